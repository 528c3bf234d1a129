"""StableQuant's layer-adaptive range search: screen -> clip -> MSE.

Following the paper's public description (Hong et al., ICASSP 2025; see shared/reference/papers.md):

1. **Screen.** Quantize one layer at a time (its weight and input activation, MAX ranges, target
   bits) and measure the task metric on the calibration set. Layers whose degradation over the
   float model exceeds `threshold` are flagged (paper: 0.25 % absolute WER).
2. **Clip.** With the whole model quantized, go through the flagged layers in network order; for
   each, try the cut-off percentiles of `percentiles` and keep the one with the best metric (ties
   keep the larger percentile, i.e. less clipping). Earlier choices stay fixed (greedy).
3. **MSE.** Every layer's range is the MSE-optimal one on its histogram clipped at its percentile
   (100 for layers not flagged): `percentile_then_mse_range`.

Not in the paper, on by default (`builtin_candidates`), so that the search never loses to a built-in on its own
metric: the whole model is first scored with every layer on one built-in rule (MSE, MAX, moving-average MAX,
L2 histogram) and the best of them is where unflagged layers stay and the clip step starts; each flagged layer's
candidates are the cut-offs plus those rules' ranges plus its current one, so every accepted step is at least
as good. `refine_passes` adds sweeps over the flagged layers once all are set; `float_fallback` makes float a
candidate too.

The search is framework-free: it drives a plain `nn.Module` through `sq_plugin.backends.simulate` and asks
two callables for the data: `run_calibration()` (pushes the calibration set through the model) and
`metric()` (evaluates the model as it currently is; lower is better; with a keyword `bound` it may stop once its
value is sure to exceed it, `sq_plugin.search.early_stop`). The result becomes a `QuantPlan`
(`SearchResult.to_plan()`: every layer's range on the grids that were scored), which every backend applies.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from sq_plugin import parallel
from sq_plugin.backends.simulate import LayerQuant, observe_inputs, quantizable_layers, simulate, strip_weight_norm
from sq_plugin.backends.x86_isa import resolve_int8_grid
from sq_plugin.core.defaults import (
    DEFAULT_BASELINE_PERCENTILE,
    DEFAULT_MSE_GRID,
    DEFAULT_PERCENTILES,
    DEFAULT_THRESHOLD,
    QUICK_EVERY,
)
from sq_plugin.core.plan import LayerPlan, QuantPlan, x86_grids
from sq_plugin.core.quant import check_bits, grid_bits
from sq_plugin.core.ranges import RangeRule, check_percentile, compute_range, l2_histogram_range
from sq_plugin.core.stats import DEFAULT_BINS, Histogram, MovingAverageMinMax
from sq_plugin.search.early_stop import takes_bound
from sq_plugin.search.prefix_cache import DEFAULT_BUDGET_MB, Evaluation, PrefixCache


@dataclass(frozen=True)
class SearchConfig:
    """Options of the search. Everything the paper leaves open is here with its default.

    threshold: flag a layer when metric(quantized layer alone) - metric(float) > threshold.
        In the metric's units: 0.0025 = 0.25 % absolute WER when the metric is WER as a fraction.
    percentiles: candidate cut-offs for flagged layers (100 = no clipping) — must include 100.
    float_fallback: not in the paper (off by default). A flagged layer is also tried in float, and
        stays float when that beats its best cut-off by more than `threshold`: the mixed-precision
        escape for a layer no clipping saves (wav2vec2's waveform conv at 8 bits; it is 1 input
        channel, so keeping it float costs almost nothing in speed or size).
    keep_float: layer names or fnmatch patterns (e.g. "*.conv_layers.0.conv") that stay float and
        are left out of the search: mixed precision chosen by the user, as INC's fp32 fallback is.
    int8_grid: the grids the search scores, which must be the ones that will execute: "auto" (resolved
        at construction to this CPU's x86 policy: "narrow_weights", 7-bit weights, on x86 without VNNI,
        else "full"), "full", "narrow_weights" or "narrow_activations". `grid_bits` gives their widths.
    builtin_candidates: not in the paper (on by default). The search starts from the best whole-model built-in
        rule (`BUILTIN_RULES`: MSE, MAX, one 99.99 cut-off, moving-average MAX, L2 histogram) on its metric, and
        those rules' ranges join every flagged layer's cut-offs as candidates; so it never ends worse, on the
        metric it scores, than a built-in rule applied to every layer. False: the paper's search alone (MSE base,
        cut-offs only).
    refine_passes: not in the paper (0 by default). Extra sweeps over the flagged layers once all are set, each
        layer re-choosing among its candidates with the others at their new choices (never worse: the current
        choice is a candidate).
    early_stop: not in the paper (on by default); changes no decision. A candidate's evaluation (a range, or float)
        stops once it cannot beat the best so far, when the metric takes `bound` (`sq_plugin.search.early_stop`):
        the same choices, in less time; a loser's recorded metric is then a lower bound (`LayerDecision.lower_bounds`).
        False scores every candidate in full (to plot whole candidate curves).
    shortlist: not in the paper (0 by default: off, every candidate is scored on the full metric). k > 0 scores each
        flagged unit's candidates first on a quick metric (the same metric on a spread subset of its utterances,
        `sq_plugin.families.quick_subset`, which the families' searches pass as `quick_metric`), then only the best k
        of them in full, beside the current choice. Approximate: a candidate that would have won in full may be left
        out (a 6-bit WER search's candidates lie within a few words of one another, which early stopping cannot
        prune, BENCHMARKS.md); never worse than the current choice on the full metric, which stays a candidate.
    """

    w_bits: int = 8
    a_bits: int = 8
    threshold: float = DEFAULT_THRESHOLD
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES
    mse_grid: int = DEFAULT_MSE_GRID
    bins: int = DEFAULT_BINS
    float_fallback: bool = False
    keep_float: tuple[str, ...] = ()
    int8_grid: str = "auto"
    builtin_candidates: bool = True
    refine_passes: int = 0
    early_stop: bool = True
    shortlist: int = 0

    def __post_init__(self) -> None:
        check_bits(self.w_bits, name="w_bits")
        check_bits(self.a_bits, name="a_bits")
        # Resolved once, so that the result records the grid that was scored.
        object.__setattr__(self, "int8_grid", resolve_int8_grid(self.int8_grid))
        if not (isinstance(self.threshold, int | float) and math.isfinite(self.threshold) and self.threshold >= 0):
            raise ValueError(f"threshold must be a finite number >= 0 (got {self.threshold!r}); the paper uses "
                             "0.0025 (0.25 % absolute WER)")
        if not self.percentiles or 100.0 not in self.percentiles:
            raise ValueError(f"percentiles must include 100 (no clipping) (got {self.percentiles!r})")
        for p in self.percentiles:
            check_percentile(p)
        if isinstance(self.refine_passes, bool) or not isinstance(self.refine_passes, int) or self.refine_passes < 0:
            raise ValueError(f"refine_passes must be an integer >= 0 (got {self.refine_passes!r}); 0 = the paper's "
                             "single greedy sweep, 1 = one more sweep over the flagged layers")
        if isinstance(self.shortlist, bool) or not isinstance(self.shortlist, int) or self.shortlist < 0:
            raise ValueError(f"shortlist must be an integer >= 0 (got {self.shortlist!r}); 0 = score every candidate "
                             "in full, 2 = only the best two on the quick metric")

    @property
    def grid_bits(self) -> tuple[int, int]:
        """(weight bits, activation bits) of the grids that will execute."""
        return grid_bits(self.w_bits, self.a_bits, self.int8_grid)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LayerDecision:
    """What the search decided for one layer."""

    name: str
    kind: str
    screen_metric: float
    screen_delta: float
    flagged: bool
    percentile: float
    act_range: tuple[float, float]
    max_range: tuple[float, float]
    candidates: dict[float, float] = field(default_factory=dict)  # percentile -> metric (flagged layers)
    keep_float: bool = False  # stays float: listed in keep_float, or chosen by float_fallback
    float_metric: float | None = None  # the whole-model metric with this layer float (float_fallback)
    # How the range was decided: "percentile" (cut-off `percentile`, then MSE) or a built-in rule of BUILTIN_RULES
    # ("max", "percentile_clip", "moving_average", "l2_histogram"; "mse" is percentile 100).
    choice: str = "percentile"
    rule_candidates: dict[str, float] = field(default_factory=dict)  # built-in rule -> metric (flagged layers)
    macs: int = 0  # multiply-accumulates over the calibration set (the share kept float is reported)
    shares_input_with: list[str] = field(default_factory=list)  # layers reading the same tensor: one decision
    # Candidates (a percentile as text, a rule name, or "float") that lost to the best so far with early_stop: their
    # recorded metric is a lower bound, as their evaluation may have stopped once it could not win.
    lower_bounds: list[str] = field(default_factory=list)
    # shortlist: each candidate's score on the quick metric (labelled as lower_bounds are); one above the k-th best so
    # far may be a lower bound. Only the best k were scored in full (`candidates`, `rule_candidates`).
    quick_candidates: dict[str, float] = field(default_factory=dict)


@dataclass
class SearchResult:
    config: SearchConfig
    fp_metric: float
    max_metric: float
    final_metric: float
    layers: list[LayerDecision]
    seconds: dict[str, float]
    evaluations: int
    stopped_early: int = 0  # evaluations whose metric stopped before the last utterance (early_stop)
    quick_evaluations: int = 0  # of the evaluations, those on the quick metric (shortlist)
    cache: dict[str, float] = field(default_factory=dict)  # prefix-cache counters (empty: no cache)
    # The statistics the search decided on (layer -> input histogram): a baseline rule can reuse them
    # (`sq_plugin.search.rules.rule_plan`) instead of pushing the calibration set through the model again.
    histograms: dict[str, Histogram] = field(default_factory=dict, repr=False, compare=False)
    # Whole-model metric of each built-in rule applied to every layer (builtin_candidates), and the one it started from.
    rule_metrics: dict[str, float] = field(default_factory=dict)
    base_rule: str = "mse"
    # The referee's scores (search vs each built-in rule everywhere) and what it chose ("search" or a rule).
    referee_metrics: dict[str, float] = field(default_factory=dict)
    referee_choice: str = "search"

    @property
    def flagged(self) -> list[str]:
        return [d.name for d in self.layers if d.flagged]

    @property
    def float_layers(self) -> list[str]:
        return [d.name for d in self.layers if d.keep_float]

    @property
    def float_mac_share(self) -> float:
        """The share of the quantizable layers' multiply-accumulates (on the calibration set) kept float."""
        total = sum(d.macs for d in self.layers)
        return sum(d.macs for d in self.layers if d.keep_float) / total if total else 0.0

    def per_layer_rules(self) -> dict[str, RangeRule | None]:
        """The activation rule of every layer, for `stablequant_x86_quantizer(per_layer=...)`; None for a
        layer that stays float (float_fallback). A layer that chose the moving-average or L2-histogram range
        has no `RangeRule` (those are not histogram rules): apply the decision as a plan (`to_plan()`)."""
        rules: dict[str, RangeRule | None] = {}
        for d in self.layers:
            if d.keep_float:
                rules[d.name] = None
            elif d.choice == "max":
                rules[d.name] = RangeRule("max")
            elif d.choice == "percentile_clip":
                rules[d.name] = RangeRule("percentile", percentile=DEFAULT_BASELINE_PERCENTILE)
            elif d.choice == "percentile":
                rules[d.name] = RangeRule("percentile_then_mse", percentile=d.percentile, mse_grid=self.config.mse_grid)
            else:
                raise ValueError(f"layer {d.name}: the search chose the {d.choice} range, which no RangeRule "
                                 "expresses; apply the search as a plan (result.to_plan(), e.g. "
                                 "quantize_ctc_pt2e(plan=...)), or search with builtin_candidates=False")
        return rules

    def to_plan(self, provenance: dict | None = None) -> QuantPlan:
        """The decision as a `QuantPlan`: every layer's input range on the grids the search scored
        (`config.grid_bits`), per-channel MAX weights, or float with the reason."""
        weight_grid, act_grid = x86_grids(*self.config.grid_bits)
        layers = {}
        for d in self.layers:
            op = d.kind.lower()
            if d.keep_float:
                why = "keep_float" if d.float_metric is None else "float_fallback: float beat every cut-off"
                layers[d.name] = LayerPlan(op=op, why_float=why)
                continue
            decision = ({"method": "percentile_then_mse", "percentile": d.percentile} if d.choice == "percentile"
                        else {"method": d.choice})
            layers[d.name] = LayerPlan(op=op, activation=act_grid, act_range=d.act_range, weight=weight_grid,
                                       decision={**decision, "flagged": d.flagged})
        return QuantPlan(layers, {**(provenance or {}), "method": "stablequant", "w_bits": self.config.w_bits,
                                  "a_bits": self.config.a_bits, "int8_grid": self.config.int8_grid,
                                  "fp_metric": self.fp_metric, "final_metric": self.final_metric,
                                  "base_rule": self.base_rule, "float_mac_share": self.float_mac_share,
                                  "referee_choice": self.referee_choice})

    def to_dict(self) -> dict:
        return {
            "config": self.config.to_dict(), "fp_metric": self.fp_metric, "max_metric": self.max_metric,
            "final_metric": self.final_metric, "flagged": self.flagged, "float_layers": self.float_layers,
            "float_mac_share": self.float_mac_share, "base_rule": self.base_rule, "rule_metrics": self.rule_metrics,
            "referee_metrics": self.referee_metrics, "referee_choice": self.referee_choice,
            "seconds": self.seconds,
            "evaluations": self.evaluations, "stopped_early": self.stopped_early,
            "quick_evaluations": self.quick_evaluations, "cache": self.cache,
            "layers": [{**asdict(d), "candidates": {str(k): v for k, v in d.candidates.items()}} for d in self.layers],
        }


