"""CUDA INT8 path: padding arithmetic, per-layer plan and torchao config on CPU; execution only with a GPU."""

import copy

import pytest
import torch
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

from sq_plugin.backends.cuda import (
    PADDING_STATS,
    ActRange,
    act_scale,
    activation_ranges,
    cuda_int8_config,
    format_plan,
    install_int_mm_padding,
    int_mm_padded,
    int_mm_padding,
    plan_layers,
    quantize_cuda_int8,
    uninstall_int_mm_padding,
)
from sq_plugin.backends.pt2e import calibrate, prepare_stablequant, strip_weight_norm
from sq_plugin.backends.x86_isa import x86_policy

cuda = pytest.mark.cuda
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def int8(shape: tuple[int, int], seed: int, device: str = "cpu", *, limit: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-limit, limit, shape, generator=g, dtype=torch.int8).to(device)


# CPU `torch._int_mm` runs oneDNN, which without VNNI sums u8 x s8 pairs in int16: right operands on
# the full int8 range saturate there (measured: every shape wrong under ONEDNN_MAX_CPU_ISA=AVX2), within
# [-64, 63] never (2 * 255 * 64 < 32767). The padding arithmetic is what these tests check.
CPU_RIGHT_LIMIT = 128 if x86_policy().int32_accumulation else 64


# (M, K, N): M <= 16, K or N not a multiple of 8, all at once, and a shape that needs nothing.
SHAPES = [(1, 16, 8), (16, 64, 32), (5, 12, 8), (32, 64, 30), (3, 7, 5), (49, 192, 32), (17, 8, 8)]


@pytest.mark.parametrize(("m", "k", "n"), SHAPES)
def test_int_mm_padded_equals_int32_matmul_exactly(m, k, n):
    a, b = int8((m, k), 0), int8((k, n), 1, limit=CPU_RIGHT_LIMIT)
    out = int_mm_padded(a, b)
    assert out.dtype == torch.int32 and out.shape == (m, n)
    assert torch.equal(out, a.to(torch.int32) @ b.to(torch.int32))


def test_padding_amounts_meet_the_int_mm_constraints():
    for m, k, n in SHAPES:
        pm, pk, pn = int_mm_padding(m, k, n)
        assert m + pm > 16 and (k + pk) % 8 == 0 and (n + pn) % 8 == 0
        assert pm < 17 and pk < 8 and pn < 8
    assert int_mm_padding(17, 8, 8) == (0, 0, 0)


def test_padding_is_counted_never_silent():
    PADDING_STATS.reset()
    int_mm_padded(int8((3, 12), 0), int8((12, 8), 1))
    int_mm_padded(int8((32, 16), 0), int8((16, 8), 1))
    assert (PADDING_STATS.calls, PADDING_STATS.padded_m, PADDING_STATS.padded_k, PADDING_STATS.padded_n) == (2, 1, 1, 0)


def test_int_mm_padded_rejects_bad_operands():
    with pytest.raises(ValueError, match="2-D int8"):
        int_mm_padded(torch.zeros(2, 8), int8((8, 8), 0))
    with pytest.raises(ValueError, match="inner dimensions differ"):
        int_mm_padded(int8((2, 8), 0), int8((16, 8), 0))


def test_act_scale_is_symmetric_and_shaped_for_the_input_rank():
    s = act_scale(ActRange(-0.5, 2.54, ndim=3))
    assert s.shape == (1, 1, 1)  # Int8Tensor.from_hp asserts scale.ndim == input.ndim
    assert float(s) == pytest.approx(2.54 / 127)
    with pytest.raises(ValueError, match="empty"):
        act_scale(ActRange(0.0, 0.0))


