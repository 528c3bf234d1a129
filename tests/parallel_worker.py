"""Run by tests/test_parallel.py under torchrun (2 CPU processes, gloo): the CTC search on the shipped HuBERT
reference, its result written by rank 0 as JSON. With --die-after K, rank 1 exits after K metric evaluations."""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from sq_plugin import parallel
from sq_plugin.core.defaults import METRIC_THRESHOLDS
from sq_plugin.families.ctc import search_ctc
from sq_plugin.search import SearchConfig
from sq_plugin.speech.corpus import load_split
from sq_plugin.speech.models import load_model


def search_summary(result) -> dict:
    return {"flagged": result.flagged, "fp_metric": result.fp_metric, "max_metric": result.max_metric,
            "final_metric": result.final_metric, "rule_metrics": result.rule_metrics,
            "evaluations": result.evaluations, "ranges": {d.name: list(d.act_range) for d in result.layers},
            "choices": {d.name: d.choice for d in result.layers}, "stopped_early": result.stopped_early,
            "lower_bounds": {d.name: d.lower_bounds for d in result.layers if d.lower_bounds},
            "candidates": {d.name: {str(k): v for k, v in d.candidates.items()} for d in result.layers if d.flagged}}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--utterances", type=int, default=16)
    parser.add_argument("--metric", default="wer")
    parser.add_argument("--threshold", type=float, default=None, help="default: the metric's own")
    parser.add_argument("--out", required=True)
    parser.add_argument("--die-after", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    parallel.init_from_env()
    bundle = load_model("sq/hubert-ref")
    dev = load_split("dev", limit=args.utterances, progress=False)
    if args.die_after is not None and parallel.rank_and_world()[0] == 1:
        import sq_plugin.families.ctc as ctc

        real, calls = ctc.ctc_wer, [0]  # the WER metric's one call per evaluation

        def dying(*a, **k):  # a rank that crashes mid-search
            calls[0] += 1
            if calls[0] > args.die_after:
                os._exit(17)
            return real(*a, **k)
        ctc.ctc_wer = dying
    threshold = METRIC_THRESHOLDS[args.metric] if args.threshold is None else args.threshold
    result = search_ctc(bundle, dev, SearchConfig(threshold=threshold, float_fallback=True), metric=args.metric,
                        progress=False)
    if parallel.is_main():
        with open(args.out, "w") as f:
            json.dump(search_summary(result), f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
