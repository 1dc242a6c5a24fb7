"""Time and peak memory of one DD outer iteration: naive create_graph unroll vs the reverse loop (± checkpoints).

Digits 1x8x8, a ConvNet (conv3x3 -> GroupNorm -> relu -> avgpool2, depth 2, width 128), ipc 10 in one
synthetic batch, n inner steps, a real batch of 256. Each configuration runs in its own process because
ru_maxrss is a process-lifetime peak; the figure reported is that peak minus the resident size just
before the first hypergradient (data, net and torch already loaded).

    python benchmarks/unroll_memory.py [--steps 10] [--width 128] [--repeats 3] [--threads 1]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..")]   # this checkout and its tests.helpers


def _rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(kind, K, steps, width, repeats, threads):
    """One configuration in this process: median seconds per hypergradient and peak RSS growth (MiB)."""
    import torch
    from tests.helpers.condense_fixtures import ConvNet, digits
    from torchopt_ext.condense import unroll as U

    torch.set_num_threads(threads)
    data = digits()
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = ConvNet(data.shape, data.n_classes, width=width, depth=2)
    ipc, C = 10, data.n_classes
    idx = torch.cat([torch.nonzero(data.y_train == c).flatten()[:ipc] for c in range(C)])
    x_syn = data.x_train[idx].unsqueeze(0)
    y_syn = torch.nn.functional.one_hot(data.y_train[idx], C).to(x_syn.dtype).unsqueeze(0)
    lrs = torch.full((steps,), 0.01)
    real = torch.randperm(data.x_train.shape[0], generator=g)[:256]
    outer = U.cross_entropy_outer(net, data.x_train[real], data.y_train[real])
    params0 = {k: p.detach().clone() for k, p in net.named_parameters()}
    base = _rss_kib()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        if kind == "naive":
            h = U.naive_unroll_hypergrad(net, params0, x_syn, y_syn, lrs, outer)
        else:
            h = U.unroll_hypergrad(net, params0, x_syn, y_syn, lrs, outer, checkpoint_every=K)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times.sort()
    return {"kind": kind, "K": K, "seconds": times[len(times) // 2], "peak_mib": (peak - base) / 1024,
            "state_mib": h.stats.get("peak_state_bytes", 0) / 2 ** 20, "loss": h.loss}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--one", help=argparse.SUPPRESS)    # kind:K, run in a child process
    a = ap.parse_args()
    if a.one:
        kind, K = a.one.split(":")
        print(json.dumps(measure(kind, int(K) or None, a.steps, a.width, a.repeats, a.threads)))
        return
    root = int(round(a.steps ** 0.5))
    configs = [("naive", 0), ("reverse", 0), ("reverse", 2)] + ([("reverse", root)] if root not in (0, 2) else [])
    rows = []
    for kind, K in configs:
        out = subprocess.run([sys.executable, __file__, "--one", f"{kind}:{K}", "--steps", str(a.steps),
                              "--width", str(a.width), "--repeats", str(a.repeats), "--threads", str(a.threads)],
                             check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"digits 1x8x8, ConvNet width {a.width} depth 2, ipc 10 (one batch of 100), n = {a.steps}, "
          f"real batch 256, float32, {a.threads} thread(s)")
    print(f"{'method':<22}{'s / outer iter':>16}{'peak RSS growth MiB':>22}{'theta copies MiB':>18}")
    for r in rows:
        name = "naive (create_graph)" if r["kind"] == "naive" else \
            ("reverse loop" if r["K"] is None else f"reverse, K = {r['K']}")
        print(f"{name:<22}{r['seconds']:>16.3f}{r['peak_mib']:>22.1f}{r['state_mib']:>18.2f}")
    losses = {round(r["loss"], 6) for r in rows}
    print(f"outer loss L (same in every row): {sorted(losses)}")


if __name__ == "__main__":
    main()
