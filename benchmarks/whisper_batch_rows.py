"""Why is Whisper's batch-8 INT8 decode slow? Tokens per row of the latency benchmark's batch, INT8 against FP32.

A batch decodes until its longest row ends. This decodes the eight 10 s clips that `latency.py` times at batch 8
(its clip file and INT8 artifact, from a previous `latency.py` run) with the INT8 graphs and with the float step
graphs, and writes the number of tokens of each row and the start of each transcript, plus one INT8 decoder step's
time at batch 1 and 8.

    python benchmarks/whisper_batch_rows.py     # after python benchmarks/latency.py --models openai/whisper-tiny.en

Writes benchmarks/results/whisper_batch_rows.json and .md.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from common import ARTIFACTS, RESULTS, atomic_write, device_name
from latency import time_fn

from sq_plugin.families.whisper_int8 import (
    GreedySettings,
    WhisperDecoderStep,
    WhisperEncoderKV,
    decoder_step_inputs,
    empty_cache,
    greedy_decode_batch,
    load_whisper_int8,
)
from sq_plugin.speech.models import load_model


def main() -> None:
    torch.set_num_threads(2)
    bundle = load_model("openai/whisper-tiny.en")
    clip_file = ARTIFACTS / "clip_80s.npy"  # latency.py's clip for batch 8 x 10 s
    if not clip_file.is_file():
        raise SystemExit(f"{clip_file} is missing: run python benchmarks/latency.py --models openai/whisper-tiny.en")
    clip = np.load(clip_file)
    n = 10 * 16000
    audios = [clip[i * n:(i + 1) * n] for i in range(8)]
    feats = bundle.processor.feature_extractor(audios, sampling_rate=16000, return_tensors="pt").input_features
    int8 = load_whisper_int8(ARTIFACTS / "openai__whisper-tiny.en", bundle)
    settings = GreedySettings.from_model(bundle.model)
    decoded = {
        "int8": int8.transcribe_batch(feats),
        "fp32": greedy_decode_batch(WhisperEncoderKV(bundle.model).eval(), WhisperDecoderStep(bundle.model).eval(),
                                    feats, empty_cache(bundle.model, batch=8), settings),
    }
    step_ms = {}
    with torch.no_grad():
        for batch in (1, 8):
            inputs = decoder_step_inputs(bundle.model, int8.encode(feats[:batch]))
            step_ms[batch] = round(time_fn(lambda i=inputs: int8.step(*i), 2, 20)[0], 2)
    tok = bundle.processor.tokenizer
    rows = [{"row": i, **{f"{k}_tokens": len(v[i]) for k, v in decoded.items()},
             **{f"{k}_text": tok.decode(v[i], skip_special_tokens=True).strip()[:120] for k, v in decoded.items()}}
            for i in range(8)]
    payload = {"device": device_name(), "max_new_tokens": settings.max_new_tokens, "rows": rows,
               "int8_step_ms": step_ms}
    atomic_write(RESULTS / "whisper_batch_rows.json", json.dumps(payload, indent=1) + "\n")
    lines = ["# Whisper tiny.en, the latency benchmark's batch of 8: tokens per row", "",
             f"{device_name()}, 2 threads. One INT8 decoder step: {step_ms[1]} ms at batch 1, {step_ms[8]} ms at "
             f"batch 8. The limit is {settings.max_new_tokens} new tokens.", "",
             "| row | INT8 tokens | FP32 tokens | INT8 transcript (start) |", "|---:|---:|---:|---|"]
    lines += [f"| {r['row']} | {r['int8_tokens']} | {r['fp32_tokens']} | {r['int8_text']} |" for r in rows]
    atomic_write(RESULTS / "whisper_batch_rows.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
