"""INT8 attention (sq_plugin.backends.int8_attention): Q·Kᵀ and P·V on torch._int_mm, as a lower_x86 option."""

import pytest
import torch
import torch.nn.functional as F
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

from sq_plugin.backends.int8_attention import int8_sdpa, use_int8_attention
from sq_plugin.backends.pt2e import calibrate, lower_x86, prepare_stablequant
from sq_plugin.backends.x86_isa import IsaError, x86_policy

# Without VNNI oneDNN's s8 x s8 GEMM saturates (x86_isa.INT_MM_SATURATES): the numbers are only checked where
# it is exact; the refusal is checked on every CPU (the policy follows ONEDNN_MAX_CPU_ISA in this process).
needs_int32_accumulation = pytest.mark.skipif(not x86_policy().int32_accumulation,
                                              reason="torch._int_mm saturates on this CPU (no VNNI)")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def qkv(batch: int = 2, heads: int = 3, frames: int = 50, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, frames, dim, generator=g) for _ in range(3))
    return 2.0 * q, 2.0 * k, v  # peaked enough that attention is not uniform


@needs_int32_accumulation
def test_int8_sdpa_follows_float_attention_with_and_without_masks():
    q, k, v = qkv()
    want = F.scaled_dot_product_attention(q, k, v)
    assert rel_err(int8_sdpa(q, k, v), want) < 0.03
    assert rel_err(int8_sdpa(q, k, v, scale=0.1), F.scaled_dot_product_attention(q, k, v, scale=0.1)) < 0.03
    keep = torch.ones(2, 1, 1, 50, dtype=torch.bool)
    keep[1, :, :, 30:] = False  # the second utterance is 30 frames long, padded to 50
    got = int8_sdpa(q, k, v, attn_mask=keep)
    assert rel_err(got, F.scaled_dot_product_attention(q, k, v, attn_mask=keep)) < 0.03
    # the padding gets no weight: the second row equals attention over its first 30 frames alone
    alone = F.scaled_dot_product_attention(q[1:, :, :, :], k[1:, :, :30], v[1:, :, :30])
    assert rel_err(got[1:], alone) < 0.03
    additive = torch.zeros(2, 1, 1, 50).masked_fill(~keep, float("-inf"))
    assert torch.equal(int8_sdpa(q, k, v, attn_mask=additive), got)


@needs_int32_accumulation
def test_per_row_softmax_scales_are_what_keeps_diffuse_attention_accurate():
    """Over many frames attention weights are small (here ~1/400); one scale for all of P rounds most to 0."""
    q, k, v = qkv(batch=1, heads=2, frames=400, dim=16)
    q, k = q / 4, k / 4  # diffuse
    want = F.scaled_dot_product_attention(q, k, v)
    p = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)
    one_scale = torch.round(p / (1 / 127)).clamp(0, 127) * (1 / 127) @ v
    assert rel_err(one_scale, want) > 0.3
    assert rel_err(int8_sdpa(q, k, v), want) < 0.05


def test_training_only_arguments_are_refused():
    q, k, v = qkv(batch=1, heads=1, frames=20)
    for kwargs in ({"dropout_p": 0.1}, {"is_causal": True}, {"enable_gqa": True}):
        with pytest.raises(ValueError, match="inference attention only.*int8_attention=False"):
            int8_sdpa(q, k, v, **kwargs)


def test_a_graph_without_sdpa_is_refused():
    graph = torch.fx.symbolic_trace(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no scaled_dot_product_attention.*attn_implementation='sdpa'"):
        use_int8_attention(graph)


def _converted(model):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16000, generator=g) * 0.1
    prepared = prepare_stablequant(model, (x,))
    calibrate(prepared, [torch.randn(1, 12000 + 2000 * i, generator=g) * 0.1 for i in range(3)])
    return convert_pt2e(prepared), x


@needs_int32_accumulation
def test_lower_x86_runs_every_attention_block_on_int8_gemms(tiny_wav2vec2):
    converted, x = _converted(tiny_wav2vec2)
    plain, plain_report = lower_x86(converted, (x,))
    int8, report = lower_x86(converted, (x,), int8_attention=True)
    assert report.int8_attention == len(tiny_wav2vec2.wav2vec2.encoder.layers) == 2
    assert report.backend.endswith(", INT8 attention in 2 blocks)") and plain_report.int8_attention == 0
    assert (report.qlinear, report.qconv) == (plain_report.qlinear, plain_report.qconv)
    with torch.no_grad():
        fake_quant, got, without = converted(x).logits, int8(x).logits, plain(x).logits
    # the rewrite is on a second graph over the same weights: the converted graph still has float attention
    assert any(n.target == torch.ops.aten.scaled_dot_product_attention.default for n in converted.graph.nodes)
    assert not torch.equal(got, without)  # attention really runs otherwise
    assert rel_err(got, fake_quant) < 0.05 and max(int8.errors.values()) < 0.05
    # the profiler sees the INT8 GEMMs: 2 per (batch, head) per block
    with torch.profiler.profile() as prof, torch.no_grad():
        int8(x)
    heads = tiny_wav2vec2.config.num_attention_heads
    assert sum(e.name == "aten::_int_mm" for e in prof.events()) == 2 * 2 * heads


def test_lower_x86_refuses_int8_attention_without_vnni(tiny_wav2vec2, monkeypatch):
    converted, x = _converted(tiny_wav2vec2)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # the policy of a CPU without VNNI
    with pytest.raises(IsaError, match="int8_attention.*saturates.*avx2.*leave int8_attention off"):
        lower_x86(converted, (x,), int8_attention=True)