class _Odd(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(16, 32)  # fine
        self.b = torch.nn.Linear(32, 30)  # N not a multiple of 8
        self.c = torch.nn.Linear(30, 8)  # K not a multiple of 8
        self.d = torch.nn.Linear(8, 8)  # no range: stays float

    def forward(self, x):
        return self.d(self.c(self.b(self.a(x))))


def test_plan_reports_the_path_of_every_linear():
    ranges = {n: ActRange(-1.0, 1.0) for n in ("a", "b", "c")}
    plans = {p.name: p for p in plan_layers(_Odd(), ranges)}
    assert {n: p.path for n, p in plans.items()} == {"a": "int_mm", "b": "int_mm_padded", "c": "int_mm_padded",
                                                    "d": "float"}
    assert "N=30 -> 32" in plans["b"].reason and "K=30 -> 32" in plans["c"].reason
    assert "no calibrated input range" in plans["d"].reason
    unpadded = {p.name: p.path for p in plan_layers(_Odd(), ranges, pad=False)}
    assert unpadded == {"a": "int_mm", "b": "float", "c": "float", "d": "float"}
    table = format_plan(list(plans.values()))
    assert "totals: float=1, int_mm=1, int_mm_padded=2" in table


def test_config_has_one_static_int8_config_per_int8_layer():
    from torchao.quantization import Int8StaticActivationInt8WeightConfig, PerRow, PerTensor

    ranges = {n: ActRange(-1.0, 2.0) for n in ("a", "b", "c")}
    config = cuda_int8_config(plan_layers(_Odd(), ranges), ranges)
    assert list(config.fqn_to_config) == ["a", "b", "c"]
    for c in config.fqn_to_config.values():
        assert isinstance(c, Int8StaticActivationInt8WeightConfig)
        assert c.granularity == [PerTensor(), PerRow()]
        assert float(c.act_quant_scale) == pytest.approx(2.0 / 127)
        assert not c.set_inductor_config  # no global Inductor changes behind the caller's back


@pytest.mark.skipif(not x86_policy().int32_accumulation, reason="CPU torch._int_mm saturates without VNNI; the "
                    "padding tests above cover this CPU, the CUDA numerics run on VNNI/AMX CPUs")
def test_stablequant_ranges_drive_torchao_int8_linears_on_cpu(tiny_wav2vec2):
    """The same config runs on CPU (torchao's CPU path also calls torch._int_mm): checks names, scale
    shapes and accuracy without a GPU."""
    from torchao.quantization import Int8Tensor

    model = strip_weight_norm(tiny_wav2vec2)
    x = torch.randn(1, 16000, generator=torch.Generator().manual_seed(0)) * 0.1
    prepared = prepare_stablequant(copy.deepcopy(model), (x,))
    calibrate(prepared, [x])
    ranges = activation_ranges(convert_pt2e(prepared))
    assert len(ranges) == 14 and all(r.ndim == 3 for r in ranges.values())
    quantized = copy.deepcopy(model)
    plans = quantize_cuda_int8(quantized, ranges)
    try:
        assert [p.path for p in plans] == ["int_mm"] * 14
        assert isinstance(quantized.lm_head.weight, Int8Tensor)
        with torch.no_grad():
            ref, out = model(x).logits, quantized(x).logits
        assert float((out - ref).norm() / ref.norm()) < 0.1
    finally:
        uninstall_int_mm_padding()


def test_activation_ranges_from_artifact_metadata(tiny_hubert, tmp_path):
    from sq_plugin.backends.artifact import load, save

    model = strip_weight_norm(tiny_hubert)
    x = torch.randn(1, 8000, generator=torch.Generator().manual_seed(0)) * 0.1
    prepared = prepare_stablequant(model, (x,))
    calibrate(prepared, [x])
    converted = convert_pt2e(prepared)
    _, meta = load(save(converted, tmp_path / "h.sqa", example_inputs=(x,), metadata={"model": "h"}))
    assert activation_ranges(meta["layers"]) == activation_ranges(converted)


# ---- CUDA only (untested on the development machine: no GPU) ----


@cuda
@needs_gpu
@pytest.mark.parametrize(("m", "k", "n"), SHAPES)
def test_int_mm_padded_on_cuda(m, k, n):
    a, b = int8((m, k), 0, "cuda"), int8((k, n), 1, "cuda")
    assert torch.equal(int_mm_padded(a, b).cpu(), a.cpu().to(torch.int32) @ b.cpu().to(torch.int32))


@cuda
@needs_gpu
def test_quantized_model_runs_int_mm_on_cuda(tiny_wav2vec2):
    model = strip_weight_norm(tiny_wav2vec2)
    x = torch.randn(1, 16000, generator=torch.Generator().manual_seed(0)) * 0.1
    prepared = prepare_stablequant(copy.deepcopy(model), (x,))
    calibrate(prepared, [x])
    quantized = copy.deepcopy(model)
    install_int_mm_padding()
    try:
        quantize_cuda_int8(quantized, activation_ranges(convert_pt2e(prepared)))
        quantized.cuda()
        PADDING_STATS.reset()
        with torch.no_grad():
            out = quantized(x.cuda()).logits.cpu()
            ref = model(x).logits
        assert PADDING_STATS.calls == 14  # every linear went through int_mm_padded on the GPU
        assert float((out - ref).norm() / ref.norm()) < 0.1
        with torch.no_grad():  # 0.2 s of audio: M = 9 frames <= 16, padded instead of an fp32 fallback
            quantized(x[:, :3200].cuda())
        assert PADDING_STATS.padded_m >= 14
    finally:
        uninstall_int_mm_padding()
