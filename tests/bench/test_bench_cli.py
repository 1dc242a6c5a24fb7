"""`python -m torchopt_ext bench` runs end to end and writes its JSON (tiny sizes)."""
import json
import subprocess
import sys


def test_bench_cli_quick_kernels(tmp_path):
    out = tmp_path / "bench.json"
    res = subprocess.run(
        [sys.executable, "-m", "torchopt_ext", "bench", "--what", "kernels", "--quick", "--no-reference",
         "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "| relu |" in res.stdout and "ib_alpha / add" in res.stdout
    data = json.loads(out.read_text())
    assert {r["activation"] for r in data["kernels"]} >= {"relu", "arctan", "hardtanh", "smoothstep"}
    assert all(r["kernel_over_add"] > 0 for r in data["kernels"])


def test_bench_cli_rejects_missing_cuda():
    import torch

    if torch.cuda.is_available():
        return
    res = subprocess.run([sys.executable, "-m", "torchopt_ext", "bench", "--device", "cuda"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "no CUDA device" in res.stderr
