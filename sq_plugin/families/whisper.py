"""Whisper (encoder-decoder) through StableQuant's search and a fake-quant simulation.

    bundle = load_model("openai/whisper-tiny.en")
    result = search_whisper(bundle, dev, SearchConfig(threshold=0.01), metric="tf_loss")
    quantized = quantize_whisper_simulated(bundle, dev, plan=result.to_plan())
    evaluate(quantized.bundle, test, batch_size=16)          # greedy generate, fake-quantized layers

Metrics for the search. The paper screens by WER, which for Whisper means autoregressive decoding
of the whole calibration set per candidate (about 1 s per utterance per evaluation on one CPU
core, with ~70 layers to screen). So two teacher-forced proxies are offered, one encoder pass plus
one decoder pass over the reference transcript, with the float encoder output replayed for
decoder-layer candidates (`sq_plugin.search.prefix_cache`):

- `tf_loss`: mean cross-entropy (nats per token) of the float model's own greedy transcript of
  each calibration clip; threshold in nats. The float model's transcript, not the reference: the
  screen asks how much quantizing a layer changes the output, and Whisper's cased, punctuated
  output is far from our lowercase references, whose loss would swamp that change.
- `tf_token_error`: fraction of those tokens whose teacher-forced argmax differs (WER-like units).
- `tf_kl`: mean KL divergence (nats per token) of the next-token distribution from the float model's, at the same
  positions: the whole distribution rather than the float model's argmax (0 at float). It holds the float model's
  log-probabilities over the calibration transcripts in memory (tokens x vocabulary floats: about 100 MB for 16
  utterances of a 51,864-token vocabulary).
- `wer` / `cer`: greedy `generate`, as the paper; slow, and no prefix replay (the KV cache is state).

`quantize_whisper_simulated` is a simulation (fake-quant weights per output channel and input
activations per tensor, `sq_plugin.backends.simulate`), labelled so in every report: it measures accuracy, not
speed. `quantize_whisper_x86` runs the search's plan on real INT8 kernels (`sq_plugin.families.whisper_int8`:
the encoder and a static-cache decoder step), which the recipe runner uses for StableQuant at W8A8.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sq_plugin.backends.simulate import (
    LayerQuant,
    apply_fake_quant,
    observer_ranges,
    plan_layer_quants,
    quantizable_layers,
    strip_weight_norm,
)
from sq_plugin.backends.weights import StoredWeight, install_stored_weights
from sq_plugin.backends.x86_isa import resolve_int8_grid
from sq_plugin.core.quant import grid_bits, quant_bounds
from sq_plugin.core.ranges import RangeRule, compute_range
from sq_plugin.core.stats import DEFAULT_BINS, Histogram
from sq_plugin.families import metric_subset, quick_subset
from sq_plugin.families.ctc import QuantizedModel
from sq_plugin.recipe import TEACHER_FORCED_METRICS
from sq_plugin.search import SearchConfig, SearchResult, collect_input_histograms, stablequant_search
from sq_plugin.search.early_stop import sum_until
from sq_plugin.search.prefix_cache import DEFAULT_BUDGET_MB
from sq_plugin.speech.audio import SAMPLE_RATE
from sq_plugin.speech.evaluate import evaluate, transcribe
from sq_plugin.speech.models import SpeechModel

WHISPER_METRICS = ("wer", "cer", *TEACHER_FORCED_METRICS)
SIMULATED_BACKEND = "fake-quant simulation (float weights/activations rounded to the grid)"
EVAL_BATCH = 16  # generate() batch for evaluation


@dataclass
class TeacherForcedBatch:
    """Log-mel features, the decoder input (prompt + reference tokens) and the next-token labels
    (-100 where the row is padding)."""

    input_features: torch.Tensor
    decoder_input_ids: torch.Tensor
    labels: torch.Tensor


def _require_whisper(bundle: SpeechModel) -> None:
    if bundle.kind != "whisper":
        raise ValueError(f"{bundle.name}: this path takes Whisper models; got kind={bundle.kind!r}")


def teacher_forced_batches(bundle: SpeechModel, utterances: Sequence[Any], *, batch_size: int = 8,
                           texts: Sequence[str] | None = None) -> list[TeacherForcedBatch]:
    """Batches for teacher-forced scoring: the tokenizer's prompt (<|startoftranscript|>
    <|notimestamps|>) + " " + text + <|endoftext|>, shifted by one for the labels. text: the
    reference transcript, or `texts[i]` (e.g. the float model's own transcripts)."""
    _require_whisper(bundle)
    if not utterances:
        raise ValueError("the calibration set is empty: pass at least one utterance")
    if texts is not None and len(texts) != len(utterances):
        raise ValueError(f"got {len(texts)} texts for {len(utterances)} utterances")
    texts = list(texts) if texts is not None else [u.text for u in utterances]
    fe, tokenizer = bundle.processor.feature_extractor, bundle.processor.tokenizer
    pad = tokenizer.eos_token_id
    batches = []
    for start in range(0, len(utterances), batch_size):
        chunk = utterances[start : start + batch_size]
        feats = fe([u.audio for u in chunk], sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
        ids = [tokenizer(" " + t.strip()).input_ids for t in texts[start : start + batch_size]]
        length = max(len(x) for x in ids) - 1
        dec = torch.full((len(chunk), length), pad, dtype=torch.long)
        labels = torch.full((len(chunk), length), -100, dtype=torch.long)
        for row, x in enumerate(ids):
            dec[row, : len(x) - 1] = torch.tensor(x[:-1])
            labels[row, : len(x) - 1] = torch.tensor(x[1:])
        batches.append(TeacherForcedBatch(feats.to(torch.float32), dec, labels))
    return batches


def _forward(model: torch.nn.Module, batch: TeacherForcedBatch) -> torch.Tensor:
    # use_cache=False: no KV cache object is updated in place, so decoder layers are pure functions
    # of their inputs (what the prefix cache needs).
    return model(input_features=batch.input_features, decoder_input_ids=batch.decoder_input_ids,
                 use_cache=False).logits


def teacher_forced_kl(model: torch.nn.Module, batches: Sequence[TeacherForcedBatch],
                      reference: Sequence[torch.Tensor], *, bound: float | None = None) -> float:
    """Mean KL(reference || model) per target token: `reference[i]` holds the float model's log-probabilities at
    batch i's target positions (`teacher_forced_log_probs`). bound: stop once the mean is sure to exceed it, and
    return that lower bound (`sq_plugin.search.early_stop`)."""
    if len(batches) != len(reference):
        raise ValueError(f"teacher_forced_kl: {len(batches)} batches for {len(reference)} reference batches")
    tokens = sum(len(log_p) for log_p in reference)

    def per_batch() -> Iterator[float]:
        for batch, log_p in zip(batches, reference, strict=True):
            with torch.inference_mode():  # not across the yield: a caller that stops early leaves no mode set
                log_q = torch.log_softmax(_forward(model, batch).float()[batch.labels != -100], dim=-1)
                kl = float(torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="sum"))
            yield kl

    _, total, _ = sum_until(per_batch(), tokens, bound)
    return total / tokens


def teacher_forced_log_probs(model: torch.nn.Module, batches: Sequence[TeacherForcedBatch]) -> list[torch.Tensor]:
    """Per batch, the model's next-token log-probabilities at the target positions (tokens, vocabulary)."""
    with torch.inference_mode():
        return [torch.log_softmax(_forward(model, b).float()[b.labels != -100], dim=-1) for b in batches]


def teacher_forced_scores(model: torch.nn.Module, batches: Sequence[TeacherForcedBatch], *,
                          stop_above: tuple[str, float] | None = None) -> dict[str, float]:
    """{"tf_loss": mean cross-entropy per reference token, "tf_token_error": argmax error rate}.
    stop_above: (metric, bound): stop once that metric is sure to exceed the bound; both values are then lower
    bounds (`sq_plugin.search.early_stop`)."""
    tokens = sum(int((b.labels != -100).sum()) for b in batches)
    if not tokens:
        raise ValueError("teacher_forced_scores: the batches hold no target token")
    sums = {"tf_loss": 0.0, "tf_token_error": 0.0}
    with torch.inference_mode():
        for batch in batches:
            logits = _forward(model, batch).float()
            mask = batch.labels != -100
            sums["tf_loss"] += float(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch.labels.reshape(-1), ignore_index=-100, reduction="sum"))
            sums["tf_token_error"] += int(((logits.argmax(-1) != batch.labels) & mask).sum())
            if stop_above is not None and sums[stop_above[0]] / tokens > stop_above[1]:
                break
    return {name: total / tokens for name, total in sums.items()}


