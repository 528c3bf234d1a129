"""INT8 attention on x86: Q·Kᵀ and P·V as `torch._int_mm` (oneDNN s8 x s8 -> s32 GEMMs), an option of the x86 backend.

The x86 quantizer quantizes the Linear/Conv layers only; attention's two matmuls stay float (`aten.scaled_dot_
product_attention`). Inductor has no activation x activation INT8 lowering and torchao's INT8 SDPA has no CPU kernel
in the x86 wheel (../shared/reference/turn2-facts.md §2), so `use_int8_attention` rewrites each SDPA node of a
converted graph into `int8_sdpa`, which Inductor then compiles around the GEMMs (it fuses the float glue: scaling,
softmax, quantization):

    Q, K, V   quantized per tensor to int8 with a scale read at run time (max |x| / 127: three reductions of
              T x d, cheap next to the T x T work, and no calibration to go stale);
    Q·Kᵀ      one `_int_mm` per (batch, head) -> int32, dequantized, + the attention mask, softmax;
    P·V       P quantized with one scale per row (the row's max / 127), which the GEMM undoes exactly (a row scale
              multiplies that output row). One scale for all of P, as a calibrated range would give, is wrong
              here: attention over 500 frames is diffuse (median weight 0.0016), below one step of a tensor-wide
              grid: on the references' real activations the output error is 12-13 % against 1.0-1.4 % per
              row (`benchmarks/int8_attention.py`).

`_int_mm` is exact only where oneDNN sums int8 products in int32 (VNNI, AMX); without VNNI it saturates, so the
option is refused there (`x86_isa.INT_MM_SATURATES`).
"""

from __future__ import annotations

import torch

INT8_MAX = 127.0


def _quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round(x / scale), -INT8_MAX, INT8_MAX).to(torch.int8)


def _tensor_scale(x: torch.Tensor) -> torch.Tensor:
    return x.abs().amax().clamp_min(1e-12) / INT8_MAX


def int8_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
              dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
              enable_gqa: bool = False) -> torch.Tensor:
    """`scaled_dot_product_attention` of (batch, heads, T, d) float tensors with Q·Kᵀ and P·V on INT8 GEMMs (see
    the module docstring). attn_mask: additive (float) or boolean (True = attend), broadcastable to
    (batch, heads, T, S); no dropout, no causal mask, no grouped-query attention (inference on encoders)."""
    if dropout_p != 0.0 or is_causal or enable_gqa:
        raise ValueError(f"int8_sdpa runs inference attention only: dropout_p=0, is_causal=False, enable_gqa=False "
                         f"(got dropout_p={dropout_p}, is_causal={is_causal}, enable_gqa={enable_gqa}); put the "
                         "model in eval mode, or keep this graph's attention float (int8_attention=False)")
    batch, heads, frames, dim = query.shape
    scale = dim ** -0.5 if scale is None else scale
    scale_q, scale_k, scale_v = _tensor_scale(query), _tensor_scale(key), _tensor_scale(value)
    q8, v8 = _quantize(query, scale_q), _quantize(value, scale_v)
    kt8 = _quantize(key, scale_k).transpose(-1, -2).contiguous()
    score_scale = scale_q * scale_k * scale
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype).masked_fill(~attn_mask, float("-inf"))
        attn_mask = attn_mask.expand(batch, heads, frames, key.shape[-2])
    rows = []
    for b in range(batch):
        for h in range(heads):
            scores = torch._int_mm(q8[b, h], kt8[b, h]).to(query.dtype) * score_scale
            if attn_mask is not None:
                scores = scores + attn_mask[b, h]
            p = torch.softmax(scores, dim=-1)
            p_scale = p.amax(dim=-1, keepdim=True).clamp_min(1e-12) / INT8_MAX
            rows.append(torch._int_mm(_quantize(p, p_scale), v8[b, h]).to(query.dtype) * (p_scale * scale_v))
    return torch.stack(rows).view(batch, heads, frames, value.shape[-1])


def use_int8_attention(graph: torch.fx.GraphModule) -> int:
    """Rewrite every `aten.scaled_dot_product_attention` node of `graph` into `int8_sdpa` (same arguments), in
    place; returns how many. Raises if there is none (the model's attention is not SDPA: load it with
    attn_implementation="sdpa"), rather than leave the caller believing attention runs in INT8."""
    sdpa = torch.ops.aten.scaled_dot_product_attention.default
    nodes = [n for n in graph.graph.nodes if n.op == "call_function" and n.target == sdpa]
    if not nodes:
        raise ValueError("int8_attention: the graph has no scaled_dot_product_attention node to run in INT8. "
                         "Fix: load the model with attn_implementation='sdpa' (transformers' default), or leave "
                         "int8_attention off")
    for node in nodes:
        node.target = int8_sdpa
    graph.recompile()
    return len(nodes)
