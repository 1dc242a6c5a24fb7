"""A finished grid's sets trained by each evaluation optimizer on each net: does ImplicitSGD or AdaptiveLRSGD
close the cross-architecture gap?

    python benchmarks/condense_eval_optimizers.py GRID [--cells random_ipc10,dm_ipc10,mtt_ipc10]
        [--optimizers sgd,implicit,adaptive] [--nets convnet,mlp,lenet,convnet_bn] [--models 3] [--json OUT]

GRID is a `condense --out` directory: its config.json gives the data, split, widths, seed and epochs, its
cells/*.pt the sets (digest-checked). Each (cell, optimizer, net) trains --models fresh nets by the grid's
protocol (torchopt_ext/condense/evaluate.py; the same initialisations for every optimizer). Printed per optimizer: the
accuracies and the gap, ConvNet's accuracy minus the mean over the other nets. --json writes every number.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from torchopt_ext.condense.config import CondenseConfig   # noqa: E402
from torchopt_ext.condense.data import load_images   # noqa: E402
from torchopt_ext.condense.evaluate import compute_threads, evaluate_detailed   # noqa: E402
from torchopt_ext.condense.outputs import load_set, set_files   # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("grid")
    ap.add_argument("--cells", default="random_ipc10,dm_ipc10,mtt_ipc10")
    ap.add_argument("--optimizers", default="sgd,implicit,adaptive")
    ap.add_argument("--nets", default="convnet,mlp,lenet,convnet_bn")
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    with open(os.path.join(args.grid, "config.json")) as f:
        config = CondenseConfig.from_json(f.read())
    cells, optimizers, nets = args.cells.split(","), args.optimizers.split(","), args.nets.split(",")
    out = {"grid": os.path.abspath(args.grid), "models": args.models, "epochs": config.eval_epochs,
           "load_start": os.getloadavg()[0], "results": {}}
    t0 = time.perf_counter()
    with compute_threads(args.threads):
        data = load_images(config.dataset, config.data_root, config.seed, config.test_fraction, config.zca,
                           config.torch_dtype)
        for cell in cells:
            syn, _ = load_set(os.path.join(args.grid, set_files(cell)[0]), data)
            for opt in optimizers:
                row = {}
                for net in nets:
                    ev = evaluate_detailed(syn, data, net, args.models, config.eval_epochs, config.seed, opt,
                                           width=config.width, depth=config.depth)
                    row[net] = {"accuracies": ev["accuracies"], "mean": ev["mean"], "std": ev["std"]}
                others = [row[n]["mean"] for n in nets if n != "convnet"]
                gap = row["convnet"]["mean"] - sum(others) / len(others) if "convnet" in row and others else None
                out["results"].setdefault(cell, {})[opt] = {"nets": row, "gap": gap}
                print(f"{cell:12s} {opt:9s} " + "  ".join(f"{n} {100 * row[n]['mean']:.1f} ± {100 * row[n]['std']:.1f}"
                                                       for n in nets)
                      + ("" if gap is None else f"  gap {100 * gap:+.1f}"), flush=True)
    out["seconds"], out["load_end"] = time.perf_counter() - t0, os.getloadavg()[0]
    print(f"{out['seconds']:.0f} s; load average {out['load_start']:.1f} at the start, {out['load_end']:.1f} at the end")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
