import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sq_plugin.core.quant import fake_quantize_np, qparams_from_range, quant_bounds
from sq_plugin.core.ranges import (
    RangeRule,
    compute_range,
    max_range,
    mse_range,
    percentile_magnitude,
    percentile_range,
    percentile_then_mse_range,
)
from sq_plugin.core.stats import Histogram


def data_mse(x, lo, hi, bits, symmetric, signed):
    qmin, qmax = quant_bounds(bits, signed=signed)
    scale, zp = qparams_from_range(lo, hi, qmin, qmax, symmetric=symmetric)
    return float(np.mean((fake_quantize_np(x, scale, zp, qmin, qmax) - x) ** 2))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), df=st.floats(2.5, 8.0), bits=st.sampled_from([4, 6, 8]),
       symmetric=st.booleans())
def test_mse_rule_is_no_worse_than_max_on_heavy_tailed_data(seed, df, bits, symmetric):
    # Student-t with 2.5 <= df <= 8: heavy tails, max|x| 10-100x the bulk. (When max|x| exceeds the
    # bulk by ~1000x, e.g. Cauchy-like data, the whole bulk falls into one or two of the 1024 |x|
    # bins and the MSE rule cannot resolve it; measured: up to 1 % above MAX's error. That is what
    # percentile clipping, StableQuant's first step, is for. Documented in sq_plugin.core.ranges.)
    x = np.random.default_rng(seed).standard_t(df, size=20000)
    hist = Histogram.of(x)
    lo_max, hi_max = max_range(hist)
    lo, hi = mse_range(hist, bits=bits, symmetric=symmetric, signed=True)
    assert data_mse(x, lo, hi, bits, symmetric, True) <= data_mse(x, lo_max, hi_max, bits, symmetric, True)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-3, 1e3))
def test_percentile_100_equals_max_exactly(seed, scale):
    x = np.random.default_rng(seed).normal(size=500) * scale
    hist = Histogram.of(x)
    lo, hi = percentile_range(hist, 100.0)
    assert lo[0] == x.min() and hi[0] == x.max()


def test_percentile_matches_numpy_within_one_bin():
    x = np.random.default_rng(0).standard_t(2, size=200_000)
    hist = Histogram.of(x)
    for p in (99.0, 99.5, 99.8, 99.9, 99.99):
        expected = np.percentile(np.abs(x), p)
        assert abs(percentile_magnitude(hist, p)[0] - expected) <= hist.bin_width[0]


def test_percentile_clips_both_signs_but_not_past_the_observed_range():
    x = np.concatenate([np.linspace(0, 1, 10_000), [50.0]])  # one-sided, with one outlier
    lo, hi = percentile_range(Histogram.of(x), 99.9)
    assert lo[0] == 0.0  # the negative side had no data: nothing to clip
    assert 0.99 < hi[0] < 1.01


def test_stablequant_rule_removes_an_outlier_that_ruins_max():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(size=50_000), [400.0]])
    hist = Histogram.of(x)
    lo, hi = percentile_then_mse_range(hist, 99.9, bits=8, symmetric=False, signed=False)
    assert hi[0] < 5.0
    err_sq = data_mse(x[:-1], lo, hi, 8, False, False)
    err_max = data_mse(x[:-1], *max_range(hist), 8, False, False)
    assert err_sq < err_max / 100


def test_rules_are_deterministic():
    x = np.random.default_rng(3).laplace(size=10_000)
    rule = RangeRule("percentile_then_mse", percentile=99.8)
    a = compute_range(Histogram.of(x), rule, bits=6, symmetric=False, signed=False)
    b = compute_range(Histogram.of(x.copy()), rule, bits=6, symmetric=False, signed=False)
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()


def test_per_channel_ranges_are_per_row():
    w = np.stack([np.linspace(-1, 1, 100), np.linspace(-10, 10, 100)])
    lo, hi = compute_range(Histogram.of(w, channel_axis=0), RangeRule("max"), bits=8, symmetric=True, signed=True)
    np.testing.assert_array_equal(hi, [1.0, 10.0])
    np.testing.assert_array_equal(lo, [-1.0, -10.0])


def test_empty_statistics_raise_naming_the_layer():
    with pytest.raises(RuntimeError, match="conv_layers.2.*no calibration data"):
        compute_range(Histogram.empty(), RangeRule("max"), bits=8, symmetric=False, signed=False,
                      name="conv_layers.2")


