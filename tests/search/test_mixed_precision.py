"""Sensitivity per layer and width, mixed plans and their stored weights (search.mixed_precision)."""

import pytest
import torch
from torch import nn

from sq_plugin.backends.weights import quantize_weight
from sq_plugin.core.grid import PlanError, x86_grids
from sq_plugin.core.plan import LayerPlan, QuantPlan
from sq_plugin.search.mixed_precision import measure_sensitivity, mixed_plan, stored_weights, tied_layers


class Blocks(nn.Module):
    """Two residual blocks in a ModuleList (what the prefix cache replays), then a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)) for _ in range(2)])
        self.head = nn.Linear(16, 8)
        with torch.no_grad():
            self.layers[1][0].weight.mul_(6.0)  # one layer whose low widths hurt far more

    def forward(self, x):
        for block in self.layers:
            x = x + block(x)
        return self.head(x)


INPUTS = [torch.randn(4, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]


def kl_metric(model):
    teacher = [torch.log_softmax(model(x), -1).detach() for x in INPUTS]

    def metric():
        total = 0.0
        for x, t in zip(INPUTS, teacher, strict=True):
            s = torch.log_softmax(model(x), -1)
            total += float((t.exp() * (t - s)).sum(-1).mean())
        return total
    return metric


def test_sensitivity_falls_with_the_width_and_replay_changes_nothing():
    model = Blocks().eval()
    metric = kl_metric(model)
    replayed = measure_sensitivity(model, metric, widths=(2, 3, 4, 8), progress=False)
    plain = measure_sensitivity(model, metric, widths=(2, 3, 4, 8), replay_blocks=None, progress=False)
    assert replayed.sensitivity == plain.sensitivity  # replaying unchanged prefixes is exact
    assert replayed.fp_metric == pytest.approx(0.0, abs=1e-9)
    for name, by_width in replayed.sensitivity.items():
        assert by_width[2] > by_width[4] > 0, name
        assert by_width[8] < 1e-3 * by_width[2], name
    # the scaled layer hurts more than both layers of the first block, at every width below 8
    for bits in (2, 3, 4):
        assert replayed.sensitivity["layers.1.0"][bits] > 5 * max(replayed.sensitivity[n][bits]
                                                                  for n in ("layers.0.0", "layers.0.2"))
    assert replayed.evaluations == 1 + 5 * 4
    assert replayed.params == {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_the_allocation_gives_the_sensitive_layer_more_bits_and_meets_the_budget():
    model = Blocks().eval()
    sens = measure_sensitivity(model, kl_metric(model), widths=(2, 3, 4, 5, 6, 8), progress=False)
    bits = sens.allocate(3.0)
    total = sum(sens.params.values())
    assert sum(bits[n] * sens.params[n] for n in bits) / total <= 3.0
    assert bits["layers.1.0"] > max(bits["layers.0.0"], bits["layers.0.2"])  # same size, more sensitive
    assert bits["head"] == max(bits.values())  # the most sensitive per parameter, and the smallest
    assert sens.predicted(bits) >= sens.fp_metric
    # the envelope: a narrower width never predicted cheaper than a wider one
    for name in sens.sensitivity:
        env = sens.monotone(name)
        assert all(env[a] >= env[b] for a, b in zip(sens.widths, sens.widths[1:], strict=False))


class TiedHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 8)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight  # tied, as Whisper's proj_out and token embedding

    def forward(self, ids):
        return self.head(torch.tanh(self.proj(self.embed(ids))))


def test_a_tied_weight_is_measured_where_both_modules_read_it():
    model = TiedHead().eval()
    ids = torch.arange(10)[None]
    teacher = torch.log_softmax(model(ids), -1).detach()

    def metric():
        s = torch.log_softmax(model(ids), -1)
        return float((teacher.exp() * (teacher - s)).sum(-1).mean())

    assert tied_layers(model, ["proj", "head"]) == {"head"}
    original = model.embed.weight.detach().clone()
    sens = measure_sensitivity(model, metric, widths=(2, 8), progress=False)
    assert torch.equal(model.embed.weight, original) and model.head.weight is model.embed.weight  # restored
    with torch.no_grad():  # by hand: both the lookup and the head read the 2-bit table
        model.embed.weight.copy_(quantize_weight(original, 2).dequantize())
        expected = metric()
        model.embed.weight.copy_(original)
    assert sens.sensitivity["head"][2] == pytest.approx(expected, rel=1e-6)


def base_plan(model):
    weight, act = x86_grids(8, 8)
    layers = {n: LayerPlan(op="linear", activation=act, act_range=(-1.0, 1.0), weight=weight)
              for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    layers["head"] = LayerPlan(op="linear", why_float="kept float by the search")
    return QuantPlan(layers, {"model": "blocks"})


def test_mixed_plan_sets_each_width_and_stored_weights_follow_it():
    model = Blocks().eval()
    base = base_plan(model)
    plan = mixed_plan(base, {"layers.0.0": 3, "layers.0.2": 8, "layers.1.0": 5, "layers.1.2": 2})
    assert {n: plan.layers[n].weight.bits for n in plan.quantized} == {"layers.0.0": 3, "layers.0.2": 8,
                                                                        "layers.1.0": 5, "layers.1.2": 2}
    assert all(plan.layers[n].weight_rule == "stored" for n in plan.quantized)
    assert plan.layers["layers.1.0"].act_range == (-1.0, 1.0)  # the activations are the base plan's
    assert plan.layers["head"].is_float
    assert plan.provenance["mixed_precision"]["weight_widths"] == [2, 3, 5, 8]
    weights = stored_weights(model, plan)
    assert {n: w.bits for n, w in weights.items()} == {"layers.0.0": 3, "layers.0.2": 8, "layers.1.0": 5,
                                                        "layers.1.2": 2}
    assert QuantPlan.from_dict(plan.to_dict()).layers == plan.layers  # survives JSON


def test_a_width_is_capped_by_the_base_grid_and_bad_widths_are_refused():
    model = Blocks().eval()
    base = base_plan(model)
    narrow = QuantPlan({n: (LayerPlan(op=lp.op, activation=lp.activation, act_range=lp.act_range,
                                      weight=lp.weight.narrowed(7)) if not lp.is_float else lp)
                        for n, lp in base.layers.items()}, base.provenance)
    assert mixed_plan(narrow, {"layers.0.0": 8}).layers["layers.0.0"].weight.bits == 7  # x86 without VNNI
    with pytest.raises(PlanError, match="float in the base plan"):
        mixed_plan(base, {"head": 4})
    with pytest.raises(PlanError, match="does not name"):
        mixed_plan(base, {"nope": 4})
    with pytest.raises(ValueError, match="unknown weight width"):
        mixed_plan(base, {"layers.0.0": 7})
