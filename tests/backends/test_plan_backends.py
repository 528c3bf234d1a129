"""One QuantPlan, made once, drives the fake-quant simulation, x86 INT8, INC and the CUDA path (its
numerics on CPU), and all agree with the plan's fake-quant reference: the PT2E q/dq graph of the plan.

The project's own simulation (`sq_plugin.backends.simulate`, what the search scores) matches that reference to
0.3 % here, not exactly: a weight at exactly -max of its channel lands on -127.5 steps, which torch.round
takes to -128 and PT2E's float32 x * (1/scale) to -127 (0.2 % of this MLP's weights)."""

import copy

import pytest
import torch
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

from sq_plugin.backends.pt2e import (
    calibrate,
    lower_x86,
    plan_deviations,
    prepare_stablequant,
    stablequant_x86_quantizer_from_plan,
)
from sq_plugin.backends.simulate import apply_fake_quant, plan_layer_quants
from sq_plugin.backends.x86_isa import x86_policy
from sq_plugin.core.plan import LayerPlan, PlanError, QuantPlan, x86_grids
from sq_plugin.core.ranges import RangeRule, compute_range
from sq_plugin.search import collect_input_histograms


class Mlp(torch.nn.Module):
    """Three linears, none sharing its input (PT2E quantizes a shared input once)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.fc3 = torch.nn.Linear(64, 128), torch.nn.Linear(128, 64), torch.nn.Linear(64, 32)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.nn.functional.gelu(self.fc1(x)))))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def setup():
    model = Mlp().eval()
    x = torch.randn(1, 40, 64, generator=torch.Generator().manual_seed(1))
    names = ["fc1", "fc2", "fc3"]
    hists = collect_input_histograms(model, lambda: model(x), names)
    weight, act = x86_grids(*x86_policy().grid_bits(8, 8))  # the grids this CPU runs
    rules = {"fc1": RangeRule("max"), "fc2": RangeRule("percentile_then_mse", 99.0), "fc3": RangeRule("max")}
    layers = {}
    for n in names:
        lo, hi = compute_range(hists[n], rules[n], bits=act.bits, symmetric=False, signed=False)
        layers[n] = LayerPlan("linear", act, (float(lo[0]), float(hi[0])), weight, decision=rules[n].to_dict())
    plan = QuantPlan(layers, {"model": "mlp", "method": "hand-made"})
    prepared = prepare_stablequant(model, (x,), stablequant_x86_quantizer_from_plan(plan))
    calibrate(prepared, [x])
    converted = convert_pt2e(prepared)
    with torch.no_grad():
        reference = converted(x)
    return model, x, plan, reference, converted


def test_the_reference_is_quantized_and_the_simulation_agrees(setup):
    model, x, plan, reference, _ = setup
    with torch.no_grad():
        assert rel_err(reference, model(x)) > 1e-3  # it did quantize
        simulated = apply_fake_quant(copy.deepcopy(model), plan_layer_quants(plan))(x)
    assert rel_err(simulated, reference) < 0.01  # weight ties at the channel max (module docstring)


def test_x86_int8_follows_the_plan(setup):
    _, x, plan, reference, converted = setup
    assert plan_deviations(converted, plan) == {}
    compiled, report = lower_x86(converted, (x,))
    assert report.qlinear == 3
    with torch.no_grad():
        assert rel_err(compiled(x), reference) < 0.02  # INT8 kernels: up to rounding ties


def test_inc_with_the_plan_builds_the_same_graph(setup):
    pytest.importorskip("neural_compressor.torch.quantization")
    from neural_compressor.torch.quantization import quantize

    from sq_plugin.backends.inc import StableQuantConfig

    model, x, plan, reference, _ = setup
    config = StableQuantConfig(plan=plan)
    assert StableQuantConfig.from_dict(config.to_dict()).plan == plan.to_dict()
    quantized = quantize(copy.deepcopy(model), config, run_fn=calibrate, run_args=([x],), example_inputs=(x,))
    with torch.no_grad():
        assert rel_err(quantized(x), reference) < 1e-5


@pytest.mark.skipif(not x86_policy().int32_accumulation, reason="CPU torch._int_mm saturates without VNNI, and "
                    "the plan there is narrowed to 7-bit weights, which torchao's static INT8 cannot run")
def test_cuda_path_with_the_plans_zero_points_on_cpu(setup):
    from sq_plugin.backends.cuda import quantize_cuda_from_plan, uninstall_int_mm_padding

    model, x, plan, reference, _ = setup
    quantized = copy.deepcopy(model)
    try:
        paths, deviations = quantize_cuda_from_plan(quantized, plan)
        assert deviations == {} and [p.path for p in paths] == ["int_mm"] * 3
        with torch.no_grad():
            # asymmetric int8 activations with the plan's scale and zero point: the same grid as x86's uint8
            assert rel_err(quantized(x), reference) < 1e-4
    finally:
        uninstall_int_mm_padding()


def test_a_backend_says_which_plan_layers_it_cannot_run(setup):
    from sq_plugin.backends.cuda import quantize_cuda_from_plan, uninstall_int_mm_padding

    model, x, plan, _, _ = setup
    weight, act = x86_grids(7, 8)
    narrowed = QuantPlan({n: LayerPlan("linear", act, layer.act_range, weight) for n, layer in plan.layers.items()})
    try:
        _, deviations = quantize_cuda_from_plan(copy.deepcopy(model), narrowed)
    finally:
        uninstall_int_mm_padding()
    assert set(deviations) == {"fc1", "fc2", "fc3"} and "not the plan's 7-bit weights" in deviations["fc1"]
    with pytest.raises(PlanError, match="1 layer\\(s\\) of this model are not in the plan"):
        quantize_cuda_from_plan(copy.deepcopy(model), QuantPlan({"fc1": plan.layers["fc1"],
                                                                  "fc2": plan.layers["fc2"]}))
    # a mixed-precision plan's stored codes cannot be taken by torchao's static INT8: refused, not re-derived
    from sq_plugin.search.mixed_precision import mixed_plan

    with pytest.raises(PlanError, match="weight_rule 'stored'.*cannot take stored codes"):
        quantize_cuda_from_plan(copy.deepcopy(model), mixed_plan(plan, {"fc1": 4, "fc2": 8, "fc3": 2}))
