"""The tabular paper's Table 1 (--arch 1, 2, 4) and Table 2 (--arch 1,2,4) protocol, with wall times.

    python benchmarks/tables_protocol.py OUT                         # full: 10 restarts x 50 outer epochs
    python benchmarks/tables_protocol.py OUT --jobs 2                # the same commands, two at a time
    python benchmarks/tables_protocol.py OUT --restarts 10 --outer-epochs 5 --checkouts OLD .

Each command is ``python -m torchopt_ext distill --arch A --restarts R --outer-epochs E --eval-models 5
--no-progress --out OUT/<checkout>/<table>``, run from the repository root of each checkout; with
several checkouts the commands are interleaved (arch 1 in each, then arch 2 in each, ...), so that a
change of load on a shared machine hits all of them alike. Prints wall, distillation and evaluation
seconds of every command (the last two as the driver reports them, wall), its CPU seconds (user +
system, what the work costs however busy the machine is), the totals, the elapsed time and the load
average. Each driver computes on one thread, so ``--jobs 2`` runs the protocol in about half the time on
two idle cores; the numbers are the same (each command's seeds are its own).
"""
import argparse
import concurrent.futures
import os
import re
import subprocess
import sys
import tempfile
import time

TABLES = [("table1_arch1", "1"), ("table1_arch2", "2"), ("table1_arch4", "4"), ("table2", "1,2,4")]


def run(checkout, arch, restarts, outer, out):
    """Wall, CPU (this child's own user + system seconds, from wait4: exact also when commands run side by
    side), and the driver's distillation and evaluation seconds of one command."""
    cmd = [sys.executable, "-m", "torchopt_ext", "distill", "--arch", arch, "--restarts", str(restarts),
           "--outer-epochs", str(outer), "--eval-models", "5", "--no-progress", "--out", out]
    with tempfile.TemporaryFile("w+") as log, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=checkout, stdout=log, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0), err.seek(0)
        stdout, stderr = log.read(), err.read()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} (in {checkout}) failed:\n{stderr}")
    distill = re.search(r"distilled \d+ restart\(s\) in ([\d.]+) s", stdout)
    evaluation = re.search(r"evaluation ([\d.]+) s", stdout)
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime,
            "distill": float(distill.group(1)) if distill else None,
            "evaluation": float(evaluation.group(1)) if evaluation else None}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="directory for the runs' --out directories (must not exist)")
    ap.add_argument("--restarts", type=int, default=10)
    ap.add_argument("--outer-epochs", type=int, default=50)
    ap.add_argument("--jobs", type=int, default=1,
                    help="commands run side by side (each driver uses one thread; 2 fills a 2-core machine); "
                    "the longest tables start first")
    ap.add_argument("--checkouts", nargs="+", default=[os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")],
                    help="repository roots to run from (default: this one)")
    args = ap.parse_args()
    os.makedirs(args.out)
    roots = [os.path.abspath(c) for c in args.checkouts]
    labels = [f"{i}_{os.path.basename(r.rstrip('/')) or 'root'}" for i, r in enumerate(roots)]
    print(f"load average at start {os.getloadavg()[0]:.2f}; {args.restarts} restarts x {args.outer_epochs} outer "
          "epochs", flush=True)
    totals = {label: 0.0 for label in labels}
    cpus = {label: 0.0 for label in labels}
    for label in labels:
        os.makedirs(os.path.join(args.out, label))
    jobs = [(name, arch, root, label) for name, arch in TABLES for root, label in zip(roots, labels)]
    if args.jobs > 1:   # longest first (Table 2, then arch 4, 2, 1), so that the lanes end together
        jobs.sort(key=lambda j: [t for t, _ in TABLES].index(j[0]), reverse=True)
    t_start = time.perf_counter()

    def one(job):
        name, arch, root, label = job
        return job, run(root, arch, args.restarts, args.outer_epochs, os.path.join(os.path.abspath(args.out), label, name))
    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        for (name, arch, root, label), r in pool.map(one, jobs):
            totals[label] += r["wall"]
            cpus[label] += r["cpu"]
            print(f"{name:13s} --arch {arch:6s} {root}: wall {r['wall']:.1f} s (distillation {r['distill']} s, "
                  f"evaluation {r['evaluation']} s), CPU {r['cpu']:.1f} s; load {os.getloadavg()[0]:.2f}", flush=True)
    elapsed = time.perf_counter() - t_start
    for root, label in zip(roots, labels):
        print(f"Table 1 + Table 2, {root}: {totals[label]:.1f} s wall ({totals[label] / 60:.1f} min), "
              f"{cpus[label]:.1f} s CPU")
    if len(roots) > 1:
        print("ratios to the last checkout's, wall and CPU: " + ", ".join(
            f"{root} {totals[label] / totals[labels[-1]]:.2f} and {cpus[label] / cpus[labels[-1]]:.2f}"
            for root, label in zip(roots, labels)))
    print(f"elapsed {elapsed:.1f} s ({elapsed / 60:.1f} min) with --jobs {args.jobs}; load average at the end "
          f"{os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
