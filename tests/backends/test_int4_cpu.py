"""Stored 4-bit codes on torch's x86 int4 kernel (tinygemm), bf16 activations."""

import copy

import pytest
import torch

from sq_plugin.backends.int4_cpu import Int4KernelLinear, apply_int4_kernel, group_size_for, int4_tensor
from sq_plugin.backends.weights import StoredWeight, quantize_weight


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_the_kernel_computes_with_exactly_the_stored_codes():
    torch.manual_seed(0)
    linear = torch.nn.Linear(384, 256)
    stored = quantize_weight(linear.weight, 4)
    x = torch.randn(8, 384)
    kernel = Int4KernelLinear(linear, stored, group_size_for(384))
    assert isinstance(kernel.weight.data, torch.Tensor) and type(kernel.weight.data).__name__ == "Int4OpaqueTensor"
    y = kernel(x)
    assert y.dtype == torch.float32
    # the reference: the same codes, the scales as the kernel holds them (bf16), bf16 activations
    weight = stored.codes.float() * stored.scale.to(torch.bfloat16).float()[:, None]
    reference = torch.nn.functional.linear(x.to(torch.bfloat16).float(), weight, linear.bias.to(torch.bfloat16).float())
    assert rel(y, reference) < 0.01  # bf16 output rounding
    off_by_one = StoredWeight(torch.clamp(stored.codes.to(torch.int16) + 1, -8, 7).to(torch.int8), stored.scale, 4)
    wrong = torch.nn.functional.linear(x, off_by_one.dequantize(), linear.bias)
    assert rel(y, wrong) > 5 * rel(y, reference)


def test_a_model_runs_its_4_bit_linears_on_the_kernel_and_says_what_does_not():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 96),
                                torch.nn.GELU(), torch.nn.Linear(96, 40), torch.nn.GELU(), torch.nn.Linear(40, 8))
    widths = {"0": 4, "2": 6, "4": 4, "6": 4}
    weights = {n: quantize_weight(dict(model.named_modules())[n].weight, b) for n, b in widths.items()}
    reference = copy.deepcopy(model)
    for name, stored in weights.items():
        dict(reference.named_modules())[name].weight.data = stored.dequantize()
    run = copy.deepcopy(model)
    report = apply_int4_kernel(run, weights)
    assert report.int4_layers == ["0"]
    assert set(report.other_layers) == {"2", "4", "6"}
    assert "6-bit weights" in report.other_layers["2"]
    assert "output width 40 is not a multiple of 16" in report.other_layers["4"]
    assert "input width 40 is not a multiple of 32" in report.other_layers["6"]
    assert "1 Linear(s), 3 stored layer(s) dequantized to float" in report.backend
    assert isinstance(run[0], Int4KernelLinear) and isinstance(run[2], torch.nn.Linear)
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert rel(run(x), reference(x)) < 0.02


def test_refusals():
    stored = quantize_weight(torch.randn(16, 64), 6)
    with pytest.raises(ValueError, match="takes 4-bit weights"):
        int4_tensor(stored, 64)
    with pytest.raises(ValueError, match="not a multiple of the group size"):
        int4_tensor(quantize_weight(torch.randn(16, 48), 4), 32)
    with pytest.raises(ValueError, match="output width 24 is not a multiple of 16"):
        int4_tensor(quantize_weight(torch.randn(24, 64), 4), 64)
    with pytest.raises(ValueError, match="stored weight of shape"):
        apply_int4_kernel(torch.nn.Sequential(torch.nn.Linear(32, 8)), {"0": quantize_weight(torch.randn(8, 64), 4)})
    assert group_size_for(192) == 64 and group_size_for(1536) == 128 and group_size_for(40) is None