def collect_input_histograms(model: torch.nn.Module, run_calibration: Callable[[], None], layers: Sequence[str],
                             *, bins: int = DEFAULT_BINS, sharded: bool = False) -> dict[str, Histogram]:
    """One pass over the calibration data, in float: a histogram of every layer's input activation.
    sharded: `run_calibration` pushed only this rank's share; the histograms are merged across ranks (exact)."""
    hists = {name: Histogram.empty(bins=bins) for name in layers}
    observe_inputs(model, run_calibration, layers, lambda name, x: hists[name].update(x, name=f"{name} (input)"))
    return merge_across_ranks(hists) if sharded else hists


def merge_across_ranks(hists: dict[str, Histogram]) -> dict[str, Histogram]:
    """Every rank's histograms merged (exact, so the same as one process that saw all the data)."""
    parts = parallel.gather(hists)
    merged = {}
    for name, hist in parts[0].items():
        for part in parts[1:]:
            hist = hist.merge(part[name])
        merged[name] = hist
    return merged


# The built-in baselines' rules the search also tries (builtin_candidates), in tie-break order: "mse" is the
# paper's base (percentile 100, then MSE), "max" MinMax, "percentile_clip" the percentile baseline (clip |x| at
# DEFAULT_BASELINE_PERCENTILE, no MSE), "moving_average" the moving-average MinMax observer, "l2_histogram" the
# histogram observer's L2 criterion.
BUILTIN_RULES: tuple[str, ...] = ("mse", "max", "percentile_clip", "moving_average", "l2_histogram")


