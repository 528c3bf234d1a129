import numpy as np
import pytest
import torch

from sq_plugin.core.quant import fake_quantize, qparams_from_range, quant_bounds


@pytest.mark.parametrize(("bits", "signed", "expected"), [
    (8, True, (-128, 127)), (8, False, (0, 255)), (6, True, (-32, 31)), (4, False, (0, 15)), (2, True, (-2, 1)),
])
def test_quant_bounds(bits, signed, expected):
    assert quant_bounds(bits, signed=signed) == expected


@pytest.mark.parametrize("bits", [1, 9, 16, 8.0, True, "8"])
def test_invalid_bits_are_rejected(bits):
    with pytest.raises(ValueError, match="bits must be an integer from 2 to 8"):
        quant_bounds(bits, signed=True)


def test_asymmetric_qparams_match_the_torchao_convention():
    scale, zp = qparams_from_range(-1.0, 3.0, 0, 255, symmetric=False)
    assert scale == pytest.approx(4.0 / 255)
    assert zp == round(1.0 / (4.0 / 255))  # 64: -1.0 maps to integer 0


def test_symmetric_qparams_and_zero_range_never_give_zero_scale():
    scale, zp = qparams_from_range(np.array([-2.0, 0.0]), np.array([1.0, 0.0]), -128, 127, symmetric=True)
    assert scale[0] == pytest.approx(2.0 / 127.5)
    assert scale[1] == 2.0**-12 and np.isfinite(scale).all()
    assert zp.tolist() == [0, 0]


def test_fake_quantize_error_is_at_most_half_a_step_inside_the_range():
    x = torch.linspace(-1.2, 1.2, 1201)  # past both ends, so every level is hit
    scale, zp = qparams_from_range(-1.0, 1.0, -8, 7, symmetric=True)  # 4-bit
    y = fake_quantize(x, float(scale), int(zp), -8, 7)
    inside = x.abs() <= 7 * float(scale)
    assert (y - x)[inside].abs().max() <= float(scale) / 2 + 1e-7
    assert len(torch.unique(y)) == 16


def test_per_channel_fake_quantize_uses_each_channel_scale():
    x = torch.tensor([[0.3, -0.3], [30.0, -30.0]])
    y = fake_quantize(x, torch.tensor([0.1, 10.0]), torch.tensor([0, 0]), -128, 127, axis=0)
    torch.testing.assert_close(y, torch.tensor([[0.3, -0.3], [30.0, -30.0]]))


@pytest.mark.parametrize("axis", [None, 1])
def test_fake_quantize_in_place_path_gives_the_bits_of_the_plain_formula_and_keeps_its_input(axis):
    # Outside autograd the ops run in place on one new tensor (the search's hot path); they must give exactly what the
    # formula gives, leave the input as it was, and the autograd path must give the same bits.
    torch.manual_seed(0)
    x = torch.randn(4, 3, 257) * 3
    scale = torch.tensor([0.05, 0.1, 0.2]).reshape(1, 3, 1) if axis is not None else torch.tensor(0.07)
    zp = torch.tensor([3.0, 10.0, 31.0]).reshape(1, 3, 1) if axis is not None else torch.tensor(29.0)
    expected = (torch.clamp(torch.round(x / scale) + zp, 0, 63) - zp) * scale
    before = x.clone()
    got = fake_quantize(x, scale.flatten() if axis else scale, zp.flatten() if axis else zp, 0, 63, axis=axis)
    assert torch.equal(got, expected)
    assert torch.equal(x, before)
    with_grad = fake_quantize(x.clone().requires_grad_(), scale.flatten() if axis else scale,
                              zp.flatten() if axis else zp, 0, 63, axis=axis)
    assert with_grad.requires_grad and torch.equal(with_grad.detach(), expected)
