"""``python -m torchopt_ext bench``: the kernel table (ib_alpha against a same-bytes elementwise
op and against its pure-PyTorch reference) and, where available, the layer table (an implicit
layer's forward+backward+step against explicit backprop), printed as markdown."""
from __future__ import annotations

import argparse
import importlib
import json
import sys

import torch

import torchopt_ext
from torchopt_ext.bench import meta


def add_parser(sub):
    p = sub.add_parser(
        "bench",
        help="kernel and layer microbenchmarks, printed as side-by-side ratios",
        description="Times the compiled kernels against same-bytes elementwise ops and their pure-PyTorch "
        "references, and implicit-backprop layers against explicit backprop, interleaved in one run so "
        "that the ratios hold on a noisy machine. Prints markdown tables. On Linux, running with "
        "THP_MEM_ALLOC_ENABLE=1 in the environment (PyTorch's CPU allocator then uses transparent huge "
        "pages) steadies the large layer cells, whose steps allocate tens of MB each.",
    )
    p.add_argument("--what", choices=["kernels", "layers", "all"], default="all",
                   help="which table to produce (default: all)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--rows", type=int, default=4096, help="kernel table: rows of pre/grad_out (default 4096)")
    p.add_argument("--cols", type=int, default=1024, help="kernel table: neurons m (default 1024)")
    p.add_argument("--sizes", default="100,300,1000,3000",
                   help="layer table: comma-separated n = m sizes (default 100,300,1000,3000)")
    p.add_argument("--batch", type=int, default=256, help="layer table: batch size (default 256)")
    p.add_argument("--quick", action="store_true", help="small sizes and few rounds, for a smoke run")
    p.add_argument("--no-reference", action="store_true", help="skip the (slow) pure-PyTorch reference column")
    p.add_argument("--json", metavar="PATH",
                   help="also write every measurement, with the date, hardware, load and command, to this JSON "
                   "file (benchmarks/render.py renders benchmarks/{cpu,gpu}/{kernels,layers}.json into pages)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench: --device cuda asked for, but torch sees no CUDA device", file=sys.stderr)
        return 2
    if not torchopt_ext.extension_available():
        print("bench: warning: the compiled extension is not built; timing the reference fallback", file=sys.stderr)
    # the load is read before the measurements, which raise it
    results = {"meta": meta.collect(args.device), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "device": args.device}
    if args.what in ("kernels", "all"):
        from torchopt_ext.bench import kernels

        rows, cols, rounds = (512, 256, 3) if args.quick else (args.rows, args.cols, 7)
        table = kernels.run(rows=rows, m=cols, device=args.device, rounds=rounds,
                            with_reference=not args.no_reference)
        print(f"## ib_alpha kernel, float32, {rows} x {cols}, {args.device}, {torch.get_num_threads()} threads\n")
        print(kernels.format_table(table) + "\n")
        results["kernels"] = table
    if args.what in ("layers", "all"):
        try:
            layers = importlib.import_module("torchopt_ext.bench.layers")
        except ImportError:
            layers = None
        if layers is None:
            print("bench: the layer benchmark is not available in this build", file=sys.stderr)
        else:
            sizes = (100, 300) if args.quick else tuple(int(s) for s in args.sizes.split(","))
            table = layers.run(sizes=sizes, batch=args.batch, device=args.device, quick=args.quick)
            print(f"## implicit vs explicit backprop, batch {args.batch}, {args.device}\n")
            print(layers.format_table(table) + "\n")
            results["layers"] = table
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
        print(f"wrote {args.json}")
    return 0
