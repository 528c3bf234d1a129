"""Width allocation under a budget (core.mixed): exact against brute force, and the refusals."""

import itertools

import numpy as np
import pytest

from sq_plugin.core.mixed import WEIGHT_WIDTHS, allocate_bits, check_budget, check_widths, mean_bits, pareto_front


def random_problem(seed: int, n_layers: int = 5):
    rng = np.random.default_rng(seed)
    layers = [f"layer{i}" for i in range(n_layers)]
    params = {n: int(rng.integers(100, 5000)) for n in layers}
    # costs fall with the width, at a layer-specific rate (as measured sensitivities do)
    cost = {n: {b: float(rng.uniform(0.1, 3.0) * 2.0 ** (-b)) for b in WEIGHT_WIDTHS} for n in layers}
    return layers, params, cost


def brute_force(layers, params, cost, budget):
    best = None
    for combo in itertools.product(WEIGHT_WIDTHS, repeat=len(layers)):
        bits = dict(zip(layers, combo, strict=True))
        if mean_bits(bits, params) <= budget + 1e-12:
            total = sum(cost[n][b] for n, b in bits.items())
            if best is None or total < best[0]:
                best = (total, bits)
    return best


@pytest.mark.parametrize("seed,budget", [(0, 3.0), (1, 3.7), (2, 4.5), (3, 6.0)])
def test_allocation_is_the_exact_optimum(seed, budget):
    layers, params, cost = random_problem(seed)
    bits = allocate_bits(cost, params, budget)
    best_total, _ = brute_force(layers, params, cost, budget)
    assert mean_bits(bits, params) <= budget + 1e-9
    assert sum(cost[n][b] for n, b in bits.items()) == pytest.approx(best_total, rel=1e-9)


def test_a_budget_at_the_widest_width_takes_each_layers_cheapest_width():
    cost = {"a": {4: 1.0, 8: 0.5}, "b": {4: 0.2, 8: 0.3}}  # b is (noisily) better at 4 bits
    assert allocate_bits(cost, {"a": 10, "b": 10}, 8.0) == {"a": 8, "b": 4}


def test_the_budget_binds_by_parameter_count():
    cost = {"big": {2: 1.0, 8: 0.0}, "small": {2: 1.0, 8: 0.0}}
    params = {"big": 900, "small": 100}
    # 8 bits for the small layer only: mean 2.6; for the big one only: 7.4
    assert allocate_bits(cost, params, 3.0) == {"big": 2, "small": 8}
    assert mean_bits({"big": 2, "small": 8}, params) == pytest.approx(2.6)


def test_refusals_name_the_problem():
    with pytest.raises(ValueError, match="below the smallest candidate width"):
        check_budget(1.5, WEIGHT_WIDTHS)
    with pytest.raises(ValueError, match="unknown weight width"):
        check_widths([4, 7])
    with pytest.raises(ValueError, match="unknown weight width"):
        check_widths([1])
    with pytest.raises(ValueError, match="number of bits"):
        check_budget("four", WEIGHT_WIDTHS)
    with pytest.raises(ValueError, match="no cost for width"):
        allocate_bits({"a": {4: 1.0}}, {"a": 1}, 4.0, widths=(4, 8))
    with pytest.raises(ValueError, match="not finite"):
        allocate_bits({"a": {4: float("nan"), 8: 0.0}}, {"a": 1}, 4.0)
    with pytest.raises(ValueError, match="no layers"):
        allocate_bits({}, {}, 4.0)


def test_pareto_front_keeps_what_nothing_beats():
    points = [(10, 5.0), (20, 4.0), (15, 6.0), (30, 4.0), (40, 1.0), (5, 9.0)]
    assert pareto_front(points) == [5, 0, 1, 4]
