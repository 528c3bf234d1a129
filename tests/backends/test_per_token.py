"""Per-token INT8 Linears (sq_plugin.backends.per_token): the integer kernel computes what the simulation
fake-quantizes, beats one static range per tensor where activations have outlier channels, and is refused where
`_int_mm` saturates."""

import pytest
import torch

from sq_plugin.backends.per_token import (
    PerTokenInt8Linear,
    check_per_token_runs_here,
    fake_quantize_per_token,
    swap_per_token_linears,
)
from sq_plugin.backends.simulate import LayerQuant, fake_quantize_weight, simulate
from sq_plugin.backends.x86_isa import IsaError, X86IsaPolicy, x86_policy
from sq_plugin.core.grid import X86_ACTIVATION_PER_TOKEN, PlanError
from sq_plugin.core.plan import LayerPlan, QuantPlan, x86_grids

needs_int32_sums = pytest.mark.skipif(not x86_policy().int32_accumulation,
                                      reason="torch._int_mm saturates without VNNI (the refusal is tested here)")


def outlier_inputs(seed: int = 1, rows: int = 20, width: int = 64) -> torch.Tensor:
    """Normal activations whose first two channels are 30x larger, and rows of very different scales, as in
    transformer layers: one range per tensor spends its levels on the outliers."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, rows, width, generator=gen)
    x[..., :2] *= 30
    return x * torch.linspace(0.05, 1.0, rows)[None, :, None]


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def test_fake_quantize_per_token_rounds_each_row_on_its_own_range():
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0], [-100.0, 0.0, 50.0, 100.0]])
    grid = X86_ACTIVATION_PER_TOKEN.narrowed(2)  # 4 levels per row
    got = fake_quantize_per_token(x, grid)
    assert torch.allclose(got[0], torch.tensor([0.0, 1.0, 2.0, 3.0]))  # 3 steps of 1 over [0, 3]: exact
    # [-100, 100] on 4 levels: steps of 200/3 and a zero point rounded to a level (round(1.5) = 2, so 0 stays exact,
    # as in core.quant.qparams_from_range): the grid covers [-133.3, 66.7]; 50 and 100 both land on 66.7
    step = 200 / 3
    assert torch.allclose(got[1], torch.tensor([-2 * step, 0.0, step, step]), atol=1e-4)


@needs_int32_sums
def test_the_integer_linear_is_the_simulation_and_beats_a_static_range():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    x = outlier_inputs()
    module = PerTokenInt8Linear.from_linear(linear, X86_ACTIVATION_PER_TOKEN, 8)
    with torch.no_grad():
        got, want = module(x), linear(x)
        simulated = torch.nn.functional.linear(fake_quantize_per_token(x, X86_ACTIVATION_PER_TOKEN),
                                               fake_quantize_weight(linear.weight, 8), linear.bias)
        compiled = torch.compile(module)(x)
        with simulate(torch.nn.Sequential(linear), {"0": LayerQuant(act_range=(float(x.min()), float(x.max())))}):
            static = linear(x)
    assert relative(got, simulated) < 1e-5  # the same numbers, up to float summation order
    assert relative(compiled, got) < 1e-5
    assert relative(got, want) < 0.02
    assert relative(static, want) > 3 * relative(got, want)


@needs_int32_sums
def test_a_6_bit_grid_and_the_mse_weight_rule_are_what_they_say():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 16, bias=False)
    x = outlier_inputs(seed=2)
    grid = X86_ACTIVATION_PER_TOKEN.narrowed(6)
    from sq_plugin.backends.weights import quantize_weight

    module = PerTokenInt8Linear.from_linear(linear, grid, 6, "mse")
    with torch.no_grad():
        simulated = torch.nn.functional.linear(fake_quantize_per_token(x, grid),
                                               quantize_weight(linear.weight, 6, rule="mse").dequantize())
        assert relative(module(x), simulated) < 1e-5
    assert int(module.weight_t.abs().max()) <= 32


def per_token_plan(model: torch.nn.Module, names: list[str]) -> QuantPlan:
    weight, act = x86_grids(8, 8)
    static = QuantPlan({n: LayerPlan("linear", act, (-1.0, 1.0), weight) for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear)}, {"model": "toy"})
    return static.with_per_token_activations(names)


def test_check_refuses_a_per_token_plan_where_int_mm_saturates():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    plan = per_token_plan(model, ["1"])
    with pytest.raises(IsaError, match=r"1 plan layer\(s\) ask for per-token activations \(e.g. 1\).*saturates.*"
                                       r"avx2.*Fix: make the plan with static activation ranges"):
        check_per_token_runs_here(plan, X86IsaPolicy("avx2", "narrow_weights", True))
    check_per_token_runs_here(plan, X86IsaPolicy("amx", "full", False))  # int32 sums: runs
    check_per_token_runs_here(per_token_plan(model, []), X86IsaPolicy("avx2", "narrow_weights", True))  # none asked


def test_swap_replaces_exactly_the_planned_linears_and_names_a_mismatch():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    plan = per_token_plan(model, ["2"])
    if not x86_policy().int32_accumulation:
        with pytest.raises(IsaError, match="per-token"):
            swap_per_token_linears(model, plan)
        return
    assert swap_per_token_linears(model, plan) == ["2"]
    assert isinstance(model[0], torch.nn.Linear) and isinstance(model[2], PerTokenInt8Linear)
    other = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Conv1d(8, 4, 1))
    with pytest.raises(PlanError, match=r"layers.2: the plan puts it on a per-token grid, but the model's '2' is "
                                        r"Conv1d, not a Linear"):
        swap_per_token_linears(other, plan)
