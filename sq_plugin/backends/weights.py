"""Weights on their integer grid: the codes, the per-channel scales and the width, for every width 2–8.

    stored = quantize_weight(layer.weight, bits=4, rule="mse")   # per output channel, symmetric
    layer.weight.data = stored.dequantize()                      # what every backend then computes with
    stored.nbytes                                                # packed codes + float32 scales

A mixed-precision plan gives each layer its own width, so the weights can no longer be re-derived by a
backend's own MAX observer: at 2–6 bits the clipping matters, and a learned step size (the one-stage
method) has no rule to re-derive it from. The codes and scales decided here are what is stored
(`sq_plugin.backends.packed`) and what executes (`StoredScaleObserver` in `sq_plugin.backends.pt2e` hands
these scales to PT2E unchanged, so convert reproduces these codes bit for bit).

Grid: signed, symmetric, per output channel (axis 0): codes on -2**(bits-1) .. 2**(bits-1)-1, zero point 0,
the x86 weight scheme at any width (`sq_plugin.core.grid.X86_WEIGHT.narrowed(bits)`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from sq_plugin.core.packing import packed_nbytes
from sq_plugin.core.quant import DEFAULT_EPS, check_bits, quant_bounds

WeightRule = Literal["max", "mse"]
WEIGHT_RULES = ("max", "mse")
# Clipping ratios the MSE rule tries (fractions of each channel's max |w|): 2-bit weights clip near 0.5.
MSE_CLIP_RATIOS = tuple(round(0.25 + 0.75 * i / 60, 4) for i in range(61))


@dataclass
class StoredWeight:
    """One layer's weight on its grid: int8 `codes` (the weight's shape), float32 `scale` [out channels]."""

    codes: torch.Tensor
    scale: torch.Tensor
    bits: int

    def __post_init__(self) -> None:
        check_bits(self.bits)
        qmin, qmax = quant_bounds(self.bits, signed=True)
        if self.codes.dtype != torch.int8:
            raise ValueError(f"codes must be int8, got {self.codes.dtype}")
        if self.scale.dim() != 1 or self.scale.shape[0] != self.codes.shape[0]:
            raise ValueError(f"scale must have one entry per output channel ({self.codes.shape[0]}), got shape "
                             f"{tuple(self.scale.shape)}")
        if self.codes.numel() and (int(self.codes.min()) < qmin or int(self.codes.max()) > qmax):
            raise ValueError(f"codes {int(self.codes.min())}..{int(self.codes.max())} do not fit the {self.bits}-bit "
                             f"grid {qmin}..{qmax}")

    def dequantize(self) -> torch.Tensor:
        shape = (-1,) + (1,) * (self.codes.dim() - 1)
        return self.codes.to(torch.float32) * self.scale.to(torch.float32).reshape(shape)

    @property
    def nbytes(self) -> int:
        """Bytes stored: the codes packed at `bits` per value, plus one float32 scale per channel."""
        return packed_nbytes(self.codes.numel(), self.bits) + 4 * self.scale.numel()


def _scales(amax: torch.Tensor, bits: int) -> torch.Tensor:
    qmin, qmax = quant_bounds(bits, signed=True)
    # torchao's symmetric convention (sq_plugin.core.quant): the range maps onto (qmax - qmin) / 2 steps.
    return torch.clamp(amax / ((qmax - qmin) / 2.0), min=DEFAULT_EPS)


def codes_for(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The weight rounded onto the `bits` grid with these per-channel scales (int8 codes)."""
    qmin, qmax = quant_bounds(bits, signed=True)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return torch.clamp(torch.round(weight.detach().float() / scale.reshape(shape)), qmin, qmax).to(torch.int8)


def quantize_weight(weight: torch.Tensor, bits: int, *, rule: WeightRule = "mse") -> StoredWeight:
    """Per-output-channel symmetric quantization at `bits`: "max" scales each channel to its max |w|; "mse"
    picks, per channel, the clipping ratio in `MSE_CLIP_RATIOS` with the least squared rounding error."""
    check_bits(bits)
    if rule not in WEIGHT_RULES:
        raise ValueError(f"unknown weight rule {rule!r}; use one of {', '.join(WEIGHT_RULES)}")
    flat = weight.detach().float().reshape(weight.shape[0], -1)
    amax = flat.abs().amax(dim=1)
    if rule == "max":
        scale = _scales(amax, bits)
    else:
        qmin, qmax = quant_bounds(bits, signed=True)
        best_err = torch.full_like(amax, math.inf)
        scale = _scales(amax, bits)
        for ratio in MSE_CLIP_RATIOS:
            candidate = _scales(amax * ratio, bits)
            q = torch.clamp(torch.round(flat / candidate[:, None]), qmin, qmax)
            err = ((q * candidate[:, None] - flat) ** 2).sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            scale = torch.where(better, candidate, scale)
    scale = scale.to(torch.float32)
    return StoredWeight(codes_for(weight, scale, bits), scale, bits)




def install_stored_weights(model: torch.nn.Module, weights: Mapping[str, StoredWeight]) -> torch.nn.Module:
    """Set each named layer's weight to its dequantized stored weight, in place (use on a copy). A weight tied to
    another module (Whisper's embedding and proj_out share one Parameter) follows, since the data is copied in."""
    modules = dict(model.named_modules())
    for name, stored in weights.items():
        module = modules.get(name)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise ValueError(f"{name}: not a layer with a weight in this model. Fix: store the weights of this model")
        if tuple(weight.shape) != tuple(stored.codes.shape):
            raise ValueError(f"{name}: stored weight of shape {tuple(stored.codes.shape)}, the layer's is "
                             f"{tuple(weight.shape)}. Fix: store the weights of this model")
        with torch.no_grad():
            weight.copy_(stored.dequantize().to(weight.dtype))
    return model


__all__ = ["MSE_CLIP_RATIOS", "WEIGHT_RULES", "StoredWeight", "codes_for", "install_stored_weights", "quantize_weight"]