def _row(bounds: tuple[np.ndarray, np.ndarray]) -> tuple[float, float]:
    return float(bounds[0][0]), float(bounds[1][0])


def layer_macs(module: torch.nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of one call of a Linear or Conv1d layer on input `x`."""
    if isinstance(module, torch.nn.Conv1d):
        (k,), (s,), (d,) = module.kernel_size, module.stride, module.dilation
        pad = module.padding[0] if isinstance(module.padding, tuple) else 0  # "same"/"valid": close enough
        frames = (x.shape[-1] + 2 * pad - d * (k - 1) - 1) // s + 1
        batch = x.shape[0] if x.dim() == 3 else 1
        return int(batch * max(frames, 0) * module.out_channels * (module.in_channels // module.groups) * k)
    return int(x.numel() // module.in_features * module.in_features * module.out_features)


def shared_input_units(names: Sequence[str], inputs_seen: dict[str, list[tuple[int, tuple[int, ...]]]],
                       hists: dict[str, Histogram]) -> dict[str, tuple[str, ...]]:
    """Group layers that read the same tensor: first unit member -> its members, in network order. Same tensor
    means the same storage and shape in each of the first calls, and bit-identical statistics (a freed buffer
    reused by another tensor cannot pass both)."""
    units: dict[str, tuple[str, ...]] = {}
    # storage key -> every leader seen with it: the allocator reuses addresses, so an unrelated earlier layer may hold
    # the same key with other data (keeping only the first leader split q/k/v then, differently in each process)
    by_input: dict[tuple, list[str]] = {}
    for name in names:
        key = tuple(inputs_seen.get(name, ()))
        leaders = by_input.get(key, []) if key else []
        leader = next((lead for lead in leaders if hists[lead].equals(hists[name])), None)
        if leader is not None:
            units[leader] += (name,)
        else:
            units[name] = (name,)
            if key:
                by_input.setdefault(key, []).append(name)
    return units


def _checked(value: float, what: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise RuntimeError(f"the metric returned {value} for {what}; the search needs a finite metric (is the "
                           "calibration set empty, or does the model output NaN?)")
    return value


def _matching(names: Sequence[str], patterns: Sequence[str]) -> set[str]:
    """The layers that `patterns` (names or fnmatch patterns) select; each pattern must select one."""
    matched: set[str] = set()
    for pattern in patterns:
        hits = {n for n in names if fnmatch.fnmatchcase(n, pattern)}
        if not hits:
            raise ValueError(f"keep_float: {pattern!r} matches no quantizable layer; layers are named like "
                             f"{names[0]!r} (module names from model.named_modules(), or a glob such as "
                             "'*.conv_layers.0.conv')")
        matched |= hits
    return matched


def stablequant_search(model: torch.nn.Module, run_calibration: Callable[[], None], metric: Callable[..., float],
                       config: SearchConfig | None = None, *, layers: Sequence[str] | None = None,
                       progress: bool = True, replay_blocks: Sequence[str] | str | None = None,
                       cache_budget_mb: float = DEFAULT_BUDGET_MB, sharded: bool = False,
                       referee: Callable[[], float] | None = None, referee_name: str = "referee",
                       quick_metric: Callable[..., float] | None = None) -> SearchResult:
    """Run screen -> clip -> MSE on `model` (modified only inside the calls; restored after).

    layers: module names to quantize (default: every Linear and Conv1d). Weight-norm
    parametrizations are folded into plain weights first (same outputs).
    replay_blocks: "auto" (every module in an nn.ModuleList) or block names: evaluations replay the
    recorded outputs of blocks whose preceding layers are unchanged (`PrefixCache`; exact). Only for
    metrics that push the same batches every time through pure blocks (no KV cache). None: off.
    cache_budget_mb: memory for those recorded outputs; past it, blocks are recomputed.
    sharded: under `torch.distributed` (`sq_plugin.parallel`), `run_calibration` pushes only this rank's share
    of the calibration batches, dealt round-robin (as `transcribe` does), and `metric` returns the value over all
    utterances (gathered): the statistics are then combined across ranks exactly, so every rank decides what one
    process would (`search_ctc` sets it).
    referee: not in the paper. A second, truer metric (lower is better) for a proxy-driven search: Whisper's
    teacher-forced loss ranks ranges one layer at a time, but free-running decoding is what the user gets. Once the
    search is done, the referee scores its result and every built-in rule applied to every layer (with
    builtin_candidates), and the best of them is the decision (`SearchResult.referee_metrics`, `referee_choice`).
    quick_metric: the metric on every `QUICK_EVERY`-th of its utterances, for `config.shortlist` (required then). With
    a prefix cache it gets its own, with that share of the budget (its records belong to its batches).
    """
    config = config or SearchConfig()
    if config.shortlist and quick_metric is None:
        raise ValueError(f"shortlist={config.shortlist} scores candidates on a quick metric first: pass quick_metric "
                         "(the metric on a subset of the utterances; search_ctc / search_whisper build it), or set "
                         "shortlist=0")
    strip_weight_norm(model)
    modules = quantizable_layers(model)
    names = list(layers) if layers is not None else list(modules)
    if not names:
        raise ValueError("the model has no Linear or Conv1d layer to quantize")
    kept = _matching(names, config.keep_float)
    seconds: dict[str, float] = {}
    evaluations = 0
    stopped_early = 0
    quick_evaluations = 0
    bounded = config.early_stop and takes_bound(metric)
    quick_bounded = quick_metric is not None and config.early_stop and takes_bound(quick_metric)

    cache: PrefixCache | None = None
    quick_cache: PrefixCache | None = None

    def evaluate(plan: dict[str, LayerQuant], what: str, *, bound: float | None = None, quick: bool = False) -> float:
        """The metric (quick: the quick metric) with `plan`; with a `bound` it may stop once the value is sure to
        exceed it (early_stop) and return a lower bound above it."""
        nonlocal evaluations, stopped_early, quick_evaluations
        evaluations += 1
        quick_evaluations += quick
        score, scores_cache = (quick_metric, quick_cache) if quick else (metric, cache)
        bound = bound if (quick_bounded if quick else bounded) else None
        replay = scores_cache.active(plan) if scores_cache is not None else contextlib.nullcontext(Evaluation())
        with simulate(model, plan), torch.inference_mode(), replay as run:
            value = _checked(score() if bound is None else score(bound=bound), what)
            # Above the bound it may have stopped early: what the cache recorded may be partial (it drops it).
            run.stopped = bound is not None and value > bound
        stopped_early += run.stopped
        return value

    start = time.perf_counter()
    hists: dict[str, Histogram] = {}
    averages: dict[str, MovingAverageMinMax] = {}
    macs: dict[str, int] = {}
    inputs_seen: dict[str, list[tuple[int, tuple[int, ...]]]] = {}  # the first calls' input tensors (shared inputs)

    def on_input(name: str, x: torch.Tensor) -> None:
        hists[name].update(x, name=f"{name} (input)")
        averages[name].update(x, name=f"{name} (input)")
        macs[name] += layer_macs(modules[name], x)
        if len(inputs_seen[name]) < 4:
            inputs_seen[name].append((x.data_ptr(), tuple(x.shape)))

    def statistics() -> None:
        hists.update({n: Histogram.empty(bins=config.bins) for n in names})
        averages.update({n: MovingAverageMinMax() for n in names})
        macs.update(dict.fromkeys(names, 0))
        inputs_seen.update({n: [] for n in names})
        observe_inputs(model, run_calibration, names, on_input)
        if sharded:  # each rank saw its share (transcribe deals batches round-robin): combine exactly
            parts = parallel.gather({"averages": dict(averages), "macs": dict(macs)})
            hists.update(merge_across_ranks(hists))
            for n in names:
                averages[n] = MovingAverageMinMax.interleave([part["averages"][n] for part in parts])
                macs[n] = sum(part["macs"][n] for part in parts)

    if replay_blocks is None:
        statistics()
    else:  # the statistics pass also traces the order of blocks and layers
        blocks = None if replay_blocks == "auto" else list(replay_blocks)
        cache = PrefixCache.for_model(model, names, statistics, blocks=blocks, budget_mb=cache_budget_mb)
        if config.shortlist:
            quick_cache = cache.split(1 / QUICK_EVERY)  # the quick metric's share of the batches
    seconds["statistics"] = time.perf_counter() - start

    w_grid_bits, a_grid_bits = config.grid_bits
    # Layers that read the same tensor (q/k/v projections) are one decision: a quantized graph quantizes a tensor
    # once for all its consumers, so one range is what will execute. A unit is named by its first layer.
    units = shared_input_units([n for n in names if n not in kept], inputs_seen, hists)
    units.update({n: (n,) for n in kept})
    leaders = [n for n in names if n in units]

    def percentile_range(name: str, p: float) -> tuple[float, float]:
        return _row(compute_range(hists[name], RangeRule("percentile_then_mse", p, config.mse_grid),
                                  bits=a_grid_bits, symmetric=False, signed=False, name=f"{name} (input)"))

    def rule_range(name: str, rule: str) -> tuple[float, float]:
        """The range a built-in rule gives this layer (BUILTIN_RULES)."""
        label = f"{name} (input)"
        if rule == "mse":
            return percentile_range(name, 100.0)
        if rule == "max":
            return _row(compute_range(hists[name], RangeRule("max"), bits=a_grid_bits, symmetric=False, signed=False,
                                      name=label))
        if rule == "percentile_clip":
            return _row(compute_range(hists[name], RangeRule("percentile", DEFAULT_BASELINE_PERCENTILE),
                                      bits=a_grid_bits, symmetric=False, signed=False, name=label))
        if rule == "moving_average":
            return averages[name].range(name=label)
        return _row(l2_histogram_range(hists[name], bits=a_grid_bits, symmetric=False, signed=False, name=label))

    def quant(rng: tuple[float, float]) -> LayerQuant:
        return LayerQuant(act_range=rng, a_bits=a_grid_bits, w_bits=w_grid_bits)

    max_ranges = {n: rule_range(n, "max") for n in names}

    # 1. Screen: one layer (one shared input) at a time, MAX ranges.
    start = time.perf_counter()
    fp_metric = evaluate({}, "the float model")
    screen: dict[str, float] = {}
    for leader in tqdm(leaders, desc="screen", disable=not progress):
        what = f"layer {leader}" + (f" and the {len(units[leader]) - 1} sharing its input" if len(units[leader]) > 1
                                    else "") + " alone (MAX)"
        value = fp_metric if leader in kept else evaluate({m: quant(max_ranges[m]) for m in units[leader]}, what)
        screen.update(dict.fromkeys(units[leader], value))
    flagged = [n for n in leaders if screen[n] - fp_metric > config.threshold]  # flagged units, by their leader
    seconds["screen"] = time.perf_counter() - start

    # 2. Clip: greedy over flagged layers in network order, whole model quantized.
    start = time.perf_counter()
    float_layers: set[str] = set(kept)
    quantized = [n for n in names if n not in kept]

    def whole_model() -> dict[str, LayerQuant]:
        return {n: quant(ranges[n]) for n in names if n not in float_layers}

    max_metric = evaluate({n: quant(max_ranges[n]) for n in quantized}, "the whole model (MAX)")
    # The base: every layer on one rule. The paper's is MSE on the unclipped histogram; with builtin_candidates the
    # best built-in rule on the metric (ties: the earlier in BUILTIN_RULES, so MSE first).
    base_ranges = {rule: {n: rule_range(n, rule) for n in names}
                   for rule in (BUILTIN_RULES if config.builtin_candidates else ("mse",))}
    rule_metrics: dict[str, float] = {}
    for rule, rule_ranges in base_ranges.items():
        rule_metrics[rule] = max_metric if rule == "max" else evaluate(
            {n: quant(rule_ranges[n]) for n in quantized}, f"the whole model ({rule})")
    base_rule = min(rule_metrics, key=lambda r: (rule_metrics[r], BUILTIN_RULES.index(r)))
    ranges = dict(base_ranges[base_rule])
    base_choice = ("percentile", 100.0) if base_rule == "mse" else (base_rule, 100.0)
    chosen = {n: base_choice for n in names}
    current_metric = rule_metrics[base_rule]

    candidate_ps = sorted(set(config.percentiles), reverse=True)
    percentile_candidates: dict[str, dict[float, float]] = {n: {} for n in flagged}
    rule_candidates: dict[str, dict[str, float]] = {n: {} for n in flagged}
    float_metrics: dict[str, float] = {}
    lower_bounds: dict[str, set[str]] = {n: set() for n in flagged}
    quick_candidates: dict[str, dict[str, float]] = {n: {} for n in flagged}

    def label(option: tuple[str, float]) -> str:
        return str(option[1]) if option[0] == "percentile" else option[0]

    def shortlisted(name: str, sweep: str, options: list[tuple[tuple[str, float], tuple[float, float]]]
                    ) -> set[tuple[float, float]]:
        """The ranges of the best `config.shortlist` options on the quick metric (ties: the earlier option), the
        current one (`options[0]`) left out: it is always a candidate. Scoring stops early once an option cannot
        enter them."""
        quick: dict[tuple[float, float], float] = {ranges[name]: math.inf}  # the current range is not ranked
        ranked: list[tuple[float, int, tuple[float, float]]] = []
        quick_candidates[name] = {}
        for order, (option, rng) in enumerate(options):
            if rng not in quick:
                set_unit(name, option, rng)
                kth = sorted(ranked)[config.shortlist - 1][0] if len(ranked) >= config.shortlist else None
                what = f"layer {name} at {label(option)} on the quick metric ({sweep})"
                quick[rng] = evaluate(whole_model(), what, bound=kth, quick=True)
                ranked.append((quick[rng], order, rng))
            if math.isfinite(quick[rng]):
                quick_candidates[name][label(option)] = quick[rng]
        set_unit(name, *options[0])  # back to the current choice
        return {rng for _, _, rng in sorted(ranked)[: config.shortlist]}

    def set_unit(name: str, choice: tuple[str, float], rng: tuple[float, float]) -> None:
        for member in units[name]:
            chosen[member], ranges[member] = choice, rng

    def choose(name: str, sweep: str) -> None:
        """Re-choose the range of `name`'s unit with every other layer as it is now; the current one is a
        candidate. Its members share one input, so one histogram gives the candidates for all."""
        nonlocal current_metric
        options: list[tuple[tuple[str, float], tuple[float, float]]] = [(chosen[name], ranges[name])]
        options += [(("percentile", p), percentile_range(name, p)) for p in candidate_ps]
        if config.builtin_candidates:
            options += [((rule, 100.0), rule_range(name, rule)) for rule in BUILTIN_RULES if rule != "mse"]
        scored: dict[tuple[float, float], float] = {ranges[name]: current_metric}  # one evaluation per range
        if config.shortlist:  # only the best few on the quick metric are scored in full
            kept_ranges = shortlisted(name, sweep, options) | {ranges[name]}
            options = [(option, rng) for option, rng in options if rng in kept_ranges]
        results: list[tuple[float, int, tuple[str, float], tuple[float, float]]] = []
        best_so_far = current_metric  # a later candidate must be below it to win (ties keep the earlier one)
        lower_bounds[name] = set()  # this sweep's scores replace the last one's
        bounded_ranges: set[tuple[float, float]] = set()  # scored only to a lower bound (early_stop)
        for order, (option, rng) in enumerate(options):
            if rng not in scored:
                set_unit(name, option, rng)
                what = f"percentile {option[1]}" if option[0] == "percentile" else f"the {option[0]} range"
                scored[rng] = evaluate(whole_model(), f"layer {name} at {what} ({sweep})", bound=best_so_far)
                if bounded and scored[rng] > best_so_far:
                    bounded_ranges.add(rng)
            if rng in bounded_ranges:
                lower_bounds[name].add(label(option))
            best_so_far = min(best_so_far, scored[rng])
            results.append((scored[rng], order, option, rng))
            if option[0] == "percentile":
                percentile_candidates[name][option[1]] = scored[rng]
            elif order > 0:
                rule_candidates[name][option[0]] = scored[rng]
        # Ties keep the current choice (order 0), then the larger percentile, then the earlier built-in rule.
        current_metric, _, best, best_range = min(results, key=lambda t: (t[0], t[1]))
        set_unit(name, best, best_range)
        if config.float_fallback:
            float_layers.update(units[name])
            wins_below = current_metric - config.threshold  # float must beat the best range by the threshold
            float_metrics[name] = evaluate(whole_model(), f"layer {name} in float ({sweep})", bound=wins_below)
            if float_metrics[name] < wins_below:
                current_metric = float_metrics[name]
            else:
                float_layers.difference_update(units[name])
                if bounded and float_metrics[name] > wins_below:
                    lower_bounds[name].add("float")

    for name in tqdm(flagged, desc="clip", disable=not progress or not flagged):  # no empty "clip: 0it" bar
        choose(name, "clip")
    for sweep in range(config.refine_passes):
        for name in tqdm(flagged, desc=f"refine {sweep + 1}", disable=not progress or not flagged):
            if name not in float_layers:
                choose(name, f"refine {sweep + 1}")
    # Every accepted step set current_metric to the whole model's metric as it now is: no final evaluation needed.
    final_metric = current_metric
    seconds["clip"] = time.perf_counter() - start

    # 3. Referee (optional): the searched model against each whole-model built-in rule, on the truer metric.
    referee_metrics: dict[str, float] = {}
    referee_choice = "search"
    if referee is not None:
        start = time.perf_counter()
        contenders = {"search": whole_model(), **{rule: {n: quant(base_ranges[rule][n]) for n in quantized}
                                                  for rule in base_ranges}}
        for label, plan in tqdm(contenders.items(), desc=f"referee ({referee_name})", disable=not progress):
            with simulate(model, plan), torch.inference_mode():  # no replay: a referee may decode (KV cache)
                referee_metrics[label] = _checked(referee(), f"{referee_name} of {label}")
            evaluations += 1
        referee_choice = min(referee_metrics, key=lambda k: (referee_metrics[k], k != "search"))  # ties: the search
        if referee_choice != "search":  # a built-in rule everywhere won: that is the decision
            rule = referee_choice
            ranges.update(base_ranges[rule])
            chosen.update(dict.fromkeys(names, ("percentile", 100.0) if rule == "mse" else (rule, 100.0)))
            float_layers.intersection_update(kept)
            final_metric = rule_metrics[rule]
        seconds["referee"] = time.perf_counter() - start

    leader_of = {member: leader for leader, unit in units.items() for member in unit}
    decisions = [
        LayerDecision(name=n, kind=type(modules[n]).__name__, screen_metric=screen[n],
                      screen_delta=screen[n] - fp_metric, flagged=leader_of[n] in flagged, percentile=chosen[n][1],
                      act_range=ranges[n], max_range=max_ranges[n],
                      candidates=percentile_candidates.get(leader_of[n], {}), keep_float=n in float_layers,
                      float_metric=float_metrics.get(leader_of[n]), choice=chosen[n][0],
                      rule_candidates=rule_candidates.get(leader_of[n], {}), macs=macs[n],
                      shares_input_with=[m for m in units[leader_of[n]] if m != n],
                      lower_bounds=sorted(lower_bounds.get(leader_of[n], ())),
                      quick_candidates=quick_candidates.get(leader_of[n], {}))
        for n in names
    ]
    seconds["total"] = float(np.sum(list(seconds.values())))
    cache_stats = {} if cache is None else {
        "blocks": len(cache.blocks), "budget_mb": cache.budget_bytes / 2**20, "peak_mb": cache.peak_bytes / 2**20,
        "replayed_calls": cache.replayed_calls, "computed_calls": cache.computed_calls}
    if quick_cache is not None:  # the shortlist's own cache: its share of the budget, and what it saved
        cache_stats |= {"quick_budget_mb": quick_cache.budget_bytes / 2**20,
                        "quick_peak_mb": quick_cache.peak_bytes / 2**20,
                        "quick_replayed_calls": quick_cache.replayed_calls,
                        "quick_computed_calls": quick_cache.computed_calls}
    return SearchResult(config=config, fp_metric=fp_metric, max_metric=max_metric, final_metric=final_metric,
                        layers=decisions, seconds=seconds, evaluations=evaluations, stopped_early=stopped_early,
                        quick_evaluations=quick_evaluations,
                        cache=cache_stats,
                        histograms=hists, rule_metrics=rule_metrics, base_rule=base_rule,
                        referee_metrics=referee_metrics, referee_choice=referee_choice)
