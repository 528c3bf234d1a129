import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from sq_plugin.core.stats import Histogram

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False, width=64)


@settings(max_examples=60, deadline=None)
@given(a=arrays(np.float64, st.integers(1, 300), elements=finite),
       b=arrays(np.float64, st.integers(1, 300), elements=finite),
       bins=st.sampled_from([8, 64, 2048]))
def test_merge_is_exact(a, b, bins):
    together = Histogram.of(np.concatenate([a, b]), bins=bins)
    merged = Histogram.of(a, bins=bins).merge(Histogram.of(b, bins=bins))
    np.testing.assert_array_equal(merged.counts, together.counts)
    np.testing.assert_array_equal(merged.exponents, together.exponents)
    assert merged.min_val[0] == together.min_val[0] and merged.max_val[0] == together.max_val[0]
    assert merged.count[0] == a.size + b.size == merged.counts.sum()


@settings(max_examples=30, deadline=None)
@given(chunks=st.lists(arrays(np.float64, st.integers(1, 100), elements=finite), min_size=1, max_size=6))
def test_streaming_updates_equal_one_shot(chunks):
    streamed = Histogram.empty(bins=256)
    for chunk in chunks:
        streamed.update(chunk)
    one_shot = Histogram.of(np.concatenate(chunks), bins=256)
    np.testing.assert_array_equal(streamed.counts, one_shot.counts)


def test_range_is_smallest_power_of_two_above_absmax():
    h = Histogram.of(np.array([-3.0, 0.5, 4.0]), bins=8)
    assert h.exponents[0] == 3  # 2**3 = 8 > 4 (4 itself needs a range strictly above it)
    assert h.bin_width[0] == 2.0
    # bins cover [-8, 8) in steps of 2: -3 -> [-4,-2) = bin 2, 0.5 -> bin 4, 4.0 -> bin 6
    np.testing.assert_array_equal(h.counts[0], [0, 0, 1, 0, 1, 0, 1, 0])


def test_per_channel_rows_are_independent():
    w = torch.tensor([[1.0, -1.0, 0.5], [100.0, 3.0, -50.0]])
    h = Histogram.of(w, channel_axis=0, bins=64)
    assert h.rows == 2
    np.testing.assert_array_equal(h.max_val, [1.0, 100.0])
    np.testing.assert_array_equal(h.min_val, [-1.0, -50.0])
    assert h.exponents.tolist() == [1, 7]
    np.testing.assert_array_equal(h.counts.sum(axis=1), [3, 3])


def test_abs_counts_fold_both_signs():
    h = Histogram.of(np.array([-0.7, 0.7, 0.1, -0.1]), bins=8)  # R = 1, w = 0.25
    np.testing.assert_array_equal(h.abs_counts()[0], [2, 0, 2, 0])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_rejected_with_the_layer_name(bad):
    h = Histogram.empty()
    with pytest.raises(ValueError, match=r"encoder\.layers\.3\.fc1.*NaN/Inf"):
        h.update(np.array([1.0, bad]), name="encoder.layers.3.fc1")


def test_bins_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        Histogram.empty(bins=1000)


def test_merge_rejects_other_shapes():
    with pytest.raises(ValueError, match="cannot merge"):
        Histogram.empty(bins=64).merge(Histogram.empty(bins=128))


def test_moving_average_min_max_is_torchaos_observer_statistic():
    torch = pytest.importorskip("torch")
    from torchao.quantization.pt2e import MovingAverageMinMaxObserver

    from sq_plugin.core.stats import MovingAverageMinMax

    observer = MovingAverageMinMaxObserver(dtype=torch.quint8, quant_min=0, quant_max=255)
    ours = MovingAverageMinMax()
    with pytest.raises(RuntimeError, match="enc.fc: no calibration data was observed"):
        ours.range(name="enc.fc")
    gen = torch.Generator().manual_seed(0)
    for i in range(50):
        batch = torch.randn(300, generator=gen) * (1 + (i % 7 == 0) * 5)
        observer(batch)
        ours.update(batch)
    lo, hi = ours.range()
    assert ours.batches == 50 and lo == pytest.approx(float(observer.min_val), rel=1e-5)
    assert hi == pytest.approx(float(observer.max_val), rel=1e-5)
    with pytest.raises(ValueError, match="enc.fc: NaN/Inf"):
        ours.update(torch.tensor([1.0, float("nan")]), name="enc.fc")
