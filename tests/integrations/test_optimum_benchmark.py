"""optimum-benchmark runs the shipped recipes: FP32 and StableQuant's MinMax baseline on INT8 kernels, through
`quant_method: stablequant` in its PyTorch backend (`StableQuantPyTorchBackend`), on a tiny setting."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes" / "optimum-benchmark"
MODEL = ROOT / "sq_plugin" / "checkpoints" / "wav2vec2-ref"


def run_benchmark(name: str, cwd: Path, *overrides: str) -> dict:
    exe = shutil.which("optimum-benchmark") or str(Path(sys.executable).parent / "optimum-benchmark")
    if not Path(exe).exists():
        pytest.fail("optimum-benchmark is missing: the dev extra installs it (pip install -e '.[dev]')")
    proc = subprocess.run([exe, "--config-dir", str(RECIPES), "--config-name", name, f"backend.model={MODEL}",
                           "scenario.iterations=2", "scenario.warmup_runs=1",
                           "scenario.input_shapes.sequence_length=32000", *overrides],
                          capture_output=True, text=True, timeout=1200, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads((cwd / "benchmark_report.json").read_text())


def test_the_shipped_recipes_benchmark_fp32_and_int8(tmp_path):
    (tmp_path / "fp").mkdir()
    (tmp_path / "int8").mkdir()
    fp = run_benchmark("wav2vec2-ref-fp32", tmp_path / "fp")
    int8 = run_benchmark("wav2vec2-ref-max", tmp_path / "int8", "backend.quantization_config.calibration.size=1")
    for report in (fp, int8):
        assert report["forward"]["latency"]["count"] == 2 and report["forward"]["latency"]["mean"] > 0
        assert report["forward"]["memory"]["max_ram"] > 0
    config = json.loads((tmp_path / "int8" / "benchmark_config.json").read_text())
    assert config["backend"]["_target_"].endswith("StableQuantPyTorchBackend")
    assert config["backend"]["quantization_config"]["quant_method"] == "stablequant"
    assert "prefill" not in int8 and "decode" not in int8  # timed by its forward, not Whisper's generate
