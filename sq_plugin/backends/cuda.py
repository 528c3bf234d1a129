"""CUDA INT8 path: StableQuant per-layer activation ranges as torchao static W8A8 linears (`torch._int_mm`).

There is no PT2E -> INT8 GEMM lowering for CUDA in Inductor (a converted q/dq graph on CUDA only
simulates quantization). The working path is torchao's tensor subclasses: each `nn.Linear` weight
becomes an `Int8Tensor` (per-row symmetric INT8) that carries a static activation scale, and
`aten.linear` on it quantizes the input with that scale and runs `torch._int_mm` (cuBLASLt int8 GEMM).

    ranges = activation_ranges(converted)            # StableQuant ranges from the PT2E graph
    # or activation_ranges(load(artifact)[1]["layers"]) from a saved artifact's metadata
    plans = quantize_cuda_int8(fp_model, ranges)     # in place: FqnToConfig + quantize_
    print(format_plan(plans))                        # which path each linear takes, never silent
    fp_model.cuda()

Activations: symmetric per-tensor INT8, scale = max(|lo|, |hi|) / 127 from the StableQuant range
[lo, hi] of the layer's input (torchao's static path is symmetric by default; the PT2E/x86 path uses
asymmetric uint8, so the same range gives a grid up to 2x coarser for one-sided inputs such as fc2
after GELU). Weights: per-output-row symmetric INT8, computed by torchao from the FP weight.

`torch._int_mm` on CUDA needs 2-D int8 operands, K and N multiples of 8, and M > 16 (M = batch x
frames). torchao's `safe_int_mm` falls back to an int32 matmul *on the CPU* for bad K/N and, in eager,
to an fp32 matmul when M <= 16. `install_int_mm_padding()` replaces that with `int_mm_padded`: zero
padding of M/K/N and slicing of the result (exact: zero rows/columns add nothing to the int32 sums).
`plan_layers` reports per layer whether it runs `_int_mm` directly, padded, or stays float, and
`PADDING_STATS` counts padded calls at run time.

On CPU the same `torch._int_mm` is oneDNN's: exact with VNNI/AMX, but on x86 without VNNI it saturates
for full-range int8 weights (`sq_plugin.backends.x86_isa.INT_MM_SATURATES`), so CPU runs of this path check its
numerics only on VNNI/AMX machines.

Status: the config construction, the layer plan and the padding arithmetic are tested on CPU (CPU
`torch._int_mm` has no shape constraints, so padded and unpadded results can be compared exactly).
Execution on a CUDA GPU is untested here (no GPU on the development machine); tests that need one are
marked `@pytest.mark.cuda`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

INT_MM_MIN_M = 17  # cuBLASLt `_int_mm`: "self.size(0) needs to be greater than 16"
INT_MM_MULTIPLE = 8  # K and N must be multiples of 8
QMAX = 127  # symmetric int8 activations


# ----------------------------------------------------------------------------------------------------
# Padded _int_mm
# ----------------------------------------------------------------------------------------------------


@dataclass
class PaddingStats:
    """How often `int_mm_padded` had to pad, by dimension (reset with `.reset()`)."""

    calls: int = 0
    padded_m: int = 0
    padded_k: int = 0
    padded_n: int = 0

    def reset(self) -> None:
        self.calls = self.padded_m = self.padded_k = self.padded_n = 0


PADDING_STATS = PaddingStats()


def int_mm_padding(m: int, k: int, n: int) -> tuple[int, int, int]:
    """Zero padding (rows of A, shared K, columns of B) that makes an (m,k)x(k,n) product legal for
    CUDA `torch._int_mm`."""
    return max(INT_MM_MIN_M - m, 0), (-k) % INT_MM_MULTIPLE, (-n) % INT_MM_MULTIPLE


def int_mm_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`torch._int_mm(a, b)` for any shapes: int8 (M, K) x int8 (K, N) -> int32 (M, N).

    Pads M up to 17 and K, N up to multiples of 8 with zeros, multiplies, and slices the result. Zero
    rows of A give rows that are sliced off; zero K columns/rows add 0 to every dot product; zero
    columns of B give columns that are sliced off. So the result equals the int32 matmul exactly.
    """
    if a.dim() != 2 or b.dim() != 2 or a.dtype != torch.int8 or b.dtype != torch.int8:
        raise ValueError(f"int_mm_padded needs two 2-D int8 tensors, got {tuple(a.shape)} {a.dtype} and "
                         f"{tuple(b.shape)} {b.dtype}")
    m, k = a.shape
    k2, n = b.shape
    if k != k2:
        raise ValueError(f"int_mm_padded: inner dimensions differ: {tuple(a.shape)} x {tuple(b.shape)}")
    pm, pk, pn = int_mm_padding(m, k, n)
    PADDING_STATS.calls += 1
    PADDING_STATS.padded_m += bool(pm)
    PADDING_STATS.padded_k += bool(pk)
    PADDING_STATS.padded_n += bool(pn)
    if pm or pk:
        a = F.pad(a, (0, pk, 0, pm))
    if pk or pn:
        b = F.pad(b, (0, pn, 0, pk))
    # cuBLASLt silently gives wrong results for a non-contiguous B (see torchao's safe_int_mm).
    out = torch._int_mm(a.contiguous(), b.contiguous())
    return out[:m, :n] if (pm or pn) else out


