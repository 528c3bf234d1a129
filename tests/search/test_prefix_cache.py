"""Prefix replay: exact results, fewer computed block calls, a memory bound, and loud misuse."""

import pytest
import torch

from sq_plugin.backends.simulate import LayerQuant, simulate
from sq_plugin.search import SearchConfig, stablequant_search
from sq_plugin.search.prefix_cache import PrefixCache, ordered_blocks


class Stack(torch.nn.Module):
    """A stem Linear, 4 residual blocks in a ModuleList, and a head (the shape of HF encoders)."""

    def __init__(self, width: int = 24):
        super().__init__()
        torch.manual_seed(0)
        self.stem = torch.nn.Linear(8, width)
        self.layers = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.Linear(width, width))
            for _ in range(4))
        self.head = torch.nn.Linear(width, 5)
        self.calls = {i: 0 for i in range(4)}

    def forward(self, x):
        h = self.stem(x)
        for i, layer in enumerate(self.layers):
            self.calls[i] += 1
            h = h + layer(h)
        return self.head(h)


def make_problem(n_batches: int = 6):
    model = Stack().eval()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(64, 8, generator=gen) * (1 + 20 * (i == 0)) for i in range(n_batches)]
    with torch.no_grad():
        reference = [model(b) for b in batches]

    def run():
        for b in batches:
            model(b)

    def metric():
        with torch.no_grad():
            err = sum(float((model(b) - r).square().sum()) for b, r in zip(batches, reference, strict=True))
        return err / sum(float(r.square().sum()) for r in reference) * 100

    return model, run, metric


def test_default_blocks_are_the_modulelist_items_plus_loose_layers():
    assert ordered_blocks(Stack()) == ["layers.0", "layers.1", "layers.2", "layers.3", "stem", "head"]


def test_traced_order_and_signature_prefixes():
    model, run, _ = make_problem()
    layers = ["stem", *[f"layers.{i}.{j}" for i in range(4) for j in (0, 2)], "head"]
    cache = PrefixCache.for_model(model, layers, run)
    assert cache.blocks == ["stem", "layers.0", "layers.1", "layers.2", "layers.3", "head"]  # execution order
    assert cache._upto["layers.1"] == ["stem", "layers.0.0", "layers.0.2", "layers.1.0", "layers.1.2"]


def test_replayed_evaluation_is_bit_for_bit_a_full_one_and_skips_the_prefix():
    model, run, metric = make_problem()
    layers = ["stem", *[f"layers.{i}.{j}" for i in range(4) for j in (0, 2)], "head"]
    cache = PrefixCache.for_model(model, layers, run)
    plan = {"layers.2.0": LayerQuant(act_range=(-3.0, 3.0), a_bits=4, w_bits=4)}
    with simulate(model, plan):
        full = metric()
    with cache.active({}), simulate(model, {}):  # the float run records every block
        assert metric() == 0.0
    model.calls = {i: 0 for i in range(4)}
    computed = cache.computed_calls
    with simulate(model, plan), cache.active(plan):
        replayed = metric()
    assert replayed == full  # exact, not approximately equal
    # stem, layers.0 and layers.1 were replayed for each of the 6 batches; layers.2, .3 and head ran
    assert cache.computed_calls - computed == 3 * 6 and cache.replayed_calls == 3 * 6


def test_search_with_replay_equals_search_without():
    config = SearchConfig(threshold=0.05, w_bits=4, a_bits=4)
    plain = stablequant_search(*make_problem(), config, progress=False)
    model, run, metric = make_problem()
    cached = stablequant_search(model, run, metric, config, progress=False, replay_blocks="auto")
    assert plain.flagged and cached.flagged == plain.flagged
    assert [d.screen_metric for d in cached.layers] == [d.screen_metric for d in plain.layers]
    assert cached.to_plan().layers == plain.to_plan().layers and cached.final_metric == plain.final_metric
    stats = cached.cache
    assert stats["replayed_calls"] > stats["computed_calls"] / 2  # most block calls were not recomputed


