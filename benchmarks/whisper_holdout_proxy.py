"""Is Whisper's search proxy misled by its small calibration set, or by teacher forcing itself?

A W6A6 search on 16 calibration utterances lowered the teacher-forced loss (`tf_loss`) well below the best built-in
rule's, yet its test WER came out worse than that rule's (BENCHMARKS.md). If the 16 utterances were the problem, the
same loss on utterances the search never saw would rank the two the other way, and a held-out check would be the
fix. This scores a searched plan (a run's `plan_..._stablequant_w6a6.json`) and the percentile rule applied to every
layer (the search's starting point) by tf_loss on the calibration utterances, on --held-out other dev utterances and
on --test test utterances (each against the float model's own greedy transcripts), fake-quant simulation.

    python benchmarks/whisper_holdout_proxy.py runs/accuracy/<run>/plan_openai_whisper-tiny.en_stablequant_w6a6.json

Writes benchmarks/results/whisper_holdout_proxy.json and .md.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from common import RESULTS, atomic_write, device_name, searched_and_percentile_whisper

from sq_plugin.families.whisper import (
    EVAL_BATCH,
    teacher_forced_batches,
    teacher_forced_scores,
)
from sq_plugin.speech.corpus import load_split
from sq_plugin.speech.evaluate import transcribe
from sq_plugin.speech.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("plan", help="the searched plan (QuantPlan JSON written by a run)")
    parser.add_argument("--model", default="openai/whisper-tiny.en")
    parser.add_argument("--calib", type=int, default=16, help="calibration utterances the search used (dev[:n])")
    parser.add_argument("--held-out", type=int, default=48, help="dev utterances after those")
    parser.add_argument("--test", type=int, default=48)
    parser.add_argument("--out", default="whisper_holdout_proxy")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    bundle = load_model(args.model)
    dev = load_split("dev", progress=False)
    calib = dev[:args.calib]
    splits = {"calibration": calib, "held-out dev": dev[args.calib:args.calib + args.held_out],
              "test": load_split("test", limit=args.test, progress=False)}
    models, bits = searched_and_percentile_whisper(bundle, args.plan, calib)
    scores: dict[str, dict[str, float]] = {}
    for split, utterances in splits.items():
        targets = transcribe(bundle, [u.audio for u in utterances], batch_size=EVAL_BATCH, progress=False)
        batches = teacher_forced_batches(bundle, utterances, batch_size=8, texts=targets)
        scores[split] = {"fp": teacher_forced_scores(bundle.model, batches)["tf_loss"]}
        for name, model in models.items():
            scores[split][name] = teacher_forced_scores(model, batches)["tf_loss"]
        print(split, scores[split], flush=True)
    payload = {"device": device_name(), "model": args.model, "plan": args.plan, "bits": bits,
               "utterances": {k: len(v) for k, v in splits.items()}, "tf_loss": scores,
               "seconds": round(time.perf_counter() - start, 1)}
    atomic_write(RESULTS / f"{args.out}.json", json.dumps(payload, indent=1) + "\n")
    lines = [f"# Whisper's teacher-forced proxy on held-out audio ({args.model}, {payload['bits']})", "",
             f"{device_name()}; plan `{args.plan}`; tf_loss in nats per token of the float model's greedy "
             "transcripts (lower is better).", "",
             "| utterances | n | FP | searched plan | percentile_clip everywhere | proxy prefers |",
             "|---|---:|---:|---:|---:|---|"]
    for split, s in scores.items():
        prefers = "search" if s["search"] < s["percentile_clip everywhere"] else "percentile_clip everywhere"
        lines.append(f"| {split} | {len(splits[split])} | {s['fp']:.4f} | {s['search']:.4f} | "
                     f"{s['percentile_clip everywhere']:.4f} | {prefers} |")
    atomic_write(RESULTS / f"{args.out}.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
