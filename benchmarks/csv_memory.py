"""Peak memory and time of reading a CSV table: python benchmarks/csv_memory.py [--rows N] [--root REPO].

Generates a table of 20 numeric columns and a label column (250k rows: about 50 MB), runs load_split on it in a
fresh process and prints the peak RSS increase over the file size. --root measures another checkout's package."""
import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # for tests.helpers

from tests.helpers.csv_tables import _ROOT, peak_memory, write_table  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=250_000)
    p.add_argument("--cols", type=int, default=20)
    p.add_argument("--root", default=_ROOT, help="checkout whose torchopt_ext is measured")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "table.csv")
        size = write_table(path, args.rows, args.cols)
        m = peak_memory(path, root=args.root)
    mb = 1 << 20
    print(f"root {args.root}")
    print(f"file {size / mb:.1f} MiB ({m['rows']} rows x {args.cols} numeric columns + label)")
    print(f"peak RSS increase {(m['peak'] - m['before']) / mb:.1f} MiB = {m['ratio']:.2f} x the file size"
          + ("" if m["reset"] else " (peak not reset after imports: an upper bound)"))
    print(f"load_split {m['seconds']:.2f} s")


if __name__ == "__main__":
    main()
