"""Calibration statistics, kept apart from the range decision (collect once, decide many ways).

`Histogram` is a signed histogram per row (one row per tensor, or one per channel) that can grow
its range and merges *exactly*: the histogram of A∪B equals merge(histogram of A, histogram of B),
bin for bin. Exactness comes from two choices:

* a row's half-range R is always a power of two, the smallest one strictly above max|x| of that
  row, and the bin width w = 2R / bins is then a power of two too;
* the bin of x is floor(x / w) + bins/2. Dividing by a power of two is exact in floating point,
  and floor(floor(y) / 2) == floor(y / 2), so doubling R (pairing neighbouring bins) assigns every
  value to the bin it would have had if R had been the larger one from the start.

Exact min/max/count per row are kept beside the counts, so `max` and `percentile(100)` ranges
are exact and not rounded to a bin edge.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

DEFAULT_BINS = 2048
# The smallest half-range a row may have; a row that only ever saw values below this keeps it.
_MIN_EXPONENT = -40


def _exponent_above(absmax: np.ndarray) -> np.ndarray:
    """Smallest integer e with 2**e > absmax (element-wise), at least _MIN_EXPONENT."""
    safe = np.maximum(absmax, np.ldexp(1.0, _MIN_EXPONENT - 1))
    _, exp = np.frexp(safe)  # safe = m * 2**exp with 0.5 <= m < 1, so 2**exp > safe always
    return np.maximum(exp.astype(np.int64), _MIN_EXPONENT)


@dataclass
class Histogram:
    """Per-row signed histograms with exact running min, max and count.

    counts: (rows, bins) int64; exponents: (rows,) so row r covers [-2**e_r, 2**e_r).
    """

    counts: np.ndarray
    exponents: np.ndarray
    min_val: np.ndarray
    max_val: np.ndarray
    count: np.ndarray

    @classmethod
    def empty(cls, rows: int = 1, bins: int = DEFAULT_BINS) -> Histogram:
        if bins < 8 or bins & (bins - 1):
            raise ValueError(f"bins must be a power of two >= 8 (got {bins}); 2048 is the usual choice")
        return cls(
            counts=np.zeros((rows, bins), dtype=np.int64),
            exponents=np.full(rows, _MIN_EXPONENT, dtype=np.int64),
            min_val=np.full(rows, np.inf),
            max_val=np.full(rows, -np.inf),
            count=np.zeros(rows, dtype=np.int64),
        )

    @classmethod
    def of(cls, values: np.ndarray | torch.Tensor, *, bins: int = DEFAULT_BINS, name: str = "tensor",
           channel_axis: int | None = None) -> Histogram:
        """Histogram of `values`: one row, or one row per channel along `channel_axis`."""
        hist = cls.empty(rows=1 if channel_axis is None else _shape(values)[channel_axis], bins=bins)
        hist.update(values, name=name, channel_axis=channel_axis)
        return hist

    @classmethod
    def from_arrays(cls, counts: np.ndarray | torch.Tensor, exponents: np.ndarray | torch.Tensor,
                    min_val: np.ndarray | torch.Tensor, max_val: np.ndarray | torch.Tensor,
                    count: np.ndarray | torch.Tensor) -> Histogram:
        """A histogram from its five arrays (e.g. saved buffers), checked; inverse of `arrays()`.

        Shares memory with the inputs where their dtype already matches (CPU tensors included), so
        later updates write through. Raises ValueError saying what is inconsistent: shapes, bins that
        are not a power of two >= 8, negative counts, a `count` that is not each row's total, or a
        value outside its row's range.
        """
        c = _array(counts, np.int64, "counts")
        if c.ndim != 2:
            raise ValueError(f"counts must be 2-D (rows, bins), got shape {c.shape}")
        rows, bins = c.shape
        if bins < 8 or bins & (bins - 1):
            raise ValueError(f"bins must be a power of two >= 8, got {bins}")
        e = _array(exponents, np.int64, "exponents")
        lo = _array(min_val, np.float64, "min_val")
        hi = _array(max_val, np.float64, "max_val")
        n = _array(count, np.int64, "count")
        for label, a in (("exponents", e), ("min_val", lo), ("max_val", hi), ("count", n)):
            if a.shape != (rows,):
                raise ValueError(f"{label} must have shape ({rows},) like the counts' rows, got {a.shape}")
        if (c < 0).any():
            raise ValueError("counts must not be negative")
        if not np.array_equal(c.sum(axis=1), n):
            raise ValueError("count must equal the sum of each row's counts")
        if (e < _MIN_EXPONENT).any() or (e > 1023).any():
            raise ValueError(f"exponents must lie in [{_MIN_EXPONENT}, 1023]")
        seen = n > 0
        if np.isnan(lo).any() or np.isnan(hi).any() or (lo[seen] > hi[seen]).any():
            raise ValueError("min_val/max_val must not be NaN, and min_val <= max_val in every row with data")
        half = np.ldexp(1.0, e[seen])
        if not ((np.abs(lo[seen]) < half) & (np.abs(hi[seen]) < half)).all():
            raise ValueError("min_val/max_val must lie inside each row's range [-2**e, 2**e)")
        return cls(c, e, lo, hi, n)

    def arrays(self) -> dict[str, np.ndarray]:
        """The five arrays `from_arrays` takes, by name (no copies)."""
        return {"counts": self.counts, "exponents": self.exponents, "min_val": self.min_val,
                "max_val": self.max_val, "count": self.count}

    def equals(self, other: Histogram) -> bool:
        """Whether `other` holds exactly the same statistics (bin for bin, same ranges, min, max, count)."""
        return all(a.shape == b.shape and np.array_equal(a, b)
                   for a, b in zip(self.arrays().values(), other.arrays().values(), strict=True))

    @property
    def rows(self) -> int:
        return self.counts.shape[0]

    @property
    def bins(self) -> int:
        return self.counts.shape[1]

    @property
    def bin_width(self) -> np.ndarray:
        """(rows,) width of one bin in each row."""
        return np.ldexp(2.0, self.exponents) / self.bins

    @property
    def absmax(self) -> np.ndarray:
        return np.maximum(np.abs(self.min_val), np.abs(self.max_val))

    def bin_centers(self) -> np.ndarray:
        """(rows, bins) centre of every bin."""
        idx = np.arange(self.bins, dtype=np.float64) - self.bins // 2 + 0.5
        return idx[None, :] * self.bin_width[:, None]

    def update(self, values: np.ndarray | torch.Tensor, *, name: str = "tensor",
               channel_axis: int | None = None) -> None:
        """Add `values` (any shape) to the histogram. Rejects NaN/Inf, naming `name`."""
        x = _as_rows(values, channel_axis)
        if x.shape[0] != self.rows:
            raise ValueError(f"{name}: got {x.shape[0]} channels, the histogram has {self.rows}")
        if x.shape[1] == 0:
            return
        finite = np.isfinite(x)
        if not finite.all():
            bad = int((~finite).sum())
            raise ValueError(
                f"{name}: {bad} NaN/Inf value(s) in the calibration tensor; a range cannot be computed "
                "from them. Check the input audio/features (and the layers before it) for overflow, "
                "or exclude this layer from quantization."
            )
        row_min, row_max = x.min(axis=1), x.max(axis=1)
        needed = _exponent_above(np.maximum(np.abs(row_min), np.abs(row_max)))
        self._grow_to(np.maximum(needed, self.exponents))
        width = self.bin_width[:, None]
        idx = np.floor(x / width).astype(np.int64) + self.bins // 2
        flat = idx + (np.arange(self.rows, dtype=np.int64) * self.bins)[:, None]
        self.counts += np.bincount(flat.ravel(), minlength=self.rows * self.bins).reshape(self.rows, self.bins)
        self.min_val = np.minimum(self.min_val, row_min)
        self.max_val = np.maximum(self.max_val, row_max)
        self.count += x.shape[1]

    def merge(self, other: Histogram) -> Histogram:
        """A new histogram equal to the histogram of both data sets together."""
        if other.counts.shape != self.counts.shape:
            raise ValueError(f"cannot merge histograms of shape {self.counts.shape} and {other.counts.shape}")
        a, b = self.copy(), other.copy()
        target = np.maximum(a.exponents, b.exponents)
        a._grow_to(target)
        b._grow_to(target)
        a.counts += b.counts
        a.min_val = np.minimum(a.min_val, b.min_val)
        a.max_val = np.maximum(a.max_val, b.max_val)
        a.count += b.count
        return a

    def copy(self) -> Histogram:
        return Histogram(self.counts.copy(), self.exponents.copy(), self.min_val.copy(),
                         self.max_val.copy(), self.count.copy())

    def abs_counts(self) -> np.ndarray:
        """(rows, bins/2) histogram of |x|: bin k covers [k*w, (k+1)*w)."""
        half = self.bins // 2
        return self.counts[:, half:] + self.counts[:, half - 1::-1]

    def _grow_to(self, target: np.ndarray) -> None:
        """Double each row's half-range until it reaches `target` (exact: pairs neighbouring bins)."""
        bins, quarter = self.bins, self.bins // 4
        for row in np.nonzero(target > self.exponents)[0]:
            steps = int(target[row] - self.exponents[row])
            counts = self.counts[row]
            for _ in range(min(steps, int(np.log2(bins)) + 1)):
                paired = counts.reshape(bins // 2, 2).sum(axis=1)
                counts = np.zeros(bins, dtype=np.int64)
                counts[quarter:quarter + bins // 2] = paired
            # Past log2(bins) doublings every value already sits in the two centre bins: stable.
            self.counts[row] = counts
            self.exponents[row] = target[row]


def _array(values: np.ndarray | torch.Tensor, dtype: type, label: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
    a = np.asarray(values)
    allowed = "fiu" if np.dtype(dtype).kind == "f" else "iu"  # no float counts, no bools
    if a.dtype.kind not in allowed:
        raise ValueError(f"{label} must be {np.dtype(dtype).name}, got {a.dtype}")
    return np.ascontiguousarray(a, dtype=dtype)


def _shape(values: np.ndarray | torch.Tensor) -> tuple[int, ...]:
    return tuple(values.shape)


def _as_rows(values: np.ndarray | torch.Tensor, channel_axis: int | None) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().to(torch.float64).cpu().numpy()
    x = np.asarray(values, dtype=np.float64)
    if channel_axis is None:
        return x.reshape(1, -1)
    return np.moveaxis(x, channel_axis, 0).reshape(x.shape[channel_axis], -1)


# torchao's MovingAverageMinMaxObserver default: each new batch moves the range 1 % of the way to its own.
DEFAULT_AVERAGING_CONSTANT = 0.01


@dataclass
class MovingAverageMinMax:
    """The moving-average MAX statistic of the built-in observers (torchao's `MovingAverageMinMaxObserver`,
    per tensor): the first batch sets [min, max]; every later batch moves each bound by `averaging_constant`
    toward that batch's own min and max. It depends on the order of the batches, so it keeps each batch's
    [min, max] (two floats a batch) and averages on demand: statistics split over processes then combine
    exactly by putting the batches back in their order (`interleave`)."""

    averaging_constant: float = DEFAULT_AVERAGING_CONSTANT
    batch_ranges: list[tuple[float, float]] = field(default_factory=list)

    @property
    def batches(self) -> int:
        return len(self.batch_ranges)

    def update(self, values: np.ndarray | torch.Tensor, *, name: str = "tensor") -> None:
        x = values.detach().float() if isinstance(values, torch.Tensor) else torch.as_tensor(values).float()
        if x.numel() == 0:
            return
        lo, hi = (float(v) for v in torch.aminmax(x))
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError(f"{name}: NaN/Inf in the calibration tensor; a moving-average range cannot be computed")
        self.batch_ranges.append((lo, hi))

    def range(self, *, name: str = "tensor") -> tuple[float, float]:
        if not self.batch_ranges:
            raise RuntimeError(f"{name}: no calibration data was observed, so no moving-average range exists; run "
                               "the calibration data through the model first")
        (lo, hi), c = self.batch_ranges[0], self.averaging_constant
        for batch_lo, batch_hi in self.batch_ranges[1:]:
            lo += c * (batch_lo - lo)
            hi += c * (batch_hi - hi)
        return lo, hi

    @classmethod
    def interleave(cls, parts: list[MovingAverageMinMax]) -> MovingAverageMinMax:
        """The statistic of batches dealt round-robin to `parts` (batch i to part i % len(parts)), in their
        original order."""
        merged = cls(parts[0].averaging_constant if parts else DEFAULT_AVERAGING_CONSTANT)
        for k in range(max((p.batches for p in parts), default=0)):
            merged.batch_ranges += [p.batch_ranges[k] for p in parts if k < p.batches]
        return merged
