"""Where the time goes: torch.profiler over FP32 `torch.compile` and the lowered INT8 model.

For each model, one process builds the INT8 model (StableQuant PT2E ranges on --calib dev utterances;
the ranges do not change the kernels' speed), lowers it with `lower_x86`, compiles the FP32 model with
Inductor, runs --warmup untimed calls, then profiles --runs calls of each on the same input (10 s of
test speech, batch 1; Whisper: the encoder's 30 s window). Self CPU time is summed by kind of work:

    int8 linear (oneDNN qlinear)      onednn::qlinear_pointwise
    int8 conv (oneDNN qconv)          onednn::qconv_pointwise
    float conv (oneDNN)               aten::mkldnn_convolution (FP32 convs; in INT8: those kept float)
    float linear / matmul             aten::addmm / mm / bmm / linear
    float attention (SDPA)            aten::_scaled_dot_product_*
    int8 attention GEMM (_int_mm)     aten::_int_mm (Q·Kᵀ and P·V with --int8-attention)
    Inductor fused kernels            graph_*_cpp_fused_* (norms, GELU, softmax, residual adds and,
                                      in INT8, the quantize/dequantize fused into them)
    other (dispatch, views, guards)   the rest

    python benchmarks/profile_int8.py                       # both CTC references + Whisper encoder
    python benchmarks/profile_int8.py --models sq/hubert-ref --threads 1
    python benchmarks/profile_int8.py --models arch/wav2vec2-base --int8-attention   # + INT8 attention
    python benchmarks/profile_int8.py --models openai/whisper-tiny.en:step   # one decoder step (M = 1 GEMMs)

Writes benchmarks/results/profile.json and profile.md (atomically). The profiler adds overhead, so
per-call totals here run a little above `latency.py`'s medians; the shares are what this is for.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from common import RESULTS, write_results

CTC_MODELS = ("sq/wav2vec2-ref", "sq/hubert-ref")
WHISPER = "openai/whisper-tiny.en"
WHISPER_STEP = WHISPER + ":step"  # the decoder step alone (one token, batch 1, mid-utterance)
STEP_POSITION = 20  # the step's position in the static cache: a typical mid-utterance step

KINDS = (
    ("int8 linear (oneDNN qlinear)", lambda n: "qlinear" in n),
    ("int8 conv (oneDNN qconv)", lambda n: "qconv" in n),
    ("float conv (oneDNN)", lambda n: n in ("aten::mkldnn_convolution", "aten::convolution_overrideable")),
    ("float linear / matmul", lambda n: n in ("aten::addmm", "aten::mm", "aten::bmm", "aten::linear",
                                              "aten::baddbmm", "aten::matmul")),
    ("float attention (SDPA)", lambda n: n.startswith("aten::_scaled_dot_product")),
    ("int8 attention GEMM (_int_mm)", lambda n: n == "aten::_int_mm"),
    ("Inductor fused kernels", lambda n: n.startswith("graph_") and "_cpp_fused_" in n),
)
OTHER = "other (dispatch, views, guards)"
# Profiler wrappers whose self time is the Python/C++ glue around the graph, not compute.
WRAPPERS = ("## Call CompiledFxGraph", "Torch-Compiled Region", "TorchDynamo Cache Lookup")


def kind_of(name: str) -> str:
    for kind, match in KINDS:
        if match(name):
            return kind
    return OTHER


def profile_calls(fn: Any, x: Any, warmup: int, runs: int) -> tuple[dict[str, float], list[dict[str, Any]], float]:
    """({kind: ms per call}, top ops [{name, kind, ms_per_call, calls_per_call}], wall ms per call)."""
    import torch

    with torch.no_grad():
        for _ in range(warmup):
            fn(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(runs):
                fn(x)
            wall = (time.perf_counter() - start) * 1000.0 / runs
    by_kind = {kind: 0.0 for kind, _ in KINDS} | {OTHER: 0.0}
    ops = []
    for event in prof.key_averages():
        ms = event.self_cpu_time_total / 1000.0 / runs
        kind = kind_of(event.key)
        by_kind[kind] += ms
        ops.append({"name": event.key, "kind": kind, "ms_per_call": round(ms, 3),
                    "calls_per_call": event.count / runs})
    ops.sort(key=lambda o: -o["ms_per_call"])
    return {k: round(v, 3) for k, v in by_kind.items()}, ops[:12], wall


def worker(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torch._inductor.config as inductor_config

    # Name each Inductor-generated C++ kernel in the profile (otherwise one opaque "CompiledFxGraph").
    inductor_config.cpp.enable_kernel_profile = True
    torch.set_num_threads(cfg["threads"])
    from latency import _calib_ctc, _whisper_features, ctc_input, load_ctc, speech_clip
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    from sq_plugin.backends.pt2e import calibrate, lower_x86, prepare_stablequant, strip_weight_norm
    from sq_plugin.speech.corpus import load_split
    from sq_plugin.speech.models import load_model

    if cfg["model"] == WHISPER_STEP:
        return step_worker(cfg)
    bundle = load_model(cfg["model"]) if cfg["model"] == WHISPER else load_ctc(cfg["model"])
    audio = speech_clip(cfg["seconds"])
    if cfg["model"] == WHISPER:
        fp = bundle.model.model.encoder.eval()
        x = _whisper_features(bundle, [audio])
        calib = [_whisper_features(bundle, [u.audio]) for u in load_split("dev", limit=cfg["calib"], progress=False)]
        prepared = prepare_stablequant(fp, (calib[0],), dynamic_dims={})  # static: always the 30 s window
    else:
        fp = strip_weight_norm(bundle.model)
        x = ctc_input(bundle.processor.feature_extractor, audio)
        calib = _calib_ctc(bundle, cfg["calib"])
        prepared = prepare_stablequant(fp, (calib[0],))
    calibrate(prepared, calib)
    converted = convert_pt2e(prepared)
    int8, report = lower_x86(converted, (x,))
    variants = [("fp32 compiled", torch.compile(fp)), ("int8", int8)]
    if cfg.get("int8_attention"):
        variants.append(("int8 + INT8 attention", lower_x86(converted, (x,), int8_attention=True)[0]))
    result: dict[str, Any] = {"model": cfg["model"], "threads": cfg["threads"], "runs": cfg["runs"],
                              "int8_kernels": {"qlinear": report.qlinear, "qconv": report.qconv}}
    for name, fn in variants:
        by_kind, top, wall = profile_calls(fn, x, cfg["warmup"], cfg["runs"])
        result[name] = {"by_kind_ms": by_kind, "top_ops": top, "wall_ms": round(wall, 2)}
    return result


def step_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """The Whisper decoder step alone: FP32 compiled against the INT8 step of `quantize_whisper_int8` (StableQuant
    observers on --calib dev utterances), batch 1, at position STEP_POSITION over one real clip's cross K/V."""
    import torch
    from latency import _whisper_features, speech_clip

    from sq_plugin.families.whisper_int8 import WhisperDecoderStep, decoder_step_inputs, quantize_whisper_int8
    from sq_plugin.speech.corpus import load_split
    from sq_plugin.speech.models import load_model

    bundle = load_model(WHISPER)
    calib = [_whisper_features(bundle, [u.audio]) for u in load_split("dev", limit=cfg["calib"], progress=False)]
    quantized = quantize_whisper_int8(bundle, calib)
    with torch.no_grad():
        cross = quantized.encode(_whisper_features(bundle, [speech_clip(cfg["seconds"])]))
    inputs = list(decoder_step_inputs(bundle.model, cross))
    inputs[1] = torch.tensor([STEP_POSITION])
    fp = torch.compile(WhisperDecoderStep(bundle.model).eval(), dynamic=False)
    result: dict[str, Any] = {"model": WHISPER_STEP, "threads": cfg["threads"], "runs": cfg["runs"],
                              "int8_kernels": quantized.report["lowering"]["decoder_step"]}
    for name, step in (("fp32 compiled", fp), ("int8", quantized.step)):
        by_kind, top, wall = profile_calls(lambda args, s=step: s(*args), inputs, cfg["warmup"], cfg["runs"])
        result[name] = {"by_kind_ms": by_kind, "top_ops": top, "wall_ms": round(wall, 3)}
    return result


