"""Renders the benchmark results pages from their JSON.

    python benchmarks/render.py            # rewrite the pages
    python benchmarks/render.py --check    # write nothing; exit 1 when a page differs from its JSON

Each page PAGE is the template ``templates/PAGE.tmpl`` with its ``{{source.field}}`` placeholders
filled from one current JSON per table (``SOURCES``). The tables come from the formatters the bench
commands print with, so a page shows what the command that measured it printed; the JSON's
``"meta"`` (``torchopt_ext.bench.meta``) supplies the date, hardware, load and command.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
from typing import Dict, List, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # this checkout's torchopt_ext, not another installed one

from torchopt_ext.bench import kernels, layers  # noqa: E402
from torchopt_ext.bench.meta import REQUIRED  # noqa: E402
from torchopt_ext.compare import lr_free  # noqa: E402

# placeholder prefix -> the one JSON its table is rendered from, relative to benchmarks/
SOURCES = {
    "cpu_kernels": "cpu/kernels.json",
    "cpu_layers": "cpu/layers.json",
    "gpu_kernels": "gpu/kernels.json",
    "gpu_layers": "gpu/layers.json",
    "adaptive": "lr_free/guarded/runs.json",
}
PAGES = ("README.md", "implicit-cpu.md", "implicit-gpu.md", "adaptive-lr.md")

# the kernel targets: ib_alpha / same-bytes add on the CPU, relu's share of the copy
# bandwidth on the GPU, and the speed-up over the pure-PyTorch reference
CPU_KERNEL_OVER_ADD = {"relu": 2.0, "hardtanh": 2.0, "smoothstep": 2.0, "arctan": 8.0}
GPU_RELU_COPY_SHARE = 0.70
REFERENCE_SPEEDUP = 5.0

PLACEHOLDER = re.compile(r"\{\{([a-z_]+)\.([a-z_]+)\}\}")


class RenderError(Exception):
    """A JSON or template the pages cannot be rendered from; the message names the file."""


def load(root: str, rel: str) -> dict:
    """The JSON at ``root/rel``, checked to carry every ``meta`` field a page states."""
    path = os.path.join(root, rel)
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise RenderError(f"{rel}: cannot read it as JSON ({exc})") from exc
    meta = data.get("meta")
    missing = [k for k in REQUIRED if not isinstance(meta, dict) or not meta.get(k)]
    if missing:
        raise RenderError(f"{rel}: \"meta\" lacks {', '.join(missing)} (expected an object with "
                          f"{', '.join(REQUIRED)}: what the page says about the measurement)")
    return data


def _span(vals: List[float], fmt: str, unit: str = "") -> str:
    lo, hi = min(vals), max(vals)
    return f"{lo:{fmt}}{unit}" if f"{lo:{fmt}}" == f"{hi:{fmt}}" else f"{lo:{fmt}}{unit} to {hi:{fmt}}{unit}"


def provenance(data: dict, rel: str) -> str:
    m = data["meta"]
    software = [f"torch {data['torch']}, {data['threads']} threads"] if "torch" in data else []
    software += [m["software"]] if m.get("software") else []
    lines = [f"Measured {m['date']} ([`{rel}`]({rel})):", "", f"    {m['command']}", "",
             f"- hardware: {m['hardware']}"]
    lines += [f"- software: {'; '.join(software)}"] if software else []
    lines.append(f"- load: {m['load']}")
    lines += [f"- commit: {m['commit']}"] if m.get("commit") else []
    return "\n".join(lines)


def _ratio(x: float) -> str:
    return f"{x:.2f}x" if x < 10 else f"{x:.0f}x"


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def kernel_fields(data: dict, device: str) -> Dict[str, str]:
    rows = data["kernels"]
    by = {r["activation"]: r for r in rows}
    n_rows, m = rows[0]["shape"]
    mb = n_rows * m * torch.empty((), dtype=getattr(torch, rows[0]["dtype"])).element_size() / 2 ** 20
    out = {"table": kernels.format_table(rows), "add_mb": f"{3 * mb:.0f}",
           "setup": f"{rows[0]['dtype']}, `pre` and `grad_out` {n_rows} × {m} ({mb:.0f} MB each)"}
    lines = []
    if device == "cpu":
        limits = {a: t for a, t in CPU_KERNEL_OVER_ADD.items() if a in by}
        ok = all(by[a]["kernel_over_add"] <= t for a, t in limits.items())
        groups = {}
        for a, t in limits.items():
            groups.setdefault(t, []).append(a)
        allowed = " and ".join(f"{t:g}x ({', '.join(acts)})" for t, acts in groups.items())
        got = ", ".join(f"{a} {_ratio(by[a]['kernel_over_add'])}" for a in limits)
        lines.append(f"- `ib_alpha` / `add` at most {allowed}: {_verdict(ok)} ({got}).")
        out["headline"] = (f"`ib_alpha` takes {_span([r['kernel_over_add'] for r in rows], '.2f', 'x')} the time of "
                           f"a same-bytes `add`")
    else:
        relu = by["relu"]
        share = relu["kernel_over_copy_bandwidth"]
        lines.append(f"- relu at least {GPU_RELU_COPY_SHARE:.0%} of the measured copy bandwidth: "
                     f"{_verdict(share >= GPU_RELU_COPY_SHARE)} ({share:.0%}, {relu['kernel_gbps'] / 1e3:.2f} of "
                     f"{relu['copy_gbps'] / 1e3:.2f} TB/s).")
        others = [100 * r["kernel_over_copy_bandwidth"] for a, r in by.items() if a != "relu"]
        out["headline"] = f"relu's `ib_alpha` at {share:.0%} of the copy bandwidth (others {_span(others, '.0f', '%')})"
    refs = [r["reference_over_kernel"] for r in rows if "reference_over_kernel" in r]
    if refs:
        lines.append(f"- every kernel at least {REFERENCE_SPEEDUP:g}x faster than its reference: "
                     f"{_verdict(min(refs) >= REFERENCE_SPEEDUP)} ({_span(refs, '.0f', 'x')}).")
    out["targets"] = "Targets:\n\n" + "\n".join(lines)
    return out


def layer_fields(data: dict) -> Dict[str, str]:
    rows = data["layers"]
    cells = [layers._target_cell(r) for r in rows]  # the met/MISSED the table prints, decided once there
    judged = [c for c in cells if c != "-"]
    met = sum(c.endswith(" met") for c in judged)
    ib_eb = _span([r["ib_over_eb"] for r in rows], ".2f")
    sizes = ", ".join(str(n) for n in sorted({r["n"] for r in rows}))
    return {
        "table": layers.format_table(rows),
        "setup": f"{rows[0]['dtype']}, batch {rows[0]['batch']}, n = m in {sizes}",
        "eb_ms": _span([1e3 * r["eb_s"] for r in rows], ".2f"),
        "summary": (f"IB/EB is {ib_eb} and meets its target in {met} of {len(judged)} cells; IB is "
                    f"{_span([r['naive_over_ib'] for r in rows], '.1f', 'x')} faster than the naive eager IB."),
        "headline": f"IB/EB {ib_eb}, within target in {met} of {len(judged)} cells",
    }


def adaptive_fields(data: dict) -> Dict[str, str]:
    runs = data["runs"]
    models = [m for m in lr_free.MODELS if lr_free.select(runs, m)]
    configs = [r["config"] for r in runs]
    seeds = sorted({c["seed"] for c in configs})
    lrs = sorted({c["lr"] for c in configs})
    grid = (f"{len(runs)} runs: models {', '.join(models)}; {configs[0]['epochs']} epochs of batch "
            f"{configs[0]['batch']}; seeds {', '.join(map(str, seeds))}; initial lr "
            f"{', '.join(f'{x:g}' for x in lrs)}.")
    verdicts = [lr_free.verdict(runs, m) for m in models if lr_free.select(runs, m, "adaptive")]
    passed = sum(v["passed"] for v in verdicts)
    tables = lr_free.results_markdown(runs, "", data["dead_at_init"]).lstrip("\n").rstrip("\n")
    return {"grid": grid, "tables": tables,
            "acc_floor": f"{lr_free.ACC_FLOOR:g}", "loss_ratio": f"{lr_free.LOSS_RATIO:g}",
            "headline": f"`AdaptiveLRSGD` passes all three criteria on {passed} of {len(verdicts)} models"}


def fields(root: str) -> Dict[str, Dict[str, str]]:
    """Every placeholder's text: {source: {field: text}}."""
    out = {}
    for name, rel in SOURCES.items():
        data = load(root, rel)
        if name.endswith("_kernels"):
            f = kernel_fields(data, data["device"])
        elif name.endswith("_layers"):
            f = layer_fields(data)
        else:
            if not isinstance(data.get("dead_at_init"), dict):
                raise RenderError(f"{rel}: no \"dead_at_init\" (expected {{model: [seeds whose untrained net is "
                                  f"already constant]}}, which the page states beside the dead counts)")
            f = adaptive_fields(data)
        f["provenance"] = provenance(data, rel)
        f["date"] = data["meta"]["date"]
        out[name] = f
    return out


