#!/bin/sh
# Reduced Table 1 protocol of the tabular paper (3 restarts x 20 outer epochs instead of 10 x 50).
# Usage: sh benchmarks/table1_reduced.sh OUTDIR   (from the repository root)
# Table 1 and Table 2 in full, with wall times: python benchmarks/tables_protocol.py OUTDIR
set -e
OUT=${1:-table1_reduced}
RESTARTS=${RESTARTS:-3}
OUTER=${OUTER:-20}
mkdir -p "$OUT"
for a in 1 2 4; do
  /usr/bin/time -f "arch $a: %e s wall" python -m torchopt_ext distill --arch $a --restarts $RESTARTS \
    --outer-epochs $OUTER --eval-models 5 --no-progress --out "$OUT/arch$a"
done
