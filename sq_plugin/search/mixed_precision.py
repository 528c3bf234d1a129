"""Mixed precision without training: measure each layer's sensitivity at each weight width, then allocate the
widths exactly under a size budget (integer linear programming, `sq_plugin.core.mixed.allocate_bits`).

    sens = measure_sensitivity(model, score, widths=(2, 3, 4, 5, 6, 8))   # one evaluation per layer and width
    bits = sens.allocate(budget_bits=4.5)                                  # {layer: bits}, mean <= 4.5
    plan = mixed_plan(stablequant_plan, bits)                              # the search's activation ranges
    weights = stored_weights(model, plan)                                  # codes + scales, what runs and is stored

Sensitivity: the calibration metric (the family's proxy: CTC loss per character for CTC models, the
teacher-forced loss against the float model's own transcript for Whisper, both on the dev utterances) with
only that layer's weight quantized (MSE-clipped per channel at that width) and everything else float, minus
the float metric. The allocation assumes these add up (the usual additive model of mixed-precision PTQ;
`SensitivityResult.predicted` gives the sum, to compare with the measured metric of the allocated model).
Activations stay on the base plan's 8-bit grid with its StableQuant ranges.

Like the range search, evaluations replay unchanged prefixes (`PrefixCache`), so a decoder layer's
evaluations do not re-run the encoder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from sq_plugin.backends.simulate import LayerQuant, quantizable_layers, simulate, strip_weight_norm
from sq_plugin.backends.weights import WEIGHT_RULES, StoredWeight, quantize_weight
from sq_plugin.core.grid import PlanError
from sq_plugin.core.mixed import PTQ_WIDTHS, allocate_bits, check_widths
from sq_plugin.core.plan import QuantPlan
from sq_plugin.search.prefix_cache import DEFAULT_BUDGET_MB, PrefixCache


@dataclass
class SensitivityResult:
    """Per layer and width, how much the metric rises with only that layer's weight at that width."""

    fp_metric: float
    sensitivity: dict[str, dict[int, float]]
    params: dict[str, int]
    widths: tuple[int, ...]
    weight_rule: str
    seconds: float
    evaluations: int

    def allocate(self, budget_bits: float, *, widths: Sequence[int] | None = None,
                 layers: Sequence[str] | None = None) -> dict[str, int]:
        """The widths of least predicted metric rise with mean weight bits <= `budget_bits` (over `layers`,
        default all measured ones)."""
        names = list(layers) if layers is not None else list(self.sensitivity)
        unknown = [n for n in names if n not in self.sensitivity]
        if unknown:
            raise ValueError(f"no sensitivity measured for layer(s) {unknown[:3]}; measure them first")
        return allocate_bits({n: self.monotone(n) for n in names}, self.params, budget_bits,
                             widths=widths or self.widths)

    def monotone(self, name: str) -> dict[int, float]:
        """The layer's measured rises, made non-increasing in the width (each width costs at least what any wider
        one does). At 6–8 bits the rises are within the metric's noise, and sometimes negative; taken as measured,
        a width would look better than a wider one and the allocation would leave budget unused for nothing."""
        envelope, worst = {}, float("-inf")
        for bits in sorted(self.sensitivity[name], reverse=True):
            worst = max(worst, self.sensitivity[name][bits])
            envelope[bits] = worst
        return dict(sorted(envelope.items()))

    def predicted(self, bits: Mapping[str, int]) -> float:
        """The additive model's metric for an allocation: float metric + the sum of the layers' rises."""
        return self.fp_metric + sum(self.monotone(n)[b] for n, b in bits.items())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SensitivityResult:
        """The inverse of `to_dict` (a saved measurement, to allocate again without re-measuring)."""
        return cls(float(data["fp_metric"]),
                   {n: {int(b): float(v) for b, v in s.items()} for n, s in data["sensitivity"].items()},
                   {n: int(p) for n, p in data["params"].items()}, tuple(int(b) for b in data["widths"]),
                   str(data["weight_rule"]), float(data["seconds"]), int(data["evaluations"]))

    def to_dict(self) -> dict[str, Any]:
        return {"fp_metric": self.fp_metric, "widths": list(self.widths), "weight_rule": self.weight_rule,
                "seconds": round(self.seconds, 2), "evaluations": self.evaluations, "params": self.params,
                "sensitivity": {n: {str(b): v for b, v in s.items()} for n, s in self.sensitivity.items()}}


