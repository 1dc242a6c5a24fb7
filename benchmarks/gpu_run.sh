#!/usr/bin/env bash
# One device call: build the CUDA extension, run the CUDA tests, the whole suite and the GPU
# benchmarks. Logs and JSON go to $OUT (or ./gpu_out when run by hand); copy kernels.json and
# layers.json to benchmarks/gpu/ and run python benchmarks/render.py to update the GPU page.
# Usage: bash benchmarks/gpu_run.sh [build|test|bench|all]...
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
steps=${*:-all}
want() { [[ " $steps " == *" $1 "* || " $steps " == *" all "* ]]; }
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
  nvcc --version | tail -2
} 2>&1 | tee "$OUT/env.txt"
if want build; then
  t0=$(date +%s)
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=16 \
    $PY -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 \
    || { tail -60 "$OUT/build.log"; exit 1; }
  echo "build: $(( $(date +%s) - t0 )) s"
  $PY -c "import torchopt_ext, torchopt_ext._C as C; print('extension', torchopt_ext.extension_available(), 'WITH_CUDA', C.WITH_CUDA)"
fi
if want test; then
  $PY -m pytest -q -p no:cacheprovider -x -rs tests/ops/test_ib_alpha_op.py tests/ops/test_probe_ops.py -k cuda 2>&1 | tee "$OUT/test_cuda.log" | tail -30
  timeout 300 $PY -m pytest -q -p no:cacheprovider -n 8 tests 2>&1 | tee "$OUT/test_all.log" | tail -25
fi
if want bench; then
  $PY -m torchopt_ext bench --what kernels --device cuda --rows 65536 --cols 1024 --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.md"
  $PY -m torchopt_ext bench --what layers --device cuda --no-reference --json "$OUT/layers.json" 2>&1 | tee "$OUT/layers.md"
fi
