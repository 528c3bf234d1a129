"""Where does a Whisper INT8 model's WER go? Each graph alone, runaway decodes, and the repetition guard.

Decodes the first N test utterances greedily with the four pairings of the float and the INT8 encoder / decoder
step (the INT8 artifact that `latency.py` saved), and the INT8 pair once more with HF's `no_repeat_ngram_size`
guard. Per pairing: WER, ΔWER against float with its 95 % paired-bootstrap interval, the utterances that run away
(more than twice the reference's words plus 5), and the WER without them.

    python benchmarks/whisper_int8_wer.py --model openai/whisper-base --utts 40   # after latency.py --models ...

Writes benchmarks/results/whisper_int8_wer_<model>.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Any

import torch
from common import ARTIFACTS, RESULTS, atomic_write, decode_in_batches, device_name

from sq_plugin.core.significance import paired_bootstrap
from sq_plugin.families.whisper_int8 import (
    GreedySettings,
    WhisperDecoderStep,
    WhisperEncoderKV,
    load_whisper_int8,
)
from sq_plugin.speech.corpus import load_split
from sq_plugin.speech.evaluate import normalize_text, wer, word_errors
from sq_plugin.speech.models import load_model

BATCH = 8


def runaway(reference: str, hypothesis: str) -> bool:
    """A decode that did not stop: more than twice the reference's words, plus 5."""
    return len(normalize_text(hypothesis).split()) > 2 * len(normalize_text(reference).split()) + 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="openai/whisper-base")
    parser.add_argument("--utts", type=int, default=40, help="test utterances")
    parser.add_argument("--no-repeat-ngram", type=int, default=3, help="the guarded INT8 row's no_repeat_ngram_size")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bundle = load_model(args.model)
    artifact = ARTIFACTS / args.model.replace("/", "__")
    if not artifact.is_dir():
        raise SystemExit(f"{artifact} is missing: run python benchmarks/latency.py --models {args.model}")
    int8 = load_whisper_int8(artifact, bundle)
    utterances = load_split("test", limit=args.utts, progress=False)
    references = [u.text for u in utterances]
    fe, tok = bundle.processor.feature_extractor, bundle.processor.tokenizer
    features = fe([u.audio for u in utterances], sampling_rate=16000, return_tensors="pt").input_features
    float_encode = WhisperEncoderKV(bundle.model).eval()
    float_step = WhisperDecoderStep(bundle.model).eval()
    settings = GreedySettings.from_model(bundle.model)
    guarded = dataclasses.replace(settings, no_repeat_ngram_size=args.no_repeat_ngram)
    pairings = {
        "float encoder + float step": (float_encode, float_step, settings),
        "INT8 encoder + float step": (int8.encode, float_step, settings),
        "float encoder + INT8 step": (float_encode, int8.step, settings),
        "INT8 encoder + INT8 step": (int8.encode, int8.step, settings),
        f"INT8 + INT8, no_repeat_ngram_size {args.no_repeat_ngram}": (int8.encode, int8.step, guarded),
    }
    caches: dict[int, Any] = {}
    rows, hypotheses = [], {}
    for name, (encode, step, use) in pairings.items():
        start = time.perf_counter()
        hypotheses[name] = decode_in_batches(bundle.model, encode, step, features, tok, use, batch=BATCH,
                                             caches=caches)
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    float_errors, words = word_errors(references, hypotheses["float encoder + float step"])
    for name, texts in hypotheses.items():
        errors = word_errors(references, texts)[0]
        delta = paired_bootstrap(float_errors, errors, words)
        ran_away = [i for i, (r, h) in enumerate(zip(references, texts, strict=True)) if runaway(r, h)]
        kept = [i for i in range(len(texts)) if i not in ran_away]
        rows.append({"pairing": name, "wer": round(wer(references, texts), 4),
                     "delta_pp": round(100 * delta.delta, 2), "ci95_pp": [round(100 * delta.low, 2),
                                                                          round(100 * delta.high, 2)],
                     "runaway_utterances": [utterances[i].id for i in ran_away],
                     "runaway_word_errors": int(sum(errors[i] for i in ran_away)),
                     "wer_without_runaways": round(wer([references[i] for i in kept], [texts[i] for i in kept]), 4)})
    payload = {"model": args.model, "device": device_name(), "threads": args.threads, "utterances": len(utterances),
               "artifact": str(artifact), "calibration": int8.report.get("calibration_utterances"), "rows": rows}
    name = args.model.split("/")[-1]
    atomic_write(RESULTS / f"whisper_int8_wer_{name}.json", json.dumps(payload, indent=1) + "\n")
    lines = [f"# {args.model} INT8: where the WER goes", "",
             f"{device_name()}, {args.threads} threads; greedy on the first {len(utterances)} test utterances; the "
             f"INT8 artifact of `latency.py` ({artifact.name}). ΔWER against the float pairing, 95 % paired bootstrap. "
             "Runaway: more than twice the reference's words plus 5.", "",
             "| pairing | WER | ΔWER pp [95 % CI] | runaway utterances | their word errors | WER without them |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['pairing']} | {r['wer']:.4f} | {r['delta_pp']:+.2f} [{r['ci95_pp'][0]:+.2f}, "
              f"{r['ci95_pp'][1]:+.2f}] | {len(r['runaway_utterances'])} | {r['runaway_word_errors']} | "
              f"{r['wer_without_runaways']:.4f} |" for r in rows]
    atomic_write(RESULTS / f"whisper_int8_wer_{name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
