"""The layer-adaptive search on a small network with one layer whose input has a harmless outlier."""

import pytest
import torch

from sq_plugin.backends.simulate import LayerQuant, simulate
from sq_plugin.core import RangeRule
from sq_plugin.search import SearchConfig, stablequant_search


class ThreeLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 32)
        self.fc3 = torch.nn.Linear(32, 8)
        with torch.no_grad():
            self.fc2.weight[:, 0] = 0.0  # channel 0 of fc2's input does not matter to the output ...

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        h = h.clone()
        h[:, 0] = h[:, 0] + 500.0 * (torch.arange(h.shape[0]) % 97 == 0)  # ... but it carries rare outliers
        return self.fc3(torch.relu(self.fc2(h)))


def make_problem():
    model = ThreeLayers().eval()
    data = torch.randn(2000, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(data)

    def run_calibration():
        model(data)

    @torch.no_grad()
    def metric():  # relative output error in percent: lower is better, like WER
        return float((model(data) - reference).norm() / reference.norm() * 100)

    return model, run_calibration, metric


def test_search_flags_exactly_the_outlier_layer_and_clips_it():
    # The paper's search alone (builtin_candidates=False): MSE base, cut-offs only.
    model, run_calibration, metric = make_problem()
    result = stablequant_search(model, run_calibration, metric, SearchConfig(threshold=1.0, builtin_candidates=False),
                                progress=False)
    assert result.base_rule == "mse" and set(result.rule_metrics) == {"mse"}
    assert result.flagged == ["fc2"]
    fc2 = next(d for d in result.layers if d.name == "fc2")
    assert fc2.percentile < 100.0
    assert fc2.act_range[1] < 0.05 * fc2.max_range[1]  # the clipped range ignores the 500s
    assert {d.name: d.percentile for d in result.layers if not d.flagged} == {"fc1": 100.0, "fc3": 100.0}
    # the chosen percentile is the best candidate, and the search beats MAX ranges by far
    assert fc2.candidates[fc2.percentile] == min(fc2.candidates.values())
    assert result.final_metric < result.max_metric / 5
    # fp, screen (3), whole model MAX, MSE base, then fc2's cut-offs but 100 (the base's range): no final evaluation
    assert result.evaluations == 1 + 3 + 1 + 1 + len(SearchConfig().percentiles) - 1
    rules = result.per_layer_rules()
    assert rules["fc2"] == RangeRule("percentile_then_mse", percentile=fc2.percentile)


def test_search_restores_the_model():
    model, run_calibration, metric = make_problem()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stablequant_search(model, run_calibration, metric, SearchConfig(threshold=1.0), progress=False)
    assert metric() == 0.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_search_is_deterministic():
    a = stablequant_search(*make_problem(), SearchConfig(threshold=1.0), progress=False)
    b = stablequant_search(*make_problem(), SearchConfig(threshold=1.0), progress=False)
    assert [d.act_range for d in a.layers] == [d.act_range for d in b.layers]


def test_nan_metric_is_a_clear_error():
    model, run_calibration, _ = make_problem()
    with pytest.raises(RuntimeError, match="metric returned nan for the float model"):
        stablequant_search(model, run_calibration, lambda: float("nan"), progress=False)


def test_empty_calibration_is_a_clear_error():
    model, _, metric = make_problem()
    with pytest.raises(RuntimeError, match=r"fc1 \(input\): no calibration data"):
        stablequant_search(model, lambda: None, metric, progress=False)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"percentiles": (99.9, 99.0)}, "must include 100"),
    ({"percentiles": (100.0, 101.0)}, "percentile must be in"),
    ({"threshold": -1}, "threshold must be"),
    ({"a_bits": 12}, "a_bits must be an integer from 2 to 8"),
    ({"shortlist": -1}, "shortlist must be an integer >= 0"),
    ({"shortlist": True}, "shortlist must be an integer >= 0"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SearchConfig(**kwargs)


def test_simulate_rejects_unknown_layers():
    model, _, _ = make_problem()
    with pytest.raises(KeyError, match="not quantizable layers"):
        with simulate(model, {"fc9": LayerQuant(act_range=(0.0, 1.0))}):
            pass


class OutlierThatMatters(ThreeLayers):
    """fc2's rare 500s now reach the output: no cut-off of fc2's input can be right, MAX ranges are coarse."""

    def __init__(self):
        super().__init__()
        with torch.no_grad():
            self.fc2.weight[:, 0] = 0.02


def test_float_fallback_keeps_a_layer_float_only_where_no_cut_off_saves_it():
    # harmless outlier: the cut-off fixes fc2, so the fallback changes nothing but one evaluation
    model, run_calibration, metric = make_problem()
    plain = stablequant_search(model, run_calibration, metric, SearchConfig(threshold=1.0), progress=False)
    fallback = stablequant_search(model, run_calibration, metric, SearchConfig(threshold=1.0, float_fallback=True),
                                  progress=False)
    assert fallback.float_layers == [] and fallback.evaluations == plain.evaluations + 1
    assert fallback.final_metric == plain.final_metric

    # an outlier that matters: clipping hurts, MAX is coarse -> fc2 stays float, and that is better
    model = OutlierThatMatters().eval()
    data = torch.randn(2000, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(data)

    @torch.no_grad()
    def relative_error():
        return float((model(data) - reference).norm() / reference.norm() * 100)

    # The case is built for the full 8-bit grids (with a 7-bit side fc3 may need float too)
    config = SearchConfig(threshold=2.0, float_fallback=True, int8_grid="full")
    result = stablequant_search(model, lambda: model(data), relative_error, config, progress=False)
    fc2 = next(d for d in result.layers if d.name == "fc2")
    assert result.flagged == ["fc2"] and result.float_layers == ["fc2"] and fc2.keep_float
    assert result.final_metric < result.max_metric / 10
    assert fc2.float_metric < min(fc2.candidates.values()) - config.threshold
    assert result.to_plan().layers["fc2"].why_float.startswith("float_fallback")
    assert result.final_metric == pytest.approx(fc2.float_metric)
    assert result.to_dict()["float_layers"] == ["fc2"]


def test_keep_float_layers_stay_float_and_out_of_the_search():
    model, run_calibration, metric = make_problem()
    config = SearchConfig(threshold=1.0, keep_float=("fc[2]",), builtin_candidates=False)
    result = stablequant_search(model, run_calibration, metric, config, progress=False)
    assert result.float_layers == ["fc2"] and result.flagged == []  # fc2, the outlier layer, was never screened
    assert result.evaluations == 1 + 2 + 1 + 1  # fp, screen fc1 and fc3, whole model MAX, MSE
    assert result.per_layer_rules() == {"fc1": RangeRule("percentile_then_mse", 100.0), "fc2": None,
                                        "fc3": RangeRule("percentile_then_mse", 100.0)}
    with pytest.raises(ValueError, match="keep_float: 'encoder.*' matches no quantizable layer; layers are named"):
        stablequant_search(model, run_calibration, metric, SearchConfig(keep_float=("encoder.*",)), progress=False)


def test_the_decision_becomes_a_plan_on_the_grids_that_were_scored():
    model, run_calibration, metric = make_problem()
    config = SearchConfig(threshold=1.0, int8_grid="narrow_weights", keep_float=("fc3",))
    result = stablequant_search(model, run_calibration, metric, config, progress=False)
    plan = result.to_plan({"model": "three-layers"})
    plan.check_layers(["fc1", "fc2", "fc3"])
    fc2 = next(d for d in result.layers if d.name == "fc2")
    assert plan.layers["fc2"].act_range == fc2.act_range
    assert plan.layers["fc2"].decision == {"method": "percentile_then_mse", "percentile": fc2.percentile,
                                           "flagged": True}
    assert (plan.layers["fc1"].weight.qmin, plan.layers["fc1"].activation.qmax) == (-64, 255)  # 7-bit weights
    assert plan.float_layers == ["fc3"] and plan.layers["fc3"].why_float == "keep_float"
    assert plan.provenance["int8_grid"] == "narrow_weights" and plan.provenance["model"] == "three-layers"


def test_progress_shows_no_empty_clip_bar_when_nothing_is_flagged(capsys):
    model, run_calibration, metric = make_problem()
    result = stablequant_search(model, run_calibration, metric, SearchConfig(threshold=1e9), progress=True)
    err = capsys.readouterr().err
    assert result.flagged == [] and "screen" in err and "clip" not in err


def test_builtin_candidates_never_lose_to_a_builtin_rule_on_the_metric():
    model, run_calibration, metric = make_problem()
    paper = stablequant_search(model, run_calibration, metric, SearchConfig(threshold=1.0, builtin_candidates=False),
                               progress=False)
    result = stablequant_search(model, run_calibration, metric, SearchConfig(threshold=1.0), progress=False)
    assert set(result.rule_metrics) == {"mse", "max", "percentile_clip", "moving_average", "l2_histogram"}
    assert result.rule_metrics["max"] == result.max_metric
    # The base is the best whole-model built-in rule, and the search ends at or below it and below the paper's.
    assert result.rule_metrics[result.base_rule] == min(result.rule_metrics.values())
    assert result.final_metric <= min(result.rule_metrics.values())
    assert result.final_metric <= paper.final_metric
    fc2 = next(d for d in result.layers if d.name == "fc2")
    assert set(fc2.rule_candidates) == {"max", "percentile_clip", "moving_average", "l2_histogram"}
    best = min([*fc2.candidates.values(), *fc2.rule_candidates.values()])
    assert result.final_metric == pytest.approx(best)
    # Unflagged layers sit on the base rule: its range, exactly.
    fc1 = next(d for d in result.layers if d.name == "fc1")
    assert fc1.choice == ("percentile" if result.base_rule == "mse" else result.base_rule)
    # One evaluation per distinct range: float, screen (3), MAX, 4 more base rules, fc2's candidates.
    distinct = len({*fc2.candidates.values(), *fc2.rule_candidates.values()})
    assert 1 + 3 + 1 + 4 + distinct - 1 <= result.evaluations <= 1 + 3 + 1 + 4 + 6 + 3


def test_a_range_no_rule_expresses_is_refused_by_per_layer_rules_and_kept_by_the_plan():
    model, run_calibration, metric = make_problem()
    result = stablequant_search(model, run_calibration, metric, SearchConfig(threshold=1.0), progress=False)
    fc1 = next(d for d in result.layers if d.name == "fc1")
    fc1.choice = "moving_average"
    with pytest.raises(ValueError, match="layer fc1: the search chose the moving_average range.*to_plan"):
        result.per_layer_rules()
    plan = result.to_plan()
    assert plan.layers["fc1"].decision == {"method": "moving_average", "flagged": False}
    assert plan.layers["fc1"].act_range == pytest.approx(fc1.act_range)
    assert plan.provenance["base_rule"] == result.base_rule


def test_refine_pass_never_ends_worse_and_re_scores_each_flagged_layer():
    model, run_calibration, metric = make_problem()
    once = stablequant_search(model, run_calibration, metric, SearchConfig(threshold=1.0), progress=False)
    twice = stablequant_search(model, run_calibration, metric, SearchConfig(threshold=1.0, refine_passes=1),
                               progress=False)
    assert twice.final_metric <= once.final_metric
    # With one flagged layer, the second sweep sees the same model: every range is scored already, or once more.
    assert once.evaluations <= twice.evaluations <= once.evaluations + 9
    with pytest.raises(ValueError, match="refine_passes must be an integer >= 0"):
        SearchConfig(refine_passes=-1)


def test_layer_macs_and_the_share_kept_float():
    from sq_plugin.search.stablequant import layer_macs

    assert layer_macs(torch.nn.Linear(16, 32), torch.zeros(5, 7, 16)) == 5 * 7 * 16 * 32
    conv = torch.nn.Conv1d(4, 8, kernel_size=3, stride=2, groups=2)
    assert layer_macs(conv, torch.zeros(2, 4, 11)) == 2 * 5 * 8 * 2 * 3  # 5 output frames, 2 inputs per group
    model, run_calibration, metric = make_problem()
    result = stablequant_search(model, run_calibration, metric, SearchConfig(threshold=1.0, keep_float=("fc1",)),
                                progress=False)
    macs = {d.name: d.macs for d in result.layers}
    assert macs == {"fc1": 2000 * 16 * 32, "fc2": 2000 * 32 * 32, "fc3": 2000 * 32 * 8}
    assert result.float_mac_share == pytest.approx(macs["fc1"] / sum(macs.values()))
    assert result.to_dict()["float_mac_share"] == result.float_mac_share


class SharedInput(torch.nn.Module):
    """q/k/v read one tensor (as attention does); `out` reads another."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
        self.out = torch.nn.Linear(16, 4)

    def forward(self, x):
        h = x.clone()
        h[:, 0] = h[:, 0] + 40.0 * (torch.arange(h.shape[0]) % 97 == 0)  # rare outliers in the shared input
        return self.out(torch.relu(self.q(h) + self.k(h) * self.v(h)))


def test_layers_that_share_an_input_are_one_decision():
    model = SharedInput().eval()
    data = torch.randn(2000, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(data)

    @torch.no_grad()
    def error():
        return float((model(data) - reference).norm() / reference.norm() * 100)

    config = SearchConfig(threshold=0.2, builtin_candidates=False, int8_grid="full")
    result = stablequant_search(model, lambda: model(data), error, config, progress=False)
    by = {d.name: d for d in result.layers}
    assert by["q"].shares_input_with == ["k", "v"] and by["v"].shares_input_with == ["q", "k"]
    assert by["out"].shares_input_with == []
    # one range for the three, whatever was chosen, so the quantized graph runs what was scored
    assert by["q"].act_range == by["k"].act_range == by["v"].act_range
    assert by["q"].flagged == by["k"].flagged == by["v"].flagged
    # screened once for the three: float, 2 units, all MAX, MSE base, the flagged units' candidates
    flagged_units = sum(1 for n in ("q", "out") if by[n].flagged)
    assert result.evaluations <= 1 + 2 + 1 + 1 + flagged_units * len(config.percentiles)
    plan = result.to_plan()
    assert plan.layers["q"].act_range == plan.layers["k"].act_range == plan.layers["v"].act_range


def test_a_referee_picks_between_the_search_and_each_builtin_rule():
    model, run_calibration, metric = make_problem()
    plain = stablequant_search(model, run_calibration, metric, SearchConfig(threshold=1.0), progress=False)
    # A referee that disagrees with the metric entirely (it prefers the worst model): it must overrule the search.
    result = stablequant_search(model, run_calibration, metric, SearchConfig(threshold=1.0), progress=False,
                                referee=lambda: -metric(), referee_name="contrarian")
    assert set(result.referee_metrics) == {"search", "mse", "max", "percentile_clip", "moving_average", "l2_histogram"}
    assert result.referee_metrics["search"] == pytest.approx(-plain.final_metric)
    worst = max(result.rule_metrics, key=result.rule_metrics.get)
    assert result.referee_choice == min(result.referee_metrics, key=result.referee_metrics.get)
    assert result.referee_choice == worst and result.final_metric == result.rule_metrics[worst]
    assert {d.choice for d in result.layers} == {"percentile" if worst == "mse" else worst}
    assert result.evaluations == plain.evaluations + 6 and result.to_plan().provenance["referee_choice"] == worst
    # A referee that agrees keeps the search's decision (ties go to the search).
    agreeing = stablequant_search(model, run_calibration, metric, SearchConfig(threshold=1.0), progress=False,
                                  referee=metric)
    assert agreeing.referee_choice == "search" and agreeing.final_metric == plain.final_metric


def test_an_unrelated_layer_on_a_reused_address_does_not_split_a_shared_input():
    from sq_plugin.core.stats import Histogram
    from sq_plugin.search.stablequant import shared_input_units

    same, other = Histogram.of(torch.arange(10.0)), Histogram.of(torch.arange(5.0))
    # "fc" ran earlier on a buffer at the address q/k/v later read (freed and reused), with other data
    seen = {"fc": [(7, (2, 3))], "q": [(7, (2, 3))], "k": [(7, (2, 3))], "v": [(7, (2, 3))]}
    hists = {"fc": other, "q": same, "k": same.copy(), "v": same.copy()}
    assert shared_input_units(["fc", "q", "k", "v"], seen, hists) == {"fc": ("fc",), "q": ("q", "k", "v")}


def test_a_shortlist_scores_only_the_best_candidates_in_full():
    # With the quick metric the full one, the best on it is the best in full: the same decision as every candidate
    # scored in full, with one full evaluation per flagged unit instead of one per distinct range.
    model, run_calibration, metric = make_problem()
    exact = stablequant_search(model, run_calibration, metric, SearchConfig(threshold=1.0), progress=False)
    short = stablequant_search(model, run_calibration, metric, SearchConfig(threshold=1.0, shortlist=1),
                               progress=False, quick_metric=metric)
    assert short.flagged == exact.flagged == ["fc2"]
    assert [d.act_range for d in short.layers] == [d.act_range for d in exact.layers]
    assert short.final_metric == exact.final_metric
    fc2 = next(d for d in short.layers if d.name == "fc2")
    ranked = len(set(fc2.quick_candidates.values()))  # the distinct ranges but the current one
    assert short.quick_evaluations == ranked >= 5
    assert short.evaluations - short.quick_evaluations == exact.evaluations - ranked + 1
    # In full: the shortlisted candidate and the current choice (the base rule's range, whose metric is known).
    assert {*fc2.candidates.values(), *fc2.rule_candidates.values()} == {short.final_metric,
                                                                        short.rule_metrics[short.base_rule]}
    assert short.to_dict()["quick_evaluations"] == short.quick_evaluations


def test_a_misleading_quick_metric_never_makes_the_search_worse_than_its_start():
    # The quick metric ranks backwards: the shortlisted candidate is the worst, and the current choice stays.
    model, run_calibration, metric = make_problem()
    result = stablequant_search(model, run_calibration, metric, SearchConfig(threshold=1.0, shortlist=1),
                                progress=False, quick_metric=lambda: -metric())
    assert result.final_metric <= result.rule_metrics[result.base_rule]


def test_a_shortlist_without_a_quick_metric_is_a_clear_error():
    model, run_calibration, metric = make_problem()
    with pytest.raises(ValueError, match="shortlist=2 scores candidates on a quick metric first: pass quick_metric"):
        stablequant_search(model, run_calibration, metric, SearchConfig(shortlist=2), progress=False)
