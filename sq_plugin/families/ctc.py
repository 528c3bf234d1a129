"""Glue between speech models, the search and the PT2E adapter: what the demo, the CLI and the
benchmarks call. CTC models (wav2vec2 / HuBERT) for now; Whisper goes through the same pieces.

    bundle = load_model("sq/wav2vec2-ref")
    result = search_ctc(bundle, dev_utterances)                        # screen -> clip -> MSE on WER
    quantized = quantize_ctc_pt2e(bundle, dev_utterances, plan=result.to_plan())
    evaluate(quantized.bundle, test_utterances, batch_size=1)           # real INT8 kernels
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sq_plugin import parallel
from sq_plugin.backends.simulate import is_parametrized, quantizable_layers, strip_weight_norm
from sq_plugin.backends.weights import StoredWeight, install_stored_weights
from sq_plugin.core.plan import QuantPlan
from sq_plugin.core.ranges import RangeRule
from sq_plugin.core.stats import DEFAULT_BINS, Histogram
from sq_plugin.families import metric_subset, quick_subset
from sq_plugin.search import SearchConfig, SearchResult, collect_input_histograms, stablequant_search
from sq_plugin.search.early_stop import gathered_mean, sum_until
from sq_plugin.search.prefix_cache import DEFAULT_BUDGET_MB
from sq_plugin.speech.audio import SAMPLE_RATE
from sq_plugin.speech.evaluate import (
    evaluate,
    length_batches,
    normalize_text,
    transcribe,
    transcribe_ctc_batches,
    uses_attention_mask,
    word_errors,
)
from sq_plugin.speech.models import SpeechModel

# wer/cer: decode the calibration set (the paper). ctc_loss: mean CTC loss per reference character
# (nats), a proxy that moves before any word flips: on wav2vec2-ref's dev split, 8-bit MAX on the
# waveform conv alone left WER within 0.06 pp but raised the loss 25x more than any other layer.
# ctc_kl: KL divergence of the model's CTC posteriors from the float model's, per frame (nats): fidelity to the
# float model rather than to the references, so it is 0 at float and no candidate can score "better than FP"
# by luck on a few hundred utterances (the winner's curse of wer on wav2vec2-ref, BENCHMARKS.md).
METRICS = ("wer", "cer", "ctc_loss", "ctc_kl")
# How CTC models are evaluated when FP32 and INT8 are compared: one utterance at a time, zero-padded
# to whole 2-second buckets. The INT8 module is compiled for static shapes (Inductor cannot lower
# INT8 conv1d for dynamic shapes in torch 2.13), so buckets bound the number of compilations; the
# float model gets the same padding so that both see the same inputs.
EVAL_KWARGS: dict[str, int] = {"batch_size": 1, "pad_to_multiple": 2 * SAMPLE_RATE}


def _require_ctc(bundle: SpeechModel) -> None:
    if bundle.kind != "ctc":
        raise ValueError(f"{bundle.name}: this path takes CTC models (wav2vec2/HuBERT); got kind={bundle.kind!r}")


def _require_utterances(utterances: Sequence[Any], what: str) -> None:
    if len(utterances) == 0:
        raise ValueError(f"the {what} set is empty: pass at least one utterance (the recipes use a few hundred)")


def ctc_inputs(bundle: SpeechModel, audio: np.ndarray) -> tuple[torch.Tensor, ...]:
    """The positional inputs of one utterance, exactly as the evaluator feeds it: (1, samples)
    normalized input_values, plus an all-ones attention mask for models that take one."""
    fe = bundle.processor.feature_extractor
    values = torch.from_numpy(np.asarray(fe(audio, sampling_rate=SAMPLE_RATE).input_values[0], dtype=np.float32))
    values = values[None, :]
    if uses_attention_mask(bundle):
        return values, torch.ones(values.shape, dtype=torch.long)
    return (values,)


def unchanged_caller_model(bundle: SpeechModel) -> SpeechModel:
    """The bundle to search on without touching the caller's model: the search folds weight norm in
    place (it swaps plain weights in and out), so a parametrized model is searched as a folded copy."""
    if not is_parametrized(bundle.model):
        return bundle
    return dataclasses.replace(bundle, model=strip_weight_norm(copy.deepcopy(bundle.model)))


def _blank_id(bundle: SpeechModel) -> int:
    return int(bundle.model.config.pad_token_id)  # the HF CTC convention: blank = pad


def ctc_labels(bundle: SpeechModel, utterances: Sequence[Any]) -> list[torch.Tensor]:
    """Reference texts as CTC targets; raises if the tokenizer cannot spell one of them."""
    tokenizer = bundle.processor.tokenizer
    labels = []
    for u in utterances:
        ids = tokenizer(u.text).input_ids
        if not ids:
            raise ValueError(f"utterance {u.id!r} has an empty transcript: the ctc_loss metric needs references")
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
            raise ValueError(f"utterance {u.id!r}: the tokenizer maps part of {u.text!r} to <unk>; normalize the "
                             "references to the model's alphabet or use metric wer")
        labels.append(torch.tensor(ids, dtype=torch.long))
    return labels


def _log_probs(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(model(*inputs).logits[0].float(), dim=-1)


def ctc_log_probs(model: torch.nn.Module, inputs: Sequence[tuple[torch.Tensor, ...]], indices: Sequence[int]
                  ) -> dict[int, torch.Tensor]:
    """The CTC log-posteriors (frames, vocabulary) of the utterances `indices`, one utterance per call."""
    return {i: _log_probs(model, inputs[i]) for i in indices}


def ctc_loss_per_char(model: torch.nn.Module, inputs: Sequence[tuple[torch.Tensor, ...]],
                      labels: Sequence[torch.Tensor], *, blank: int, bound: float | None = None) -> float:
    """Mean over utterances of CTC loss / reference length (one utterance per call: no padding). Under
    torch.distributed each rank scores every world-th utterance; the values are gathered and summed in order.
    bound: stop once the mean is sure to exceed it, and return that lower bound (`sq_plugin.search.early_stop`)."""
    if len(inputs) != len(labels):
        raise ValueError(f"ctc_loss_per_char: {len(inputs)} inputs for {len(labels)} label sequences")
    mine = parallel.batch_shard(len(labels), 1)

    def per_utterance() -> Iterator[float]:
        for i in mine:
            log_probs, y = _log_probs(model, inputs[i]), labels[i]
            loss = torch.nn.functional.ctc_loss(log_probs[:, None], y[None], torch.tensor([log_probs.shape[0]]),
                                                torch.tensor([len(y)]), blank=blank, reduction="sum")
            yield float(loss) / len(y)  # inf if the audio is too short for its transcript: the search raises

    values, _, stopped = sum_until(per_utterance(), len(labels), bound)
    return gathered_mean(values, mine, len(labels), len(labels), stopped)


def ctc_kl_per_frame(model: torch.nn.Module, inputs: Sequence[tuple[torch.Tensor, ...]],
                     reference: Mapping[int, torch.Tensor], *, bound: float | None = None) -> float:
    """Mean over utterances of the per-frame KL(reference || model) of the CTC posteriors, in nats: how far the
    model's outputs moved from `reference` (the float model's `ctc_log_probs`). Under torch.distributed each rank
    scores the utterances its `reference` holds (`parallel.batch_shard`); the values are gathered in order.
    bound: stop once the mean is sure to exceed it, and return that lower bound (`sq_plugin.search.early_stop`)."""
    mine = sorted(reference)

    def per_utterance() -> Iterator[float]:
        for i in mine:
            log_q, log_p = _log_probs(model, inputs[i]), reference[i]
            if log_q.shape != log_p.shape:
                raise ValueError(f"ctc_kl: utterance {i} gives {tuple(log_q.shape)} posteriors against the float "
                                 f"model's {tuple(log_p.shape)}; the metric compares one model's quantized and float "
                                 "versions")
            yield float(torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).mean())

    values, _, stopped = sum_until(per_utterance(), len(inputs), bound)
    return gathered_mean(values, mine, len(inputs), len(inputs), stopped)


def ctc_statistics(bundle: SpeechModel, calibration: Sequence[Any], *, bins: int = DEFAULT_BINS
                   ) -> dict[str, Histogram]:
    """Every quantizable layer's input histogram over the calibration utterances (one float pass, one
    utterance at a time, as the search collects them): what `rule_plan` decides baseline ranges on."""
    _require_ctc(bundle)
    _require_utterances(calibration, "calibration")
    bundle = unchanged_caller_model(bundle)
    model = bundle.model.eval()
    audios = [u.audio for u in calibration]
    return collect_input_histograms(model, lambda: transcribe(bundle, audios, batch_size=1, progress=False),
                                    list(quantizable_layers(model)), bins=bins, sharded=parallel.active())


def ctc_score(bundle: SpeechModel, utterances: Sequence[Any], metric: str, *, batch_size: int = 8
              ) -> Callable[..., float]:
    """The calibration metric on `bundle.model` as it stands at each call: "wer", "cer" (greedy decoding) or
    "ctc_loss" (CTC loss per reference character) or "ctc_kl" (per-frame KL of the posteriors from those of
    `bundle.model` as it is now, which must be float: computed once, here). What the search and the sensitivity
    measurement score. "wer", "ctc_loss" and "ctc_kl" take an optional `bound=` (`sq_plugin.search.early_stop`);
    "cer" decodes every utterance in full."""
    _require_ctc(bundle)
    _require_utterances(utterances, "calibration")
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if metric == "ctc_loss":
        inputs = [ctc_inputs(bundle, u.audio) for u in utterances]
        labels, blank = ctc_labels(bundle, utterances), _blank_id(bundle)

        def loss(*, bound: float | None = None) -> float:
            return ctc_loss_per_char(bundle.model, inputs, labels, blank=blank, bound=bound)
        return loss
    if metric == "ctc_kl":
        inputs = [ctc_inputs(bundle, u.audio) for u in utterances]
        reference = ctc_log_probs(bundle.model.eval(), inputs, parallel.batch_shard(len(inputs), 1))

        def kl(*, bound: float | None = None) -> float:
            return ctc_kl_per_frame(bundle.model, inputs, reference, bound=bound)
        return kl

    if metric == "wer":
        def word_error_rate(*, bound: float | None = None) -> float:
            return ctc_wer(bundle, utterances, batch_size=batch_size, bound=bound)
        return word_error_rate

    def rate() -> float:
        return evaluate(bundle, utterances, batch_size=batch_size, progress=False).cer
    return rate


def ctc_wer(bundle: SpeechModel, utterances: Sequence[Any], *, batch_size: int = 8, bound: float | None = None
            ) -> float:
    """Corpus WER of greedy CTC decoding, bit for bit `evaluate(...).wer` (the same batches; word edits / reference
    words, empty references left out), summed batch by batch so that it can stop once the WER is sure to exceed
    `bound` (then it returns that lower bound, `sq_plugin.search.early_stop`). Under torch.distributed each rank
    decodes every world-th batch, as `transcribe` does."""
    _require_utterances(utterances, "calibration")
    audios = [u.audio for u in utterances]
    references = [normalize_text(u.text or "") for u in utterances]
    words = sum(len(r.split()) for r in references)
    if not words:
        raise ValueError("every reference transcript is empty; WER is undefined (pass transcribed utterances, or "
                         "use metric: ctc_kl, which needs none)")
    batches = length_batches(audios, batch_size)
    rank, world = parallel.rank_and_world()
    if world > 1:
        parallel.batch_shard(len(audios), batch_size, what="clips")  # refuses a world larger than the batches
    mine = list(range(len(batches)))[rank::world]

    def per_batch() -> Iterator[float]:
        for texts in transcribe_ctc_batches(bundle, audios, [batches[b] for b in mine]):
            scored = [i for i in texts if references[i]]  # as evaluate(): empty references are not scored
            yield float(sum(word_errors([utterances[i].text for i in scored], [texts[i] for i in scored])[0])
                        if scored else 0)

    errors, _, stopped = sum_until(per_batch(), words, bound)
    return gathered_mean(errors, mine, len(batches), words, stopped)


def search_ctc(bundle: SpeechModel, calibration: Sequence[Any], config: SearchConfig | None = None, *,
               metric: str = "wer", batch_size: int = 8, progress: bool = True, prefix_cache: bool = True,
               cache_budget_mb: float = DEFAULT_BUDGET_MB, metric_size: int | None = None) -> SearchResult:
    """StableQuant's search on a CTC model, scored by WER (or CER, or the `ctc_loss` / `ctc_kl` proxies) on the
    calibration utterances (the first `metric_size` of them; the statistics always use all).

    prefix_cache: replay the outputs of unchanged conv / Transformer layers between evaluations
    (exact; `sq_plugin.search.prefix_cache`), keeping at most `cache_budget_mb` of them.
    """
    _require_ctc(bundle)
    _require_utterances(calibration, "calibration")
    bundle = unchanged_caller_model(bundle)
    scored = metric_subset(calibration, metric_size)
    score = ctc_score(bundle, scored, metric, batch_size=batch_size)
    quick = (ctc_score(bundle, quick_subset(scored), metric, batch_size=batch_size)
             if config is not None and config.shortlist else None)
    audios = [u.audio for u in calibration]

    def run_calibration() -> None:
        # One utterance at a time, as PT2E calibration does: the histograms then see no padding and
        # the PT2E observers later compute the very same ranges from the very same inputs.
        transcribe(bundle, audios, batch_size=1, progress=False)

    bundle.model.eval()
    return stablequant_search(bundle.model, run_calibration, score, config, progress=progress,
                              replay_blocks="auto" if prefix_cache else None, cache_budget_mb=cache_budget_mb,
                              sharded=parallel.active(), quick_metric=quick)


@dataclass
class QuantizedModel:
    """A quantized CTC model ready to evaluate, and how it runs."""

    bundle: SpeechModel
    backend: str
    simulated: bool
    op_counts: dict[str, int]
    int8_kernels: int
    calib_seconds: float
    lower_seconds: float
    converted: Any = field(repr=False, default=None)
    # Plan layers the backend ran otherwise than planned, and how (empty: the plan ran as written).
    plan_deviations: dict[str, str] = field(default_factory=dict)
    # The plan it was built from (None: a framework's own observers decided the ranges).
    plan: QuantPlan | None = field(default=None, repr=False)
    # Inputs the quantized graph was traced with, and the float model it came from (what `save_ctc_int8` needs).
    example_inputs: tuple | None = field(default=None, repr=False)
    float_model: Any = field(default=None, repr=False)
    # A mixed-precision plan's codes and scales (`backends.weights.StoredWeight`): what `save_packed` stores.
    stored_weights: dict[str, Any] | None = field(default=None, repr=False)


def finish_converted(bundle: SpeechModel, converted: Any, example: tuple, calib_seconds: float, *, lower: bool,
                     label: str = "", int8_attention: bool = False) -> QuantizedModel:
    """A `convert_pt2e` graph of `bundle.model` as a `QuantizedModel`: lowered to oneDNN INT8 kernels
    (`lower_x86`, with attention's matmuls on INT8 GEMMs too if `int8_attention`), or run as the q/dq fake-quant
    simulation. `label` prefixes the backend (a baseline's name)."""
    from sq_plugin.backends.pt2e import count_quantized_ops, lower_x86

    counts = count_quantized_ops(converted)
    info = {**bundle.info, "model_config": getattr(bundle.model, "config", bundle.info.get("model_config"))}
    if not lower:
        from sq_plugin.backends.pt2e import graph_grid_bits

        quantized = dataclasses.replace(bundle, model=converted, info=info)
        grid = "".join(f", {bits}-bit {what}" for bits, what in zip(graph_grid_bits(converted),
                                                                    ("weights", "activations"), strict=True)
                       if bits is not None)
        backend = " ".join(filter(None, (label, f"pt2e fake-quant simulation (float q/dq{grid})")))
        return QuantizedModel(quantized, backend, True, counts, 0, calib_seconds, 0.0, converted,
                              example_inputs=example, float_model=bundle.model)
    start = time.perf_counter()
    # Utterances of a batch do not interact (each row carries its own padding): the kernel check runs row by row.
    compiled, report = lower_x86(converted, example, int8_attention=int8_attention, reference=bundle.model,
                                 batch_dims=dict.fromkeys(range(len(example)), 0))
    lower_seconds = time.perf_counter() - start
    quantized = dataclasses.replace(bundle, model=compiled, info=info)
    backend = f"{label}: {report.backend}" if label else report.backend
    return QuantizedModel(quantized, backend, False, counts, report.int8_kernels, calib_seconds, lower_seconds,
                          converted, example_inputs=example, float_model=bundle.model)


def quantize_ctc_pt2e(bundle: SpeechModel, calibration: Sequence[Any], *, act_rule: RangeRule | None = None,
                      per_layer: dict[str, RangeRule] | None = None, observer: Any = None, a_bits: int = 8,
                      w_bits: int = 8, lower: bool | None = None, int8_grid: str = "auto",
                      strict: bool = False, plan: QuantPlan | None = None,
                      weights: Mapping[str, StoredWeight] | None = None,
                      int8_attention: bool = False) -> QuantizedModel:
    """PT2E quantize a CTC model: export, prepare (StableQuant observers, or `observer` for a
    baseline), calibrate one utterance at a time, convert, and (8-bit) lower to oneDNN INT8 kernels.

    lower: default True for W8A8, False below 8 bits, where the converted q/dq graph is run as a
    fake-quant simulation (labelled `simulated=True`).
    int8_grid: "auto" (this CPU's x86 policy: 7-bit weights without VNNI), "full", "narrow_weights",
    "narrow_activations" (`sq_plugin.backends.x86_isa`).
    strict: export in strict mode (see `export_for_quantization`).
    plan: apply a `QuantPlan` (e.g. `search_ctc(...).to_plan()`, `rule_plan(...)`) instead of rules: each
    layer's input range and grids come from the plan (checked against the model's layers), so only the first
    calibration utterance is run (it observes the weights); `act_rule`, `per_layer`, `observer`, the bits and
    `int8_grid` are then unused.
    weights: the `StoredWeight`s of a plan's "stored" layers (a mixed-precision plan): installed on a copy of
    the model and quantized with exactly their scales. A plan whose activations are on 7 or 8 bits runs on
    INT8 kernels whatever its weight widths (narrower weights are int8 values on a narrower grid).
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    from sq_plugin.backends.pt2e import (
        calibrate,
        observer_x86_quantizer,
        plan_deviations,
        prepare_stablequant,
        stablequant_x86_config,
        stablequant_x86_quantizer,
        stablequant_x86_quantizer_from_plan,
    )

    _require_ctc(bundle)
    _require_utterances(calibration, "calibration")
    model = bundle.model.eval()
    example = ctc_inputs(bundle, calibration[0].audio)
    start = time.perf_counter()
    if weights is not None and plan is None:
        raise ValueError("stored weights go with the plan they were allocated for: pass plan= too")
    if plan is not None:
        plan.check_layers(quantizable_layers(model), model=bundle.name)
        if weights:
            model = install_stored_weights(strip_weight_norm(copy.deepcopy(model)), weights).eval()
        if plan.per_token_layers:  # PerTokenInt8Linears in a copy: the caller's model stays float
            from sq_plugin.backends.per_token import swap_per_token_linears

            model = model if weights else copy.deepcopy(model)
            swap_per_token_linears(model, plan, weights)
        quantizer = stablequant_x86_quantizer_from_plan(plan, weights=weights)
        # 7/8-bit activations run on INT8 kernels (any weight width: int8 values on a narrower grid, exact on
        # every ISA); narrower activation grids simulate
        lower = min(plan.layers[n].activation.bits for n in plan.quantized) >= 7 if lower is None else lower
        calibration = calibration[:1]  # weights only: every input range is the plan's
    else:
        if observer is not None:  # a baseline: the same specs with another activation observer
            quantizer = observer_x86_quantizer(observer, a_bits=a_bits, w_bits=w_bits, int8_grid=int8_grid)
        else:
            config = stablequant_x86_config(act_rule, a_bits=a_bits, w_bits=w_bits, int8_grid=int8_grid)
            quantizer = stablequant_x86_quantizer(config, per_layer, a_bits=a_bits, w_bits=w_bits,
                                                  int8_grid=int8_grid)
        lower = (a_bits == 8 and w_bits == 8) if lower is None else lower
    prepared = prepare_stablequant(model, example, quantizer, strict=strict)
    calibrate(prepared, (ctc_inputs(bundle, u.audio) for u in calibration))
    converted = convert_pt2e(prepared)
    calib_seconds = time.perf_counter() - start
    quantized = finish_converted(bundle, converted, example, calib_seconds, lower=lower, int8_attention=int8_attention)
    if plan is not None:
        quantized.plan_deviations = plan_deviations(converted, plan)
        quantized.plan = plan
    return quantized


def save_ctc_int8(quantized: QuantizedModel, path: str | os.PathLike, *, metadata: dict[str, Any] | None = None
                  ) -> Path:
    """Write a `quantize_ctc_pt2e` result as an `sq_plugin.backends.artifact` directory: the INT8 weights and
    scales (safetensors), the graph, its plan (plan.json) and metadata; atomic, replacing `path`.
    `load_ctc_int8` reads it back with no calibration and the same outputs."""
    from sq_plugin.backends.artifact import save

    if not isinstance(quantized.converted, torch.fx.GraphModule) or quantized.example_inputs is None:
        raise ValueError(f"{quantized.bundle.name}: save_ctc_int8 saves what quantize_ctc_pt2e returns (a PT2E graph "
                         f"with its example inputs); this model ran on {quantized.backend!r}. Quantize it with "
                         "quantize_ctc_pt2e (or the runner's PT2E methods) to save it")
    if quantized.float_model is None:
        raise ValueError(f"{quantized.bundle.name}: this QuantizedModel does not record its float model, whose "
                         "architecture fingerprint the artifact stores; build it with quantize_ctc_pt2e")
    return save(quantized.converted, path, example_inputs=quantized.example_inputs,
                fp_model=_folded(quantized.float_model), plan=quantized.plan,
                metadata={**(metadata or {}), "model": quantized.bundle.name, "family": "ctc",
                          "backend": quantized.backend})


def _folded(model: torch.nn.Module) -> torch.nn.Module:
    """The model with weight norm folded (on a copy if it has any): what PT2E exports and fingerprints."""
    return strip_weight_norm(copy.deepcopy(model)) if is_parametrized(model) else model


def load_ctc_int8(path: str | os.PathLike, bundle: SpeechModel, *, lower: bool = True) -> QuantizedModel:
    """Load `save_ctc_int8`'s directory for `bundle` (the same checkpoint: its processor feeds the inputs) and,
    with lower=True, compile it to oneDNN INT8 kernels. Raises `ArtifactError` if the artifact is damaged or
    was made for another model."""
    from sq_plugin.backends.artifact import architecture_fingerprint, load, read_plan

    _require_ctc(bundle)
    fp = _folded(bundle.model)
    start = time.perf_counter()
    converted, meta = load(path, expect_model=architecture_fingerprint(fp))
    example = ctc_inputs(bundle, np.zeros(meta["example_input_shapes"][0][-1], dtype=np.float32))
    quantized = finish_converted(dataclasses.replace(bundle, model=fp), converted, example,
                                 time.perf_counter() - start, lower=lower)
    quantized.plan = read_plan(path)
    return quantized


def quantize_ctc_inc(bundle: SpeechModel, calibration: Sequence[Any], *, act_algo: str, a_bits: int = 8,
                     w_bits: int = 8, lower: bool | None = None) -> QuantizedModel:
    """Baseline: INC 3.10 static quant of a CTC model (calibrated one utterance at a time), lowered
    to oneDNN INT8 kernels with `lower_x86` (default) or run as a q/dq simulation (`lower=False`)."""
    from sq_plugin.backends.inc import check_inc_static, quantize_inc_static

    _require_ctc(bundle)
    _require_utterances(calibration, "calibration")
    check_inc_static(act_algo, a_bits, w_bits)
    lower = True if lower is None else lower
    model = bundle.model.eval()
    example = ctc_inputs(bundle, calibration[0].audio)
    start = time.perf_counter()
    converted = quantize_inc_static(model, example, (ctc_inputs(bundle, u.audio) for u in calibration),
                                    act_algo=act_algo, a_bits=a_bits, w_bits=w_bits)
    calib_seconds = time.perf_counter() - start
    return finish_converted(bundle, converted, example, calib_seconds, lower=lower, label=f"inc {act_algo}")


def quantize_ctc_quanto(bundle: SpeechModel, calibration: Sequence[Any], *, a_bits: int = 8,
                        w_bits: int = 8) -> QuantizedModel:
    """Baseline: optimum-quanto W8A8 of a CTC model, calibrated one utterance at a time.

    `int8_kernels` is the number of INT8 matmuls one forward runs (measured); with none, the run is
    labelled simulated.
    """
    from sq_plugin.backends.quanto import check_quanto_bits, count_int8_matmuls, quantize_quanto, quanto_op_counts

    _require_ctc(bundle)
    _require_utterances(calibration, "calibration")
    check_quanto_bits(a_bits, w_bits)
    start = time.perf_counter()
    model = quantize_quanto(bundle.model, (ctc_inputs(bundle, u.audio) for u in calibration))
    calib_seconds = time.perf_counter() - start
    int8_matmuls = count_int8_matmuls(model, ctc_inputs(bundle, calibration[0].audio))
    if int8_matmuls:
        backend = ("optimum-quanto W8A8 eager: Linear as torch._int_mm INT8 GEMM, activations quantized and "
                   "outputs rescaled in eager PyTorch, Conv1d float")
    else:
        backend = "optimum-quanto W8A8 eager: dequantized float matmuls (simulation)"
    quantized = dataclasses.replace(bundle, model=model)
    return QuantizedModel(quantized, backend, int8_matmuls == 0, quanto_op_counts(model), int8_matmuls,
                          calib_seconds, 0.0, model)
