"""The switches and counters of the compiled kernels' fast paths, in one place.

Every fast path is held to its reference by the tests, so none of these changes a result beyond
the tolerances stated there; they exist to rule a path out while debugging and to tell which one
ran. ``describe()`` gathers them all (paste it into a bug report).

CPU ``ib_alpha`` kernel (csrc/cpu/ib_alpha_cpu.cpp)
    Instruction set. The row loops are compiled three times, for baseline x86-64, AVX2+FMA and
    AVX-512 (F, VL, DQ, BW), and each call runs the best one this CPU and build have, up to a cap.
    ``cpu_isa()`` names the one in use, ``cpu_isas()`` those available; ``set_cpu_isa(name)``
    caps it ("auto", "avx512", "avx2", "baseline"; "default" is ATen's name for "baseline").
    The environment variable ``TORCHOPT_EXT_CPU_CAPABILITY`` sets the cap for a whole process
    (the same names, read at the first call; as ATen's ``ATEN_CPU_CAPABILITY`` does for ATen's
    kernels), and ``set_cpu_isa`` overrides it; with any other value the op raises an error that
    names the variable and the accepted values. Results may differ in the last bits between
    instruction sets where glibc's vector cbrt/acos/cos replace the scalar ones (arctan).

    float32 fast paths. float32 hardtanh, smoothstep and arctan are solved in float32 with a
    certificate of their own rounding (csrc/include/torchopt_ext/ib_alpha_fast32.h): a first pass
    takes the common case, a second the general form (smoothstep; arctan where the vector math is
    there), and the double solver the elements neither is certain of. ``set_fast_float32(False)``
    sends float32 input to the double solver instead. ``fast_float32_activations()`` lists the
    kinds that take a fast path now; ``fast_float32_counts()`` counts the elements handed on,
    from the first pass to the second and from the fast paths to the double solver.

The other kernels have no switch: CUDA's ``ib_alpha`` runs one loop per kind and dtype, and the
CPU's ``probe_move_`` picks its AVX2 clone at load time (GCC's target_clones). Build-time
switches are environment variables of setup.py: ``TORCHOPT_EXT_NO_LIBMVEC=1`` builds without
glibc's vector math, ``TORCHOPT_EXT_NO_CUDA=1`` without CUDA, ``TORCHOPT_EXT_FORCE_CUDA=1`` with
CUDA where no device is visible.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Dict, Iterator, List, Optional

from torchopt_ext._extension import _C, cuda_available

CPU_CAPABILITY_VAR = "TORCHOPT_EXT_CPU_CAPABILITY"


def _ext():
    if _C is None:
        raise RuntimeError("torchopt_ext.debug: the compiled extension torchopt_ext._C is not loaded, so no "
                           "kernel runs; every op uses its pure-PyTorch reference")
    return _C


def cpu_isa() -> str:
    """The instruction set the CPU ``ib_alpha`` row loops run in now: "baseline", "avx2" or "avx512"."""
    return _ext().cpu_isa()


def cpu_isas() -> List[str]:
    """The instruction sets this CPU and build can run the row loops in, lowest first."""
    return list(_ext().cpu_isas())


def set_cpu_isa(name: str) -> str:
    """Caps the row loops' instruction set at ``name`` ("auto" lifts the cap); returns the one in use."""
    return _ext().set_cpu_isa(name)


def set_fast_float32(enabled: bool) -> bool:
    """Switches the float32 fast paths on (the default) or off; returns the previous setting."""
    return bool(_ext().set_cpu_fast_float32(enabled))


def fast_float32_activations() -> List[str]:
    """The activations whose float32 input takes a fast path now (none while switched off)."""
    return list(_ext().cpu_fast_float32_activations())


def fast_float32_counts(reset: bool = False) -> Dict[str, int]:
    """Elements the float32 fast paths handed on since the last reset, summed over calls:
    ``second_pass`` from the first pass to the second, ``redone`` to the double solver."""
    ext = _ext()
    return {"second_pass": int(ext.cpu_fast_float32_second_pass(reset)),
            "redone": int(ext.cpu_fast_float32_redone(reset))}


@contextlib.contextmanager
def kernel_settings(cpu_isa: Optional[str] = None, fast_float32: Optional[bool] = None) -> Iterator[None]:
    """Runs the block with the row loops capped at ``cpu_isa`` and/or the float32 fast paths on or
    off, and restores both afterwards; None leaves a setting as it is."""
    ext = _ext()
    isa_before = ext.cpu_isa() if cpu_isa is not None else None
    fast_before = ext.set_cpu_fast_float32(fast_float32) if fast_float32 is not None else None
    try:
        if cpu_isa is not None:
            ext.set_cpu_isa(cpu_isa)
        yield
    finally:
        if isa_before is not None:
            ext.set_cpu_isa(isa_before)
        if fast_before is not None:
            ext.set_cpu_fast_float32(fast_before)


def describe() -> Dict[str, Any]:
    """Everything above as one dict: whether the extension loaded, the instruction set in use and
    those available, the capability variable's value, the float32 fast paths and their counts."""
    info: Dict[str, Any] = {"extension": _C is not None, "cuda": cuda_available(),
                            CPU_CAPABILITY_VAR: os.environ.get(CPU_CAPABILITY_VAR)}
    if _C is not None:
        info["cpu_isas"] = cpu_isas()
        try:
            info.update(cpu_isa=cpu_isa(), fast_float32_activations=fast_float32_activations())
        except RuntimeError as exc:  # a TORCHOPT_EXT_CPU_CAPABILITY the kernel refuses: report it
            info["error"] = str(exc).splitlines()[0]
        info["fast_float32_counts"] = fast_float32_counts()
    return info


__all__ = ["CPU_CAPABILITY_VAR", "cpu_isa", "cpu_isas", "set_cpu_isa", "set_fast_float32",
           "fast_float32_activations", "fast_float32_counts", "kernel_settings", "describe"]
