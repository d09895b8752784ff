"""benchmarks/gpu.py runs every code path on the CPU at a tiny size (the GPU run is the lead's)."""

import importlib.util
import json
from pathlib import Path

import pytest

GPU_SCRIPT = Path(__file__).parent.parent / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def gpu_benchmark():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", GPU_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_benchmark_writes_encoding_and_attack_results_on_cpu(gpu_benchmark, tmp_path, capsys):
    out = tmp_path / "gpu.json"
    tiny = "--width 256 --image-size 64 --patch-size 8 --bn-batch 32".split()
    gpu_benchmark.main(
        ["--device", "cpu", "--sizes", "48,1000000000", "--cpu-max", "48", "--encode-n", "32", "--cpu-encode-n", "32"]
        + ["--out", str(out), "--scratch", str(tmp_path), *tiny]
    )
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["machine"]["cpu"]
    assert {(row["device"], row["precision"]) for row in result["encode"]} >= {("cpu", "fp32")}
    assert all(row["images_per_s"] > 0 for row in result["encode"])
    [attack] = result["attack"]  # the CPU is the device: one run per N
    assert attack["n"] == 48 and attack["reid_accuracy"] >= 0.6  # chance is 1/48
    assert any("N=1000000000" in note for note in result["skipped"])  # its release cannot fit
    printed = capsys.readouterr().out
    assert "| 48 | cpu |" in printed and "GPU: none" in printed
