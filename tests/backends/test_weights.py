"""Weights on their integer grid: codes on the grid, dequantize = codes * scale, MSE clipping, sizes, errors."""

import pytest
import torch

from sq_plugin.backends.weights import StoredWeight, codes_for, quantize_weight


def weight(shape=(6, 40), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g)
    w[0] *= 10.0  # channels of very different range: per-channel scales matter
    w.view(shape[0], -1)[1, 1] = 25.0  # one outlier in channel 1
    return w


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("rule", ["max", "mse"])
def test_codes_lie_on_the_grid(bits, rule):
    stored = quantize_weight(weight(), bits, rule=rule)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    assert stored.codes.dtype == torch.int8
    assert stored.codes.shape == (6, 40)
    assert stored.scale.dtype == torch.float32 and stored.scale.shape == (6,)
    assert int(stored.codes.min()) >= qmin and int(stored.codes.max()) <= qmax
    assert stored.bits == bits
    if rule == "max":
        # MAX scales each channel to its max |w|: that value lands on the grid's edge (symmetric: qmax + 0.5 steps)
        amax = weight().abs().amax(dim=1)
        torch.testing.assert_close(stored.scale, amax / ((qmax - qmin) / 2.0))


def test_dequantize_is_codes_times_scale():
    stored = quantize_weight(weight(), 4, rule="mse")
    expected = stored.codes.float() * stored.scale[:, None]
    assert torch.equal(stored.dequantize(), expected)
    assert stored.dequantize().dtype == torch.float32
    # the codes are the weight rounded with these scales
    assert torch.equal(codes_for(weight(), stored.scale, 4), stored.codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_mse_error_is_no_larger_than_max_per_channel(bits):
    w = weight(seed=bits)
    errs = {rule: ((quantize_weight(w, bits, rule=rule).dequantize() - w) ** 2).sum(dim=1) for rule in ("max", "mse")}
    assert torch.all(errs["mse"] <= errs["max"] * (1 + 1e-6) + 1e-12)
    if bits == 2:
        # on the Gaussian channels (2..5) clipping must help at 2 bits, not just tie
        assert torch.all(errs["mse"][2:] < 0.9 * errs["max"][2:])


@pytest.mark.parametrize("bits,shape", [(4, (6, 40)), (3, (5, 7)), (2, (3, 3)), (8, (4, 9)), (5, (8, 2, 3))])
def test_nbytes_is_packed_codes_plus_four_bytes_per_channel(bits, shape):
    stored = quantize_weight(weight(shape), bits, rule="max")
    n = shape[0]
    count = 1
    for s in shape:
        count *= s
    assert stored.nbytes == (count * bits + 7) // 8 + 4 * n


def test_four_bit_conv_weight_with_three_dims():
    w = weight((8, 4, 5), seed=3)  # Conv1d(4, 8, kernel_size=5).weight
    stored = quantize_weight(w, 4, rule="mse")
    assert stored.codes.shape == (8, 4, 5)
    assert stored.scale.shape == (8,)
    assert torch.equal(stored.dequantize(), stored.codes.float() * stored.scale[:, None, None])
    assert stored.nbytes == 8 * 4 * 5 // 2 + 4 * 8
    assert int(stored.codes.min()) >= -8 and int(stored.codes.max()) <= 7
    # every output channel has its own scale: the loud channels 0 and 1 get far larger ones than the rest
    assert float(stored.scale[2:].max()) < 0.5 * float(stored.scale[:2].min())


def test_bad_rule_bits_and_shapes_raise():
    with pytest.raises(ValueError, match="unknown weight rule 'percentile'; use one of max, mse"):
        quantize_weight(weight(), 4, rule="percentile")
    for bits in (1, 9, 4.0, True):
        with pytest.raises(ValueError, match="bits must be an integer from 2 to 8"):
            quantize_weight(weight(), bits)
    codes = torch.zeros(6, 40, dtype=torch.int8)
    with pytest.raises(ValueError, match="one entry per output channel \\(6\\)"):
        StoredWeight(codes, torch.ones(5), 4)
    with pytest.raises(ValueError, match="one entry per output channel"):
        StoredWeight(codes, torch.ones(6, 1), 4)
    with pytest.raises(ValueError, match="codes must be int8"):
        StoredWeight(codes.to(torch.int32), torch.ones(6), 4)
    with pytest.raises(ValueError, match="do not fit the 3-bit grid -4..3"):
        StoredWeight(codes + 4, torch.ones(6), 3)
    with pytest.raises(ValueError, match="bits must be an integer from 2 to 8"):
        StoredWeight(codes, torch.ones(6), 9)
