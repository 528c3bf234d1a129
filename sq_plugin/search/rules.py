"""One range rule for every layer, as a `QuantPlan`: the baselines max / percentile / mse.

    hists = ctc_statistics(bundle, calibration)            # one float pass (sq_plugin.families.ctc)
    plan = rule_plan(hists, layer_ops(model), RangeRule("percentile", percentile=99.99), w_bits=8, a_bits=8)

The same statistics and the same plan format as StableQuant's search, so a baseline and StableQuant
differ only in the decision, and every backend applies both the same way. The histograms can be the
search's own (`SearchResult.histograms`): then the calibration set is pushed through the model once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from sq_plugin.backends.simulate import quantizable_layers
from sq_plugin.backends.x86_isa import resolve_int8_grid
from sq_plugin.core.grid import grid_bits
from sq_plugin.core.plan import LayerPlan, QuantPlan, x86_grids
from sq_plugin.core.ranges import RangeRule, compute_range
from sq_plugin.core.stats import Histogram


def layer_ops(model: torch.nn.Module) -> dict[str, str]:
    """Every quantizable layer's module name -> its op ("linear", "conv1d"), in network order."""
    return {name: type(module).__name__.lower() for name, module in quantizable_layers(model).items()}


def rule_plan(histograms: Mapping[str, Histogram], ops: Mapping[str, str], rule: RangeRule, *, w_bits: int = 8,
              a_bits: int = 8, int8_grid: str = "auto", provenance: dict[str, Any] | None = None) -> QuantPlan:
    """Every layer of `ops` quantized, its input range decided by `rule` on its histogram, on the grids that
    will execute (`int8_grid`, "auto" resolved for this CPU), with per-channel MAX weights."""
    missing = [name for name in ops if name not in histograms]
    if missing:
        raise ValueError(f"no statistics for layer(s) {missing[:3]}{' ...' if len(missing) > 3 else ''}; collect "
                         "them on this model (ctc_statistics / whisper_statistics) before making its plan")
    grid = resolve_int8_grid(int8_grid)
    w_grid_bits, a_grid_bits = grid_bits(w_bits, a_bits, grid)
    weight_grid, act_grid = x86_grids(w_grid_bits, a_grid_bits)
    decision = {"method": rule.method}
    if rule.method in ("percentile", "percentile_then_mse"):
        decision["percentile"] = rule.percentile
    layers = {}
    for name, op in ops.items():
        lo, hi = compute_range(histograms[name], rule, bits=a_grid_bits, symmetric=False, signed=False,
                               name=f"{name} (input)")
        layers[name] = LayerPlan(op=op, activation=act_grid, act_range=(float(lo[0]), float(hi[0])),
                                 weight=weight_grid, decision=dict(decision))
    return QuantPlan(layers, {**(provenance or {}), "rule": rule.to_dict(), "w_bits": w_bits, "a_bits": a_bits,
                              "int8_grid": grid})


__all__ = ["layer_ops", "rule_plan"]
