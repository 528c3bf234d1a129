"""One-stage mixed-precision quantization: learn each layer's weight width and its quantized weights together.

A re-implementation of Xu et al., "Effective and Efficient Mixed Precision Quantization of Speech Foundation
Models" (ICASSP 2025; shared/reference/papers.md §2), on CPU and on any `nn.Module`:

* **Supernet.** Every trained layer (Linear/Conv1d) keeps its float weight W and, per candidate width b, a
  weight-sharing quantizer Q_b(W) = clamp(round(W / s_b), qmin_b, qmax_b) * s_b with its own per-output-channel
  step size s_b, plus one architecture logit λ_b per width (the paper's λ^l_i).
* **Gumbel-softmax selection.** Each step samples g = softmax((λ + Gumbel noise) / τ) per layer and the layer
  computes with W_eff = Σ_b g_b Q_b(W); τ anneals from `tau_start` to `tau_end`, so g becomes almost one-hot.
* **One stage.** W, the step sizes and λ train jointly against the float teacher (the paper's KL alignment);
  afterwards each layer takes its most probable width and its codes are read off the trained W and s_b.
* **Two-stage baseline** (`train_two_stage`): the precision search first (only λ trains; W and the step
  sizes stay at their MSE initialisation), then quantization-aware fine-tuning at the fixed widths.

What the paper's available text does not say, and what we chose here:

* soft (not hard / straight-through) Gumbel samples, with exponential temperature annealing;
* the quantizer: symmetric, signed, per output channel (the grid of `sq_plugin.backends.weights`, so the result
  is stored and executed as is), with LSQ-style learned step sizes, parameterised as log s_b and initialised
  from the per-channel MSE rule (`quantize_weight(W, b, rule="mse")`). Rounding is straight-through, so the
  gradient to s_b is LSQ's (round(W/s) - W/s inside the grid, the clipped code outside), without LSQ's
  gradient-scale factor (Adam normalises the step anyway);
* the loss: KL(teacher || student) of the output distribution, averaged over the positions the mask counts,
  plus the size penalty `size_weight * (E[bits] - budget_bits) ** 2` toward the budget, with E[bits] the
  parameter-weighted mean of Σ_b softmax(λ_l)_b · b (the expectation under λ, not under the noisy sample).
  Two-sided on purpose: with a one-sided penalty (only above the budget) the learned probabilities stay
  spread over the low widths and the most probable widths land well under the budget (measured: mean 2.9
  bits at a budget of 4), leaving allowed bits unused;
* only the trained layers' weights, their step sizes and λ train; biases, norms and every other parameter stay
  at their float values, and the student runs in eval() mode (no dropout);
* the budget always holds: when the argmax widths exceed it, `sq_plugin.core.mixed.allocate_bits` picks the
  allocation of least total cost -log softmax(λ_l)_b that fits (an exact ILP);
* activations are optional: with `act_ranges`, those layers' inputs are fake-quantized (per tensor, asymmetric,
  unsigned `a_bits` grid, fixed range, straight-through) during training, as they will run;
* the teacher is a frozen float copy; its log-probabilities over the counted positions are computed once per
  batch and cached (up to `TEACHER_CACHE_BYTES`), for both methods alike, so their times compare fairly.

The module is family-free: the caller supplies `forward(model, batch) -> (logits, mask)` (e.g. a CTC model's
frame logits and its frame mask, or a decoder's token logits and the label mask).

    from sq_plugin.core.mixed import mean_bits
    from sq_plugin.search.mixed_training import MixedTrainConfig, train_one_stage

    def forward(model, batch):
        x, mask = batch
        return model(x), mask                       # logits [batch, time, vocab], mask [batch, time]

    result = train_one_stage(model, batches, forward, MixedTrainConfig(budget_bits=3.5, steps=200))
    result.bits                                     # {"encoder.layers.0.fc1": 4, ...}
    result.weights["encoder.layers.0.fc1"].dequantize()   # what the layer computes with
    params = {name: w.codes.numel() for name, w in result.weights.items()}
    assert mean_bits(result.bits, params) <= 3.5
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.utils import parametrize

from sq_plugin.backends.simulate import quantizable_layers, strip_weight_norm
from sq_plugin.backends.weights import StoredWeight, codes_for, quantize_weight
from sq_plugin.core.mixed import WEIGHT_WIDTHS, allocate_bits, check_budget, check_widths, mean_bits
from sq_plugin.core.quant import check_bits, qparams_from_range, quant_bounds

ForwardFn = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, torch.Tensor]]

# The teacher's log-probabilities are computed once per batch and kept while they fit in this many bytes;
# beyond it they are recomputed each step (a large vocabulary times many batches would not fit in memory).
TEACHER_CACHE_BYTES = 256 * 2**20


def _positive(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{key} must be a finite number > 0 (got {value!r})")
    return float(value)


@dataclass(frozen=True)
class MixedTrainConfig:
    """Options of the mixed-precision training. Everything the paper leaves open is here with its default.

    budget_bits: the parameter-weighted mean weight bits over the trained layers; the result never exceeds it.
    widths: the candidate widths of every layer (from `WEIGHT_WIDTHS`).
    steps: optimiser steps (one-stage: all of them; two-stage: this many per stage).
    lr_weights / lr_scales / lr_arch: Adam learning rates of the float weights, the log step sizes and the
        architecture logits.
    tau_start / tau_end: the Gumbel-softmax temperature, annealed exponentially over the steps.
    size_weight: weight of the penalty (expected_bits - budget_bits) ** 2 (toward the budget).
    a_bits: width of the input activations of the layers given `act_ranges` (fake-quantized, straight-through).
    seed: seeds the Gumbel noise (the only randomness), so a run is reproducible.
    """

    budget_bits: float = 4.0
    widths: tuple[int, ...] = WEIGHT_WIDTHS
    steps: int = 200
    lr_weights: float = 1e-5
    lr_scales: float = 1e-3
    lr_arch: float = 5e-2
    tau_start: float = 1.0
    tau_end: float = 0.1
    size_weight: float = 1.0
    a_bits: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        try:
            widths = check_widths(self.widths)
        except ValueError as exc:
            raise ValueError(f"widths: {exc}") from None
        object.__setattr__(self, "widths", widths)
        try:
            budget = check_budget(self.budget_bits, widths)
        except ValueError as exc:
            raise ValueError(f"budget_bits: {exc}") from None
        object.__setattr__(self, "budget_bits", budget)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1 (got {self.steps!r})")
        for key in ("lr_weights", "lr_scales", "lr_arch", "tau_start", "tau_end"):
            object.__setattr__(self, key, _positive(getattr(self, key), key))
        size_weight = self.size_weight
        if (isinstance(size_weight, bool) or not isinstance(size_weight, int | float)
                or not math.isfinite(size_weight) or size_weight < 0):
            raise ValueError(f"size_weight must be a finite number >= 0 (got {size_weight!r}); 0 turns the size "
                             "penalty off (the budget is then met by the final allocation alone)")
        object.__setattr__(self, "size_weight", float(size_weight))
        check_bits(self.a_bits, name="a_bits")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer (got {self.seed!r})")


@dataclass
class MixedTrainResult:
    """The learned widths and weights.

    bits: the fixed width of every trained layer; mean_bits(bits, params) <= budget_bits always.
    weights: each layer's codes and per-channel scales at its width (what is stored and executed).
    arch_probs: softmax of each layer's learned logits, {layer: {bits: probability}}.
    seconds: wall time of the whole compression (both stages for two-stage).
    stage_seconds: {"one_stage": s} or {"precision_search": s, "finetune": s}.
    history: one entry per step: step (counted across both stages for two-stage), kl, expected_bits (the fixed
        widths' mean during fine-tuning), tau (0 during fine-tuning: nothing is sampled) and loss.
    method: "one-stage" or "two-stage".
    """

    bits: dict[str, int]
    weights: dict[str, StoredWeight]
    arch_probs: dict[str, dict[int, float]]
    seconds: float
    stage_seconds: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    method: str = "one-stage"


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round forward, identity backward."""
    return x + (torch.round(x) - x).detach()


class _SupernetWeight(torch.nn.Module):
    """A parametrization of one layer's weight: the Gumbel-weighted sum of its per-width quantizers, or
    (with `fixed` set) the quantizer of one width alone."""

    def __init__(self, weight: torch.Tensor, widths: tuple[int, ...]) -> None:
        super().__init__()
        self.widths = widths
        self.bounds = [quant_bounds(b, signed=True) for b in widths]
        init = torch.stack([quantize_weight(weight, b, rule="mse").scale for b in widths])
        self.log_scales = torch.nn.Parameter(torch.log(init))  # [n_widths, out channels]
        self.logits = torch.nn.Parameter(torch.zeros(len(widths), device=weight.device))
        self.view = (-1,) + (1,) * (weight.dim() - 1)
        self.gate: torch.Tensor | None = None  # the step's Gumbel sample; None: softmax(logits)
        self.fixed: int | None = None  # index into widths: that width alone

    def scale(self, index: int) -> torch.Tensor:
        return torch.exp(self.log_scales[index])

    def quantize(self, weight: torch.Tensor, index: int) -> torch.Tensor:
        qmin, qmax = self.bounds[index]
        s = self.scale(index).to(weight.dtype).reshape(self.view)
        return torch.clamp(_round_ste(weight / s), qmin, qmax) * s

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.fixed is not None:
            return self.quantize(weight, self.fixed)
        gate = self.gate if self.gate is not None else torch.softmax(self.logits, dim=0)
        gate = gate.to(weight.dtype)
        out = gate[0] * self.quantize(weight, 0)
        for i in range(1, len(self.widths)):
            out = out + gate[i] * self.quantize(weight, i)
        return out


def _act_hook(act_range: tuple[float, float], a_bits: int) -> Callable[[torch.nn.Module, tuple], tuple]:
    qmin, qmax = quant_bounds(a_bits, signed=False)
    scale, zp = qparams_from_range(act_range[0], act_range[1], qmin, qmax, symmetric=False)
    scale_f, zp_f = float(scale), float(zp)

    def hook(_module: torch.nn.Module, args: tuple) -> tuple:
        x = args[0]
        q = torch.clamp(_round_ste(x / scale_f) + zp_f, qmin, qmax)
        return ((q - zp_f) * scale_f, *args[1:])

    return hook


def masked_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the softmax over the last dim, averaged over the positions `mask` counts."""
    mask = mask.to(torch.bool)
    t = torch.log_softmax(teacher_logits[mask].float(), dim=-1)
    s = torch.log_softmax(student_logits[mask].float(), dim=-1)
    return (t.exp() * (t - s)).sum(dim=-1).mean()


def _call(forward: ForwardFn, model: torch.nn.Module, batch: Any, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    out = forward(model, batch)
    if not (isinstance(out, tuple | list) and len(out) == 2
            and all(isinstance(t, torch.Tensor) for t in out)):
        raise ValueError(f"forward must return (logits, mask), two tensors (got {type(out).__name__} for the "
                         f"{who}); e.g. `return model(x).logits, attention_mask`")
    logits, mask = out
    if logits.dim() < 1 or tuple(mask.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"forward returned logits of shape {tuple(logits.shape)} and a mask of shape "
                         f"{tuple(mask.shape)} for the {who}; the mask must have the logits' shape without the last "
                         f"(vocabulary) dim, i.e. {tuple(logits.shape[:-1])}. Fix: return the mask of the positions "
                         "that count, one entry per logit row")
    return logits, mask.to(torch.bool)


class _Teacher:
    """The frozen float copy and its log-probabilities over the counted positions, cached per batch while they
    fit in `TEACHER_CACHE_BYTES`."""

    def __init__(self, model: torch.nn.Module, forward: ForwardFn) -> None:
        self.model = model
        self.forward = forward
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]] = {}
        self.cached_bytes = 0

    @torch.no_grad()
    def __call__(self, index: int, batch: Any) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        if index in self.cache:
            return self.cache[index]
        logits, mask = _call(self.forward, self.model, batch, "teacher")
        if not bool(mask.any()):
            raise ValueError(f"batch {index}: the mask counts no position; every batch needs at least one position "
                             "that counts (check the mask the forward returns)")
        logp = torch.log_softmax(logits[mask].float(), dim=-1).detach()
        entry = (logp, mask, tuple(logits.shape))
        size = logp.numel() * logp.element_size()
        if self.cached_bytes + size <= TEACHER_CACHE_BYTES:
            self.cache[index] = entry
            self.cached_bytes += size
        return entry


def _kl_to(teacher_logp: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    s = torch.log_softmax(student_logits[mask].float(), dim=-1)
    return (teacher_logp.exp() * (teacher_logp - s)).sum(dim=-1).mean()


class _Student:
    """The student copy: every trained layer's weight parametrized by its supernet, inputs optionally hooked."""

    def __init__(self, model: torch.nn.Module, layers: list[str], widths: tuple[int, ...],
                 act_ranges: Mapping[str, tuple[float, float]], a_bits: int) -> None:
        self.model = strip_weight_norm(copy.deepcopy(model)).eval()
        modules = quantizable_layers(self.model)
        self.widths = widths
        self.supernets: dict[str, _SupernetWeight] = {}
        self.params: dict[str, int] = {}
        for name in layers:
            module = modules[name]
            # A Parameter of this layer only: a weight tied to another module (an output head tied to the token
            # embedding) trains here, while the other module keeps its float weight.
            weight = torch.nn.Parameter(module.weight.detach().clone())
            module._parameters["weight"] = weight
            supernet = _SupernetWeight(weight.detach(), widths)
            parametrize.register_parametrization(module, "weight", supernet)
            self.supernets[name] = supernet
            self.params[name] = weight.numel()
        for name, act_range in act_ranges.items():
            modules[name].register_forward_pre_hook(_act_hook(act_range, a_bits))
        self.modules = {name: modules[name] for name in layers}
        for p in self.model.parameters():  # nothing trains until a stage says what does
            p.requires_grad_(False)

    def train_only(self, *groups: list[torch.nn.Parameter]) -> None:
        for p in self.model.parameters():
            p.requires_grad_(False)
        for group in groups:
            for p in group:
                p.requires_grad_(True)

    def float_weight(self, name: str) -> torch.nn.Parameter:
        return self.modules[name].parametrizations.weight.original

    def weights(self) -> list[torch.nn.Parameter]:
        return [self.float_weight(name) for name in self.supernets]

    def scales(self) -> list[torch.nn.Parameter]:
        return [s.log_scales for s in self.supernets.values()]

    def logits(self) -> list[torch.nn.Parameter]:
        return [s.logits for s in self.supernets.values()]

    def expected_bits(self) -> torch.Tensor:
        total = sum(self.params.values())
        return sum(self.params[name] * (torch.softmax(s.logits, dim=0)
                                        * torch.tensor(self.widths, dtype=torch.float32, device=s.logits.device)).sum()
                   for name, s in self.supernets.items()) / total

    def probs(self) -> dict[str, dict[int, float]]:
        out = {}
        for name, s in self.supernets.items():
            p = torch.softmax(s.logits.detach(), dim=0)
            out[name] = {b: float(p[i]) for i, b in enumerate(self.widths)}
        return out

    def choose_bits(self, budget_bits: float) -> dict[str, int]:
        """Each layer's most probable width (ties: the wider); when that breaks the budget, the allocation of
        least total -log probability that meets it."""
        cost = {}
        for name, s in self.supernets.items():
            logp = torch.log_softmax(s.logits.detach().double(), dim=0)
            cost[name] = {b: float(-logp[i]) for i, b in enumerate(self.widths)}
        bits = {name: min(self.widths, key=lambda b, c=c: (c[b], -b)) for name, c in cost.items()}
        if mean_bits(bits, self.params) > budget_bits:
            bits = allocate_bits(cost, self.params, budget_bits, widths=self.widths)
        if mean_bits(bits, self.params) > budget_bits:
            raise RuntimeError(f"the width allocation exceeds the budget ({mean_bits(bits, self.params)} > "
                               f"{budget_bits} bits)")
        return bits

    def fix(self, bits: Mapping[str, int]) -> None:
        for name, s in self.supernets.items():
            s.fixed = self.widths.index(bits[name])
            s.gate = None

    def stored(self, bits: Mapping[str, int]) -> dict[str, StoredWeight]:
        out = {}
        for name, s in self.supernets.items():
            index = self.widths.index(bits[name])
            weight = self.float_weight(name).detach()
            scale = s.scale(index).detach().float().clone()
            out[name] = StoredWeight(codes_for(weight, scale, bits[name]), scale, bits[name])
        return out


def _check_inputs(model: torch.nn.Module, batches: Sequence[Any], layers: Sequence[str] | None,
                  act_ranges: Mapping[str, tuple[float, float]] | None) -> tuple[list, list[str], dict]:
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module (got {type(model).__name__})")
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty: the training needs at least one batch. Fix: pass the training/"
                         "calibration batches that forward(model, batch) accepts")
    available = quantizable_layers(model)
    if not available and layers is None:
        raise ValueError("the model has no Linear or Conv1d layer to quantize")
    if layers is None:
        names = list(available)
    else:
        if isinstance(layers, str):
            raise ValueError(f"layers must be a sequence of layer names, not one string ({layers!r}); "
                             f"e.g. layers=[{layers!r}]")
        names = list(dict.fromkeys(layers))
        if not names:
            raise ValueError("layers is empty: name at least one Linear/Conv1d layer, or pass None for all of them")
        unknown = [name for name in names if name not in available]
        if unknown:
            raise ValueError(f"layer(s) {unknown[:5]} are not Linear/Conv1d layers of the model; choose from its "
                             "Linear/Conv1d module names, e.g. " + ", ".join(list(available)[:3]))
    ranges: dict[str, tuple[float, float]] = {}
    for name, value in (act_ranges or {}).items():
        if name not in names:
            raise ValueError(f"act_ranges names layer {name!r}, which is not one of the trained layers; add it to "
                             "`layers` or drop its range")
        try:
            lo, hi = (float(v) for v in value)
        except (TypeError, ValueError):
            raise ValueError(f"act_ranges[{name!r}] must be a (lo, hi) pair of numbers (got {value!r})") from None
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
            raise ValueError(f"act_ranges[{name!r}] = {value!r} is not a finite range with lo <= hi")
        ranges[name] = (lo, hi)
    return batches, names, ranges


