"""Does the range method change INT8 speed? INT8 models of several plan methods, timed against each other.

Every plan method of a CTC reference lowers to the same oneDNN kernels (qconv/qlinear); only the scales and zero
points differ. optimum-benchmark once timed StableQuant's model slower than MAX's (BENCHMARKS.md, optimum-benchmark
section), which the kernels cannot explain. This script measures it without the harness's noise: one process
quantizes the model once per method through transformers' `from_pretrained(quantization_config=...)` (the path the
optimum-benchmark configs take), then times the models **interleaved** (A, B, A, B, ... for --rounds rounds), so that
a drift of the machine's speed falls on every method alike. It also says how many layers' plans differ from the
first method's (a method whose plan equals another's must time the same), builds the first method twice by default
(the noise floor: two models that compute the same), and times each model on real speech and on the random input
optimum-benchmark feeds.

    python benchmarks/method_speed.py                                   # wav2vec2-ref: max, stablequant, max again
    python benchmarks/method_speed.py --models sq/hubert-ref --methods max,stablequant,mse --threads 2

Writes benchmarks/results/method_speed.json and method_speed.md (atomically; --out names another folder).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from common import RESULTS, device_name, write_results

CTC_REFERENCES = ("sq/wav2vec2-ref", "sq/hubert-ref")  # the shipped checkpoints (speech.models.checkpoint_dir)


def build(model: str, method: str, calib: int) -> tuple[Any, dict[str, Any]]:
    """The HF model quantized by `method` (W8A8, x86), and what describes it: backend, kernels, plan layers."""
    from transformers import AutoModelForCTC

    from sq_plugin.speech.models import checkpoint_dir

    start = time.perf_counter()
    hf = AutoModelForCTC.from_pretrained(checkpoint_dir(model), quantization_config={
        "quant_method": "stablequant", "method": method, "bits": "w8a8",
        "calibration": {"dataset": "corpus-dev", "size": calib}})
    quantized = hf.stablequant
    plan = quantized.plan.to_dict() if quantized.plan is not None else {"layers": {}, "provenance": {}}
    return hf.eval(), {"backend": quantized.backend, "int8_kernels": quantized.int8_kernels,
                       "build_s": round(time.perf_counter() - start, 1), "plan_layers": plan["layers"],
                       # the search starts from the best whole-model built-in rule: which one it was
                       "base_rule": plan["provenance"].get("base_rule", method)}


def arithmetic(layer: dict[str, Any]) -> dict[str, Any]:
    """What a plan layer makes the kernels compute (its grids and range), without the decision's provenance."""
    return {k: v for k, v in layer.items() if k != "decision"}


def labels(methods: list[str]) -> list[str]:
    """One label per model: the method, numbered where a method is asked for twice (a second build of the same
    method is the measurement's noise floor: two models that compute the same)."""
    return [m if methods.count(m) == 1 else f"{m} ({methods[:i + 1].count(m)})" for i, m in enumerate(methods)]


def interleaved_ms(models: dict[str, Any], x: Any, warmup: int, rounds: int) -> dict[str, list[float]]:
    """Wall ms of each model's forward on `x`, the models taking turns `rounds` times after `warmup` calls each."""
    import torch

    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            for _ in range(warmup):
                model(x)
        for _ in range(rounds):
            for name, model in models.items():
                start = time.perf_counter()
                model(x)
                times[name].append((time.perf_counter() - start) * 1000.0)
    return times


def worker(cfg: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch

    torch.set_num_threads(cfg["threads"])
    from latency import SR, ctc_feature_extractor, ctc_input, speech_clip

    import sq_plugin  # noqa: F401  (registers quant_method "stablequant" with transformers)

    models, described = {}, {}
    for label in labels(cfg["methods"]):
        models[label], described[label] = build(cfg["model"], label.split(" ")[0], cfg["calib"])
    plans = {label: d.pop("plan_layers") for label, d in described.items()}
    first = next(iter(plans))
    for label, plan in plans.items():
        described[label]["layers_differing"] = None if label == first else sum(
            arithmetic(layer) != arithmetic(plans[first].get(name, {})) for name, layer in plan.items())

    inputs = {"speech": ctc_input(ctc_feature_extractor(cfg["model"]), speech_clip(cfg["seconds"])),
              "random (optimum-benchmark's input)": torch.randn(1, int(cfg["seconds"] * SR))}
    timings = {}
    for label, x in inputs.items():
        times = interleaved_ms(models, x, cfg["warmup"], cfg["rounds"])
        timings[label] = {m: {"median_ms": round(float(np.median(t)), 2),
                              "p90_ms": round(float(np.percentile(t, 90)), 2)} for m, t in times.items()}
    return {"model": cfg["model"], "threads": cfg["threads"], "methods": described, "timings": timings}


def table(result: dict[str, Any]) -> list[str]:
    methods = list(result["methods"])
    first = methods[0]
    lines = [f"### {result['model']} ({result['threads']} threads)", "",
             "| method | backend | INT8 kernels | base rule | plan layers differing from " + first + " | "
             + " | ".join(f"{label}: median ms (÷ {first}) | p90 ms" for label in result["timings"]) + " |",
             "|---|---|---:|---|---:|" + "---:|---:|" * len(result["timings"])]
    for m in methods:
        d = result["methods"][m]
        cells = []
        for by_method in result["timings"].values():
            t, base = by_method[m], by_method[first]["median_ms"]
            cells.append(f"{t['median_ms']:.2f} ({t['median_ms'] / base:.3f}x) | {t['p90_ms']:.2f}")
        lines.append(f"| {m} | {d['backend']} | {d['int8_kernels']} | {d['base_rule']} | "
                     f"{'-' if d['layers_differing'] is None else d['layers_differing']} | " + " | ".join(cells) + " |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", default=["sq/wav2vec2-ref"], choices=CTC_REFERENCES)
    parser.add_argument("--methods", default="max,stablequant,max",
                        help="comma list of plan methods, the first the base; one named twice is built twice, "
                             "which shows the timing's noise floor")
    parser.add_argument("--calib", type=int, default=16, help="calibration utterances (the optimum-benchmark configs')")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if len(methods) < 2:
        parser.error("--methods needs at least two methods to compare, e.g. max,stablequant")
    from latency import machine_state, run_worker

    state = machine_state()
    results, failures = [], []
    for model in args.models:
        cfg = {"model": model, "methods": methods, "calib": args.calib, "threads": args.threads,
               "seconds": args.seconds, "warmup": args.warmup, "rounds": args.rounds}
        result = run_worker(cfg, sys.stderr, script=Path(__file__).resolve())
        (results.append(result) if result else failures.append(model))
    command = "python benchmarks/method_speed.py " + " ".join(sys.argv[1:])
    lines = ["# INT8 speed by range method (same kernels, interleaved timing)", "",
             f"`{command.strip()}`", "",
             f"Device: {device_name()}; {args.threads} threads; batch 1, {args.seconds:g} s; {args.warmup} warmup "
             f"calls each, then {args.rounds} rounds in turn. Quantized through "
             f"`from_pretrained(quantization_config=...)` on {args.calib} dev utterances. "
             f"Machine state at start: {state}.", ""]
    for result in results:
        lines += table(result)
    write_results(Path(args.out), "method_speed", {"command": command.strip(), "state": state, "results": results},
                  lines, failures)


if __name__ == "__main__":
    main()