# Teacher-forced scoring one utterance per forward: no padded decoder positions, and an early stop can stop after
# any utterance. Measured no slower than batches of 8 on CPU (tiny.en, 16 dev utterances, one thread: 7.4 s against
# 8.2 s per evaluation, the same tf_kl to 6 digits): the encoder's 1500 frames make each forward large already.
TEACHER_FORCED_BATCH = 1


def whisper_score(bundle: SpeechModel, utterances: Sequence[Any], metric: str, *,
                  batch_size: int = TEACHER_FORCED_BATCH) -> tuple[Callable[..., float], str | None]:
    """(the calibration metric on `bundle.model` as it stands at each call, its prefix replay: "auto" or None).
    Teacher-forced metrics score the float model's own greedy transcripts (decoded once, here) and replay;
    "wer"/"cer" decode every time, through a KV cache, so nothing can be replayed."""
    _require_whisper(bundle)
    if metric not in WHISPER_METRICS:
        raise ValueError(f"unknown Whisper search metric {metric!r}; choose one of {', '.join(WHISPER_METRICS)}")
    if not utterances:
        raise ValueError("the calibration set is empty: pass at least one utterance")
    model = bundle.model
    if metric in TEACHER_FORCED_METRICS:
        targets = transcribe(bundle, [u.audio for u in utterances], batch_size=EVAL_BATCH, progress=False)
        tf_batches = teacher_forced_batches(bundle, utterances, batch_size=batch_size, texts=targets)
        if metric == "tf_kl":  # the float model's distributions, once: `model` is float now
            reference = teacher_forced_log_probs(model.eval(), tf_batches)

            def kl(*, bound: float | None = None) -> float:
                return teacher_forced_kl(model, tf_batches, reference, bound=bound)
            return kl, "auto"

        def teacher_forced(*, bound: float | None = None) -> float:
            stop_above = None if bound is None else (metric, bound)
            return teacher_forced_scores(model, tf_batches, stop_above=stop_above)[metric]
        return teacher_forced, "auto"

    def rate() -> float:
        result = evaluate(bundle, utterances, batch_size=EVAL_BATCH, progress=False)
        return result.wer if metric == "wer" else result.cer
    return rate, None  # generate() updates a KV cache in place: replaying decoder layers would be wrong