def _tau(config: MixedTrainConfig, step: int) -> float:
    if config.steps == 1:
        return config.tau_start
    return config.tau_start * (config.tau_end / config.tau_start) ** (step / (config.steps - 1))


def _gumbel(logits: torch.Tensor, tau: float, generator: torch.Generator) -> torch.Tensor:
    u = torch.rand(logits.shape, generator=generator, dtype=torch.float32)
    noise = -torch.log((-torch.log(u.clamp_min(1e-20))).clamp_min(1e-20))
    return torch.softmax((logits + noise.to(logits.device)) / tau, dim=0)


def _train(student: _Student, teacher: _Teacher, batches: list, config: MixedTrainConfig,
           optimizer: torch.optim.Optimizer, *, sample: bool, size_term: bool, history: list[dict[str, float]],
           step_offset: int, progress: bool, desc: str) -> None:
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(config.seed)
    fixed_bits = None
    for _ in tqdm(range(config.steps), desc=desc, disable=not progress):
        step = len(history) - step_offset
        index = step % len(batches)
        batch = batches[index]
        teacher_logp, mask, shape = teacher(index, batch)
        tau = _tau(config, step) if sample else 0.0
        with torch.enable_grad():
            if sample:
                for s in student.supernets.values():
                    s.gate = _gumbel(s.logits, tau, generator)
            logits, student_mask = _call(teacher.forward, student.model, batch, "student")
            if tuple(logits.shape) != shape or not torch.equal(student_mask, mask):
                raise ValueError(f"batch {index}: the student's logits {tuple(logits.shape)} or mask differ from "
                                 f"the teacher's {shape}; forward must return the same positions for the same batch")
            kl = _kl_to(teacher_logp, logits, mask)
            if size_term:
                expected = student.expected_bits()
                loss = kl + config.size_weight * (expected - config.budget_bits) ** 2
                expected_f = float(expected.detach())
            else:
                loss = kl
                if fixed_bits is None:
                    fixed_bits = mean_bits({n: student.widths[s.fixed] for n, s in student.supernets.items()},
                                           student.params)
                expected_f = fixed_bits
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        history.append({"step": float(len(history)), "kl": float(kl.detach()), "expected_bits": expected_f,
                        "tau": tau, "loss": float(loss.detach())})
    for s in student.supernets.values():
        s.gate = None