def table(results: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in results:
        names = [n for n in ("fp32 compiled", "int8", "int8 + INT8 attention") if n in r]
        totals = {n: sum(r[n]["by_kind_ms"].values()) for n in names}
        lines += [f"### {r['model']} ({r['threads']} threads; INT8 kernels {r['int8_kernels']})", "",
                  "| kind of work | " + " | ".join(f"{n} ms/call | share" for n in names) + " |",
                  "|---|" + "---:|---:|" * len(names)]
        for kind in r["fp32 compiled"]["by_kind_ms"]:
            cells = [f"{r[n]['by_kind_ms'].get(kind, 0.0):.2f} | {r[n]['by_kind_ms'].get(kind, 0.0) / totals[n]:.0%}"
                     for n in names]
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
        fp_wall = r["fp32 compiled"]["wall_ms"]
        lines += ["| **sum of self CPU time** | " + " | ".join(f"{totals[n]:.2f} | " for n in names) + " |",
                  "| wall time per call (profiled) | " + " | ".join(
                      f"{r[n]['wall_ms']:.2f} | {r[n]['wall_ms'] / fp_wall:.2f}x" for n in names) + " |", ""]
        for n in names[1:]:
            lines += [f"Top {n} ops (ms per call): " + "; ".join(
                f"`{o['name'][:60]}` {o['ms_per_call']:.2f} (x{o['calls_per_call']:g})" for o in r[n]["top_ops"][:6]),
                ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", default=[*CTC_MODELS, WHISPER])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--calib", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--int8-attention", action="store_true",
                        help="also profile the INT8 model lowered with int8_attention=True (CTC models)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    from latency import device_name, machine_state, run_worker

    results, failures = [], []
    state = machine_state()
    for model in args.models:
        runs = {WHISPER: max(3, args.runs // 4), WHISPER_STEP: args.runs * 10}.get(model, args.runs)
        cfg = {"model": model, "threads": args.threads, "seconds": args.seconds, "calib": args.calib,
               "warmup": args.warmup, "runs": runs,
               "int8_attention": args.int8_attention and not model.startswith(WHISPER)}
        result = run_worker(cfg, sys.stderr, script=Path(__file__).resolve())
        (results.append(result) if result else failures.append(model))
    lines = ["# Where the time goes: FP32 compiled vs INT8 (torch.profiler, CPU)", "",
             f"Device: {device_name()}; {args.threads} threads; batch 1; {args.seconds:g} s of test speech "
             f"(Whisper: its 30 s encoder window); {args.warmup} warmup + {args.runs} profiled calls "
             f"(Whisper's encoder {max(3, args.runs // 4)}, its decoder step {args.runs * 10}). "
             f"Machine state at start: {state}.",
             "Self CPU time of the calling thread, summed by kind of work; oneDNN and SDPA ops include their "
             "worker threads' wall time.", "", *table(results)]
    write_results(Path(args.out), "profile", results, lines, failures)


if __name__ == "__main__":
    main()