def measure_sensitivity(model: torch.nn.Module, metric: Callable[[], float], *, layers: Sequence[str] | None = None,
                        widths: Sequence[int] = PTQ_WIDTHS, weight_rule: str = "mse",
                        replay_blocks: Sequence[str] | str | None = "auto",
                        cache_budget_mb: float = DEFAULT_BUDGET_MB, progress: bool = True) -> SensitivityResult:
    """One evaluation of `metric()` per layer and width (weights fake-quantized, inputs float), plus the float one.
    widths: default `PTQ_WIDTHS` (4, 5, 6, 8): below 4 bits the one-at-a-time rises stop adding up (BENCHMARKS.md).

    metric: a calibration metric over fixed dev batches (lower is better), run on `model` as it stands.
    replay_blocks: as in `stablequant_search` ("auto": every module in an nn.ModuleList; None: no replay, for a
    metric that is not a pure function of fixed batches, e.g. one that decodes with a KV cache)."""
    widths = check_widths(widths)
    if weight_rule not in WEIGHT_RULES:
        raise ValueError(f"unknown weight rule {weight_rule!r}; use one of {', '.join(WEIGHT_RULES)}")
    strip_weight_norm(model)
    modules = quantizable_layers(model)
    names = list(layers) if layers is not None else list(modules)
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise ValueError(f"not Linear/Conv1d layers of this model: {unknown[:3]}")
    if not names:
        raise ValueError("no layer to measure: the model has no Linear or Conv1d layer")
    start = time.perf_counter()
    cache: PrefixCache | None = None
    fp: list[float] = []
    model.eval()
    if replay_blocks is None:
        with torch.inference_mode():
            fp.append(float(metric()))
    else:  # the float evaluation also traces the order of blocks and layers
        blocks = None if replay_blocks == "auto" else list(replay_blocks)
        cache = PrefixCache.for_model(model, names, lambda: fp.append(float(metric())), blocks=blocks,
                                      budget_mb=cache_budget_mb)
    evaluations = 1

    def evaluate(plan: dict[str, LayerQuant]) -> float:
        nonlocal evaluations
        evaluations += 1
        replay = cache.active(plan) if cache is not None else contextlib.nullcontext()
        with simulate(model, plan), torch.inference_mode(), replay:
            value = float(metric())
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"the metric is not finite ({value}) for {list(plan)}; check the dev utterances")
        return value

    def evaluate_tied(name: str, bits: int) -> float:
        # A weight shared with another module (Whisper's proj_out and token embedding) is stored and executed once,
        # so both read the quantized values: change the shared data in place. No replay: the embedding runs
        # before every cached decoder block, whose signatures do not name this layer.
        nonlocal evaluations
        evaluations += 1
        weight = modules[name].weight
        original = weight.detach().clone()
        try:
            with torch.no_grad():
                weight.copy_(quantize_weight(original, bits, rule=weight_rule).dequantize().to(weight.dtype))
            with torch.inference_mode():
                return float(metric())
        finally:
            with torch.no_grad():
                weight.copy_(original)

    tied = tied_layers(model, names)
    sensitivity: dict[str, dict[int, float]] = {}
    steps = [(n, b) for n in names for b in widths]
    for name, bits in tqdm(steps, desc="sensitivity", disable=not progress):
        if name in tied:
            value = evaluate_tied(name, bits)
        else:
            value = evaluate({name: LayerQuant(act_range=None, w_bits=bits, weight_rule=weight_rule)})
        sensitivity.setdefault(name, {})[bits] = value - fp[0]
    params = {n: int(modules[n].weight.numel()) for n in names}
    return SensitivityResult(fp[0], sensitivity, params, widths, weight_rule, time.perf_counter() - start,
                             evaluations)


def tied_layers(model: torch.nn.Module, layers: Sequence[str]) -> set[str]:
    """The layers whose weight Parameter another module also holds (a tied output head and embedding)."""
    holders: dict[int, int] = {}
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None:
                holders[id(param)] = holders.get(id(param), 0) + 1
    modules = dict(model.named_modules())
    return {n for n in layers if holders.get(id(modules[n].weight), 0) > 1}


def mixed_plan(base: QuantPlan, bits: Mapping[str, int], *, method: str = "mixed-ptq",
               provenance: Mapping[str, Any] | None = None) -> QuantPlan:
    """`base` (e.g. StableQuant's W8A8 plan: its activation ranges) with each layer of `bits` at its own weight
    width, weight_rule "stored" (codes and scales decided before export: `stored_weights`). A width wider than
    the base plan's weight grid is capped to it (8 bits runs as 7 on x86 without VNNI). Layers the base keeps
    float stay float; a quantized base layer missing from `bits` keeps its grid and rule."""
    unknown = [n for n in bits if n not in base.layers]
    if unknown:
        raise PlanError(f"widths for layer(s) the plan does not name: {unknown[:3]}. Fix: allocate over this plan's "
                        "layers")
    floated = [n for n in bits if base.layers[n].is_float]
    if floated:
        raise PlanError(f"layers.{floated[0]}: float in the base plan, so it has no weight width to set. Fix: allocate "
                        "over the plan's quantized layers (plan.quantized)")
    layers = dict(base.layers)
    for name, width in bits.items():
        layer = base.layers[name]
        check_widths([width])
        grid_bits = min(int(width), layer.weight.bits)
        layers[name] = dataclasses.replace(
            layer, weight=layer.weight.narrowed(grid_bits), weight_rule="stored",
            decision={**layer.decision, "weight_bits": grid_bits, "weight_method": method})
    info = {"method": method, "weight_widths": sorted({layers[n].weight.bits for n in bits})}
    return QuantPlan(layers, {**base.provenance, **dict(provenance or {}), "mixed_precision": info})


def stored_weights(model: torch.nn.Module, plan: QuantPlan, *, rule: str = "mse") -> dict[str, StoredWeight]:
    """The codes and scales of every "stored" layer of `plan`, at its weight grid's width, by `rule` (per channel)."""
    modules = quantizable_layers(model)
    stored = {}
    for name, layer in plan.layers.items():
        if layer.weight_rule != "stored":
            continue
        if name not in modules:
            raise PlanError(f"layers.{name}: not a Linear/Conv1d of this model. Fix: pass the model the plan was made "
                            "for")
        stored[name] = quantize_weight(modules[name].weight, layer.weight.bits, rule=rule)  # type: ignore[arg-type]
    return stored


__all__ = ["SensitivityResult", "measure_sensitivity", "mixed_plan", "stored_weights", "tied_layers"]