def test_memory_stays_within_the_budget_and_results_do_not_change():
    config = SearchConfig(threshold=0.05, w_bits=4, a_bits=4)
    plain = stablequant_search(*make_problem(), config, progress=False)
    one_block_per_batch = 64 * 24 * 4
    budget_mb = 5 * one_block_per_batch * 6 / 2**20  # room for 5 blocks of 6 batches
    model, run, metric = make_problem()
    tight = stablequant_search(model, run, metric, config, progress=False, replay_blocks="auto",
                               cache_budget_mb=budget_mb)
    assert tight.to_plan().layers == plain.to_plan().layers and tight.final_metric == plain.final_metric
    assert 0 < tight.cache["peak_mb"] <= budget_mb
    model, run, metric = make_problem()
    none = stablequant_search(model, run, metric, config, progress=False, replay_blocks="auto", cache_budget_mb=0)
    assert none.cache["peak_mb"] == 0 and none.cache["replayed_calls"] == 0
    assert none.to_plan().layers == plain.to_plan().layers


def test_a_metric_that_changes_its_batches_is_an_error():
    model, run, _ = make_problem()
    cache = PrefixCache.for_model(model, ["stem", "head"], run)
    with cache.active({}), torch.no_grad():
        model(torch.randn(4, 8))
        model(torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="called more often than when it was recorded"), torch.no_grad():
        with cache.active({}):
            for _ in range(3):
                model(torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="called fewer times than when recorded"), torch.no_grad():
        with cache.active({}):
            model(torch.randn(4, 8))


def test_replay_hands_out_copies():
    model, run, _ = make_problem(n_batches=1)
    cache = PrefixCache.for_model(model, ["stem"], run, blocks=["stem"])
    x = torch.randn(3, 8)
    with cache.active({}), torch.no_grad():
        first = model.stem(x)
    with cache.active({}), torch.no_grad():
        again = model.stem(x)
        again.add_(1.0)  # a caller modifying the output in place
    with cache.active({}), torch.no_grad():
        assert torch.equal(model.stem(x), first)


def test_a_shortlist_search_replays_each_metric_from_its_own_records():
    # The quick metric pushes other batches (every other one): its records live in a cache of their own, split from
    # the budget, so replay gives what the same search without replay gives.
    def with_quick():
        model, run, metric = make_problem()
        gen = torch.Generator().manual_seed(1)
        batches = [torch.randn(64, 8, generator=gen) * (1 + 20 * (i == 0)) for i in range(6)][::2]
        with torch.no_grad():
            reference = [model(b) for b in batches]

        def quick():
            with torch.no_grad():
                return sum(float((model(b) - r).square().sum()) for b, r in zip(batches, reference, strict=True))
        return model, run, metric, quick

    config = SearchConfig(threshold=0.05, w_bits=4, a_bits=4, shortlist=2)
    model, run, metric, quick = with_quick()
    plain = stablequant_search(model, run, metric, config, progress=False, quick_metric=quick)
    model, run, metric, quick = with_quick()
    cached = stablequant_search(model, run, metric, config, progress=False, quick_metric=quick, replay_blocks="auto",
                                cache_budget_mb=1.0)
    assert plain.flagged and plain.quick_evaluations > 0 and cached.quick_evaluations == plain.quick_evaluations
    assert cached.to_plan().layers == plain.to_plan().layers and cached.final_metric == plain.final_metric
    assert [d.quick_candidates for d in cached.layers] == [d.quick_candidates for d in plain.layers]
    assert cached.cache["budget_mb"] == pytest.approx(0.75, abs=1e-6)  # the quick metric's cache has the rest
    assert cached.cache["quick_budget_mb"] == pytest.approx(0.25, abs=1e-6)
    assert cached.cache["quick_replayed_calls"] > 0 and cached.cache["quick_computed_calls"] > 0
    assert 0 < cached.cache["quick_peak_mb"] <= 0.25
    assert "quick_budget_mb" not in plain.cache and "quick_budget_mb" not in stablequant_search(
        *make_problem(), SearchConfig(threshold=0.05, w_bits=4, a_bits=4), progress=False, replay_blocks="auto",
        cache_budget_mb=1.0).cache


def test_a_split_cache_is_empty_and_the_two_budgets_add_up():
    model, run, _ = make_problem()
    cache = PrefixCache.for_model(model, ["stem", "head"], run, budget_mb=1.0)
    other = cache.split(0.25)
    assert other.blocks == cache.blocks and other.cached_bytes == 0
    assert other.budget_bytes + cache.budget_bytes == 2**20
    with pytest.raises(ValueError, match="share must be between 0 and 1"):
        cache.split(1.0)
