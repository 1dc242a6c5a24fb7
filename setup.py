"""Builds torchopt_ext and its compiled extension torchopt_ext._C.

Install with ``pip install --no-build-isolation .``: the extension must be compiled against the
torch that is already installed (an isolated build would download a different, CUDA-enabled torch
of several GB and build against that one).
"""
import glob
import os
import platform
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - only hit by a misconfigured build
    raise SystemExit(
        "torchopt_ext needs torch installed before it is built: run `pip install torch` first, "
        "then `pip install --no-build-isolation .`"
    ) from exc

HERE = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _libmvec():
    """(macros, link flags) for glibc's vector math library: x86-64 Linux with glibc >= 2.35 has
    AVX2 cbrt/acos/cos, which let the arctan solver's CPU loop vectorise. Elsewhere the loop calls
    the scalar functions (same results to a few ulp before the solver's polishing steps)."""
    if os.environ.get("TORCHOPT_EXT_NO_LIBMVEC") == "1":
        return [], []
    if not (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")):
        return [], []
    libc, version = platform.libc_ver()
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return [], []
    if libc != "glibc" or (major, minor) < (2, 35):
        return [], []
    return [("TOX_HAVE_LIBMVEC", "1")], ["-lmvec"]


def _extension():
    with_cuda = torch.cuda.is_available() or os.environ.get("TORCHOPT_EXT_FORCE_CUDA") == "1"
    with_cuda = with_cuda and torch.version.cuda is not None and CUDA_HOME is not None
    if os.environ.get("TORCHOPT_EXT_NO_CUDA") == "1":
        with_cuda = False
    # no-trapping-math and no-math-errno let GCC if-convert and vectorise the solvers; results
    # are unchanged (we neither trap on FP exceptions nor read errno)
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    macros, libs = _libmvec()
    include_dirs = [os.path.join(HERE, "csrc", "include")]
    if not with_cuda:
        return CppExtension(
            "torchopt_ext._C",
            sources,
            include_dirs=include_dirs,
            define_macros=macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"] + libs,
        )
    # sm_90 (Hopper) is always built unless the user names the architectures.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    # no --use_fast_math: the solvers rely on IEEE inf/NaN
    return CUDAExtension(
        "torchopt_ext._C",
        sources + _sources("csrc/cuda/*.cu"),
        include_dirs=include_dirs,
        define_macros=[("TORCHOPT_EXT_WITH_CUDA", "1")] + macros,
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
        extra_link_args=["-fopenmp"] + libs,
    )


# metadata, dependencies and the version live in pyproject.toml; setup.py only adds the extension
setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
