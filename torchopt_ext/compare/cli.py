"""``python -m torchopt_ext compare``: EB vs IB (or the adaptive-lr comparison) over an lr grid."""
from __future__ import annotations

import argparse
import json
import os
import sys

BUILTIN_TASKS = ("digits-mlp", "digits-autoencoder", "adding-rnn")
TASK_NAMES = BUILTIN_TASKS + ("jsb-chorales",)
ALIASES = {"jsb": "jsb-chorales"}

TASKS_HELP = """\
tasks (--tasks, comma-separated; default: the three built-in ones):
  digits-mlp          3 arctan layers + softmax on sklearn's digits (cross-entropy)
  digits-autoencoder  relu autoencoder 64-32-16-32-64 on digits (mean squared error)
  adding-rnn          the adding problem, arctan RNN with 16 units (mean squared error)
  jsb-chorales (jsb)  next-frame prediction on the Bach chorales shipped with music21 (needs
                      `pip install .[music]`): 88-key piano rolls, one frame per quarter note,
                      an arctan RNN (--hidden units, default 300, the paper's) and a linear layer
                      giving each key's logit; loss: per chorale, the Bernoulli negative
                      log-likelihood summed over the 88 keys and averaged over its frames, then
                      averaged over chorales (nats per frame); batch 1, default 5 epochs and lr
                      grid 0.003..1; train/valid/test split 229:76:77 (the JSB set's) with
                      --split-seed; EB with gradient-norm clipping (--clip, default 8) runs too.
                      The parsed rolls are cached under --data-root (default
                      $XDG_CACHE_HOME/torchopt_ext or ~/.cache/torchopt_ext).
"""


