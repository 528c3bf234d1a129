"""Per-token INT8 Linears on x86: the plan's per-token activation grid (`core.grid.X86_ACTIVATION_PER_TOKEN`).

oneDNN's qlinear, which PT2E lowers to, takes one input scale per tensor. A Linear whose plan layer asks for one
range per token instead becomes a `PerTokenInt8Linear` before export: each input row is quantized at run time onto
the grid's levels over its own [min, max] (affine: a zero point per row), multiplied against the int8 per-channel
weight by `torch._int_mm` (oneDNN s8 x s8 -> s32; Inductor compiles the float glue around it), and rescaled:

    y = ((x_q - zp) · W_qᵀ) * s_x[row] * s_w[col] + b,  with  (x_q - zp) · W = (x_q - c) · W + (c - zp) · sum(W)

(x_q - c) is the uint8 code shifted to int8 (c = the grid's midpoint), and the zero point comes back through the
weight's per-channel column sums, so the GEMM stays int8 x int8.

`_int_mm` is exact only where oneDNN sums int8 products in int32 (VNNI, AMX); without VNNI it saturates, so
`check_per_token_runs_here` refuses such a plan there (`x86_isa.INT_MM_SATURATES`). Measured on Whisper base's
searched W8A8 plan (BENCHMARKS.md, Xeon AMX): WER +5.74 pp on static ranges, +1.81 with the Linears per token,
-0.60 with the two convs float as well; decoding at 1.5x the static graphs' time, 0.6x float's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from sq_plugin.core.grid import Grid, PlanError
from sq_plugin.core.quant import fake_quantize

__all__ = ["PerTokenInt8Linear", "check_per_token_runs_here", "fake_quantize_per_token", "swap_per_token_linears"]


def _row_qparams(rows: torch.Tensor, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (scale, zero point) of the affine grid qmin..qmax over [min(row, 0), max(row, 0)], as
    `core.quant.qparams_from_range` computes them for one range."""
    lo = rows.amin(dim=-1, keepdim=True).clamp(max=0.0)
    hi = rows.amax(dim=-1, keepdim=True).clamp(min=0.0)
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=1e-8)
    zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zero_point


def fake_quantize_per_token(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Quantize-dequantize each row of the last dimension of `x` on `grid` with its own range: what the
    simulation runs for a per-token plan layer, and what `PerTokenInt8Linear` computes in integers."""
    scale, zero_point = _row_qparams(x, grid.qmin, grid.qmax)
    return fake_quantize(x, scale, zero_point, grid.qmin, grid.qmax)  # the row scales broadcast


class PerTokenInt8Linear(torch.nn.Module):
    """A Linear on per-token INT8 activations and per-channel INT8 weights through `torch._int_mm`.

    codes [out, in] int8 and scale [out] float32: the weight on its plan grid (`backends.weights.StoredWeight`).
    activation: the plan's per-token grid (unsigned, affine, at most 8 bits)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, activation: Grid) -> None:
        super().__init__()
        if not activation.per_token or activation.signed or activation.symmetric:
            raise PlanError(f"PerTokenInt8Linear takes an unsigned affine per-token grid, not {activation.describe()}")
        if codes.dtype != torch.int8 or codes.dim() != 2:
            raise ValueError(f"codes must be an int8 [out, in] matrix, got {codes.dtype} {tuple(codes.shape)}")
        self.qmin, self.qmax = activation.qmin, activation.qmax
        self.shift = (activation.qmin + activation.qmax + 1) // 2  # uint codes - shift fit int8
        self.register_buffer("weight_t", codes.t().contiguous())
        self.register_buffer("weight_sums", codes.to(torch.float32).sum(dim=1))
        self.register_buffer("weight_scale", scale.to(torch.float32))
        self.register_buffer("bias", bias.detach().to(torch.float32).clone() if bias is not None
                             else torch.zeros(codes.shape[0]))

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, activation: Grid, weight_bits: int, weight_rule: str = "max",
                    stored: Any = None) -> PerTokenInt8Linear:
        """From a float Linear: its weight quantized per output channel at `weight_bits` by `weight_rule`
        ("max" or "mse"), or `stored` (a `StoredWeight`, weight_rule "stored")."""
        from sq_plugin.backends.weights import quantize_weight

        if weight_rule == "stored":
            if stored is None:
                raise PlanError("weight_rule 'stored' takes the stored weights; none were given. Fix: pass the "
                                "StoredWeights saved with the plan")
            weight = stored
        else:
            weight = quantize_weight(linear.weight, weight_bits, rule=weight_rule)  # type: ignore[arg-type]
        return cls(weight.codes, weight.scale, linear.bias, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).float()
        scale, zero_point = _row_qparams(rows, self.qmin, self.qmax)
        codes = torch.clamp(torch.round(rows / scale) + zero_point, self.qmin, self.qmax) - self.shift
        acc = torch._int_mm(codes.to(torch.int8), self.weight_t).to(torch.float32)
        acc = acc + (self.shift - zero_point) * self.weight_sums
        out = acc * scale * self.weight_scale + self.bias
        return out.reshape(*x.shape[:-1], -1).to(x.dtype)

    def extra_repr(self) -> str:
        rows, cols = self.weight_t.shape
        return f"in={rows}, out={cols}, activations {self.qmin}..{self.qmax} per token"


def check_per_token_runs_here(plan: Any, policy: Any = None) -> None:
    """Refuse (IsaError, layers named) a plan with per-token layers on a CPU whose `_int_mm` saturates."""
    from sq_plugin.backends.x86_isa import IsaError, int8_attention_problem, x86_policy

    names = plan.per_token_layers
    if not names:
        return
    problem = int8_attention_problem(policy or x86_policy())
    if problem:
        raise IsaError(f"{len(names)} plan layer(s) ask for per-token activations (e.g. {names[0]}), which run on "
                       f"torch._int_mm: {problem}. Fix: make the plan with static activation ranges here, or run "
                       "it on a CPU with VNNI or AMX")


def swap_per_token_linears(model: torch.nn.Module, plan: Any, weights: Mapping[str, Any] | None = None) -> list[str]:
    """Replace, in place, every Linear the plan puts on a per-token grid by its `PerTokenInt8Linear`; returns
    their names. Use on a copy: the model then holds INT8 weights for those layers."""
    check_per_token_runs_here(plan)
    modules = dict(model.named_modules())
    swapped = []
    for name in plan.per_token_layers:
        layer = plan.layers[name]
        linear = modules.get(name)
        if not isinstance(linear, torch.nn.Linear):
            raise PlanError(f"layers.{name}: the plan puts it on a per-token grid, but the model's {name!r} is "
                            f"{type(linear).__name__ if linear is not None else 'missing'}, not a Linear. Fix: make "
                            "the plan for this model")
        parent_name, _, child = name.rpartition(".")
        new = PerTokenInt8Linear.from_linear(linear, layer.activation, layer.weight.bits, layer.weight_rule,
                                             (weights or {}).get(name))
        setattr(modules[parent_name] if parent_name else model, child, new)
        swapped.append(name)
    return swapped
