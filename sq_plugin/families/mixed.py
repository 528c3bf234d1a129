"""Mixed-precision weights for the model families: sensitivity on dev, the three allocation methods, execution.

    sens = family_sensitivity(bundle, dev)                         # CTC loss (CTC) / teacher-forced loss (Whisper)
    plan = mixed_plan(base_plan, sens.allocate(4.5))               # base: StableQuant's W8A8 plan
    weights = stored_weights(folded_model(bundle), plan)
    quantized = quantize_mixed(bundle, dev, plan, weights)         # oneDNN INT8 kernels, any weight widths

    result = train_mixed(bundle, train, plan_for_ranges, config, method="one-stage")   # the seed paper's method

The family supplies what the framework-free search needs: the dev metric (`ctc_score`, `whisper_score`) and,
for training, batches with a forward that returns logits and the positions that count.

Execution: a plan whose activations are on 8 bits (7 on x86 without VNNI) runs on oneDNN's INT8 kernels at any
weight width; the weights are int8 values on their narrower grid (exact on every ISA). The compression is then
in storage only (`sq_plugin.backends.packed`: packed at each layer's width), which the benchmark labels
"storage-only". `quantize_int4_kernel` runs the 4-bit Linears on torch's x86 int4 kernel instead, weight-only
(bf16 activations; `sq_plugin.backends.int4_cpu`).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from sq_plugin.backends.simulate import strip_weight_norm
from sq_plugin.backends.weights import StoredWeight
from sq_plugin.core.plan import QuantPlan
from sq_plugin.families import ctc, whisper  # modules, not functions: looked up at each call (monkeypatchable)
from sq_plugin.families.ctc import QuantizedModel
from sq_plugin.search.mixed_precision import SensitivityResult, measure_sensitivity
from sq_plugin.search.mixed_training import MixedTrainConfig, MixedTrainResult, train_one_stage, train_two_stage
from sq_plugin.speech.models import SpeechModel

DEFAULT_METRIC = {"ctc": "ctc_loss", "whisper": "tf_loss"}


def folded_model(bundle: SpeechModel) -> torch.nn.Module:
    """A copy of the model with weight norm folded (the layer weights every plan and stored weight refer to)."""
    return strip_weight_norm(copy.deepcopy(bundle.model)).eval()


def family_sensitivity(bundle: SpeechModel, dev: Sequence[Any], *, widths: Sequence[int] | None = None,
                       metric: str | None = None, layers: Sequence[str] | None = None,
                       progress: bool = True) -> SensitivityResult:
    """`measure_sensitivity` on a folded copy, with the family's dev metric (default: CTC loss per character for
    CTC models, the teacher-forced loss on the float model's own transcripts for Whisper), at `widths` (default
    `PTQ_WIDTHS`: 4, 5, 6, 8)."""
    if not dev:
        raise ValueError("the dev set is empty: pass at least one utterance to measure sensitivity on")
    metric = metric or DEFAULT_METRIC.get(bundle.kind, "")
    work = dataclasses.replace(bundle, model=folded_model(bundle))
    if bundle.kind == "ctc":
        score, replay = ctc.ctc_score(work, dev, metric), "auto"
    elif bundle.kind == "whisper":
        score, replay = whisper.whisper_score(work, dev, metric)
    else:
        raise ValueError(f"{bundle.name}: mixed precision covers CTC and Whisper models, not kind {bundle.kind!r}")
    kwargs = {"widths": widths} if widths is not None else {}
    return measure_sensitivity(work.model, score, layers=layers, replay_blocks=replay, progress=progress, **kwargs)


def weight_only(plan: QuantPlan) -> QuantPlan:
    """The plan with its activations left float: what the int4 kernel (bf16 activations) executes."""
    layers = {n: layer if layer.is_float else dataclasses.replace(layer, activation=None, act_range=None)
              for n, layer in plan.layers.items()}
    return QuantPlan(layers, {**plan.provenance, "activations": "float (bf16 on the int4 kernel)"})


def quantize_int4_kernel(bundle: SpeechModel, plan: QuantPlan, weights: Mapping[str, StoredWeight]
                         ) -> QuantizedModel:
    """Weight-only execution: every 4-bit Linear of the stored weights on torch's x86 int4 kernel
    (`backends.int4_cpu`, bf16 activations), every other stored layer dequantized to float32 (listed)."""
    import time

    from sq_plugin.backends.int4_cpu import apply_int4_kernel

    start = time.perf_counter()
    model = folded_model(bundle)
    report = apply_int4_kernel(model, weights)  # a tied embedding reads the stored table
    quantized = QuantizedModel(dataclasses.replace(bundle, model=model.eval()), report.backend, False,
                               {"int4_linear": len(report.int4_layers), "dequantized": len(report.other_layers)},
                               0, time.perf_counter() - start, 0.0, plan=weight_only(plan))
    quantized.stored_weights = dict(weights)
    return quantized


def quantize_mixed(bundle: SpeechModel, calibration: Sequence[Any], plan: QuantPlan,
                   weights: Mapping[str, StoredWeight], *, simulate: bool = False) -> QuantizedModel:
    """A mixed-precision plan and its stored weights on oneDNN INT8 kernels (or, `simulate=True`, Whisper's
    fake-quant simulation, labelled so). For the int4 kernel (weight-only) see `quantize_int4_kernel`."""
    if bundle.kind == "ctc":
        quantized = ctc.quantize_ctc_pt2e(bundle, calibration, plan=plan, weights=weights,
                                      **({"lower": False} if simulate else {}))
    elif bundle.kind == "whisper":
        quantized = (whisper.quantize_whisper_simulated(bundle, calibration, plan=plan, weights=weights) if simulate
                     else whisper.quantize_whisper_x86(bundle, calibration, plan, weights=weights))
    else:
        raise ValueError(f"{bundle.name}: mixed precision covers CTC and Whisper models, not kind {bundle.kind!r}")
    quantized.stored_weights = dict(weights)
    return quantized


def training_batches(bundle: SpeechModel, utterances: Sequence[Any], *, batch_size: int = 4) -> tuple[list[Any], Any]:
    """(batches, forward) for `train_one_stage` / `train_two_stage`: forward(model, batch) -> (logits, mask).

    CTC: one utterance per batch (no padding, so every frame counts). Whisper: teacher-forced batches on the
    reference transcripts; the positions that count are the reference tokens (teacher and student see the same
    decoder input, so the KL needs no float transcript)."""
    if not utterances:
        raise ValueError("the training set is empty: pass at least one utterance")
    if bundle.kind == "ctc":
        batches = [ctc.ctc_inputs(bundle, u.audio) for u in utterances]

        def ctc_forward(model: torch.nn.Module, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
            logits = model(*batch).logits
            return logits, torch.ones(logits.shape[:-1], dtype=torch.bool)

        return batches, ctc_forward
    if bundle.kind == "whisper":
        tf = whisper.teacher_forced_batches(bundle, utterances, batch_size=batch_size)

        def whisper_forward(model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
            logits = model(input_features=batch.input_features, decoder_input_ids=batch.decoder_input_ids,
                           use_cache=False).logits
            return logits, batch.labels != -100

        return tf, whisper_forward
    raise ValueError(f"{bundle.name}: mixed precision covers CTC and Whisper models, not kind {bundle.kind!r}")


def train_mixed(bundle: SpeechModel, train: Sequence[Any], plan: QuantPlan, config: MixedTrainConfig, *,
                method: str = "one-stage", batch_size: int = 4, progress: bool = True) -> MixedTrainResult:
    """The seed paper's one-stage method (or the two-stage baseline) on a folded copy, over the plan's quantized
    layers, with the plan's 8-bit input ranges fake-quantized during training (what will execute)."""
    trainers: dict[str, Callable[..., MixedTrainResult]] = {"one-stage": train_one_stage, "two-stage": train_two_stage}
    if method not in trainers:
        raise ValueError(f"unknown mixed-precision training method {method!r}; use one of {', '.join(trainers)}")
    batches, forward = training_batches(bundle, train, batch_size=batch_size)
    layers = plan.quantized
    ranges = {n: plan.layers[n].act_range for n in layers if plan.layers[n].act_range is not None}
    return trainers[method](folded_model(bundle), batches, forward, config, layers=layers, act_ranges=ranges,
                            progress=progress)


__all__ = ["DEFAULT_METRIC", "family_sensitivity", "folded_model", "quantize_int4_kernel", "quantize_mixed",
           "train_mixed", "training_batches", "weight_only"]
