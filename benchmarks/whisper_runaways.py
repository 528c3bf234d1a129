"""Where a Whisper W6A6 plan's WER goes: runaway decodes, or every utterance a little?

At W6A6 on Whisper tiny.en the searched plan lowers the teacher-forced loss well below the percentile rule's, yet
decodes worse on test (BENCHMARKS.md). This decodes the test utterances with the float model, a searched plan and
the percentile rule applied to every layer (the search's starting point), fake-quant simulation, and splits each
one's word errors into those of runaway decodes (a hypothesis more than --runaway times the reference's length:
a loop that never emits <|endoftext|>) and the rest. It also scores, teacher-forced on the float model's own
transcripts, the mean KL of the next-token distribution from the float model's over all positions (tf_kl) and at
the <|endoftext|> position alone (what stopping costs), on the calibration utterances and on the test ones.

    python benchmarks/whisper_runaways.py results/plan_whisper-tiny.en_stablequant_w6a6.json

Writes benchmarks/results/whisper_runaways.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Any

import torch
from common import RESULTS, atomic_write, device_name, searched_and_percentile_whisper

from sq_plugin.families.whisper import (
    EVAL_BATCH,
    _forward,
    teacher_forced_batches,
)
from sq_plugin.speech.corpus import load_split
from sq_plugin.speech.evaluate import evaluate, transcribe, word_errors
from sq_plugin.speech.models import load_model


def runaway_split(result: Any, factor: float) -> dict[str, Any]:
    """Word errors (normalized text) of the runaway decodes (more than factor x the reference's words) and the rest."""
    refs, hyps = [u.reference for u in result.utterances], [u.hypothesis for u in result.utterances]
    edits, words = word_errors(refs, hyps)
    runaway = [len(h.split()) > factor * max(n, 1) for h, n in zip(hyps, words, strict=True)]
    return {"wer": result.wer, "words": sum(words), "errors": sum(edits), "runaway_decodes": sum(runaway),
            "runaway_errors": sum(e for e, r in zip(edits, runaway, strict=True) if r),
            "other_errors": sum(e for e, r in zip(edits, runaway, strict=True) if not r)}


def kl_scores(bundle: Any, models: dict[str, torch.nn.Module], utterances: list[Any]) -> dict[str, dict[str, float]]:
    """tf_kl over all positions and at <|endoftext|>, teacher-forced on the float model's own transcripts."""
    targets = transcribe(bundle, [u.audio for u in utterances], batch_size=EVAL_BATCH, progress=False)
    batches = teacher_forced_batches(bundle, utterances, batch_size=8, texts=targets)
    scores = {}
    with torch.inference_mode():
        reference = [torch.log_softmax(_forward(bundle.model, b).float(), -1) for b in batches]
        for name, model in models.items():
            total = tokens = at_eos = 0.0
            for batch, log_p in zip(batches, reference, strict=True):
                log_q = torch.log_softmax(_forward(model, batch).float(), -1)
                mask = batch.labels != -100
                kl = (log_p.exp() * (log_p - log_q)).sum(-1)
                total, tokens = total + float(kl[mask].sum()), tokens + int(mask.sum())
                last = mask.sum(1) - 1  # the label there is <|endoftext|>
                at_eos += float(kl[torch.arange(len(last)), last].sum())
            scores[name] = {"tf_kl": total / tokens, "kl_at_eos": at_eos / len(utterances)}
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("plan", help="the searched plan (QuantPlan JSON written by a run)")
    parser.add_argument("--model", default="openai/whisper-tiny.en")
    parser.add_argument("--calib", type=int, default=16, help="calibration utterances the search used (dev[:n])")
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--runaway", type=float, default=1.5, help="hypothesis/reference length that is a runaway")
    parser.add_argument("--out", default="whisper_runaways")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    bundle = load_model(args.model)
    calib = load_split("dev", limit=args.calib, progress=False)
    test = load_split("test", limit=args.test, progress=False)
    models, bits = searched_and_percentile_whisper(bundle, args.plan, calib)
    decodes = {"fp": runaway_split(evaluate(bundle, test, batch_size=EVAL_BATCH, progress=False), args.runaway)}
    for name, model in models.items():
        result = evaluate(dataclasses.replace(bundle, model=model), test, batch_size=EVAL_BATCH, progress=False)
        decodes[name] = runaway_split(result, args.runaway)
        print(name, decodes[name], flush=True)
    kl = {"calibration": kl_scores(bundle, models, calib), "test": kl_scores(bundle, models, test)}
    payload = {"device": device_name(), "model": args.model, "plan": args.plan, "bits": bits,
               "calibration": len(calib), "test": len(test), "runaway_factor": args.runaway, "decodes": decodes,
               "teacher_forced_kl": kl, "seconds": round(time.perf_counter() - start, 1)}
    atomic_write(RESULTS / f"{args.out}.json", json.dumps(payload, indent=1) + "\n")
    lines = [f"# Where a Whisper plan's WER goes ({args.model}, {payload['bits']}, fake-quant simulation)", "",
             f"{device_name()}; plan `{args.plan}`; {len(test)} test utterances; a runaway decode is longer than "
             f"{args.runaway:g}x its reference.", "",
             "| model | WER % | word errors | runaway decodes | their errors | errors of the rest |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, d in decodes.items():
        lines.append(f"| {name} | {100 * d['wer']:.2f} | {d['errors']} | {d['runaway_decodes']} | "
                     f"{d['runaway_errors']} | {d['other_errors']} |")
    lines += ["", "Teacher-forced on the float model's transcripts: mean KL from the float model's next-token "
              "distribution (nats), over every position and at <|endoftext|> alone.", "",
              "| utterances | plan | tf_kl | KL at <\\|endoftext\\|> |", "|---|---|---:|---:|"]
    for split, scores in kl.items():
        for name, s in scores.items():
            lines.append(f"| {split} | {name} | {s['tf_kl']:.4f} | {s['kl_at_eos']:.4f} |")
    atomic_write(RESULTS / f"{args.out}.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
