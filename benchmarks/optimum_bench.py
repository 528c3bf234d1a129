"""Run the shipped optimum-benchmark configs (recipes/optimum-benchmark/) one after the other and tabulate them.

    python benchmarks/optimum_bench.py                      # both references: FP32, StableQuant W8A8, MinMax W8A8
    python benchmarks/optimum_bench.py --iterations 20 --threads 2

Each config runs in its own optimum-benchmark process (its `process` launcher). Writes
benchmarks/results/optimum_benchmark.{json,md}: forward latency (mean, p50, p90), max RAM, and the ratio of each
INT8 mean to the FP32 mean, all from this one run on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import atomic_write, device_name

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes" / "optimum-benchmark"
MODELS = ("wav2vec2-ref", "hubert-ref")
VARIANTS = ("fp32", "stablequant", "max")  # fp32 first: the reference of its model's ratios


def run_one(model: str, variant: str, iterations: int, warmup: int, threads: int, log: Path) -> dict:
    name = f"{model}-{variant}"
    exe = shutil.which("optimum-benchmark") or str(Path(sys.executable).parent / "optimum-benchmark")
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        cmd = [exe, "--config-dir", str(RECIPES), "--config-name", name,
               f"backend.model={ROOT / 'sq_plugin' / 'checkpoints' / model}",
               f"scenario.iterations={iterations}", f"scenario.warmup_runs={warmup}"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, env=env)
        log.write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed (exit {proc.returncode}); see {log}")
        report = json.loads((Path(tmp) / "benchmark_report.json").read_text())
    latency = report["forward"]["latency"]
    return {"config": name, "model": model, "mean_ms": latency["mean"] * 1e3, "p50_ms": latency["p50"] * 1e3,
            "p90_ms": latency["p90"] * 1e3, "count": latency["count"],
            "max_ram_mb": report["forward"]["memory"]["max_ram"], "load_s": report["load_model"]["latency"]["mean"],
            "wall_s": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logs = {(m, v): out / f"optimum_benchmark_{m}-{v}.log" for m in MODELS for v in VARIANTS}
    rows = [run_one(m, v, args.iterations, args.warmup, args.threads, logs[m, v]) for m, v in logs]
    fp = {row["model"]: row["mean_ms"] for row in rows if row["config"].endswith("-fp32")}
    for row in rows:
        row["vs_fp32"] = row["mean_ms"] / fp[row["model"]]
    command = "python benchmarks/optimum_bench.py " + " ".join(sys.argv[1:])
    payload = {"device": device_name(), "command": command.strip(), "threads": args.threads,
               "audio_seconds": 10, "batch": 1, "rows": rows}
    atomic_write(out / "optimum_benchmark.json", json.dumps(payload, indent=2) + "\n")
    lines = [f"# optimum-benchmark on the shipped CTC references ({device_name()})", "",
             f"`{payload['command']}`: 10 s of audio, batch 1, {args.threads} threads, {args.iterations} timed "
             "forwards after the warm-up; each config in its own optimum-benchmark process. INT8 rows were quantized "
             "by from_pretrained (quant_method: stablequant) and ran on oneDNN INT8 kernels.", "",
             "| config | mean ms | p50 ms | p90 ms | vs FP32 | max RAM MB | load s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['config']} | {r['mean_ms']:.1f} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['vs_fp32']:.2f}x | "
              f"{r['max_ram_mb']:.0f} | {r['load_s']:.1f} |" for r in rows]
    atomic_write(out / "optimum_benchmark.md", "\n".join(lines) + "\n")
    for log in logs.values():
        log.unlink(missing_ok=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
