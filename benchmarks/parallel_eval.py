"""Evaluation across processes: the CTC search and a test evaluation, in one process and under torchrun with 2.

    python benchmarks/parallel_eval.py --calib 64 --eval 200

Each configuration runs in its own launch (`python tests/parallel_worker.py`-style worker below, one torch thread
per process): the StableQuant search (metric WER) on --calib dev utterances of sq/hubert-ref, then the float model's
WER on --eval test utterances. The results must be identical; the speedup is the wall time of one process over two.
On a 2-core machine two processes are the most that can pay. Writes benchmarks/results/parallel_eval.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, atomic_write, device_name

WORKER = r'''
import json, sys, time, torch
from sq_plugin import parallel
parallel.init_from_env()
torch.set_num_threads(1)
from sq_plugin.families.ctc import search_ctc
from sq_plugin.search import SearchConfig
from sq_plugin.speech.corpus import load_split
from sq_plugin.speech.evaluate import evaluate
from sq_plugin.speech.models import load_model
calib, n_eval, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
bundle = load_model("sq/hubert-ref")
dev, test = load_split("dev", limit=calib, progress=False), load_split("test", limit=n_eval, progress=False)
t0 = time.perf_counter()
search = search_ctc(bundle, dev, SearchConfig(), progress=False)
t1 = time.perf_counter()
result = evaluate(bundle, test, batch_size=8, progress=False)
t2 = time.perf_counter()
if parallel.is_main():
    json.dump({"search_s": t1 - t0, "eval_s": t2 - t1, "flagged": search.flagged, "final_metric": search.final_metric,
               "ranges": {d.name: list(d.act_range) for d in search.layers}, "wer": result.wer,
               "hypotheses": [u.hypothesis for u in result.utterances]}, open(out, "w"))
'''


def launch(processes: int, calib: int, n_eval: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        script, out = Path(tmp) / "worker.py", Path(tmp) / "out.json"
        script.write_text(WORKER)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        prefix = [sys.executable] if processes == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
        start = time.perf_counter()
        subprocess.run([*prefix, str(script), str(calib), str(n_eval), str(out)], check=True, env=env)
        return {**json.loads(out.read_text()), "wall_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--eval", type=int, default=200)
    parser.add_argument("--out", default="parallel_eval")
    args = parser.parse_args()
    command = "python benchmarks/parallel_eval.py " + " ".join(sys.argv[1:])
    one, two = launch(1, args.calib, args.eval), launch(2, args.calib, args.eval)
    same = {k: one[k] == two[k] for k in ("flagged", "final_metric", "ranges", "wer", "hypotheses")}
    rows = [{"processes": n, "search_s": r["search_s"], "eval_s": r["eval_s"], "wall_s": r["wall_s"]}
            for n, r in ((1, one), (2, two))]
    payload = {"command": command, "date": time.strftime("%Y-%m-%d"), "cpu": device_name(), "cores": os.cpu_count(),
               "calib": args.calib, "eval": args.eval, "identical": same, "rows": rows,
               "speedup": {k: one[k] / two[k] for k in ("search_s", "eval_s", "wall_s")}}
    atomic_write(RESULTS / f"{args.out}.json", json.dumps(payload, indent=2) + "\n")
    lines = [f"`{command}` ({device_name()}, {os.cpu_count()} cores, one torch thread per process): sq/hubert-ref, "
             f"StableQuant search on {args.calib} dev utterances (metric WER), then the float WER on {args.eval} test "
             "utterances.", "", "| processes | search s | evaluation s | wall s (with start-up) |",
             "|---:|---:|---:|---:|"]
    lines += [f"| {r['processes']} | {r['search_s']:.1f} | {r['eval_s']:.1f} | {r['wall_s']:.1f} |" for r in rows]
    sp = payload["speedup"]
    lines += ["", f"Speedup of 2 processes: search {sp['search_s']:.2f}x, evaluation {sp['eval_s']:.2f}x, wall "
              f"{sp['wall_s']:.2f}x. Identical results (flagged layers, metric, every range, WER, every transcript): "
              f"{all(same.values())} ({same}).", ""]
    atomic_write(RESULTS / f"{args.out}.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
