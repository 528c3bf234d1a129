"""Range rules: from a `Histogram` to a float range [lo, hi] per row.

* `max_range`          — the observed [min, max] (MAX calibration).
* `percentile_range`   — clip magnitudes at the p-th percentile of |x| (TensorRT-style percentile
                         calibration, applied to both signs), intersected with [min, max].
* `mse_range`          — the range, shrunk from MAX by a factor on a grid, that minimizes the
                         expected quantization MSE over the histogram for the given grid/bits.
* `percentile_then_mse_range` — StableQuant's per-layer rule: drop the mass above the p-th
                         percentile (the "clipped histogram"), then the MSE-optimal range on what is left.
* `l2_histogram_range` — the L2-histogram criterion of the built-in histogram observers (torchao's
                         `HistogramObserver`): trim bins from the end with the lighter tail while the
                         expected L2 quantization error falls; asymmetric, unlike `mse_range`.

All rules return (lo, hi) arrays of shape (rows,). They never see the framework.

Limit of the MSE rules: they score ranges on the histogram. When max|x| exceeds the bulk of the
data by more than the number of |x| bins (bins/2: 1024 by default), the bulk sits in one or two
bins and the MSE search cannot resolve it (on Cauchy-like data it can then land marginally above
MAX's error). Clipping first (`percentile_then_mse_range`) restores the resolution.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from sq_plugin.core.quant import check_bits, fake_quantize_np, qparams_from_range, quant_bounds
from sq_plugin.core.stats import Histogram

RuleName = Literal["max", "percentile", "mse", "percentile_then_mse"]
RULES: tuple[str, ...] = ("max", "percentile", "mse", "percentile_then_mse")


@dataclass(frozen=True)
class RangeRule:
    """How a layer's range is decided from its statistics. Round-trips through `to_dict`/`from_dict`.

    method: one of RULES. percentile: the cut-off p in (0, 100] (used by the percentile rules).
    mse_grid: number of candidate clip factors in (0, 1] tried by the MSE rules.
    """

    method: RuleName = "percentile_then_mse"
    percentile: float = 100.0
    mse_grid: int = 100

    def __post_init__(self) -> None:
        if self.method not in RULES:
            raise ValueError(f"unknown range rule {self.method!r}; choose one of {', '.join(RULES)}")
        check_percentile(self.percentile)
        if not isinstance(self.mse_grid, int) or self.mse_grid < 1:
            raise ValueError(f"mse_grid must be a positive integer (got {self.mse_grid!r}); 100 is the default")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RangeRule:
        unknown = set(data) - {"method", "percentile", "mse_grid"}
        if unknown:
            raise ValueError(f"unknown RangeRule key(s) {sorted(unknown)}; valid: method, percentile, mse_grid")
        return cls(**data)


def check_percentile(p: float) -> None:
    if isinstance(p, bool) or not isinstance(p, int | float) or not (0.0 < float(p) <= 100.0):
        raise ValueError(f"percentile must be in (0, 100] (got {p!r}); 100 means no clipping, 99.9 is typical")


def _require_data(hist: Histogram, name: str) -> None:
    if (hist.count == 0).any():
        raise RuntimeError(
            f"{name}: no calibration data was observed, so no range can be computed. Run the calibration "
            "data through the prepared model before converting (check that the calibration set is not empty "
            "and actually reaches this layer)."
        )


def max_range(hist: Histogram, *, name: str = "tensor") -> tuple[np.ndarray, np.ndarray]:
    _require_data(hist, name)
    return hist.min_val.copy(), hist.max_val.copy()


def percentile_magnitude(hist: Histogram, p: float, *, name: str = "tensor") -> np.ndarray:
    """(rows,) the magnitude m with P(|x| <= m) = p/100, interpolated within a bin, at most max|x|."""
    check_percentile(p)
    _require_data(hist, name)
    absmax = hist.absmax
    if p >= 100.0:
        return absmax
    counts = hist.abs_counts().astype(np.float64)
    cdf = np.cumsum(counts, axis=1)
    target = cdf[:, -1] * (p / 100.0)
    k = np.array([np.searchsorted(cdf[r], target[r], side="left") for r in range(hist.rows)])
    below = np.where(k > 0, cdf[np.arange(hist.rows), np.maximum(k - 1, 0)], 0.0)
    in_bin = counts[np.arange(hist.rows), k]
    frac = np.where(in_bin > 0, (target - below) / np.maximum(in_bin, 1.0), 1.0)
    magnitude = (k + frac) * hist.bin_width
    return np.minimum(magnitude, absmax)


def percentile_range(hist: Histogram, p: float, *, name: str = "tensor") -> tuple[np.ndarray, np.ndarray]:
    m = percentile_magnitude(hist, p, name=name)
    return np.maximum(hist.min_val, -m), np.minimum(hist.max_val, m)


def quantization_mse(hist: Histogram, lo: np.ndarray, hi: np.ndarray, *, bits: int, symmetric: bool,
                     signed: bool, keep_below: np.ndarray | None = None) -> np.ndarray:
    """(rows,) expected squared error of quantizing the histogram's data with range [lo, hi].

    Values outside the representable range cost their clipping error (bin centre to the edge).
    Inside it, a bin narrower than the quantization step costs the rounding error of its centre;
    a bin at least as wide as the step holds values spread over several steps, so it costs the
    uniform rounding noise step**2 / 12. (Scoring wide bins by their centre alone would make the
    error depend on where the centre happens to fall on the grid: with extreme outliers, bins get
    wider than the step and that picks bad ranges.) `keep_below` drops the mass whose |x| is above
    it (the "clipped histogram" of StableQuant step 3).
    """
    centers = hist.bin_centers()
    weights = hist.counts.astype(np.float64)
    if keep_below is not None:
        weights = np.where(np.abs(centers) <= keep_below[:, None], weights, 0.0)
    return _expected_errors(centers, weights, hist.bin_width, lo, hi, bits=bits, symmetric=symmetric, signed=signed)


def _expected_errors(centers: np.ndarray, weights: np.ndarray, bin_width: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                     *, bits: int, symmetric: bool, signed: bool) -> np.ndarray:
    """`quantization_mse` on arrays: row i is a histogram (bin `centers`, `weights`, `bin_width`) scored with the
    range [lo[i], hi[i]]. The rows may repeat one histogram (broadcast) to score many ranges in one pass."""
    qmin, qmax = quant_bounds(bits, signed=signed)
    scale, zp = qparams_from_range(lo, hi, qmin, qmax, symmetric=symmetric)
    step, zero = scale[:, None], zp[:, None]
    lowest, highest = (qmin - zero) * step, (qmax - zero) * step
    clipped = (centers - np.clip(centers, lowest, highest)) ** 2
    rounding = np.where(bin_width[:, None] >= step, step**2 / 12.0,
                        (fake_quantize_np(centers, step, zero, qmin, qmax) - centers) ** 2)
    err = np.where((centers < lowest) | (centers > highest), clipped, rounding)
    total = np.maximum(weights.sum(axis=1), 1.0)
    return (err * weights).sum(axis=1) / total


def mse_range(hist: Histogram, *, bits: int, symmetric: bool, signed: bool, grid: int = 100,
              within: tuple[np.ndarray, np.ndarray] | None = None, keep_below: np.ndarray | None = None,
              name: str = "tensor") -> tuple[np.ndarray, np.ndarray]:
    """The range alpha*[lo, hi] (alpha in {1/grid, ..., 1}) with the least quantization MSE.

    [lo, hi] is `within` (default: the MAX range). alpha = 1 is a candidate, so on the histogram the
    MSE rule is never worse than the range it starts from.
    """
    check_bits(bits)
    _require_data(hist, name)
    lo, hi = within if within is not None else max_range(hist, name=name)
    best_lo, best_hi = lo.copy(), hi.copy()
    best_err = quantization_mse(hist, lo, hi, bits=bits, symmetric=symmetric, signed=signed, keep_below=keep_below)
    for step in range(grid - 1, 0, -1):
        alpha = step / grid
        err = quantization_mse(hist, alpha * lo, alpha * hi, bits=bits, symmetric=symmetric, signed=signed,
                               keep_below=keep_below)
        better = err < best_err  # strict: ties keep the wider range, so results are deterministic
        best_err = np.where(better, err, best_err)
        best_lo = np.where(better, alpha * lo, best_lo)
        best_hi = np.where(better, alpha * hi, best_hi)
    return best_lo, best_hi


def percentile_then_mse_range(hist: Histogram, p: float, *, bits: int, symmetric: bool, signed: bool,
                              grid: int = 100, name: str = "tensor") -> tuple[np.ndarray, np.ndarray]:
    """StableQuant's rule: clip at the p-th percentile, then the MSE-optimal range on the clipped histogram."""
    clipped = percentile_range(hist, p, name=name)
    keep = None if p >= 100.0 else percentile_magnitude(hist, p, name=name)
    return mse_range(hist, bits=bits, symmetric=symmetric, signed=signed, grid=grid, within=clipped,
                     keep_below=keep, name=name)


