"""Per-layer weight widths under a size budget: exact allocation by integer linear programming.

    widths = allocate_bits(cost, params, budget_bits=4.0)     # {layer: bits}, mean bits <= 4.0
    front = pareto_front(points)                               # the (size, loss) points nothing beats

`cost[layer][bits]` is the predicted loss of putting `layer` at `bits` (a measured sensitivity, or minus
the log-probability a learned architecture parameter gives that width); the allocation minimises the sum
of the chosen costs (the additive model) subject to the mean weight bits, weighted by each layer's
parameter count, staying within the budget. Each layer takes exactly one width: binary variables
x[layer, bits], one equality per layer, one budget inequality, solved exactly by `scipy.optimize.milp`.

"Mean bits" counts the quantized layers' weight parameters only (as the mixed-precision papers do); the
bytes on disk (`sq_plugin.backends.packed`) add the per-channel scales and whatever stays float.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

# The widths and their checks are torch- and numpy-free (recipe validation uses them): sq_plugin.core.grid.
from sq_plugin.core.grid import PTQ_WIDTHS, WEIGHT_WIDTHS, check_budget, check_widths


def mean_bits(bits: Mapping[str, int], params: Mapping[str, int]) -> float:
    """Parameter-weighted mean width of an allocation."""
    total = sum(params[name] for name in bits)
    if total <= 0:
        raise ValueError("the layers have no parameters")
    return sum(bits[name] * params[name] for name in bits) / total


def allocate_bits(cost: Mapping[str, Mapping[int, float]], params: Mapping[str, int], budget_bits: float, *,
                  widths: Sequence[int] | None = None) -> dict[str, int]:
    """The allocation {layer: bits} of least total cost whose mean bits (weighted by `params`) is at most
    `budget_bits`. `widths` restricts the candidates (default: the widths every layer's cost gives)."""
    if not cost:
        raise ValueError("no layers to allocate widths to")
    layers = list(cost)
    missing = [name for name in layers if name not in params]
    if missing:
        raise ValueError(f"no parameter count for layer(s) {missing[:3]}")
    if widths is None:
        common = set.intersection(*(set(c) for c in cost.values()))
        widths = sorted(common)
    widths = check_widths(widths)
    budget = check_budget(budget_bits, widths)
    for name in layers:
        absent = [b for b in widths if b not in cost[name]]
        if absent:
            raise ValueError(f"layer {name}: no cost for width(s) {absent}; measure it at every candidate width")
        bad = [b for b in widths if not np.isfinite(float(cost[name][b]))]
        if bad:
            raise ValueError(f"layer {name}: cost at {bad} bits is not finite; re-measure the sensitivity")
    if budget >= widths[-1]:  # everything at the widest width fits; no solver needed
        best = {name: min(widths, key=lambda b, n=name: (float(cost[n][b]), -b)) for name in layers}
        return best
    from scipy.optimize import Bounds, LinearConstraint, milp

    n_layers, n_widths = len(layers), len(widths)
    c = np.array([[float(cost[name][b]) for b in widths] for name in layers]).reshape(-1)
    weights = np.array([float(params[name]) for name in layers])
    total = weights.sum()
    one_width = np.kron(np.eye(n_layers), np.ones(n_widths))
    size_row = (weights[:, None] * np.array(widths, dtype=float)[None, :]).reshape(1, -1) / total
    constraints = [LinearConstraint(one_width, 1, 1), LinearConstraint(size_row, -np.inf, budget + 1e-9)]
    result = milp(c, constraints=constraints, integrality=np.ones_like(c), bounds=Bounds(0, 1))
    if not result.success:
        raise RuntimeError(f"the width allocation found no solution ({result.message}) at budget {budget} bits")
    x = np.round(result.x).reshape(n_layers, n_widths)
    return {name: int(widths[int(np.argmax(x[i]))]) for i, name in enumerate(layers)}


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (size, loss) that no other point beats in both (smaller or equal size and loss,
    one strictly), in order of size."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], np.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


__all__ = ["PTQ_WIDTHS", "WEIGHT_WIDTHS", "allocate_bits", "check_budget", "check_widths", "mean_bits", "pareto_front"]