def add_parser(sub) -> argparse.ArgumentParser:
    """Register the "compare" sub-command on ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser("compare", help="EB vs IB robustness to the learning rate on built-in data",
                       epilog=TASKS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="compare-results", help="output folder (results.md, plot, json)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per learning rate (default 3)")
    p.add_argument("--tiny", action="store_true", help="a seconds-long configuration (used by the tests)")
    p.add_argument("--optimizer", choices=("implicit", "adaptive"), default="implicit",
                   help="implicit: EB vs IB (default); adaptive: the five-probe lr comparison")
    p.add_argument("--tasks", default=",".join(BUILTIN_TASKS),
                   help="comma-separated tasks of the implicit comparison (listed below)")
    p.add_argument("--lrs", default=None,
                   help="comma-separated learning rates for every task (default: each task's grid)")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs per run (default: 10, jsb-chorales 5, --tiny 1)")
    p.add_argument("--clip", type=float, default=None,
                   help="gradient-norm threshold of the EB-with-clipping runs, added to every task "
                        "(default: jsb-chorales only, at 8; 0 turns them off)")
    p.add_argument("--hidden", type=int, default=None, help="jsb-chorales: RNN units (default 300)")
    p.add_argument("--data-root", default=None, help="jsb-chorales: folder of the cached rolls")
    p.add_argument("--split-seed", type=int, default=0, help="jsb-chorales: seed of the split (default 0)")
    p.set_defaults(func=main)
    return p


def _config(tiny: bool) -> dict:
    from torchopt_ext.compare.experiment import LR_GRID

    if tiny:
        return {"lrs": (0.01, 1.0, 50.0), "epochs": 1, "limit": 200, "n_seq": 100, "steps": 5}
    return {"lrs": LR_GRID, "epochs": 10, "limit": None, "n_seq": 1000, "steps": 10}


def _parse_tasks(text: str):
    names = [ALIASES.get(t.strip(), t.strip()) for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in TASK_NAMES]
    if bad or not names:
        raise ValueError(f"unknown task(s) {', '.join(bad) or '(none given)'}; "
                         f"choose from {', '.join(TASK_NAMES)} (or jsb)")
    return list(dict.fromkeys(names))


def _parse_lrs(text):
    if text is None:
        return None
    lrs = tuple(float(v) for v in text.split(",") if v.strip())
    if not lrs or not all(lr > 0 for lr in lrs):
        raise ValueError(f"--lrs must be positive numbers, got {text!r}")
    return lrs


def build_tasks(names, tiny: bool, clip=None, hidden=None, data_root=None, split_seed=0):
    """(task, lrs, epochs) for each name; raises compare.music.Music21Missing for jsb-chorales
    without music21."""
    from torchopt_ext.compare import tasks
    from torchopt_ext.compare.experiment import JSB_LR_GRID

    cfg = _config(tiny)
    out = []
    for name in names:
        lrs, epochs = cfg["lrs"], cfg["epochs"]
        if name == "digits-mlp":
            task = tasks.digits_classifier(cfg["limit"])
        elif name == "digits-autoencoder":
            task = tasks.digits_autoencoder(cfg["limit"])
        elif name == "adding-rnn":
            task = tasks.adding_problem(cfg["n_seq"], cfg["steps"])
        else:
            jsb_clip = 8.0 if clip is None else (clip or None)
            if tiny:
                task = tasks.jsb_chorales(hidden=hidden or 8, limit=3, data_root=data_root,
                                          clip=jsb_clip, split_seed=split_seed, progress=False)
            else:
                task = tasks.jsb_chorales(hidden=hidden or 300, data_root=data_root, clip=jsb_clip,
                                          split_seed=split_seed)
                lrs, epochs = JSB_LR_GRID, 5
        if name != "jsb-chorales" and clip:
            task.clip = clip
        out.append((task, lrs, epochs))
    return out


def run_implicit(out: str, seeds: int, tiny: bool, problems=None, lrs=None, epochs=None) -> dict:
    """Run the EB-vs-IB grid, write results.md, results.json and loss_vs_lr.png under ``out``.

    ``problems``: (task, lrs, epochs) triples (default: the three built-in tasks); ``lrs`` and
    ``epochs``, when given, replace every task's own."""
    import torch
    from tqdm import tqdm

    from torchopt_ext.compare import report
    from torchopt_ext.compare.experiment import divergence_lr, summarise, task_methods, train

    if problems is None:
        problems = build_tasks(BUILTIN_TASKS, tiny)
    problems = [(t, lrs or t_lrs, epochs or t_epochs) for t, t_lrs, t_epochs in problems]
    torch.set_num_threads(1)  # small layers: threads cost more than they give
    jobs = [(t, m, lr, s, ep) for t, t_lrs, ep in problems for m in task_methods(t)
            for lr in t_lrs for s in range(seeds)]
    runs = []
    for task, method, lr, seed, ep in tqdm(jobs, desc="compare", unit="run"):
        r = train(task, method, lr, seed, ep)
        runs.append({"task": task.name, "method": method, "lr": lr, "seed": seed, **r})
    all_lrs = sorted({lr for _, t_lrs, _ in problems for lr in t_lrs})
    summary = summarise(runs, all_lrs)
    divergence = {(t.name, m): divergence_lr(runs, t.name, m) for t, _, _ in problems for m in task_methods(t)}
    report.ensure_dir(out)
    config = {"seeds": seeds, "tiny": tiny}
    tasks_config = {t.name: {"epochs": ep, "batch": t.batch, "lrs": list(t_lrs), "clip": t.clip, **t.info}
                    for t, t_lrs, ep in problems}
    report.write_markdown(os.path.join(out, "results.md"), summary, divergence, config, tasks_config)
    report.write_plot(os.path.join(out, "loss_vs_lr.png"), summary, tasks_config)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"config": {**config, "tasks": tasks_config}, "runs": runs, "summary": summary,
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
    try:
        names = _parse_tasks(args.tasks)
        lrs = _parse_lrs(args.lrs)
        if args.epochs is not None and args.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
        if args.clip is not None and args.clip < 0:
            raise ValueError(f"--clip must be >= 0, got {args.clip}")
        if args.hidden is not None and args.hidden < 1:
            raise ValueError(f"--hidden must be >= 1, got {args.hidden}")
    except ValueError as exc:
        print(f"compare: error: {exc}", file=sys.stderr)
        return 2
    from torchopt_ext.compare.music import Music21Missing

    try:
        problems = build_tasks(names, args.tiny, clip=args.clip, hidden=args.hidden,
                               data_root=args.data_root, split_seed=args.split_seed)
    except Music21Missing as exc:
        print(f"compare: error: {exc}", file=sys.stderr)
        return 2
    run_implicit(args.out, args.seeds, args.tiny, problems, lrs=lrs, epochs=args.epochs)
    print(f"compare: wrote {os.path.join(args.out, 'results.md')} and loss_vs_lr.png")
    return 0