@pytest.mark.parametrize("p", [0, -1, 100.01, 150, float("nan"), "99"])
def test_invalid_percentile_is_rejected(p):
    with pytest.raises(ValueError, match=r"percentile must be in \(0, 100\]"):
        RangeRule("percentile", percentile=p)


def test_unknown_rule_and_dict_round_trip():
    with pytest.raises(ValueError, match="unknown range rule 'kl'"):
        RangeRule("kl")
    rule = RangeRule("percentile", percentile=99.8, mse_grid=50)
    assert RangeRule.from_dict(rule.to_dict()) == rule
    with pytest.raises(ValueError, match="unknown RangeRule key"):
        RangeRule.from_dict({"method": "max", "pct": 3})


@pytest.mark.parametrize("kind", ["gauss", "outliers", "gelu", "laplace"])
def test_l2_histogram_range_aims_where_torchaos_histogram_observer_does(kind):
    torch = pytest.importorskip("torch")
    from torchao.quantization.pt2e import HistogramObserver

    from sq_plugin.core.ranges import l2_histogram_range, quantization_mse

    rng = np.random.default_rng(0)
    observer = HistogramObserver(dtype=torch.quint8, quant_min=0, quant_max=255)
    hist = Histogram.empty()
    for _ in range(20):
        x = rng.laplace(size=4000) if kind == "laplace" else rng.standard_normal(4000)
        if kind == "outliers":
            x[:3] *= 15
        if kind == "gelu":
            x = x * 0.5 * (1 + np.tanh(0.79788456 * (x + 0.044715 * x**3)))
        batch = torch.from_numpy(x.astype(np.float32))
        observer(batch)
        hist.update(batch)
    lo, hi = l2_histogram_range(hist, bits=8, symmetric=False, signed=False)
    theirs = [float(v) for v in observer._non_linear_param_search()]
    # The same criterion, searched over the whole trimming path instead of up to the first rise: an error no
    # larger than the built-in's own range (nor MAX's), with ends within 15 % of its (measured: 0-14 %).
    args = dict(bits=8, symmetric=False, signed=False)
    ours = quantization_mse(hist, lo, hi, **args)[0]
    assert ours <= quantization_mse(hist, np.array(theirs[:1]), np.array(theirs[1:]), **args)[0]
    assert ours <= quantization_mse(hist, hist.min_val, hist.max_val, **args)[0]
    assert lo[0] == pytest.approx(theirs[0], rel=0.15) and hi[0] == pytest.approx(theirs[1], rel=0.15)
    assert hist.min_val[0] <= lo[0] < hi[0] <= hist.max_val[0]


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_l2_histogram_range_is_the_step_by_step_minimum_of_its_trimming_path(bits):
    # The path is scored in one vectorized pass; this is its definition, one range at a time (ties: the wider).
    from sq_plugin.core.ranges import l2_histogram_range, quantization_mse

    rng = np.random.default_rng(bits)
    hist = Histogram.empty(rows=2)
    x = np.stack([rng.laplace(size=20000), np.abs(rng.standard_normal(20000)) ** 3])
    x[0, :5] *= 40
    hist.update(x, channel_axis=0)
    args = dict(bits=bits, symmetric=False, signed=False)
    lo, hi = hist.min_val.astype(np.float64).copy(), hist.max_val.astype(np.float64).copy()
    half = hist.bins // 2
    for r in range(hist.rows):
        counts, width = hist.counts[r], hist.bin_width[r]
        nonzero = np.flatnonzero(counts)
        start, end, below, above = int(nonzero[0]), int(nonzero[-1]), 0, 0
        a, b = float(lo[r]), float(hi[r])

        def error(a, b, r=r):
            row_lo, row_hi = lo.copy(), hi.copy()
            row_lo[r], row_hi[r] = a, b
            return float(quantization_mse(hist, row_lo, row_hi, **args)[r])

        best, best_range = error(a, b), (a, b)
        while start < end:
            if below + counts[start] < above + counts[end]:
                below, start = below + counts[start], start + 1
            else:
                above, end = above + counts[end], end - 1
            a, b = max(a, (start - half) * width), min(b, (end - half + 1) * width)
            if error(a, b) < best:
                best, best_range = error(a, b), (a, b)
        lo[r], hi[r] = best_range
    got_lo, got_hi = l2_histogram_range(hist, **args)
    assert got_lo.tolist() == lo.tolist() and got_hi.tolist() == hi.tolist()  # bit for bit
    assert (got_hi < hist.max_val).any()  # and it did trim somewhere
