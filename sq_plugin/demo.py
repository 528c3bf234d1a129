"""`make demo`: StableQuant on a shipped wav2vec2 reference, offline, end to end, in a few minutes.

1. loads the trained `sq/wav2vec2-ref` CTC model and the offline eSpeak NG corpus (dev for
   calibration, test for evaluation; generated on first use);
2. runs the StableQuant search (screen -> clip -> MSE) on dev: by default scored by `ctc_kl` (the KL of the
   CTC posteriors from the float model's) with float as a candidate for flagged layers, the configuration that
   keeps both references within 0.1 pp of float at W8A8 (BENCHMARKS.md); `--metric wer` is the paper's;
3. quantizes with torchao PT2E (StableQuant observers, per-layer cut-offs), lowers to oneDNN INT8
   kernels through Inductor, and does the same with plain MinMax ranges as the baseline;
4. prints FP32 vs INT8 WER/CER on test, the INT8 kernel counts and the flagged layers.

    python -m sq_plugin.demo [--model sq/hubert-ref] [--calib 48] [--eval 200] [--metric wer]
"""

from __future__ import annotations

import argparse
import time

import torch

from sq_plugin.core.defaults import METRIC_THRESHOLDS
from sq_plugin.core.ranges import RangeRule
from sq_plugin.families.ctc import EVAL_KWARGS, METRICS, quantize_ctc_pt2e, search_ctc
from sq_plugin.search import SearchConfig
from sq_plugin.speech.corpus import load_split
from sq_plugin.speech.evaluate import evaluate
from sq_plugin.speech.models import load_model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sq/wav2vec2-ref")
    parser.add_argument("--calib", type=int, default=48, help="dev utterances for calibration and the search")
    parser.add_argument("--eval", type=int, default=200, help="test utterances for evaluation")
    parser.add_argument("--metric", default="ctc_kl", choices=METRICS, help="the search's metric (wer: the paper's)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    bundle = load_model(args.model)
    dev = load_split("dev", limit=args.calib)
    test = load_split("test", limit=args.eval)
    fp = evaluate(bundle, test, progress=False, **EVAL_KWARGS)
    print(f"{args.model}: FP32 on {len(test)} test utterances: WER {fp.wer:.4f} CER {fp.cer:.4f}")

    start = time.perf_counter()
    config = SearchConfig(threshold=METRIC_THRESHOLDS[args.metric], float_fallback=args.metric == "ctc_kl")
    search = search_ctc(bundle, dev, config, metric=args.metric)
    search_s = time.perf_counter() - start
    print(f"search: {search.evaluations} evaluations in {search_s:.0f} s; flagged {search.flagged or 'none'}; "
          f"dev {args.metric} fp {search.fp_metric:.4g}, all-MAX {search.max_metric:.4g}, best built-in rule "
          f"({search.base_rule}) {search.rule_metrics[search.base_rule]:.4g}, StableQuant {search.final_metric:.4g}")
    for d in search.layers:
        if d.keep_float:
            print(f"  {d.name}: screen Δ{args.metric} {d.screen_delta:+.4g}, kept float (it beat every range)")
        elif d.flagged:
            how = f"cut-off {d.percentile}" if d.choice == "percentile" else f"the {d.choice} range"
            print(f"  {d.name}: screen Δ{args.metric} {d.screen_delta:+.4g}, {how}, range "
                  f"[{d.act_range[0]:.3g}, {d.act_range[1]:.3g}] vs MAX [{d.max_range[0]:.3g}, {d.max_range[1]:.3g}]")
    if search.float_layers:
        print(f"  float: {100 * search.float_mac_share:.2f} % of the MACs")

    rows = [("fp32", "eager float", fp.wer, fp.cer, "-")]
    for method, kwargs in (("stablequant", {"plan": search.to_plan({"model": args.model})}),
                           ("minmax", {"act_rule": RangeRule("max")})):
        q = quantize_ctc_pt2e(bundle, dev, **kwargs)
        result = evaluate(q.bundle, test, progress=False, **EVAL_KWARGS)
        rows.append((f"{method} W8A8", q.backend, result.wer, result.cer,
                     f"{q.int8_kernels} INT8 kernels; {q.op_counts}"))
    print()
    print(f"{'method':<18} {'WER':>7} {'CER':>7}  backend / kernels")
    for name, backend, w, c, kernels in rows:
        print(f"{name:<18} {w:>7.4f} {c:>7.4f}  {backend}; {kernels}")


if __name__ == "__main__":
    main()