def search_whisper(bundle: SpeechModel, calibration: Sequence[Any], config: SearchConfig | None = None, *,
                   metric: str = "tf_loss", batch_size: int = TEACHER_FORCED_BATCH, progress: bool = True,
                   prefix_cache: bool = True,
                   cache_budget_mb: float = DEFAULT_BUDGET_MB, referee: str | None = None,
                   metric_size: int | None = None) -> SearchResult:
    """StableQuant's search on Whisper (encoder convs and Linears, decoder Linears, proj_out).

    metric: see the module docstring; the threshold of `config` is in the metric's units. It is scored on the first
    `metric_size` calibration utterances (None: all; the statistics always use all).
    referee: "wer" or "cer" decodes the calibration set to pick between the searched model and each built-in rule
    applied everywhere (`stablequant_search(referee=)`); "auto": "wer" when the metric is a teacher-forced proxy.
    Off by default, because measured it misleads more than the proxy: at W6A6 on 16 calibration utterances it
    ranked the 99.99 cut-off worst (199 % WER) where the test set ranks it best, and the run it refereed ended
    at +87.7 pp against +45.9 without (BENCHMARKS.md). A larger calibration set may change that."""
    _require_whisper(bundle)
    if metric not in WHISPER_METRICS:
        raise ValueError(f"unknown Whisper search metric {metric!r}; choose one of {', '.join(WHISPER_METRICS)}")
    model = bundle.model.eval()
    # Statistics: teacher-forced on the references (as quantize_whisper_simulated calibrates).
    calib_batches = teacher_forced_batches(bundle, calibration, batch_size=1)

    def run_calibration() -> None:
        for batch in calib_batches:  # one at a time: no padded decoder positions in the statistics
            _forward(model, batch)

    scored = metric_subset(calibration, metric_size)
    score, replay = whisper_score(bundle, scored, metric, batch_size=batch_size)
    replay = replay if prefix_cache else None
    if referee == "auto":
        referee = "wer" if metric in TEACHER_FORCED_METRICS else None
    if referee not in (None, "wer", "cer"):
        raise ValueError(f"unknown Whisper search referee {referee!r}; use 'wer', 'cer', 'auto' or None")
    judge = None if referee is None else whisper_score(bundle, scored, referee, batch_size=batch_size)[0]
    quick = (whisper_score(bundle, quick_subset(scored), metric, batch_size=batch_size)[0]
             if config is not None and config.shortlist else None)
    return stablequant_search(model, run_calibration, score, config, progress=progress, replay_blocks=replay,
                              cache_budget_mb=cache_budget_mb, referee=judge, referee_name=referee or "referee",
                              quick_metric=quick)


