"""Kernel microbenchmark: ib_alpha per activation against a same-bytes elementwise op
(torch.add(pre, grad_out): reads the same two tensors, writes one), against a plain device copy
(the bandwidth ceiling) and against the pure-PyTorch reference, measured side by side."""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from torchopt_ext import activations
from torchopt_ext.bench.timing import interleaved_median
from torchopt_ext.ops import ib_alpha, ib_alpha_reference


def run(rows: int = 4096, m: int = 1024, dtype=torch.float32, device: str = "cpu",
        names: Sequence[str] = ("relu", "hardtanh", "smoothstep", "arctan", "identity"),
        rounds: int = 9, with_reference: bool = True) -> List[Dict]:
    g = torch.Generator(device="cpu").manual_seed(0)
    pre = (torch.randn(rows, m, generator=g) * 2).to(device, dtype)
    grad = (torch.randn(rows, m, generator=g) * 1e-2).to(device, dtype)
    zsq = (torch.rand(rows, generator=g) * 100 + 1).to(device, dtype)
    dst = torch.empty_like(pre)
    elt = pre.element_size()
    # the fewest bytes each must move: ib_alpha reads pre, grad_out and z_sqnorm and writes alpha;
    # the copy reads one tensor and writes one
    kernel_bytes = (3 * rows * m + rows) * elt
    copy_bytes = 2 * rows * m * elt
    out = []
    for name in names:
        act = activations.get(name)
        fns = {
            "add": lambda: torch.add(pre, grad),
            "copy": lambda: dst.copy_(pre),
            "kernel": lambda: ib_alpha(pre, grad, zsq, 0.1, 1e-4, act),
        }
        if with_reference:
            fns["reference"] = lambda: ib_alpha_reference(pre, grad, zsq, 0.1, 1e-4, act)
        t = interleaved_median(fns, rounds=rounds, device=device, warmup=1)
        row = {
            "activation": name,
            "shape": [rows, m],
            "dtype": str(dtype).replace("torch.", ""),
            "device": device,
            "threads": torch.get_num_threads(),
            "flops": act.flops,
            "flops_float32": act.flops_float32,
            "add_ms": 1e3 * t["add"],
            "kernel_ms": 1e3 * t["kernel"],
            "kernel_over_add": t["kernel"] / t["add"],
            "kernel_gbps": kernel_bytes / t["kernel"] / 1e9,
            "copy_gbps": copy_bytes / t["copy"] / 1e9,
        }
        row["kernel_over_copy_bandwidth"] = row["kernel_gbps"] / row["copy_gbps"]
        if with_reference:
            row["reference_ms"] = 1e3 * t["reference"]
            row["reference_over_kernel"] = t["reference"] / t["kernel"]
        out.append(row)
    return out


def format_table(rows: List[Dict]) -> str:
    head = ("| activation | flops/solve (f64; f32 path) | add (ms) | ib_alpha (ms) | ib_alpha / add | ib_alpha GB/s | "
            "copy GB/s | share of copy bandwidth | reference (ms) | reference / ib_alpha |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        ref = f"{r['reference_ms']:.2f} | {r['reference_over_kernel']:.1f}x" if "reference_ms" in r else "- | -"
        f32 = r.get("flops_float32")
        flops = f"{r['flops']}; {f32}" if f32 is not None else f"{r['flops']}"
        lines.append(
            f"| {r['activation']} | {flops} | {r['add_ms']:.2f} | {r['kernel_ms']:.2f} | "
            f"{r['kernel_over_add']:.2f}x | {r['kernel_gbps']:.0f} | {r['copy_gbps']:.0f} | "
            f"{100 * r['kernel_over_copy_bandwidth']:.0f}% | {ref} |"
        )
    return "\n".join(lines)