def int_scaled_matmul_padded(a: torch.Tensor, b: torch.Tensor, scales1: torch.Tensor) -> torch.Tensor:
    """Drop-in for `torchao.kernel.int_scaled_matmul` (a @ b in int32, times per-row scales) whose CUDA
    path uses `int_mm_padded` instead of `safe_int_mm`'s CPU/fp32 fallbacks. On CPU it delegates to
    torchao (CPU `_int_mm` has no shape constraints)."""
    if a.device.type != "cuda":
        return _ORIGINAL_INT_SCALED_MATMUL[0](a, b, scales1)
    assert scales1.dim() == 2 and scales1.size(1) == 1
    return int_mm_padded(a, b).to(scales1.dtype) * scales1


_ORIGINAL_INT_SCALED_MATMUL: list[Any] = []


def install_int_mm_padding() -> None:
    """Route torchao's `Int8Tensor` linear through `int_scaled_matmul_padded` (idempotent).

    Why a patch: torchao 0.18 has no hook for the GEMM that `Int8Tensor`'s `aten.linear` calls; it
    imports `int_scaled_matmul` into its module namespace, which is the one name replaced here.
    """
    from torchao.quantization.quantize_.workflows.int8 import int8_tensor

    current = int8_tensor.int_scaled_matmul
    if current is int_scaled_matmul_padded:
        return
    _ORIGINAL_INT_SCALED_MATMUL[:] = [current]
    int8_tensor.int_scaled_matmul = int_scaled_matmul_padded


def uninstall_int_mm_padding() -> None:
    """Undo `install_int_mm_padding`."""
    from torchao.quantization.quantize_.workflows.int8 import int8_tensor

    if _ORIGINAL_INT_SCALED_MATMUL and int8_tensor.int_scaled_matmul is int_scaled_matmul_padded:
        int8_tensor.int_scaled_matmul = _ORIGINAL_INT_SCALED_MATMUL[0]


# ----------------------------------------------------------------------------------------------------
# Ranges -> per-layer configs
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActRange:
    """Calibrated float range of a linear's input and the rank of that input (for the scale shape)."""

    lo: float
    hi: float
    ndim: int = 3


def activation_ranges(source: torch.fx.GraphModule | Mapping[str, Any]) -> dict[str, ActRange]:
    """Input ranges of the quantized *linear* layers, by module name.

    source: a `convert_pt2e` GraphModule (StableQuant ranges as applied there), or the "layers" dict of
    an artifact's metadata (`sq_plugin.backends.artifact.load(path)[1]["layers"]`).
    """
    from sq_plugin.backends.artifact import layer_qparams

    layers = layer_qparams(source) if isinstance(source, torch.fx.GraphModule) else source
    ranges: dict[str, ActRange] = {}
    for name, entry in layers.items():
        if entry.get("op") != "linear" or not entry.get("input"):
            continue
        lo, hi = entry["input"]["range"]
        ranges[name] = ActRange(float(lo), float(hi), int(entry["input"].get("ndim") or 3))
    return ranges