_PATH_CHUNK = 256  # ranges scored per pass in l2_histogram_range: (256, bins) float64 temporaries


def l2_histogram_range(hist: Histogram, *, bits: int, symmetric: bool, signed: bool,
                       name: str = "tensor") -> tuple[np.ndarray, np.ndarray]:
    """The range the L2-histogram criterion picks: from [min, max], trim one bin at a time from the end whose tail
    holds less mass (ties: the upper end), and keep the range along that path with the least expected squared
    quantization error on the histogram.

    Our reading of torchao's `HistogramObserver` search, scored with our `quantization_mse` on our histogram. The
    built-in stops at the first rise of its (smooth) norm; ours scores bin centres, whose rounding error is not
    smooth in the range, so a first-rise stop would halt after a bin or two: we take the minimum over the whole
    path instead. It aims at the range that built-in aims at; it is not bit for bit its range.
    """
    check_bits(bits)
    _require_data(hist, name)
    lo, hi = max_range(hist, name=name)
    width, half = hist.bin_width, hist.bins // 2
    centers, weights = hist.bin_centers(), hist.counts.astype(np.float64)
    for r in range(hist.rows):
        counts = hist.counts[r]
        nonzero = np.flatnonzero(counts)
        start, end = int(nonzero[0]), int(nonzero[-1])  # first and last bins that hold data
        a, b = float(lo[r]), float(hi[r])
        path = [(a, b)]  # the ranges along the trimming path, widest first
        below, above = 0, 0  # mass trimmed off each end so far
        while start < end:
            trim_low = below + counts[start] < above + counts[end]
            if trim_low:
                below += counts[start]
                start += 1
            else:
                above += counts[end]
                end -= 1
            # Bin k spans [(k - half) * width, (k - half + 1) * width): the range keeps whole bins.
            a = max(a, (start - half) * width[r])
            b = min(b, (end - half + 1) * width[r])
            path.append((a, b))
        # Every range of the path scored in one pass (row r repeated), in chunks that bound the memory.
        errors = []
        for first in range(0, len(path), _PATH_CHUNK):
            chunk = np.array(path[first : first + _PATH_CHUNK])
            rows = len(chunk)
            errors.append(_expected_errors(np.broadcast_to(centers[r], (rows, hist.bins)),
                                           np.broadcast_to(weights[r], (rows, hist.bins)), np.full(rows, width[r]),
                                           chunk[:, 0], chunk[:, 1], bits=bits, symmetric=symmetric, signed=signed))
        best = int(np.argmin(np.concatenate(errors)))  # the first minimum: ties keep the wider range
        lo[r], hi[r] = path[best]
    return lo, hi


def compute_range(hist: Histogram, rule: RangeRule, *, bits: int, symmetric: bool, signed: bool,
                  name: str = "tensor") -> tuple[np.ndarray, np.ndarray]:
    """Apply `rule` to `hist`; `name` (a layer name) goes into every error message."""
    if rule.method == "max":
        lo, hi = max_range(hist, name=name)
    elif rule.method == "percentile":
        lo, hi = percentile_range(hist, rule.percentile, name=name)
    elif rule.method == "mse":
        lo, hi = mse_range(hist, bits=bits, symmetric=symmetric, signed=signed, grid=rule.mse_grid, name=name)
    else:
        lo, hi = percentile_then_mse_range(hist, rule.percentile, bits=bits, symmetric=symmetric, signed=signed,
                                           grid=rule.mse_grid, name=name)
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise RuntimeError(f"{name}: the {rule.method} rule produced a non-finite range; this is a bug, please report")
    return lo, hi