def _setup(model: torch.nn.Module, batches: Sequence[Any], forward: ForwardFn, config: MixedTrainConfig,
           layers: Sequence[str] | None, act_ranges: Mapping[str, tuple[float, float]] | None
           ) -> tuple[list, _Student, _Teacher]:
    if not isinstance(config, MixedTrainConfig):
        raise ValueError(f"config must be a MixedTrainConfig (got {type(config).__name__})")
    if not callable(forward):
        raise ValueError("forward must be a callable forward(model, batch) -> (logits, mask)")
    batches, names, ranges = _check_inputs(model, batches, layers, act_ranges)
    teacher_model = copy.deepcopy(model).eval()
    for p in teacher_model.parameters():
        p.requires_grad_(False)
    teacher = _Teacher(teacher_model, forward)
    teacher(0, batches[0])  # checks the forward's output before any training
    student = _Student(model, names, config.widths, ranges, config.a_bits)
    return batches, student, teacher


def train_one_stage(model: torch.nn.Module, batches: Sequence[Any], forward: ForwardFn, config: MixedTrainConfig,
                    *, layers: Sequence[str] | None = None,
                    act_ranges: Mapping[str, tuple[float, float]] | None = None,
                    progress: bool = False) -> MixedTrainResult:
    """Learn the widths, weights and step sizes jointly (the paper's one-stage method). `model` is not changed.

    batches: cycled in order, one per step; forward(model, batch) -> (logits [..., vocab], mask [...] bool).
    layers: the layers to quantize (default: every Linear/Conv1d); act_ranges: fixed input ranges of some of
    them, whose inputs are then fake-quantized at `config.a_bits` during training.
    """
    start = time.perf_counter()
    batches, student, teacher = _setup(model, batches, forward, config, layers, act_ranges)
    optimizer = torch.optim.Adam([
        {"params": student.weights(), "lr": config.lr_weights},
        {"params": student.scales(), "lr": config.lr_scales},
        {"params": student.logits(), "lr": config.lr_arch},
    ])
    student.train_only(student.weights(), student.scales(), student.logits())
    history: list[dict[str, float]] = []
    _train(student, teacher, batches, config, optimizer, sample=True, size_term=True, history=history,
           step_offset=0, progress=progress, desc="one-stage mixed precision")
    bits = student.choose_bits(config.budget_bits)
    weights = student.stored(bits)
    seconds = time.perf_counter() - start
    return MixedTrainResult(bits=bits, weights=weights, arch_probs=student.probs(), seconds=seconds,
                            stage_seconds={"one_stage": seconds}, history=history, method="one-stage")


