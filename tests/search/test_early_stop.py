"""Early stopping of candidate evaluations: the same decisions as full evaluations, in fewer metric terms."""

import pytest
import torch

from sq_plugin.search import SearchConfig, stablequant_search
from sq_plugin.search.early_stop import gathered_mean, ordered_sum, sum_until, takes_bound
from tests.search.test_prefix_cache import Stack


def test_sum_until_stops_after_the_term_that_crosses_the_bound():
    seen = []

    def terms():
        for t in [0.1, 0.2, 0.3, 0.4]:
            seen.append(t)
            yield t

    taken, total, stopped = sum_until(terms(), 2.0, 0.12)  # 0.3 / 2 = 0.15 > 0.12 after two terms
    assert (taken, stopped) == ([0.1, 0.2], True) and total == 0.1 + 0.2 and seen == [0.1, 0.2]
    taken, total, stopped = sum_until([0.1, 0.2, 0.3, 0.4], 2.0, None)
    assert (taken, total, stopped) == ([0.1, 0.2, 0.3, 0.4], ordered_sum([0.1, 0.2, 0.3, 0.4]), False)
    # a bound the full value does not exceed: every term, and the exact mean
    taken, total, stopped = sum_until([0.1, 0.2, 0.3, 0.4], 2.0, 0.5)
    assert not stopped and total / 2.0 == pytest.approx(0.5)
    with pytest.raises(ValueError, match="count must be > 0"):
        sum_until([1.0], 0, None)


def test_gathered_mean_in_one_process_is_the_ordered_sum_or_the_partial_lower_bound():
    assert gathered_mean([1.0, 2.0, 4.0], [0, 1, 2], 3, 3, False) == 7.0 / 3
    assert gathered_mean([1.0, 2.0], [0, 1, 2], 3, 3, True) == 1.0  # stopped after two: 3 / 3, below the full 7 / 3
    with pytest.raises(RuntimeError, match="returned 2 items for 3"):
        gathered_mean([1.0, 2.0], [0, 1, 2], 3, 3, False)


def test_takes_bound_looks_for_the_keyword():
    assert takes_bound(lambda *, bound=None: 0.0) and not takes_bound(lambda: 0.0) and not takes_bound(len)


def make_problem(n_batches: int = 8):
    """The prefix-cache test's stack, scored by a mean of non-negative per-batch errors that stops at `bound`."""
    model = Stack().eval()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(64, 8, generator=gen) * (1 + 20 * (i == 0)) for i in range(n_batches)]
    with torch.no_grad():
        reference = [model(b) for b in batches]
    scale = sum(float(r.square().mean()) for r in reference) / n_batches
    terms_computed = [0]

    def run():
        for b in batches:
            model(b)

    def per_batch():
        for b, r in zip(batches, reference, strict=True):
            terms_computed[0] += 1
            yield float((model(b) - r).square().mean()) / scale * 100

    @torch.no_grad()
    def metric(*, bound=None):
        _, total, _ = sum_until(per_batch(), n_batches, bound)
        return total / n_batches

    return model, run, metric, terms_computed


@pytest.mark.parametrize("replay", [None, "auto"])
def test_early_stop_decides_what_full_evaluations_decide_with_fewer_terms(replay):
    results, terms = {}, {}
    for early_stop in (False, True):
        model, run, metric, computed = make_problem()
        config = SearchConfig(threshold=0.05, w_bits=4, a_bits=4, float_fallback=True, early_stop=early_stop)
        results[early_stop] = stablequant_search(model, run, metric, config, progress=False, replay_blocks=replay)
        terms[early_stop] = computed[0]
    full, early = results[False], results[True]
    assert full.flagged and early.flagged == full.flagged
    assert early.to_plan().layers == full.to_plan().layers and early.final_metric == full.final_metric
    assert early.float_layers == full.float_layers and early.evaluations == full.evaluations
    assert full.stopped_early == 0 and all(not d.lower_bounds for d in full.layers)
    assert 0 < early.stopped_early < early.evaluations and terms[True] < terms[False]
    for exact, bounded in zip(full.layers, early.layers, strict=True):
        chosen = (exact.float_metric if exact.keep_float else
                  exact.candidates.get(exact.percentile) if exact.choice == "percentile" else None)
        for p, value in exact.candidates.items():
            if str(p) in bounded.lower_bounds:  # a loser: its recorded value is a lower bound of the exact one
                assert bounded.candidates[p] <= value and (chosen is None or bounded.candidates[p] > chosen)
            else:
                assert bounded.candidates[p] == value
        for rule, value in exact.rule_candidates.items():
            assert (bounded.rule_candidates[rule] <= value if rule in bounded.lower_bounds else
                    bounded.rule_candidates[rule] == value)
    assert any(d.lower_bounds for d in early.layers)


def test_a_metric_without_bound_is_evaluated_in_full():
    model, run, metric, computed = make_problem()
    result = stablequant_search(model, run, lambda: metric(), SearchConfig(threshold=0.05, w_bits=4, a_bits=4),
                                progress=False)
    assert result.stopped_early == 0 and computed[0] == result.evaluations * 8
