"""What INT8 attention costs in WER: the same plan on oneDNN INT8 kernels, attention float vs on `torch._int_mm`.

For each CTC reference, the plan of a StableQuant W8A8 run (`--plans`: a run directory holding
`plan_<model>_stablequant_w8a8.json`; default: rule `percentile_clip` plans made here on --calib dev utterances)
is applied by `quantize_ctc_pt2e` twice, with `int8_attention` off and on, and both are evaluated on --eval test
utterances against FP32. ΔWER with its 95 % paired-bootstrap interval, for each against FP and between the two.

    python benchmarks/int8_attention_wer.py --plans runs/accuracy/<run> --eval 600

Writes benchmarks/results/int8_attention_wer.json and .md. Needs a CPU with VNNI or AMX.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import RESULTS, atomic_write, device_name

from sq_plugin.core.defaults import DEFAULT_BASELINE_PERCENTILE
from sq_plugin.core.plan import QuantPlan
from sq_plugin.core.ranges import RangeRule
from sq_plugin.core.significance import paired_bootstrap
from sq_plugin.families.ctc import EVAL_KWARGS, ctc_statistics, quantize_ctc_pt2e
from sq_plugin.search.rules import layer_ops, rule_plan
from sq_plugin.speech.corpus import load_split
from sq_plugin.speech.evaluate import evaluate, word_errors
from sq_plugin.speech.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["sq/wav2vec2-ref", "sq/hubert-ref"])
    parser.add_argument("--plans", default=None, help="run directory with plan_<model>_stablequant_w8a8.json files")
    parser.add_argument("--calib", type=int, default=200)
    parser.add_argument("--eval", type=int, default=600)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="int8_attention_wer")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    test = load_split("test", limit=args.eval, progress=False)
    rows = []
    for name in args.models:
        bundle = load_model(name)
        calibration = load_split("dev", limit=args.calib, progress=False)
        if args.plans:
            source = Path(args.plans) / f"plan_{name.replace('/', '_')}_stablequant_w8a8.json"
            plan = QuantPlan.load(source)
        else:
            source = f"rule percentile {DEFAULT_BASELINE_PERCENTILE} on dev[:{args.calib}]"
            plan = rule_plan(ctc_statistics(bundle, calibration), layer_ops(bundle.model),
                             RangeRule("percentile", percentile=DEFAULT_BASELINE_PERCENTILE))
        fp = evaluate(bundle, test, progress=False, **EVAL_KWARGS)
        refs = [u.reference for u in fp.utterances]
        fp_errors, words = word_errors(refs, [u.hypothesis for u in fp.utterances])
        errors = {}
        for attention in (False, True):
            quantized = quantize_ctc_pt2e(bundle, calibration, plan=plan, int8_attention=attention)
            result = evaluate(quantized.bundle, test, progress=False, **EVAL_KWARGS)
            errors[attention], _ = word_errors(refs, [u.hypothesis for u in result.utterances])
            delta = paired_bootstrap(fp_errors, errors[attention], words)
            rows.append({"model": name, "plan": str(source), "int8_attention": attention, "backend": quantized.backend,
                         "wer": result.wer, "fp_wer": fp.wer, "wer_delta": delta.delta,
                         "wer_ci95": [delta.low, delta.high], "n": result.n})
            print(rows[-1], flush=True)
        between = paired_bootstrap(errors[False], errors[True], words)
        rows[-1]["vs_float_attention"] = {"wer_delta": between.delta, "wer_ci95": [between.low, between.high]}
    payload = {"device": device_name(), "threads": args.threads, "rows": rows,
               "seconds": round(time.perf_counter() - start, 1)}
    atomic_write(RESULTS / f"{args.out}.json", json.dumps(payload, indent=1) + "\n")
    lines = ["# INT8 attention: WER on the test split (same plan, attention float vs INT8)", "",
             f"{device_name()}; {args.eval} test utterances; ΔWER in pp with its 95 % paired-bootstrap interval.", "",
             "| model | attention | backend | WER % | ΔWER vs FP pp | ΔWER vs float attention pp |",
             "|---|---|---|---:|---:|---:|"]
    for r in rows:
        low, high = (100 * x for x in r["wer_ci95"])
        between = r.get("vs_float_attention")
        vs = "" if between is None else (f"{100 * between['wer_delta']:+.2f} [{100 * between['wer_ci95'][0]:+.2f}, "
                                         f"{100 * between['wer_ci95'][1]:+.2f}]")
        lines.append(f"| {r['model']} | {'INT8' if r['int8_attention'] else 'float'} | {r['backend']} | "
                     f"{100 * r['wer']:.2f} | {100 * r['wer_delta']:+.2f} [{low:+.2f}, {high:+.2f}] | {vs} |")
    lines += ["", f"Plans: {', '.join(sorted({r['plan'] for r in rows}))}."]
    atomic_write(RESULTS / f"{args.out}.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
