"""Integer grids: bit widths, bounds, the named x86 grids and the narrowing x86 CPUs without VNNI need.

Torch-free and numpy-free, so validating a recipe or reading a plan imports nothing heavy.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, replace


class PlanError(ValueError):
    """A plan that cannot be read or does not fit the model; the message names the layer or key and the fix."""


def check_bits(bits: int, *, name: str = "bits") -> None:
    if not isinstance(bits, numbers.Integral) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise ValueError(f"{name} must be an integer from 2 to 8 (got {bits!r}); use 8 for real INT8 kernels")


def quant_bounds(bits: int, *, signed: bool) -> tuple[int, int]:
    """Integer grid of an N-bit quantizer, e.g. (8, signed) -> (-128, 127), (6, unsigned) -> (0, 63)."""
    check_bits(bits)
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


# The weight widths a mixed-precision allocation chooses from (sq_plugin.core.mixed); here, torch- and numpy-free,
# so that a recipe asking for `bits: {mixed: ...}` is validated without importing either.
WEIGHT_WIDTHS = (2, 3, 4, 5, 6, 8)
# The PTQ allocation's default candidates (no training): below 4 bits the layers' one-at-a-time sensitivities stop
# adding up, and the allocation loses to uniform widths (measured on the three references, BENCHMARKS.md: HuBERT-ref
# at 5 bits +0.93 pp with 2-8 bits, +0.39 pp with 4-8 bits, uniform 5 bits -0.14 pp). The trained methods take all.
PTQ_WIDTHS = (4, 5, 6, 8)


def check_widths(widths: Sequence[int]) -> tuple[int, ...]:
    """Sorted unique candidate widths; each must be one of `WEIGHT_WIDTHS`."""
    widths = tuple(widths)
    if not widths:
        raise ValueError(f"no candidate widths given; choose from {list(WEIGHT_WIDTHS)}")
    unknown = [b for b in widths if isinstance(b, bool) or b not in WEIGHT_WIDTHS]
    if unknown:
        raise ValueError(f"unknown weight width(s) {unknown}; mixed precision takes {list(WEIGHT_WIDTHS)} bits "
                         "(7 bits is what an 8-bit layer runs as on x86 without VNNI, not a choice)")
    return tuple(sorted(set(widths)))


def check_budget(budget_bits: float, widths: Sequence[int]) -> float:
    """The budget (mean weight bits) as a float, refused, naming the fix, when no allocation can meet it."""
    widths = check_widths(widths)
    try:
        budget = float(budget_bits)
    except (TypeError, ValueError):
        raise ValueError(f"budget_bits must be a number of bits per weight (got {budget_bits!r})") from None
    if isinstance(budget_bits, bool) or not math.isfinite(budget) or budget < widths[0]:
        raise ValueError(f"budget_bits {budget_bits!r} is below the smallest candidate width ({widths[0]} bits): no "
                         f"allocation fits. Fix: raise the budget to at least {widths[0]}, or add a smaller width")
    return budget


INT8_GRIDS = ("full", "narrow_weights", "narrow_activations")
# What a user may ask for: "auto" resolves to this CPU's grid (sq_plugin.backends.x86_isa.resolve_int8_grid).
GRID_CHOICES = ("auto", *INT8_GRIDS)
NARROW_BITS = 7  # a narrowed operand: weights on -64..63, or activations on 0..127


def grid_bits(w_bits: int, a_bits: int, grid: str) -> tuple[int, int]:
    """(weight bits, activation bits) of the grids that execute for nominal `w_bits`/`a_bits`:
    "full" keeps both; "narrow_weights" caps the weights at 7 bits, "narrow_activations" the
    activations (what x86 CPUs without VNNI compute exactly at W8A8; 6 bits and fewer are unchanged)."""
    check_bits(w_bits, name="w_bits")
    check_bits(a_bits, name="a_bits")
    if grid not in INT8_GRIDS:
        raise ValueError(f"int8_grid must be one of {', '.join(INT8_GRIDS)} (got {grid!r})")
    if grid == "narrow_weights":
        return min(w_bits, NARROW_BITS), a_bits
    if grid == "narrow_activations":
        return w_bits, min(a_bits, NARROW_BITS)
    return w_bits, a_bits


@dataclass(frozen=True)
class Grid:
    """One integer grid: qmin..qmax, symmetric (zero point fixed) or affine, per tensor or per channel, or
    (per_token) one range per token, i.e. per row of the last dimension, measured at run time: a plan holds no
    range for it."""

    qmin: int
    qmax: int
    symmetric: bool
    channel_axis: int | None = None
    per_token: bool = False

    def __post_init__(self) -> None:
        levels = self.qmax - self.qmin + 1
        if levels < 4 or levels & (levels - 1):
            raise PlanError(f"grid {self.qmin}..{self.qmax} is not a 2- to 8-bit power-of-two grid")
        if not (-128 <= self.qmin and self.qmax <= 255):
            raise PlanError(f"grid {self.qmin}..{self.qmax} does not fit int8/uint8 storage")
        if self.per_token and self.channel_axis is not None:
            raise PlanError(f"grid {self.qmin}..{self.qmax}: per_token (a range per row, at run time) and "
                            f"channel_axis {self.channel_axis} exclude each other; set one")

    @property
    def bits(self) -> int:
        return (self.qmax - self.qmin + 1).bit_length() - 1

    @property
    def signed(self) -> bool:
        return self.qmin < 0

    def narrowed(self, bits: int) -> Grid:
        """The same kind of grid with `bits` levels (e.g. 7-bit weights on -64..63)."""
        if self.signed:
            return replace(self, qmin=-(2 ** (bits - 1)), qmax=2 ** (bits - 1) - 1)
        return replace(self, qmin=0, qmax=2**bits - 1)

    def describe(self) -> str:
        kind = "symmetric" if self.symmetric else "affine"
        where = "per tensor" if self.channel_axis is None else f"per channel (axis {self.channel_axis})"
        if self.per_token:
            where = "per token (dynamic)"
        return f"{self.bits}-bit {'s' if self.signed else 'u'}int {self.qmin}..{self.qmax} {kind} {where}"


# oneDNN's INT8 ops: uint8 affine per-tensor activations, int8 symmetric per-output-channel weights.
X86_ACTIVATION = Grid(0, 255, symmetric=False)
X86_WEIGHT = Grid(-128, 127, symmetric=True, channel_axis=0)
# A Linear's input on 256 levels over each token's own [min, max], measured at run time: `torch._int_mm` (int8 x int8
# -> int32) instead of oneDNN's qlinear, which takes one input scale per tensor (sq_plugin.backends.per_token). Whisper
# base's W8A8 loss is its static per-tensor activation grid, and this grid removes most of it (BENCHMARKS.md).
X86_ACTIVATION_PER_TOKEN = Grid(0, 255, symmetric=False, per_token=True)


def x86_grids(w_bits: int, a_bits: int) -> tuple[Grid, Grid]:
    """(weight grid, activation grid) of the x86 scheme at these widths (the grids that execute)."""
    return X86_WEIGHT.narrowed(w_bits), X86_ACTIVATION.narrowed(a_bits)
