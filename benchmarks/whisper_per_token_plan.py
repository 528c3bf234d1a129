"""Whisper on the x86 backend's per-token grid: one searched plan, run static and per token, on real INT8 kernels.

`whisper_per_token_int8.py` prototyped per-token INT8 Linears outside the backend. This runs what a user gets: the
searched W8A8 plan (`whisper_loss_groups.py` ships Whisper base's) through `quantize_whisper_int8`, once as searched
(static per-tensor input ranges, oneDNN qlinear) and once as `QuantPlan.with_per_token_activations` makes it (every
Linear but proj_out a `PerTokenInt8Linear` on `torch._int_mm`), and what `activations: auto` would choose: both plans
scored by the search's metric (tf_loss, nats per token) on the calibration utterances, in the simulation.
Rows: the float graphs and both INT8 models, greedy in batches of 8 on the first test utterances; WER, ΔWER against
float with its 95 % paired-bootstrap interval, and one decode pass's seconds after a warm-up (indicative).

    python benchmarks/whisper_per_token_plan.py --model openai/whisper-base \
        --plan benchmarks/results/plan_whisper-base_stablequant_w8a8.json --utts 40 --calib 16

Writes benchmarks/results/whisper_per_token_plan_<model>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from common import RESULTS, atomic_write, decode_in_batches, device_name, paired_wer, require_unsaturated_int_mm

from sq_plugin.core.plan import QuantPlan
from sq_plugin.core.ranges import RangeRule
from sq_plugin.families.whisper import whisper_score, whisper_statistics
from sq_plugin.families.whisper_int8 import (
    GreedySettings,
    WhisperDecoderStep,
    WhisperEncoderKV,
    empty_cache,
    greedy_decode_batch,
    quantize_whisper_int8,
)
from sq_plugin.search import layer_ops, rule_plan
from sq_plugin.search.activations import choose_activations, without_static_rest
from sq_plugin.speech.corpus import load_split
from sq_plugin.speech.models import load_model

BATCH = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="openai/whisper-base")
    parser.add_argument("--plan", default="benchmarks/results/plan_whisper-base_stablequant_w8a8.json",
                        help="a searched plan; 'max' or 'mse': that built-in rule's plan on the calibration set")
    parser.add_argument("--utts", type=int, default=40)
    parser.add_argument("--calib", type=int, default=16, help="calibration utterances the auto choice scores on")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    require_unsaturated_int_mm()
    torch.set_num_threads(args.threads)
    bundle = load_model(args.model)
    fe, tok = bundle.processor.feature_extractor, bundle.processor.tokenizer
    calibration = load_split("dev", limit=args.calib, progress=False)
    if args.plan in ("max", "mse"):  # a built-in rule's ranges, from one statistics pass over the calibration set
        plan = rule_plan(whisper_statistics(bundle, calibration), layer_ops(bundle.model), RangeRule(args.plan),
                         provenance={"model": args.model, "method": args.plan})
    else:
        plan = QuantPlan.load(args.plan)
    score, _ = whisper_score(bundle, calibration, "tf_loss")
    start = time.perf_counter()
    _, choice = choose_activations(bundle.model, plan, score, "auto", exclude=("proj_out",))
    choice_seconds = time.perf_counter() - start
    print(f"auto: {choice} in {choice_seconds:.0f} s", flush=True)
    per_token, _ = choose_activations(bundle.model, plan, score, "per_token", exclude=("proj_out",))
    # What is left once the Linears are per token: the two static-range convs (5 % of the encoder's MACs), kept float
    convs_float = without_static_rest(per_token, exclude=("proj_out",))

    first = fe([calibration[0].audio], sampling_rate=16000, return_tensors="pt").input_features
    built = {}
    for name, candidate in (("static", plan), ("per_token", per_token), ("per_token_convs_float", convs_float)):
        start = time.perf_counter()
        built[name] = quantize_whisper_int8(bundle, [first], plan=candidate)
        print(f"{name}: built in {time.perf_counter() - start:.0f} s, {built[name].report['backend']}, "
              f"{built[name].report['lowering']}", flush=True)

    utterances = load_split("test", limit=args.utts, progress=False)
    features = fe([u.audio for u in utterances], sampling_rate=16000, return_tensors="pt").input_features
    settings = GreedySettings.from_model(bundle.model)
    systems = {"float graphs": (WhisperEncoderKV(bundle.model).eval(), WhisperDecoderStep(bundle.model).eval()),
               "plan, static ranges (oneDNN qlinear)": (built["static"].encode, built["static"].step),
               f"plan, per-token Linears ({len(per_token.per_token_layers)} on torch._int_mm)": (
                   built["per_token"].encode, built["per_token"].step),
               "plan, per-token Linears, the two convs float": (
                   built["per_token_convs_float"].encode, built["per_token_convs_float"].step)}
    references = [u.text for u in utterances]
    hypotheses, seconds = {}, {}
    for name, (encode, step) in systems.items():
        for size in sorted({min(BATCH, len(utterances)), len(utterances) % BATCH} - {0}):  # compile each batch size
            greedy_decode_batch(encode, step, features[:size], empty_cache(bundle.model, batch=size), settings)
        start = time.perf_counter()
        hypotheses[name] = decode_in_batches(bundle.model, encode, step, features, tok, settings, batch=BATCH)
        seconds[name] = time.perf_counter() - start
        print(f"{name}: {seconds[name]:.0f} s", flush=True)
    rows = [{"system": name, **paired_wer(references, hypotheses["float graphs"], texts),
             "decode_seconds": seconds[name]} for name, texts in hypotheses.items()]
    for row in rows:
        print(json.dumps(row), flush=True)
    command = (f"python benchmarks/whisper_per_token_plan.py --model {args.model} --plan {args.plan} "
               f"--utts {args.utts} --calib {args.calib}")
    payload = {"model": args.model, "cpu": device_name(), "threads": args.threads, "utterances": len(utterances),
               "batch": BATCH, "plan": args.plan, "auto_choice": choice, "auto_choice_seconds": choice_seconds,
               "auto_chose": choice["activations"],
               "backends": {k: v.report["backend"] for k, v in built.items()},
               "lowering": {k: v.report["lowering"] for k, v in built.items()}, "rows": rows, "command": command}
    slug = args.model.split("/")[-1]
    lines = [f"# {args.model}: one W8A8 plan ({plan.provenance.get('method', args.plan)}), static and per token, on "
             "the x86 backend", "",
             f"{device_name()}, {args.threads} threads; greedy, batches of {BATCH}, the first {len(utterances)} test "
             "utterances. ΔWER against the float graphs, 95 % paired bootstrap. Seconds: one decode pass after a "
             "warm-up that compiles each batch size (indicative).", "",
             f"`activations: auto` on {len(calibration)} calibration utterances (tf_loss, simulated): static "
             f"{choice['static_metric']:.4f}, per token {choice['per_token_metric']:.4f} -> "
             f"**{choice['activations']}** ({choice_seconds:.0f} s).", "",
             "| system | WER | ΔWER pp [95 % CI] | decode s |", "|---|---:|---:|---:|"]
    lines += [f"| {r['system']} | {r['wer']:.4f} | {r['delta_pp']:+.2f} [{r['ci95_pp'][0]:+.2f}, "
              f"{r['ci95_pp'][1]:+.2f}] | {r['decode_seconds']:.0f} |" for r in rows]
    lines += ["", f"Backends: static `{built['static'].report['backend']}`; per token "
              f"`{built['per_token'].report['backend']}`.", "", f"`{command}`", ""]
    atomic_write(RESULTS / f"whisper_per_token_plan_{slug}.json", json.dumps(payload, indent=1) + "\n")
    atomic_write(RESULTS / f"whisper_per_token_plan_{slug}.md", "\n".join(lines))


if __name__ == "__main__":
    main()