def render_page(root: str, page: str, values: Dict[str, Dict[str, str]]) -> str:
    tmpl_rel = f"templates/{page}.tmpl"
    try:
        with open(os.path.join(root, tmpl_rel)) as fh:
            text = fh.read()
    except OSError as exc:
        raise RenderError(f"{tmpl_rel}: cannot read the template ({exc})") from exc
    values = {**values, "page": {"generated": f"<!-- Generated by benchmarks/render.py from {tmpl_rel} and the JSON "
                                              f"it names; edit those and rerun it, not this page. -->"}}

    def fill(match: re.Match) -> str:
        source, field = match.groups()
        if field not in values.get(source, {}):
            known = ", ".join(f"{s}.{k}" for s in values for k in values[s])
            raise RenderError(f"{tmpl_rel}: unknown placeholder {{{{{source}.{field}}}}}; known: {known}")
        return values[source][field]

    return PLACEHOLDER.sub(fill, text).rstrip("\n") + "\n"  # one final newline, however the template ends


def render_all(root: str = HERE) -> Dict[str, str]:
    """{page: its text} for every page, from the templates and JSON under ``root``."""
    values = fields(root)
    return {page: render_page(root, page, values) for page in PAGES}


def _first_difference(old: str, new: str) -> str:
    diff = list(difflib.unified_diff(old.splitlines(), new.splitlines(), "on disk", "from the JSON", n=0, lineterm=""))
    return "\n".join(diff[2:8])


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 when a page differs from its JSON")
    p.add_argument("--root", default=HERE, help="the benchmarks folder (default: the one holding this script)")
    args = p.parse_args(argv)
    try:
        pages = render_all(args.root)
    except RenderError as exc:
        print(f"render: error: {exc}", file=sys.stderr)
        return 2
    stale = []
    for page, text in pages.items():
        path = os.path.join(args.root, page)
        old = ""
        if os.path.exists(path):
            with open(path) as fh:
                old = fh.read()
        if old == text:
            continue
        stale.append(page)
        if args.check:
            print(f"render: {page} differs from what its JSON gives:\n{_first_difference(old, text)}", file=sys.stderr)
        else:
            with open(path, "w") as fh:
                fh.write(text)
            print(f"render: wrote {page}")
    if args.check and stale:
        print("render: run `python benchmarks/render.py` to rewrite them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
