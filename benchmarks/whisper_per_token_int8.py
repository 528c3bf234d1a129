"""Whisper end to end with per-token INT8 Linears (a prototype, not a backend): does the grid close the WER gap?

`whisper_loss_groups.py` found, in the fake-quant simulation, that Whisper base's W8A8 loss is the static per-tensor
activation grid, and that one range per token removes most of it. This checks it on real INT8 kernels: every Linear
of the encoder(+cross K/V) and decoder-step graphs becomes `per_token_linear.PerTokenInt8Linear` (each input row
quantized with its own scale, symmetric or asymmetric, `torch._int_mm` against the per-channel int8 weight; the two
convs stay float), both graphs compiled by Inductor, greedy decoding in batches of 8. Rows: float graphs, the static
INT8 artifact `latency.py` saved (the x86 backend), and the per-token graphs on each grid; WER with ΔWER against
float and its 95 % paired-bootstrap interval, and the seconds each decode pass took after a warm-up (one pass:
indicative).

    python benchmarks/whisper_per_token_int8.py --model openai/whisper-base --utts 40   # after latency.py --models ...

Writes benchmarks/results/whisper_per_token_int8_<model>.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from common import (
    ARTIFACTS,
    RESULTS,
    atomic_write,
    decode_in_batches,
    device_name,
    paired_wer,
    require_unsaturated_int_mm,
)
from per_token_linear import PerTokenInt8Linear

from sq_plugin.families.whisper_int8 import (
    GreedySettings,
    WhisperDecoderStep,
    WhisperEncoderKV,
    empty_cache,
    greedy_decode_batch,
    load_whisper_int8,
)
from sq_plugin.speech.corpus import load_split
from sq_plugin.speech.evaluate import wer
from sq_plugin.speech.models import load_model

BATCH = 8


def per_token_copy(whisper: torch.nn.Module, *, symmetric: bool) -> tuple[torch.nn.Module, int]:
    """A copy of the model with every Linear replaced by its per-token INT8 version; returns it and the count."""
    model = copy.deepcopy(whisper)
    swapped = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(module, child_name, PerTokenInt8Linear(child, symmetric=symmetric))
                swapped += 1
    return model, swapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="openai/whisper-base")
    parser.add_argument("--utts", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    require_unsaturated_int_mm()
    torch.set_num_threads(args.threads)
    bundle = load_model(args.model)
    artifact = ARTIFACTS / args.model.replace("/", "__")
    if not artifact.is_dir():
        raise SystemExit(f"{artifact} is missing: run python benchmarks/latency.py --models {args.model}")
    static = load_whisper_int8(artifact, bundle)
    per_token, swapped = per_token_copy(bundle.model, symmetric=True)
    asymmetric, _ = per_token_copy(bundle.model, symmetric=False)
    utterances = load_split("test", limit=args.utts, progress=False)
    fe, tok = bundle.processor.feature_extractor, bundle.processor.tokenizer
    features = fe([u.audio for u in utterances], sampling_rate=16000, return_tensors="pt").input_features
    settings = GreedySettings.from_model(bundle.model)
    systems = {
        "float graphs": (WhisperEncoderKV(bundle.model).eval(), WhisperDecoderStep(bundle.model).eval()),
        "static INT8 (x86 backend artifact)": (static.encode, static.step),
        f"per-token INT8, symmetric ({swapped} Linears; convs float)": (
            torch.compile(WhisperEncoderKV(per_token).eval()), torch.compile(WhisperDecoderStep(per_token).eval())),
        f"per-token INT8, asymmetric ({swapped} Linears; convs float)": (
            torch.compile(WhisperEncoderKV(asymmetric).eval()), torch.compile(WhisperDecoderStep(asymmetric).eval())),
    }
    references = [u.text for u in utterances]
    hypotheses, seconds = {}, {}
    for name, (encode, step) in systems.items():
        # warm up outside the timed pass: the compiled graphs compile for each batch size (8, and the last one's)
        for size in sorted({min(BATCH, len(utterances)), len(utterances) % BATCH} - {0}):
            greedy_decode_batch(encode, step, features[:size], empty_cache(bundle.model, batch=size), settings)
        start = time.perf_counter()
        texts = decode_in_batches(bundle.model, encode, step, features, tok, settings, batch=BATCH)
        seconds[name] = time.perf_counter() - start
        hypotheses[name] = texts
        print(f"{name}: WER {wer(references, texts):.4f}, {seconds[name]:.0f} s", flush=True)
    rows = [{"system": name, **paired_wer(references, hypotheses["float graphs"], texts),
             "decode_seconds": seconds[name]} for name, texts in hypotheses.items()]
    command = f"python benchmarks/whisper_per_token_int8.py --model {args.model} --utts {args.utts}"
    payload = {"model": args.model, "cpu": device_name(), "threads": args.threads, "utterances": len(utterances),
               "batch": BATCH, "artifact": str(artifact), "rows": rows, "command": command}
    slug = args.model.split("/")[-1]
    lines = [f"# {args.model}: per-token INT8 Linears on real kernels (prototype)", "",
             f"{device_name()}, {args.threads} threads; greedy, batches of {BATCH}, the first {len(utterances)} test "
             "utterances. ΔWER against the float graphs, 95 % paired bootstrap. Seconds: one decode pass after a "
             "warm-up that compiles each batch size (one pass: indicative).", "",
             "| system | WER | ΔWER pp [95 % CI] | decode s |", "|---|---:|---:|---:|"]
    lines += [f"| {r['system']} | {r['wer']:.4f} | {r['delta_pp']:+.2f} [{r['ci95_pp'][0]:+.2f}, "
              f"{r['ci95_pp'][1]:+.2f}] | {r['decode_seconds']:.0f} |" for r in rows]
    lines += ["", f"`{command}`", ""]
    atomic_write(RESULTS / f"whisper_per_token_int8_{slug}.json", json.dumps(payload, indent=1) + "\n")
    atomic_write(RESULTS / f"whisper_per_token_int8_{slug}.md", "\n".join(lines))


if __name__ == "__main__":
    main()