def act_scale(r: ActRange) -> torch.Tensor:
    """Symmetric INT8 scale for the range, shaped (1,)*ndim.

    Shape: `Int8Tensor.from_hp` asserts scale.ndim == input.ndim, so a (B, T, H) input needs (1, 1, 1);
    a 1-element 1-D scale fails."""
    amax = max(abs(r.lo), abs(r.hi))
    if not amax > 0:
        raise ValueError(f"activation range [{r.lo}, {r.hi}] is empty: cannot build an INT8 scale")
    return torch.full((1,) * r.ndim, amax / QMAX, dtype=torch.float32)


@dataclass
class LayerPlan:
    """How one nn.Linear runs after `quantize_cuda_int8`.

    path: "int_mm" (K, N multiples of 8: `torch._int_mm` directly when M > 16),
          "int_mm_padded" (K or N not a multiple of 8: zero-padded, needs `install_int_mm_padding`),
          "float" (no calibrated range, or excluded): stays an FP linear.
    M (batch x frames) is only known at run time: M <= 16 is padded to 17 on every path with padding
    installed (counted in PADDING_STATS), otherwise torchao falls back to fp32 in eager.
    """

    name: str
    in_features: int
    out_features: int
    path: str
    reason: str
    scale: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def plan_layers(model: torch.nn.Module, ranges: Mapping[str, ActRange], *, pad: bool = True,
                exclude: tuple[str, ...] = ()) -> list[LayerPlan]:
    """The per-linear decision, without changing the model."""
    plans: list[LayerPlan] = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        k, n = module.in_features, module.out_features
        if name in exclude:
            plans.append(LayerPlan(name, k, n, "float", "excluded by the caller"))
            continue
        if name not in ranges:
            plans.append(LayerPlan(name, k, n, "float", "no calibrated input range (layer kept float by the "
                                   "PT2E recipe, or a name mismatch)"))
            continue
        scale = float(act_scale(ranges[name]).flatten()[0])
        _, pk, pn = int_mm_padding(INT_MM_MIN_M, k, n)
        if not (pk or pn):
            plans.append(LayerPlan(name, k, n, "int_mm", "K and N are multiples of 8", scale))
        elif pad:
            plans.append(LayerPlan(name, k, n, "int_mm_padded", f"K={k} -> {k + pk}, N={n} -> {n + pn} zero-padded",
                                   scale))
        else:
            plans.append(LayerPlan(name, k, n, "float",
                                   f"K={k} or N={n} not a multiple of 8 and padding disabled: kept float rather "
                                   "than torchao's CPU int32 fallback"))
    return plans


def cuda_int8_config(plans: list[LayerPlan], ranges: Mapping[str, ActRange]) -> Any:
    """A torchao `FqnToConfig`: one `Int8StaticActivationInt8WeightConfig` per INT8 layer of the plan.

    granularity [PerTensor() activations, PerRow() weights]; set_inductor_config=False so that building
    the config does not change global Inductor settings (it would affect CPU `lower_x86` runs in the
    same process); call `torchao.quantization.utils.recommended_inductor_config_setter()` before
    `torch.compile` on CUDA if wanted.
    """
    from torchao.quantization import FqnToConfig, Int8StaticActivationInt8WeightConfig, PerRow, PerTensor

    table: OrderedDict[str, Any] = OrderedDict()
    for plan in plans:
        if plan.path == "float":
            continue
        table[plan.name] = Int8StaticActivationInt8WeightConfig(
            act_quant_scale=act_scale(ranges[plan.name]), granularity=[PerTensor(), PerRow()],
            set_inductor_config=False,
        )
    return FqnToConfig(fqn_to_config=table)


def quantize_cuda_int8(model: torch.nn.Module, ranges: Mapping[str, ActRange], *, pad: bool = True,
                       exclude: tuple[str, ...] = ()) -> list[LayerPlan]:
    """Quantize `model`'s linears in place with the StableQuant ranges; returns the per-layer plan.

    pad=True installs `int_mm_padded` for torchao's INT8 linear (see module docstring). Move the model
    to CUDA before or after; the weights are quantized on whatever device they are on.
    """
    from torchao.quantization import quantize_

    plans = plan_layers(model, ranges, pad=pad, exclude=exclude)
    if pad:
        install_int_mm_padding()
    config = cuda_int8_config(plans, ranges)
    if config.fqn_to_config:
        quantize_(model, config, filter_fn=None)
    return plans


