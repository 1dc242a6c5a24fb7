"""``python -m torchopt_ext compare``: EB vs IB (or the adaptive-lr comparison) over an lr grid."""
from __future__ import annotations

import argparse
import json
import os
import sys


def add_parser(sub) -> argparse.ArgumentParser:
    """Register the "compare" sub-command on ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser("compare", help="EB vs IB robustness to the learning rate on built-in data")
    p.add_argument("--out", default="compare-results", help="output folder (results.md, plot, json)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per learning rate (default 3)")
    p.add_argument("--tiny", action="store_true", help="a seconds-long configuration (used by the tests)")
    p.add_argument("--optimizer", choices=("implicit", "adaptive"), default="implicit",
                   help="implicit: EB vs IB (default); adaptive: the five-probe lr comparison")
    p.set_defaults(func=main)
    return p


def _config(tiny: bool) -> dict:
    from torchopt_ext.compare.experiment import LR_GRID

    if tiny:
        return {"lrs": (0.01, 1.0, 50.0), "epochs": 1, "limit": 200, "n_seq": 100, "steps": 5}
    return {"lrs": LR_GRID, "epochs": 10, "limit": None, "n_seq": 1000, "steps": 10}


def run_implicit(out: str, seeds: int, tiny: bool) -> dict:
    """Run the EB-vs-IB grid, write results.md, results.json and loss_vs_lr.png under ``out``."""
    import torch
    from tqdm import tqdm

    from torchopt_ext.compare import report, tasks
    from torchopt_ext.compare.experiment import METHODS, divergence_lr, summarise, train

    cfg = _config(tiny)
    torch.set_num_threads(1)  # small layers: threads cost more than they give
    problems = [tasks.digits_classifier(cfg["limit"]), tasks.digits_autoencoder(cfg["limit"]),
                tasks.adding_problem(cfg["n_seq"], cfg["steps"])]
    jobs = [(t, m, lr, s) for t in problems for m in METHODS for lr in cfg["lrs"] for s in range(seeds)]
    runs = []
    for task, method, lr, seed in tqdm(jobs, desc="compare", unit="run"):
        r = train(task, method, lr, seed, cfg["epochs"])
        runs.append({"task": task.name, "method": method, "lr": lr, "seed": seed, **r})
    summary = summarise(runs, cfg["lrs"])
    divergence = {(t.name, m): divergence_lr(runs, t.name, m) for t in problems for m in METHODS}
    report.ensure_dir(out)
    config = {"seeds": seeds, "epochs": cfg["epochs"], "batch": 100, "tiny": tiny}
    report.write_markdown(os.path.join(out, "results.md"), summary, divergence, config)
    report.write_plot(os.path.join(out, "loss_vs_lr.png"), summary)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"config": config, "runs": runs, "summary": summary,
                   "divergence_lr": {f"{t}/{m}": v for (t, m), v in divergence.items()}},
                  f, indent=1, default=str)
    return {"summary": summary, "divergence": divergence}


def main(args) -> int:
    """Entry point of the sub-command; returns the exit status."""
    if args.seeds < 1:
        print(f"compare: --seeds must be >= 1, got {args.seeds}", file=sys.stderr)
        return 2
    if args.optimizer == "adaptive":
        try:
            from torchopt_ext.compare import adaptive
        except ImportError as exc:
            print("compare: --optimizer adaptive needs torchopt_ext.compare.adaptive (the five-probe "
                  f"learning-rate comparison), which is not installed in this build: {exc}", file=sys.stderr)
            return 2
        adaptive.run(out_dir=args.out, seeds=args.seeds, tiny=args.tiny)
        return 0
    run_implicit(args.out, args.seeds, args.tiny)
    print(f"compare: wrote {os.path.join(args.out, 'results.md')} and loss_vs_lr.png")
    return 0
