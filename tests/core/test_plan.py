"""QuantPlan: grids, JSON round trip, version and layer checks that name the key and the fix."""

import json

import pytest

from sq_plugin.core.plan import (
    PLAN_VERSION,
    X86_ACTIVATION,
    X86_ACTIVATION_PER_TOKEN,
    X86_WEIGHT,
    Grid,
    LayerPlan,
    PlanError,
    QuantPlan,
    x86_grids,
)


def plan() -> QuantPlan:
    weight, act = x86_grids(7, 8)
    return QuantPlan({
        "enc.fc1": LayerPlan("linear", act, (-1.5, 3.25), weight, decision={"method": "percentile_then_mse",
                                                                           "percentile": 99.9}),
        "enc.conv0": LayerPlan("conv1d", why_float="keep_float"),
    }, {"model": "tiny", "method": "stablequant"})


def test_x86_grids_narrow_inside_int8_storage():
    assert (X86_WEIGHT.bits, X86_WEIGHT.qmin, X86_ACTIVATION.qmax) == (8, -128, 255)
    weight, act = x86_grids(7, 6)
    assert (weight.qmin, weight.qmax, weight.symmetric, weight.channel_axis) == (-64, 63, True, 0)
    assert (act.qmin, act.qmax, act.symmetric, act.channel_axis) == (0, 63, False, None)
    assert weight.describe() == "7-bit sint -64..63 symmetric per channel (axis 0)"
    with pytest.raises(PlanError, match="not a 2- to 8-bit power-of-two grid"):
        Grid(0, 200, symmetric=False)


def test_round_trip_through_json_and_a_file(tmp_path):
    original = plan()
    again = QuantPlan.from_dict(json.loads(original.to_json()))
    assert again == original
    path = original.save(tmp_path / "sub" / "p.json")
    assert QuantPlan.load(path) == original and not list(path.parent.glob(".*tmp*"))
    # no per-token grid: written as version 1, with version 1's grid keys, so older readers still take it
    data = json.loads(path.read_text())
    assert data["version"] == 1 and "per_token" not in data["layers"]["enc.fc1"]["activation"]
    assert again.quantized == ["enc.fc1"] and again.float_layers == ["enc.conv0"]


def test_a_per_token_grid_has_no_range_runs_on_linears_only_and_makes_a_version_2_plan():
    per_token = plan().with_per_token_activations(["enc.fc1"])
    layer = per_token.layers["enc.fc1"]
    assert layer.per_token and layer.act_range is None and layer.activation == X86_ACTIVATION_PER_TOKEN
    assert layer.weight == plan().layers["enc.fc1"].weight and layer.decision["activations"] == "per_token"
    assert layer.activation.describe() == "8-bit uint 0..255 affine per token (dynamic)"
    assert per_token.per_token_layers == ["enc.fc1"] and layer.x86_scheme_problem("enc.fc1") is None
    data = json.loads(per_token.to_json())
    assert data["version"] == PLAN_VERSION == 2 and QuantPlan.from_dict(data) == per_token
    assert "per token, at run time" in per_token.table()
    with pytest.raises(PlanError, match=r"layers.enc.conv0: only a quantized Linear takes a per-token grid; this "
                                        r"one is float"):
        plan().with_per_token_activations(["enc.conv0"])
    with pytest.raises(PlanError, match=r"layers.x: a per-token activation grid takes its ranges at run time; the "
                                        r"plan's act_range must be null"):
        LayerPlan("linear", X86_ACTIVATION_PER_TOKEN, (0.0, 1.0), X86_WEIGHT).check("x")
    conv = LayerPlan("conv1d", X86_ACTIVATION_PER_TOKEN, None, X86_WEIGHT)
    assert "runs on Linear layers only (torch._int_mm), not on a conv1d" in conv.x86_scheme_problem("c")
    with pytest.raises(PlanError, match="per_token .* and channel_axis 1 exclude each other"):
        Grid(0, 255, symmetric=False, channel_axis=1, per_token=True)


def test_table_shows_every_layer():
    table = plan().table()
    assert "model: tiny, method: stablequant; 1 quantized, 1 float" in table
    assert "| enc.fc1 | linear | 8-bit uint 0..255 affine per tensor | [-1.5, 3.25] | 7-bit sint -64..63" in table
    assert "percentile=99.9" in table and "| enc.conv0 | conv1d | float | - | float | keep_float |" in table


def test_a_plan_for_another_model_names_the_layers():
    with pytest.raises(PlanError, match=r"made for 'tiny': 1 plan layer\(s\) are not layers of big .*'enc.conv0'.*"
                                        r"1 layer\(s\) of big are not in the plan .*'dec.fc2'.*Fix: make a plan"):
        plan().check_layers(["enc.fc1", "dec.fc2"], model="big")
    plan().check_layers(["enc.conv0", "enc.fc1"])


def test_bad_plans_name_the_key_and_the_fix(tmp_path):
    data = plan().to_dict()
    with pytest.raises(PlanError, match="schema version 3 is newer .*Fix: upgrade sq-plugin"):
        QuantPlan.from_dict({**data, "version": PLAN_VERSION + 1})
    with pytest.raises(PlanError, match="not an sq-plugin quantization plan"):
        QuantPlan.from_dict({"layers": {}})
    bad = json.loads(json.dumps(data))
    bad["layers"]["enc.fc1"]["scale"] = 1.0
    with pytest.raises(PlanError, match=r"layers.enc.fc1: unknown key\(s\) \['scale'\]"):
        QuantPlan.from_dict(bad)
    bad = json.loads(json.dumps(data))
    bad["layers"]["enc.fc1"]["act_range"] = [2.0, 1.0]
    with pytest.raises(PlanError, match=r"layers.enc.fc1: act_range \[2.0, 1.0\] must be finite, lo <= hi"):
        QuantPlan.from_dict(bad)
    bad = json.loads(json.dumps(data))
    bad["layers"]["enc.conv0"]["why_float"] = None
    with pytest.raises(PlanError, match="layers.enc.conv0: a float layer needs why_float"):
        QuantPlan.from_dict(bad)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(PlanError, match="broken.json: not valid JSON"):
        QuantPlan.load(tmp_path / "broken.json")


def test_the_shipped_example_plan_loads():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "recipes" / "plans" / "whisper-tiny-en-w8a8-narrow-weights.plan.json"
    shipped = QuantPlan.load(path)
    assert shipped.provenance["model"] == "openai/whisper-tiny.en" and len(shipped.quantized) == 67
    assert shipped.provenance["int8_grid"] == "narrow_weights"
    assert {layer.weight.qmin for layer in shipped.layers.values()} == {-64}
