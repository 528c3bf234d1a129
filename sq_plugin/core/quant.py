"""N-bit uniform quantization math (2–8 bits; symmetric or asymmetric; per-tensor or per-channel).

Used for fake-quant simulation (W6A6, W4A4) and to score candidate ranges. Conventions match
torchao PT2E's `UniformQuantizationObserverBase._calculate_qparams` so that a range turns into the
same (scale, zero_point) here and in the converted graph:

* the range is widened to include 0 (so zero is exactly representable);
* symmetric: scale = max(|lo|, |hi|) / ((qmax - qmin) / 2), zero point = 0 for signed grids and
  the grid midpoint for unsigned ones;
* asymmetric: scale = (hi - lo) / (qmax - qmin), zero point = qmin - round(lo / scale), clamped;
* scale is at least `eps` (2**-12 as in the x86 config), so it is never 0 or NaN.
"""

from __future__ import annotations

import numpy as np
import torch

# The integer grids themselves (bits, bounds, the x86 narrowing) are torch-free: sq_plugin.core.grid.
from sq_plugin.core.grid import INT8_GRIDS, NARROW_BITS, check_bits, grid_bits, quant_bounds  # noqa: F401

DEFAULT_EPS = 2.0**-12


def qparams_from_range(lo: np.ndarray | float, hi: np.ndarray | float, qmin: int, qmax: int, *,
                       symmetric: bool, eps: float = DEFAULT_EPS) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero_point) arrays for the float range [lo, hi] on the integer grid [qmin, qmax]."""
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    if symmetric:
        amax = np.maximum(-lo, hi)
        scale = np.maximum(amax / ((qmax - qmin) / 2.0), eps)
        zero_point = np.full(scale.shape, 0 if qmin < 0 else (qmin + qmax + 1) // 2, dtype=np.int64)
    else:
        scale = np.maximum((hi - lo) / float(qmax - qmin), eps)
        zero_point = np.clip(qmin - np.round(lo / scale), qmin, qmax).astype(np.int64)
    return scale, zero_point


def fake_quantize_np(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """Quantize-dequantize with broadcasting (numpy; used to score ranges on histogram bins)."""
    q = np.clip(np.round(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def fake_quantize(x: torch.Tensor, scale: torch.Tensor | float, zero_point: torch.Tensor | int, qmin: int,
                  qmax: int, *, axis: int | None = None) -> torch.Tensor:
    """Quantize-dequantize a tensor: per-tensor (axis=None) or per-channel along `axis`."""
    scale_t = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    zp_t = torch.as_tensor(zero_point, dtype=x.dtype, device=x.device)
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        scale_t, zp_t = scale_t.reshape(shape), zp_t.reshape(shape)
    q = x / scale_t  # a new tensor: what follows may work in place on it
    if q.requires_grad:  # autograd needs what in-place ops would overwrite
        return (torch.clamp(torch.round(q) + zp_t, qmin, qmax) - zp_t) * scale_t
    # The same operations in place: the same bits, about 6x faster on a large activation (no temporaries), which is
    # most of what simulating a layer costs in the search's evaluations.
    return q.round_().add_(zp_t).clamp_(qmin, qmax).sub_(zp_t).mul_(scale_t)
