"""Cost of StableQuant's search against MinMax calibration + one evaluation, and its memory.

For each calibration size, fresh processes on the same model and bits (so that each peak RSS
belongs to one job): one MinMax job, then one search per cache budget:
  minmax   PT2E MinMax calibration (prepare + calibrate + convert) and one evaluation of the
           converted model on the same calibration utterances: the cheapest PTQ a user can run;
  search   `search_ctc` (statistics, screen, clip) with the prefix cache under `--budget-mb`.
The ratio search / (minmax calibration + evaluation) is the target of issue 4 (<= 5x). The cache's
peak stays under its budget whatever the calibration size; RSS beyond that grows only with what
every evaluation needs anyway (the audio and one batch).

    python benchmarks/search_cost.py --model sq/wav2vec2-ref --sizes 100,200,300 --budgets 0,256,1024

Writes benchmarks/results/search_cost.json and search_cost.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from typing import Any

from common import RESULTS, atomic_write


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def worker(job: str, model: str, size: int, bits: int, budget_mb: float, threads: int) -> dict[str, Any]:
    """One job in this process; returns its timings and peak RSS."""
    import torch

    from sq_plugin.core.ranges import RangeRule
    from sq_plugin.families.ctc import EVAL_KWARGS, quantize_ctc_pt2e, search_ctc
    from sq_plugin.search import SearchConfig
    from sq_plugin.speech.corpus import load_split
    from sq_plugin.speech.evaluate import evaluate
    from sq_plugin.speech.models import load_model

    torch.set_num_threads(threads)
    bundle = load_model(model)
    calibration = load_split("dev", limit=size, progress=False)
    if len(calibration) < size:
        raise SystemExit(f"--sizes: the dev split has {len(calibration)} utterances, asked for {size}")
    rss_loaded = peak_rss_mb()
    if job == "minmax":
        start = time.perf_counter()
        quantized = quantize_ctc_pt2e(bundle, calibration, act_rule=RangeRule("max"), a_bits=bits, w_bits=bits,
                                      lower=False)
        calib_s = time.perf_counter() - start
        start = time.perf_counter()
        evaluate(quantized.bundle, calibration, progress=False, **EVAL_KWARGS)  # as the runner does
        return {"calib_seconds": calib_s, "eval_seconds": time.perf_counter() - start,
                "peak_rss_mb": peak_rss_mb(), "rss_after_load_mb": rss_loaded}
    start = time.perf_counter()
    result = search_ctc(bundle, calibration, SearchConfig(w_bits=bits, a_bits=bits), progress=False,
                        prefix_cache=budget_mb > 0, cache_budget_mb=budget_mb)
    return {"search_seconds": time.perf_counter() - start, "evaluations": result.evaluations,
            "flagged": result.flagged, "cache": result.cache, "peak_rss_mb": peak_rss_mb(),
            "rss_after_load_mb": rss_loaded}


def run_job(job: str, args: argparse.Namespace, size: int, budget_mb: float) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", job, "--model", args.model, "--bits", str(args.bits),
           "--threads", str(args.threads), "--sizes", str(size), "--budget-mb", str(budget_mb)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{job} job at {size} utterances failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | bits | calib utts | cache budget MB | MinMax calib s | + 1 eval s | search s | "
             "search / (calib + eval) | evaluations | cache peak MB | replayed / computed block calls | "
             "peak RSS MinMax MB | peak RSS search MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        cache = r["search"]["cache"]
        calls = f"{cache['replayed_calls']} / {cache['computed_calls']}" if cache else "no cache"
        lines.append(
            f"| {r['model']} | W{r['bits']}A{r['bits']} | {r['size']} | {r['budget_mb']:g} | "
            f"{r['minmax']['calib_seconds']:.1f} | {r['minmax']['eval_seconds']:.1f} | "
            f"{r['search']['search_seconds']:.1f} | {r['ratio']:.2f}x | {r['search']['evaluations']} | "
            f"{cache.get('peak_mb', 0.0):.0f} | {calls} | {r['minmax']['peak_rss_mb']:.0f} | "
            f"{r['search']['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sq/wav2vec2-ref")
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--sizes", default="50,100,200,300", help="calibration sizes (dev split, at most 300)")
    parser.add_argument("--budgets", default="0,256,1024", help="prefix-cache budgets in MB (0: no cache)")
    parser.add_argument("--budget-mb", type=float, default=256.0, help=argparse.SUPPRESS)  # one worker's budget
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", choices=("minmax", "search"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, int(args.sizes), args.bits, args.budget_mb, args.threads)))
        return

    import torch

    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        minmax = run_job("minmax", args, size, 0.0)
        for budget in (float(b) for b in args.budgets.split(",")):
            search = run_job("search", args, size, budget)
            ratio = search["search_seconds"] / (minmax["calib_seconds"] + minmax["eval_seconds"])
            rows.append({"model": args.model, "bits": args.bits, "size": size, "budget_mb": budget,
                         "minmax": minmax, "search": search, "ratio": ratio})
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    payload = {"command": "python benchmarks/search_cost.py " + " ".join(sys.argv[1:]),
               "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {os.cpu_count()} cores",
               "torch": torch.__version__, "threads": args.threads, "rows": rows}
    atomic_write(RESULTS / "search_cost.json", json.dumps(payload, indent=2, allow_nan=False) + "\n")
    atomic_write(RESULTS / "search_cost.md", table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
