"""CPU latency / size / memory benchmark: FP32 eager, FP32 torch.compile and real INT8 (PT2E StableQuant).

One run on one machine writes (atomically):
    benchmarks/results/latency.json  rows {"model","backend","precision","batch","audio_seconds","median_ms",
                                     "p90_ms","threads","device","rtf","peak_rss_mb"}
    benchmarks/results/size.json     rows {"model","precision","bytes","fp32_bytes"}
    benchmarks/results/latency.md    the same as tables, INT8/float op report, ratios vs FP32 compiled

Models and configurations:
  * sq/wav2vec2-ref, sq/hubert-ref (CTC), 10 s of audio, batch 1: FP32 eager, FP32 `torch.compile`
    (Inductor), INT8 = `stablequant_x86_quantizer()` ranges calibrated on --calib dev utterances,
    `convert_pt2e`, saved with `sq_plugin.artifact.save`, loaded back, lowered by `lower_x86`.
  * openai/whisper-tiny.en encoder (input_features [1, 80, 3000]): FP32 compiled vs INT8 PT2E (same
    recipe; calibration on the dev utterances' log-mel features).
  * Whisper end to end, one 10 s utterance, greedy, prompt <|startoftranscript|><|notimestamps|>:
    HF FP32 eager, HF with the INT8 encoder (decoder stays float), ctranslate2 float32 and int8.

Every configuration runs in its own subprocess (`--worker`): peak RSS (`resource.getrusage`) is the
child's own and includes loading and compiling; Inductor bakes the thread count into its kernels, so
each thread count is compiled separately. Latency: --warmup untimed runs, then --runs timed runs;
median and p90 of wall time; rtf = median seconds / audio seconds.

    python benchmarks/latency.py                   # full run (~15 min on 2 cores)
    python benchmarks/latency.py --quick           # smoke run: 1 thread, few runs, small calibration
    python benchmarks/latency.py --verify-artifact # also: lower_x86(loaded) == lower_x86(original), bit for bit
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import atomic_write

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CTC_MODELS = ("sq/wav2vec2-ref", "sq/hubert-ref")
WHISPER = "openai/whisper-tiny.en"
SR = 16000


# ----------------------------------------------------------------------------------------------------
# Helpers shared by workers
# ----------------------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def device_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"cpu: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"cpu: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def time_fn(fn: Any, warmup: int, runs: int) -> tuple[float, float]:
    """(median_ms, p90_ms) of `fn()` wall time after `warmup` untimed calls."""
    import numpy as np

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return float(np.median(times)), float(np.percentile(times, 90))


def clip_10s(seconds: float) -> Any:
    """`seconds` of real speech: test-split utterances concatenated (not used for calibration)."""
    import numpy as np

    from sq_plugin.speech.corpus import load_split

    n = int(seconds * SR)
    parts, total = [], 0
    for u in load_split("test", limit=40, progress=False):
        parts.append(u.audio)
        total += len(u.audio)
        if total >= n:
            break
    return np.concatenate(parts)[:n].astype(np.float32)


def load_clip(cfg: dict[str, Any]) -> Any:
    """The benchmark clip, from the .npy the orchestrator wrote (so that loading the corpus, ~160 MB,
    does not count in each configuration's peak RSS)."""
    import numpy as np

    return np.load(cfg["clip"]) if "clip" in cfg else clip_10s(cfg["seconds"])


def make_clip(cfg: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    audio = clip_10s(cfg["seconds"])
    np.save(cfg["clip"], audio)
    return {"samples": len(audio)}


def ctc_input(bundle: Any, audio: Any) -> Any:
    import numpy as np
    import torch

    fe = bundle.processor.feature_extractor
    return torch.from_numpy(np.asarray(fe(audio, sampling_rate=SR).input_values[0], dtype=np.float32))[None]


def float_ops(gm: Any) -> dict[str, int]:
    """Float compute ops left in a converted graph (what is not a quantized linear/conv)."""
    import torch

    heavy = {"bmm", "matmul", "mm", "baddbmm", "scaled_dot_product_attention", "layer_norm", "group_norm",
             "native_layer_norm", "gelu", "softmax", "_softmax", "linear", "conv1d", "conv2d", "add", "mul",
             "addmm", "div"}
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        name = node.target._opname
        if name in heavy and name not in ("linear", "conv1d", "conv2d"):
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def artifact_dir(args: argparse.Namespace, model: str) -> Path:
    return Path(args.artifacts) / model.replace("/", "__")


def row(model: str, backend: str, precision: str, audio_seconds: float, median_ms: float, p90_ms: float,
        threads: int, **extra: Any) -> dict[str, Any]:
    out = {"model": model, "backend": backend, "precision": precision, "batch": 1, "audio_seconds": audio_seconds,
           "median_ms": round(median_ms, 3), "p90_ms": round(p90_ms, 3), "threads": threads,
           "device": device_name(), "rtf": round(median_ms / 1000.0 / audio_seconds, 5),
           "peak_rss_mb": round(peak_rss_mb(), 1)}
    out.update(extra)  # "_"-prefixed extras are reports, stripped before latency.json
    return out


# ----------------------------------------------------------------------------------------------------
# Workers (each runs in its own process)
# ----------------------------------------------------------------------------------------------------


def _calib_ctc(bundle: Any, n: int) -> list[Any]:
    from sq_plugin.speech.corpus import load_split

    return [ctc_input(bundle, u.audio) for u in load_split("dev", limit=n, progress=False)]


def build_ctc(cfg: dict[str, Any]) -> dict[str, Any]:
    """Calibrate + convert + save the INT8 artifact of a CTC model; report ops and sizes."""
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    from sq_plugin.artifact import artifact_bytes, save
    from sq_plugin.pt2e import calibrate, count_quantized_ops, prepare_stablequant, strip_weight_norm
    from sq_plugin.speech.models import checkpoint_dir, load_model

    bundle = load_model(cfg["model"])
    fp = strip_weight_norm(bundle.model)
    calib = _calib_ctc(bundle, cfg["calib"])
    start = time.perf_counter()
    prepared = prepare_stablequant(fp, (calib[0],))
    calibrate(prepared, calib)
    converted = convert_pt2e(prepared)
    quant_s = time.perf_counter() - start
    path = save(converted, cfg["artifact"], example_inputs=(calib[0],), fp_model=fp,
                metadata={"model": cfg["model"], "recipe": {"quantizer": "stablequant_x86_quantizer()",
                                                             "calibration": f"dev[:{cfg['calib']}]"}})
    result: dict[str, Any] = {
        "model": cfg["model"], "quantize_s": round(quant_s, 1), "calibration_utterances": len(calib),
        "quantized_ops": count_quantized_ops(converted), "float_ops": float_ops(converted),
        "artifact_bytes": artifact_bytes(path), "fp32_bytes": (checkpoint_dir(cfg["model"]) / "model.safetensors")
        .stat().st_size, "fp32_param_bytes": sum(p.numel() * 4 for p in fp.parameters()),
    }
    if cfg.get("verify"):
        result["verify"] = _verify_artifact(converted, path, ctc_input(bundle, load_clip(cfg)), torch)
    return result


def _verify_artifact(converted: Any, path: Path, x: Any, torch: Any) -> dict[str, Any]:
    """Bit-for-bit: fake-quant graph and lowered INT8 kernels, loaded artifact vs in-memory original."""
    from sq_plugin.artifact import load
    from sq_plugin.pt2e import lower_x86

    loaded, _ = load(path)
    with torch.no_grad():
        fake_equal = bool(torch.equal(_first(loaded(x)), _first(converted(x))))
        original, _ = lower_x86(converted, (x,))
        reloaded, _ = lower_x86(loaded, (x,))
        lowered_equal = bool(torch.equal(_first(reloaded(x)), _first(original(x))))
    return {"fake_quant_bit_equal": fake_equal, "lowered_bit_equal": lowered_equal}


def _first(out: Any) -> Any:
    if hasattr(out, "logits"):
        return out.logits
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out[0] if isinstance(out, (tuple, list)) else out


def time_ctc(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    from sq_plugin.pt2e import lower_x86, strip_weight_norm
    from sq_plugin.speech.models import load_model

    bundle = load_model(cfg["model"])
    x = ctc_input(bundle, load_clip(cfg))
    backend, extra = cfg["backend"], {}
    start = time.perf_counter()
    with torch.no_grad():
        if backend == "eager":
            fn, name, precision = bundle.model, "eager", "fp32"
        elif backend == "compile":
            fn = torch.compile(strip_weight_norm(bundle.model))
            fn(x)
            name, precision = "torch.compile (inductor)", "fp32"
        else:
            from sq_plugin.artifact import load

            module, _ = load(cfg["artifact"], expect_model=cfg["model"])
            fn, report = lower_x86(module, (x,))
            name, precision = "pt2e-x86 int8 (inductor freezing, oneDNN)", "int8"
            extra["_lowering"] = {"qlinear": report.qlinear, "qconv": report.qconv, "counters": report.counters}
        extra["_setup_s"] = round(time.perf_counter() - start, 1)
        median, p90 = time_fn(lambda: fn(x), cfg["warmup"], cfg["runs"])
    return row(cfg["model"], name, precision, cfg["seconds"], median, p90, cfg["threads"], **extra)


def _whisper_features(bundle: Any, audios: list[Any]) -> Any:
    fe = bundle.processor.feature_extractor
    return fe(audios, sampling_rate=SR, return_tensors="pt").input_features


def build_whisper(cfg: dict[str, Any]) -> dict[str, Any]:
    """INT8 artifact of the Whisper encoder: static [1, 80, 3000] input, same StableQuant recipe."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from sq_plugin.artifact import artifact_bytes, save
    from sq_plugin.pt2e import (
        calibrate,
        count_quantized_ops,
        export_for_quantization,
        label_observers,
        stablequant_x86_quantizer,
    )
    from sq_plugin.speech.corpus import load_split
    from sq_plugin.speech.models import load_model

    bundle = load_model(WHISPER)
    encoder = bundle.model.model.encoder.eval()
    feats = [_whisper_features(bundle, [u.audio]) for u in load_split("dev", limit=cfg["calib"], progress=False)]
    start = time.perf_counter()
    # Static shape: Whisper always sees 30 s (3000 frames); the mel axis must not become dynamic.
    exported = export_for_quantization(encoder, (feats[0],), dynamic_dims={})
    prepared = prepare_pt2e(exported, stablequant_x86_quantizer())
    label_observers(prepared)
    calibrate(prepared, feats)
    converted = convert_pt2e(prepared)
    quant_s = time.perf_counter() - start
    path = save(converted, cfg["artifact"], example_inputs=(feats[0],), fp_model=encoder,
                metadata={"model": WHISPER + ":encoder", "model_config": bundle.model.config,
                          "recipe": {"quantizer": "stablequant_x86_quantizer()",
                                     "calibration": f"dev[:{cfg['calib']}] log-mel"}})
    return {"model": WHISPER + " encoder", "quantize_s": round(quant_s, 1), "calibration_utterances": len(feats),
            "quantized_ops": count_quantized_ops(converted), "float_ops": float_ops(converted),
            "artifact_bytes": artifact_bytes(path),
            "fp32_param_bytes": sum(p.numel() * 4 for p in encoder.parameters())}


def time_whisper_encoder(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    from sq_plugin.pt2e import lower_x86
    from sq_plugin.speech.models import load_model

    bundle = load_model(WHISPER)
    x = _whisper_features(bundle, [load_clip(cfg)])
    extra: dict[str, Any] = {}
    start = time.perf_counter()
    with torch.no_grad():
        if cfg["backend"] == "compile":
            fn = torch.compile(bundle.model.model.encoder.eval())
            fn(x)
            name, precision = "torch.compile (inductor)", "fp32"
        else:
            from sq_plugin.artifact import load

            module, _ = load(cfg["artifact"], expect_model=WHISPER + ":encoder")
            fn, report = lower_x86(module, (x,))
            name, precision = "pt2e-x86 int8 (inductor freezing, oneDNN)", "int8"
            extra["_lowering"] = {"qlinear": report.qlinear, "qconv": report.qconv, "counters": report.counters}
        extra["_setup_s"] = round(time.perf_counter() - start, 1)
        median, p90 = time_fn(lambda: fn(x), cfg["warmup"], cfg["runs"])
    # The encoder always processes 30 s of (padded) features; audio_seconds is the speech in it.
    result = row(WHISPER + " (encoder, 30 s window)", name, precision, cfg["seconds"], median, p90, cfg["threads"],
                 **extra)
    if cfg["backend"] == "int8" and cfg.get("e2e_runs"):
        # End to end with this INT8 encoder, in the same process: a second worker would compile it again
        # (the slowest step). Its peak RSS is therefore this process's, encoder timing included.
        e2e = {**cfg, "backend": "hf-int8enc", "warmup": 1, "runs": cfg["e2e_runs"]}
        result["_more_rows"] = [time_whisper_e2e(e2e, compiled_encoder=fn)]
    return result


def _use_int8_encoder(hf: Any, compiled: Any) -> None:
    """Make HF generate call the lowered INT8 encoder. The encoder module object stays (generate reads
    conv1/conv2 strides and the config from it); only its forward is replaced."""
    from transformers.modeling_outputs import BaseModelOutput

    def forward(input_features: Any, **kwargs: Any) -> BaseModelOutput:
        # Greedy decoding uses last_hidden_state only; attentions/hidden states are not produced.
        return BaseModelOutput(last_hidden_state=_first(compiled(input_features)))

    hf.model.encoder.forward = forward


def time_whisper_e2e(cfg: dict[str, Any], compiled_encoder: Any = None) -> dict[str, Any]:
    import numpy as np
    import torch

    from sq_plugin.speech.whisper_ct2 import default_model_dir

    audio = load_clip(cfg)
    backend, threads, extra = cfg["backend"], cfg["threads"], {}
    from sq_plugin.speech.models import load_model

    bundle = load_model(WHISPER)
    tok = bundle.processor.tokenizer
    feats = _whisper_features(bundle, [audio])
    prompt = tok.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"])
    start = time.perf_counter()
    if backend.startswith("ct2"):
        import ctranslate2

        compute_type = backend.split("-", 1)[1]
        model = ctranslate2.models.Whisper(str(default_model_dir()), device="cpu", compute_type=compute_type,
                                           intra_threads=threads)
        storage = ctranslate2.StorageView.from_array(np.ascontiguousarray(feats.numpy(), dtype=np.float32))

        def run() -> str:
            result = model.generate(storage, [prompt], beam_size=1, max_length=448)
            return tok.decode(result[0].sequences_ids[0], skip_special_tokens=True).strip()

        name, precision = "ctranslate2", compute_type
    else:
        hf = bundle.model
        if backend == "hf-int8enc":
            from sq_plugin.artifact import load
            from sq_plugin.pt2e import lower_x86

            if compiled_encoder is None:
                module, _ = load(cfg["artifact"], expect_model=WHISPER + ":encoder")
                compiled_encoder, report = lower_x86(module, (feats,))
                extra["_lowering"] = {"qlinear": report.qlinear, "qconv": report.qconv}
            _use_int8_encoder(hf, compiled_encoder)
            name, precision = "HF generate, PT2E int8 encoder + fp32 eager decoder", "int8 encoder / fp32 decoder"
        else:
            name, precision = "HF generate (eager)", "fp32"
        gen = {"max_length": 448, "return_timestamps": False, "num_beams": 1, "do_sample": False}

        def run() -> str:
            with torch.no_grad():
                tokens = hf.generate(feats, **gen)
            return tok.batch_decode(tokens, skip_special_tokens=True)[0].strip()

    extra["_setup_s"] = round(time.perf_counter() - start, 1)
    extra["_text"] = run()
    median, p90 = time_fn(run, cfg["warmup"], cfg["runs"])
    return row(WHISPER + " (end-to-end greedy)", name, precision, cfg["seconds"], median, p90, threads, **extra)


WORKERS = {"clip": make_clip, "build_ctc": build_ctc, "time_ctc": time_ctc, "build_whisper": build_whisper,
           "time_whisper_encoder": time_whisper_encoder, "time_whisper_e2e": time_whisper_e2e}


def worker_main(cfg: dict[str, Any]) -> None:
    import torch

    torch.set_num_threads(cfg.get("threads", 1))
    result = WORKERS[cfg["kind"]](cfg)
    print("RESULT " + json.dumps(result, default=str), flush=True)


# ----------------------------------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------------------------------


def run_worker(cfg: dict[str, Any], log: Any, script: Path | None = None) -> dict[str, Any] | None:
    """Run one configuration in a fresh interpreter (`script --worker cfg`, default this script);
    None (and the error logged) if it failed."""
    env = dict(os.environ)
    threads = str(cfg.get("threads", 1))
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(script or Path(__file__).resolve()), "--worker", json.dumps(cfg)],
                          capture_output=True, text=True, env=env, cwd=str(ROOT))
    took = time.perf_counter() - start
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
    label = " ".join(f"{k}={cfg[k]}" for k in ("kind", "model", "backend", "threads") if k in cfg)
    if result is None:
        tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-15:])
        print(f"[{took:6.1f}s] FAILED {label}\n{tail}", file=log, flush=True)
    else:
        brief = {k: result[k] for k in ("median_ms", "p90_ms", "peak_rss_mb", "_setup_s") if k in result}
        print(f"[{took:6.1f}s] {label} {brief}", file=log, flush=True)
    return result


def machine_state() -> dict[str, Any]:
    """Load average and whether the project's background trainings (runs/*.pid) are running."""
    alive = []
    for pid_file in sorted((ROOT / "runs").glob("*.pid")):
        try:
            pid = int(pid_file.read_text().strip())
            os.kill(pid, 0)
            alive.append(pid_file.stem)
        except (ValueError, OSError):
            pass
    return {"utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "loadavg": [round(x, 2) for x in os.getloadavg()],
            "background_trainings_running": alive}


def ratio_table(rows: list[dict[str, Any]]) -> list[str]:
    """Speedup = baseline median / row median, baseline = FP32 torch.compile of the same model and thread
    count (Whisper end to end, which has no compiled row: HF FP32 eager generate)."""
    lines = ["| model | threads | backend | precision | median ms | p90 ms | RTF | peak RSS MB "
             "| speedup vs FP32 compiled* |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|"]
    base = {(r["model"], r["threads"]): r["median_ms"] for r in rows
            if r["precision"] == "fp32" and r["backend"].startswith("HF generate")}
    base.update({(r["model"], r["threads"]): r["median_ms"] for r in rows
                 if r["precision"] == "fp32" and r["backend"].startswith("torch.compile")})
    for r in rows:
        b = base.get((r["model"], r["threads"]))
        speed = f"{b / r['median_ms']:.2f}x" if b else "–"
        lines.append(f"| {r['model']} | {r['threads']} | {r['backend']} | {r['precision']} | {r['median_ms']:.1f} | "
                     f"{r['p90_ms']:.1f} | {r['rtf']:.4f} | {r['peak_rss_mb']:.0f} | {speed} |")
    return lines


def write_markdown(args: argparse.Namespace, rows: list[dict[str, Any]], sizes: list[dict[str, Any]],
                   builds: dict[str, dict[str, Any]], state_start: dict[str, Any], state_end: dict[str, Any],
                   failures: list[str], wall_s: float) -> str:
    lines = ["# Latency, size and memory (CPU)", ""]
    lines += [f"Device: {device_name()}; torch threads: {args.threads}; batch 1; {args.seconds:g} s of audio; "
              f"{args.warmup} warmup + {args.runs} timed runs (Whisper end to end: {args.e2e_runs}); "
              f"{'QUICK smoke run' if args.quick else 'full run'}; wall time {wall_s / 60:.1f} min.",
              f"Machine state at start: {state_start}; at end: {state_end}.",
              "Peak RSS: the configuration's own process (loading, compiling and running).", ""]
    lines += ["## Latency", ""] + ratio_table(rows) + [
        "", "\\* Whisper end to end has no compiled FP32 row: its speedups are vs HF FP32 eager generate.", ""]
    lines += ["## Size", "", "| model | precision | bytes | FP32 bytes | ratio |", "|---|---|---:|---:|---:|"]
    for s in sizes:
        lines.append(f"| {s['model']} | {s['precision']} | {s['bytes']} | {s['fp32_bytes']} | "
                     f"{s['bytes'] / s['fp32_bytes']:.3f} |")
    lines += ["", "INT8 size = the `sq_plugin.artifact` directory (INT8 weights + scales in safetensors, the graph, "
              "metadata). CTC FP32 = the shipped model.safetensors; Whisper encoder FP32 = its parameters x 4 bytes.",
              "", "## What runs in INT8", ""]
    for name, b in builds.items():
        lines.append(f"* **{name}**: quantized in the PT2E graph: {b.get('quantized_ops')}; float compute ops left: "
                     f"{b.get('float_ops')}; calibration {b.get('calibration_utterances')} dev utterances, "
                     f"{b.get('quantize_s')} s.")
        if "verify" in b:
            lines.append(f"  artifact round trip on a {args.seconds:g} s clip: {b['verify']}")
    for r in rows:
        if "_lowering" in r:
            lines.append(f"* {r['model']} ({r['threads']} threads): oneDNN INT8 kernels lowered by Inductor: "
                         f"qlinear={r['_lowering']['qlinear']}, qconv={r['_lowering']['qconv']}")
    lines += ["", "Float: LayerNorm/GroupNorm, GELU, softmax, the attention matmuls (q·kᵀ, attn·v: "
              "the x86 quantizer annotates linear/conv only) and residual adds; Inductor fuses the "
              "quantize/dequantize around them. Whisper: the decoder stays float in the HF path (see below).", "",
              "## Notes", "",
              "* Whisper decoder: not lowered to INT8. HF `generate` runs the decoder step by step with a growing "
              "KV cache (`EncoderDecoderCache` objects, a new sequence length per step); PT2E needs an exported "
              "graph, i.e. a static-cache decoder-step wrapper, which is not built here. ctranslate2 int8 "
              "quantizes both encoder and decoder (its own int8 GEMMs, weights int8, activations dynamic).",
              "* Whisper encoder rows: the encoder always runs on a 30 s padded window ([1, 80, 3000]); "
              "rtf uses the 10 s of speech in it.", ""]
    texts = [(r["backend"], r["precision"], r["_text"]) for r in rows
             if "_text" in r and r["threads"] == args.threads[0]]
    if texts:
        lines += ["Whisper transcripts of the 10 s clip:", ""] + [f"* {b} / {p}: {t!r}" for b, p, t in texts] + [""]
    if failures:
        lines += ["## Failed configurations", ""] + [f"* {f}" for f in failures] + [""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, nargs="+", default=None, help="thread counts (default 2 1)")
    parser.add_argument("--seconds", type=float, default=10.0, help="audio length")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--e2e-runs", type=int, default=None, help="timed runs of Whisper end to end")
    parser.add_argument("--calib", type=int, default=None, help="calibration utterances (default 32)")
    parser.add_argument("--models", nargs="+", default=[*CTC_MODELS, WHISPER])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 thread, few runs, 4 calibration utts")
    parser.add_argument("--verify-artifact", action="store_true",
                        help="also compile original and reloaded INT8 CTC models and compare bit for bit")
    parser.add_argument("--artifacts", default=str(Path(os.environ.get("SQ_PLUGIN_CACHE",
                                                                       Path.home() / ".cache" / "sq_plugin"))
                                                   / "bench_artifacts"))
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if args.worker:
        worker_main(json.loads(args.worker))
        return
    quick = args.quick
    args.threads = args.threads or ([1] if quick else [2, 1])
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 3)
    args.runs = args.runs if args.runs is not None else (3 if quick else 20)
    args.e2e_runs = args.e2e_runs if args.e2e_runs is not None else (1 if quick else 3)
    args.calib = args.calib if args.calib is not None else (4 if quick else 32)
    log = sys.stderr
    state_start = machine_state()
    print(f"machine: {device_name()}; state {state_start}", file=log, flush=True)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    sizes: list[dict[str, Any]] = []
    builds: dict[str, dict[str, Any]] = {}
    failures: list[str] = []
    clip = str(Path(args.artifacts) / f"clip_{args.seconds:g}s.npy")
    Path(args.artifacts).mkdir(parents=True, exist_ok=True)
    common = {"seconds": args.seconds, "warmup": args.warmup, "runs": args.runs, "clip": clip}

    def add(cfg: dict[str, Any]) -> dict[str, Any] | None:
        result = run_worker(cfg, log)
        if result is None:
            failures.append(" ".join(f"{k}={cfg[k]}" for k in ("kind", "model", "backend", "threads") if k in cfg))
        return result

    if add({"kind": "clip", "clip": clip, "seconds": args.seconds}) is None:
        sys.exit("could not build the benchmark clip from the test split")
    for model in [m for m in args.models if m in CTC_MODELS]:
        art = str(artifact_dir(args, model))
        build = add({"kind": "build_ctc", "model": model, "calib": args.calib, "artifact": art,
                     "threads": max(args.threads), "verify": args.verify_artifact, "seconds": args.seconds,
                     "clip": clip})
        if build:
            builds[model] = build
            sizes += [{"model": model, "precision": "fp32", "bytes": build["fp32_bytes"],
                       "fp32_bytes": build["fp32_bytes"]},
                      {"model": model, "precision": "int8", "bytes": build["artifact_bytes"],
                       "fp32_bytes": build["fp32_bytes"]}]
        for threads in args.threads:
            for backend in ("eager", "compile", "int8"):
                if backend == "int8" and not build:
                    continue
                r = add({"kind": "time_ctc", "model": model, "backend": backend, "threads": threads, "artifact": art,
                         **common})
                if r:
                    rows.append(r)

    if WHISPER in args.models:
        art = str(artifact_dir(args, WHISPER))
        build = add({"kind": "build_whisper", "calib": args.calib, "artifact": art, "threads": max(args.threads)})
        if build:
            builds[WHISPER + " encoder"] = build
            sizes.append({"model": WHISPER + " encoder", "precision": "int8", "bytes": build["artifact_bytes"],
                          "fp32_bytes": build["fp32_param_bytes"]})
        for threads in args.threads:
            for backend in ("compile", "int8"):
                if backend == "int8" and not build:
                    continue
                r = add({"kind": "time_whisper_encoder", "backend": backend, "threads": threads, "artifact": art,
                         **common, "runs": max(3, args.runs // 4), "e2e_runs": args.e2e_runs})
                if r:
                    rows += [r, *r.pop("_more_rows", [])]
            for backend in ("hf", "ct2-float32", "ct2-int8"):  # hf-int8enc: in the INT8 encoder worker
                r = add({"kind": "time_whisper_e2e", "backend": backend, "threads": threads, "artifact": art,
                         "seconds": args.seconds, "warmup": 1, "runs": args.e2e_runs, "clip": clip})
                if r:
                    rows.append(r)

    wall = time.perf_counter() - t0
    state_end = machine_state()
    out = Path(args.out)
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    atomic_write(out / "latency.json", json.dumps(public, indent=1) + "\n")
    atomic_write(out / "size.json", json.dumps(sizes, indent=1) + "\n")
    atomic_write(out / "latency.md", write_markdown(args, rows, sizes, builds, state_start, state_end, failures, wall))
    print(f"wrote {out}/latency.json, size.json, latency.md in {wall / 60:.1f} min; failures: {failures or 'none'}",
          file=log, flush=True)
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
