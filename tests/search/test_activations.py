"""Static or per-token activations (sq_plugin.search.activations): auto keeps whichever plan scores lower on the
calibration metric, in the simulation; per_token puts every candidate Linear per token; static changes nothing."""

import pytest
import torch

from sq_plugin.core.plan import LayerPlan, QuantPlan, x86_grids
from sq_plugin.search.activations import choose_activations, per_token_candidates


def toy(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, QuantPlan]:
    """Two Linears whose inputs are tokens of very different scales (one static range per tensor spends its levels
    on the loudest), and a static MAX plan over them plus a conv-like third layer name kept float."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)).eval()
    x = torch.randn(1, 40, 16) * torch.logspace(-2, 1, 40)[None, :, None]
    with torch.no_grad():
        hidden = model[0](x)
    weight, act = x86_grids(8, 8)
    plan = QuantPlan({"0": LayerPlan("linear", act, (float(x.min()), float(x.max())), weight),
                      "1": LayerPlan("linear", act, (float(hidden.min()), float(hidden.max())), weight)},
                     {"model": "toy"})
    return model, x, plan


def error_of(model: torch.nn.Module, x: torch.Tensor):
    with torch.no_grad():
        want = model(x)

    def score() -> float:
        with torch.no_grad():  # each token's relative error, averaged: quiet tokens count as much as loud ones
            return float(((model(x) - want).norm(dim=-1) / want.norm(dim=-1)).mean())
    return score


def test_auto_keeps_the_plan_that_scores_lower_and_records_both_metrics():
    model, x, plan = toy()
    chosen, choice = choose_activations(model, plan, error_of(model, x), "auto")
    assert choice["activations"] == "per_token" and chosen.per_token_layers == ["0", "1"]
    assert choice["per_token_metric"] < 0.2 * choice["static_metric"]  # quiet tokens lose their levels statically
    assert chosen.provenance["activation_choice"] == choice and "activation_choice" not in plan.provenance
    # a metric that prefers the static plan keeps it, unchanged
    flipped = error_of(model, x)
    kept, choice = choose_activations(model, plan, lambda: -flipped(), "auto")
    assert choice["activations"] == "static" and kept.per_token_layers == [] and kept.layers == plan.layers


def test_per_token_excludes_what_it_is_told_and_static_is_the_plan_itself():
    model, x, plan = toy()
    assert per_token_candidates(plan, exclude=("1",)) == ["0"]
    chosen, choice = choose_activations(model, plan, error_of(model, x), "per_token", exclude=("1",))
    assert chosen.per_token_layers == ["0"] and choice == {"activations": "per_token", "per_token_layers": 1}
    assert choose_activations(model, plan, error_of(model, x), "static")[0] is plan


def test_where_per_token_cannot_run_auto_stays_static_and_per_token_refuses():
    model, x, plan = toy()
    why = "torch._int_mm saturates without VNNI"
    kept, choice = choose_activations(model, plan, error_of(model, x), "auto", per_token_runs=why)
    assert kept.per_token_layers == [] and why in choice["why"] and kept.provenance["activation_choice"] == choice
    with pytest.raises(ValueError, match=r"activations: per_token cannot run here: torch._int_mm saturates.*Fix: "
                                         r"activations: static"):
        choose_activations(model, plan, error_of(model, x), "per_token", per_token_runs=why)
    with pytest.raises(ValueError, match=r"unknown activations 'dynamic'; choose one of static, per_token, auto"):
        choose_activations(model, plan, error_of(model, x), "dynamic")


def test_the_recipe_takes_the_choice_and_names_a_bad_one(tmp_path):
    from sq_plugin.recipe import RecipeError, load_recipe

    text = ("model: sq/hubert-ref\ncalibration: {dataset: corpus-dev, size: 4}\nevaluation: {dataset: corpus-test, "
            "size: 4}\nmethods: [stablequant]\nmethod_options:\n  stablequant: {activations: %s}\n")
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(text % "auto")
    bad.write_text(text % "dynamic")
    assert load_recipe(good).method_options.stablequant.activations == "auto"
    with pytest.raises(RecipeError, match=r"method_options.stablequant.activations.*static.*per_token.*auto"):
        load_recipe(bad)


class ConvThenLinear(torch.nn.Module):
    """A conv over time whose input has a few very loud frames (one static range fails it), then a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(8, 16, 1)
        self.fc = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).transpose(1, 2))


def test_with_a_float_margin_auto_keeps_the_rest_float_only_when_that_pays_by_more_than_it():
    torch.manual_seed(0)
    model = ConvThenLinear().eval()
    x = torch.randn(1, 8, 50) * torch.logspace(-2, 1, 50)
    with torch.no_grad():
        hidden = model.conv(x).transpose(1, 2)
    weight, act = x86_grids(8, 8)
    plan = QuantPlan({"conv": LayerPlan("conv1d", act, (float(x.min()), float(x.max())), weight),
                      "fc": LayerPlan("linear", act, (float(hidden.min()), float(hidden.max())), weight)}, {})
    score = error_of(model, x)
    chosen, choice = choose_activations(model, plan, score, "auto", float_margin=0.0,
                                        macs={"conv": 8 * 16 * 50, "fc": 16 * 4 * 50})
    assert choice["per_token_float_rest_metric"] < choice["per_token_metric"] < choice["static_metric"]
    assert chosen.per_token_layers == ["fc"] and chosen.float_layers == ["conv"] == choice["float_layers"]
    assert choice["float_mac_share"] == pytest.approx(8 * 16 / (8 * 16 + 16 * 4))
    assert "float_fallback" in chosen.layers["conv"].why_float
    gain = choice["per_token_metric"] - choice["per_token_float_rest_metric"]
    kept, choice = choose_activations(model, plan, score, "auto", float_margin=2 * gain)  # does not pay enough
    assert kept.float_layers == [] and kept.per_token_layers == ["fc"] and "float_layers" not in choice
    # without a margin the float rest is no candidate
    assert "per_token_float_rest_metric" not in choose_activations(model, plan, score, "auto")[1]