def whisper_statistics(bundle: SpeechModel, calibration: Sequence[Any], *, bins: int = DEFAULT_BINS
                       ) -> dict[str, Histogram]:
    """Every Conv1d/Linear input histogram, teacher-forced on the references one utterance at a time (as the
    search and the simulation calibrate): what `rule_plan` decides baseline ranges on."""
    _require_whisper(bundle)
    if not calibration:
        raise ValueError("the calibration set is empty: pass at least one utterance")
    model = strip_weight_norm(copy.deepcopy(bundle.model)).eval()
    batches = teacher_forced_batches(bundle, calibration, batch_size=1)

    def run_calibration() -> None:
        for batch in batches:
            _forward(model, batch)

    return collect_input_histograms(model, run_calibration, list(quantizable_layers(model)), bins=bins)


def _simulated_from_plan(bundle: SpeechModel, plan: Any, weights: Mapping[str, StoredWeight] | None = None
                         ) -> QuantizedModel:
    """The fake-quant simulation of a `QuantPlan` (and its stored weights): no calibration, the plan's ranges
    and grids."""
    start = time.perf_counter()
    model = strip_weight_norm(copy.deepcopy(bundle.model)).eval()
    if weights:
        install_stored_weights(model, weights)
    modules = quantizable_layers(model)
    plan.check_layers(modules, model=bundle.name)
    quants = plan_layer_quants(plan)
    apply_fake_quant(model, quants)
    counts = {"fake_quant_linear": sum(isinstance(modules[n], torch.nn.Linear) for n in quants),
              "fake_quant_conv1d": sum(isinstance(modules[n], torch.nn.Conv1d) for n in quants)}
    if len(quants) < len(modules):
        counts["float"] = len(modules) - len(quants)
    bits = sorted({(q.w_bits, q.a_bits) for q in quants.values()})
    grids = ", ".join(f"{w}-bit weights, {a}-bit activations" for w, a in bits)
    return QuantizedModel(dataclasses.replace(bundle, model=model), f"{SIMULATED_BACKEND} of the plan ({grids})",
                          True, counts, 0, time.perf_counter() - start, 0.0, None, plan=plan)


def quantize_whisper_simulated(bundle: SpeechModel, calibration: Sequence[Any], *, act_rule: RangeRule | None = None,
                               per_layer: dict[str, RangeRule | None] | None = None, observer: Any = None,
                               a_bits: int = 8, w_bits: int = 8, bins: int | None = None,
                               int8_grid: str = "auto", plan: Any = None,
                               weights: Mapping[str, StoredWeight] | None = None) -> QuantizedModel:
    """A fake-quantized copy of a Whisper model (every Conv1d and Linear): weights per output channel,
    symmetric MinMax; input activations per tensor with ranges from `per_layer` rules (StableQuant),
    one `act_rule` (default MAX), or a torchao `observer` constructor (a baseline such as
    `HistogramObserver.with_args(eps=2**-12)`), calibrated teacher-forced on `calibration`.
    int8_grid: "auto" simulates the grids this CPU's x86 INT8 kernels run (7-bit weights without VNNI,
    `sq_plugin.backends.x86_isa`), or "full" / "narrow_weights" / "narrow_activations".
    plan: simulate a `QuantPlan` (the search's, or `rule_plan`'s) instead: no calibration, and the rules,
    observer, bits and grid arguments are unused. weights: the plan's stored weights (mixed precision)."""
    _require_whisper(bundle)
    if plan is not None:
        return _simulated_from_plan(bundle, plan, weights)
    nominal = (w_bits, a_bits)
    w_bits, a_bits = grid_bits(w_bits, a_bits, resolve_int8_grid(int8_grid))  # the grids that will execute
    start = time.perf_counter()
    model = strip_weight_norm(copy.deepcopy(bundle.model)).eval()
    modules = quantizable_layers(model)
    layers = list(modules)
    batches = teacher_forced_batches(bundle, calibration, batch_size=1)

    def run_calibration() -> None:
        for batch in batches:
            _forward(model, batch)

    if observer is not None:
        qmin, qmax = quant_bounds(a_bits, signed=False)
        ranges = observer_ranges(model, run_calibration, layers, lambda: observer(
            dtype=torch.quint8, qscheme=torch.per_tensor_affine, quant_min=qmin, quant_max=qmax))
    else:
        kwargs = {"bins": bins} if bins is not None else {}
        hists = collect_input_histograms(model, run_calibration, layers, **kwargs)
        ranges = {}
        for name in layers:
            rule = (per_layer or {}).get(name, act_rule or RangeRule("max"))
            if rule is None:  # kept float (StableQuant's float_fallback)
                continue
            lo, hi = compute_range(hists[name], rule, bits=a_bits, symmetric=False, signed=False,
                                   name=f"{name} (input)")
            ranges[name] = (float(lo[0]), float(hi[0]))
    apply_fake_quant(model, {n: LayerQuant(act_range=ranges[n], a_bits=a_bits, w_bits=w_bits) for n in ranges})
    calib_seconds = time.perf_counter() - start
    quantized = dataclasses.replace(bundle, model=model)
    counts = {"fake_quant_linear": sum(isinstance(modules[n], torch.nn.Linear) for n in ranges),
              "fake_quant_conv1d": sum(isinstance(modules[n], torch.nn.Conv1d) for n in ranges)}
    if len(ranges) < len(modules):
        counts["float"] = len(modules) - len(ranges)
    narrowed = [f"{bits}-bit {what}" for bits, was, what in zip((w_bits, a_bits), nominal, ("weights", "activations"),
                                                                strict=True) if bits != was]
    backend = ", ".join([SIMULATED_BACKEND, *narrowed])
    return QuantizedModel(quantized, backend, True, counts, 0, calib_seconds, 0.0, None)