def train_two_stage(model: torch.nn.Module, batches: Sequence[Any], forward: ForwardFn, config: MixedTrainConfig,
                    *, layers: Sequence[str] | None = None,
                    act_ranges: Mapping[str, tuple[float, float]] | None = None,
                    progress: bool = False) -> MixedTrainResult:
    """The two-stage baseline: the precision search (only the architecture logits train, `config.steps` steps;
    weights and step sizes stay at their MSE initialisation), then quantization-aware fine-tuning of the
    weights and step sizes at the fixed widths (`config.steps` more steps, KL only). Same arguments as
    `train_one_stage`; `model` is not changed."""
    start = time.perf_counter()
    batches, student, teacher = _setup(model, batches, forward, config, layers, act_ranges)
    student.train_only(student.logits())
    history: list[dict[str, float]] = []
    search_opt = torch.optim.Adam(student.logits(), lr=config.lr_arch)
    _train(student, teacher, batches, config, search_opt, sample=True, size_term=True, history=history,
           step_offset=0, progress=progress, desc="precision search")
    bits = student.choose_bits(config.budget_bits)
    arch_probs = student.probs()
    searched = time.perf_counter()

    student.fix(bits)
    student.train_only(student.weights(), student.scales())
    finetune_opt = torch.optim.Adam([
        {"params": student.weights(), "lr": config.lr_weights},
        {"params": student.scales(), "lr": config.lr_scales},
    ])
    _train(student, teacher, batches, config, finetune_opt, sample=False, size_term=False, history=history,
           step_offset=len(history), progress=progress, desc="fine-tuning")
    weights = student.stored(bits)
    end = time.perf_counter()
    return MixedTrainResult(bits=bits, weights=weights, arch_probs=arch_probs, seconds=end - start,
                            stage_seconds={"precision_search": searched - start, "finetune": end - searched},
                            history=history, method="two-stage")


__all__ = ["TEACHER_CACHE_BYTES", "ForwardFn", "MixedTrainConfig", "MixedTrainResult", "masked_kl",
           "train_one_stage", "train_two_stage"]