def plan_act_qparams(lo: float, hi: float, ndim: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao's asymmetric int8 (scale, zero point) for a plan's uint8 affine range: the same 256 levels
    shifted by 128 (x86's zero point z on 0..255 is z - 128 on -128..127), shaped (1,)*ndim."""
    from sq_plugin.core.quant import qparams_from_range

    scale, zero = qparams_from_range(lo, hi, 0, 255, symmetric=False)
    return (torch.full((1,) * ndim, float(scale), dtype=torch.float32),
            torch.full((1,) * ndim, int(zero) - 128, dtype=torch.int8))


def quantize_cuda_from_plan(model: torch.nn.Module, plan: Any, *, pad: bool = True, ndim: int = 3,
                            ) -> tuple[list[LayerPlan], dict[str, str]]:
    """Apply a `QuantPlan` to `model`'s linears in place: per layer an `Int8StaticActivationInt8WeightConfig`
    with the plan's input range as an asymmetric int8 scale + zero point (no re-derivation, no symmetric
    widening) and per-row int8 weights. Returns (paths, deviations): what each linear runs, and the plan
    layers this backend cannot run as planned, each with the reason (never silently).

    torchao's static INT8 takes the full int8 grids: a plan narrowed for x86 without VNNI (7-bit weights
    or activations) runs here on 8 bits, which is listed; convs stay float (torchao quantizes linears).
    """
    from torchao.quantization import (
        FqnToConfig,
        Int8StaticActivationInt8WeightConfig,
        MappingType,
        PerRow,
        PerTensor,
        quantize_,
    )

    plan.check_layers([n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv1d)])
    stored = [n for n in plan.quantized if plan.layers[n].weight_rule == "stored"]
    if stored:
        from sq_plugin.core.plan import PlanError

        raise PlanError(f"layers.{stored[0]} (and {len(stored) - 1} more): weight_rule 'stored' (a mixed-precision "
                        "plan's codes and scales); torchao's static INT8 here re-quantizes every weight to 8 bits per "
                        "row and cannot take stored codes. Fix: run it on the x86 backend "
                        "(sq_plugin.families.mixed.quantize_mixed) or the simulation")
    ranges = {n: ActRange(*plan.layers[n].act_range, ndim=ndim) for n in plan.quantized
              if plan.layers[n].op == "linear"}
    paths = plan_layers(model, ranges, pad=pad)
    deviations: dict[str, str] = {}
    for name in plan.quantized:
        layer = plan.layers[name]
        if layer.op != "linear":
            deviations[name] = f"{layer.op} stays float on this backend (torchao's static INT8 covers nn.Linear)"
        elif layer.activation.bits != 8 or layer.weight.bits != 8:
            deviations[name] = (f"runs 8-bit weights and activations, not the plan's {layer.weight.bits}-bit weights "
                                f"and {layer.activation.bits}-bit activations (torchao's static INT8 grids are fixed)")
    if pad:
        install_int_mm_padding()
    table: OrderedDict[str, Any] = OrderedDict()
    for path in paths:
        if path.path == "float":
            continue
        scale, zero = plan_act_qparams(*plan.layers[path.name].act_range, ndim=ndim)
        path.scale = float(scale.flatten()[0])
        table[path.name] = Int8StaticActivationInt8WeightConfig(
            act_quant_scale=scale, act_quant_zero_point=zero, act_mapping_type=MappingType.ASYMMETRIC,
            granularity=[PerTensor(), PerRow()], set_inductor_config=False)
    if table:
        quantize_(model, FqnToConfig(fqn_to_config=table), filter_fn=None)
    return paths, deviations


def format_plan(plans: list[LayerPlan]) -> str:
    """A text table of the plan: one line per linear plus totals by path."""
    lines = [f"{'layer':<55} {'K':>5} {'N':>5}  {'path':<14} reason"]
    for p in plans:
        lines.append(f"{p.name:<55} {p.in_features:>5} {p.out_features:>5}  {p.path:<14} {p.reason}")
    totals: dict[str, int] = {}
    for p in plans:
        totals[p.path] = totals.get(p.path, 0) + 1
    lines.append("totals: " + ", ".join(f"{k}={v}" for k, v in sorted(totals.items())))
    return "\n".join(lines)