def quantize_whisper_x86(bundle: SpeechModel, calibration: Sequence[Any], plan: Any = None, *,
                         quantizer: Any = None, weights: Mapping[str, StoredWeight] | None = None,
                         int8_attention: bool = False) -> QuantizedModel:
    """Whisper on oneDNN INT8 kernels: the encoder and the static-cache decoder step of
    `sq_plugin.families.whisper_int8`, decoded greedily by `evaluate` through `QuantizedWhisper.generate`.

    plan: a `QuantPlan` on the HF module names (the search's, or `rule_plan`'s); its ranges need one
    calibration utterance (for the weights); `plan_deviations` say what the graphs ran otherwise.
    quantizer: instead of a plan, a PT2E quantizer whose observers decide the ranges (a framework baseline,
    e.g. `observer_x86_quantizer(HistogramObserver)`), calibrated by greedy-decoding every utterance.
    weights: the `StoredWeight`s of the plan's "stored" layers (mixed precision): installed on a copy of the
    model (the tied embedding follows proj_out's) and quantized with exactly their scales.
    int8_attention: the encoder's attention matmuls on INT8 GEMMs too (`sq_plugin.backends.int8_attention`)."""
    from sq_plugin.families.whisper_int8 import quantize_whisper_int8

    _require_whisper(bundle)
    if not calibration:
        raise ValueError("the calibration set is empty: pass at least one utterance")
    if (plan is None) == (quantizer is None):
        raise ValueError("quantize_whisper_x86 takes a plan or a quantizer (exactly one)")
    start = time.perf_counter()
    fe = bundle.processor.feature_extractor
    used = calibration[:1] if plan is not None else calibration
    features = [fe([u.audio], sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features for u in used]
    if weights is not None and plan is None:
        raise ValueError("stored weights go with the plan they were allocated for: pass plan= too")
    source = bundle
    if weights:
        model = install_stored_weights(strip_weight_norm(copy.deepcopy(bundle.model)), weights).eval()
        source = dataclasses.replace(bundle, model=model)
    quantized = quantize_whisper_int8(source, features, plan=plan, quantizer=quantizer, weights=weights,
                                      int8_attention=int8_attention)
    lowering = quantized.report["lowering"]
    counts = {f"{graph}_{op}": n for graph, ops in lowering.items() for op, n in ops.items()}
    return QuantizedModel(dataclasses.replace(bundle, model=quantized), quantized.report["backend"], False, counts,
                          sum(counts.values()), quantized.report["quantize_s"],
                          time.perf_counter() - start - quantized.report["quantize_s"], None,
                          plan_deviations=quantized.report.get("plan_deviations", {}), plan=plan)


__all__ = ["SIMULATED_BACKEND", "TEACHER_FORCED_METRICS", "WHISPER_METRICS", "TeacherForcedBatch",
           "quantize_whisper_simulated", "quantize_whisper_x86", "search_whisper", "teacher_forced_batches",
           "teacher_forced_kl", "teacher_forced_log_probs", "teacher_forced_scores", "whisper_statistics"]
