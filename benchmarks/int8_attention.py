"""Does INT8 attention pay on x86? Q·Kᵀ and P·V as `torch._int_mm` (oneDNN s8 x s8 -> s32) against float SDPA.

The issue asks for Q·Kᵀ and P·V in INT8 with per-tensor scales for Q, K, V and the softmax output. On x86
`torch._int_mm` is the only activation x activation INT8 GEMM the torch 2.13 wheel has (Inductor lowers
weight GEMMs only, torchao's INT8 SDPA has no CPU kernel in the x86 wheel: ../shared/reference/turn2-facts.md
§2), and it takes 2-D matrices, so each (batch, head) is one call. This script times, per attention block
of each model's shape at 10 s of audio (batch 1, the models' own T, heads and head size):

  * `sdpa fp32`        torch's fused CPU attention (what the INT8 models run today), eager;
  * `int8, P per tensor` quantize Q, K, V (per tensor), Q·Kᵀ by `_int_mm` per head, dequantize, softmax,
                       quantize P with one scale, P·V by `_int_mm` per head, dequantize; `torch.compile`d
                       (Inductor fuses the float glue; the `_int_mm` calls stay extern GEMMs);
  * `int8_sdpa, P per row` the backend's op (`sq_plugin.backends.int8_attention`, what `int8_attention: true`
                       runs): one scale per row of P (its max / 127), exact to undo after P·V, Q/K/V scales at run time;
  * `int8 GEMMs only`  the 2 x heads `_int_mm` calls alone: the floor of this design, whatever the glue;

and its error against float attention on the shipped references' real activations (the first layer's
Q, K, V on a 10 s test clip, MAX ranges): relative L2 error of the attention output.

    python benchmarks/int8_attention.py            # writes results/int8_attention.json and .md
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from common import atomic_write, device_name
from latency import speech_clip, time_fn

from sq_plugin.backends.int8_attention import int8_sdpa

RESULTS = Path(__file__).resolve().parent / "results"
# (name, hidden size, heads, frames): CTC models give 49 frames per second (10 s -> 499); Whisper's encoder
# always sees a 30 s window of 1500 frames.
SHAPES = (
    ("sq/wav2vec2-ref", 192, 4, 499),
    ("sq/hubert-ref", 160, 4, 499),
    ("arch/wav2vec2-base", 768, 12, 499),
    ("arch/hubert-large", 1024, 16, 499),
    ("openai/whisper-tiny.en encoder", 384, 6, 1500),
    ("openai/whisper-base encoder", 512, 8, 1500),
)


def quantize_int8(x: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round(x / scale), -127, 127).to(torch.int8)


def one_scale_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale_p: float) -> torch.Tensor:
    """`int8_sdpa` with one scale for all of P (the softmax output's calibrated max / 127) instead of one per row:
    the alternative the backend rejected, for comparison."""
    batch, heads, frames, dim = q.shape
    sq, sk, sv = (t.abs().max() / 127.0 for t in (q, k, v))
    qi, kt, vi = quantize_int8(q, sq), quantize_int8(k, sk).transpose(-1, -2).contiguous(), quantize_int8(v, sv)
    rows = []
    for b in range(batch):
        for h in range(heads):
            p = torch.softmax(torch._int_mm(qi[b, h], kt[b, h]).float() * (sq * sk / dim ** 0.5), dim=-1)
            rows.append(torch._int_mm(quantize_int8(p, scale_p), vi[b, h]).float() * (scale_p * sv))
    return torch.stack(rows).view(batch, heads, frames, dim)


def gemms_only(qi: torch.Tensor, kt: torch.Tensor, p: torch.Tensor, vi: torch.Tensor) -> None:
    for b in range(qi.shape[0]):
        for h in range(qi.shape[1]):
            torch._int_mm(qi[b, h], kt[b, h])
            torch._int_mm(p[b, h], vi[b, h])


def reference_qkv(model_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first encoder layer's Q, K, V (batch, heads, T, d) of a shipped reference on 10 s of test speech."""
    import numpy as np

    from sq_plugin.speech.models import load_model

    bundle = load_model(model_name)
    audio = speech_clip(10.0)
    x = torch.from_numpy(np.asarray(bundle.processor.feature_extractor(audio, sampling_rate=16000).input_values[0],
                                    dtype=np.float32))[None]
    attn = bundle.model.base_model.encoder.layers[0].attention
    captured: dict[str, torch.Tensor] = {}
    hooks = [getattr(attn, f"{n}_proj").register_forward_hook(
        lambda _m, _i, out, n=n: captured.__setitem__(n, out.detach())) for n in ("q", "k", "v")]
    with torch.no_grad():
        bundle.model(x)
    for hook in hooks:
        hook.remove()
    heads = attn.num_heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2).contiguous()

    return split(captured["q"]), split(captured["k"]), split(captured["v"])


def relative_errors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict[str, float]:
    """Relative L2 error of the attention output against float SDPA: Q, K, V on MAX ranges; P per tensor
    (its max over the clip / 127, as a calibrated range would give), per row, or float."""
    scales = [t.abs().max().item() / 127.0 for t in (q, k, v)]
    with torch.no_grad():
        ref = F.scaled_dot_product_attention(q, k, v)
        qkv = [quantize_int8(t, s).float() * s for t, s in zip((q, k, v), scales, strict=True)]
        p_max = torch.softmax(qkv[0] @ qkv[1].transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1).max().item()
        outputs = {"Q, K, V int8, P·V float": F.scaled_dot_product_attention(*qkv),
                   "P per tensor": one_scale_attention(q, k, v, p_max / 127.0),
                   "P per row (int8_sdpa)": int8_sdpa(q, k, v)}
    return {name: round(float((out - ref).norm() / ref.norm()), 5) for name, out in outputs.items()}


def time_shape(heads: int, dim: int, frames: int, warmup: int, runs: int) -> dict[str, float]:
    """Median ms of one attention block per implementation, on random (batch 1) Q, K, V."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, frames, dim) for _ in range(3))
    scales = [t.abs().max().item() / 127.0 for t in (q, k, v)]
    per_tensor = torch.compile(functools.partial(one_scale_attention, scale_p=1.0 / 127.0), dynamic=False)
    per_row = torch.compile(int8_sdpa, dynamic=False)
    qi, vi = quantize_int8(q, scales[0]), quantize_int8(v, scales[2])
    kt = quantize_int8(k, scales[1]).transpose(-1, -2).contiguous()
    p = torch.randint(0, 127, (1, heads, frames, frames), dtype=torch.int8)
    cases = {"sdpa fp32": lambda: F.scaled_dot_product_attention(q, k, v),
             "int8, P per tensor (compiled)": lambda: per_tensor(q, k, v),
             "int8_sdpa, P per row (compiled)": lambda: per_row(q, k, v),
             "int8 GEMMs only": lambda: gemms_only(qi, kt, p, vi)}
    with torch.no_grad():
        return {name: round(time_fn(fn, warmup, runs)[0], 3) for name, fn in cases.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", default=str(RESULTS / "int8_attention"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from sq_plugin.backends.x86_isa import int8_attention_problem, x86_policy

    policy = x86_policy()
    problem = int8_attention_problem(policy)
    if problem:
        raise SystemExit(f"{problem}, so INT8 attention on it would be wrong. Fix: run on a CPU with VNNI or AMX")
    rows = []
    for name, hidden, heads, frames in SHAPES:
        ms = time_shape(heads, hidden // heads, frames, args.warmup, args.runs)
        errors = relative_errors(*reference_qkv(name)) if name.startswith("sq/") else {}
        rows.append({"model": name, "heads": heads, "head_dim": hidden // heads, "frames": frames,
                     "threads": args.threads, "ms": ms, "relative_error_real_activations": errors})
        print(name, ms, errors, flush=True)
    out = Path(args.out)
    atomic_write(out.with_suffix(".json"), json.dumps({"device": device_name(), "cpu_kind": policy.kind,
                                                       "rows": rows}, indent=1) + "\n")
    names = list(rows[0]["ms"])
    lines = ["# INT8 attention on x86: `torch._int_mm` per head against float SDPA", "",
             f"Device: {device_name()} (oneDNN kind {policy.kind}), {args.threads} threads, batch 1, one attention "
             f"block (no projections), {args.warmup} warmup + {args.runs} timed runs, medians.", "",
             "| model | heads x d | T | " + " | ".join(f"{n} ms" for n in names) + " | per row / sdpa |",
             "|---|---|---:|" + "---:|" * (len(names) + 1)]
    for r in rows:
        ms = r["ms"]
        lines.append(f"| {r['model']} | {r['heads']} x {r['head_dim']} | {r['frames']} | "
                     + " | ".join(f"{ms[n]:.2f}" for n in names)
                     + f" | {ms['int8_sdpa, P per row (compiled)'] / ms['sdpa fp32']:.2f}x |")
    lines += ["", "Relative L2 error of the attention output against float SDPA, the first layer's real Q, K, V "
              "(10 s of test speech; Q, K, V on MAX ranges):", "",
              "| model | " + " | ".join(rows[0]["relative_error_real_activations"]) + " |",
              "|---|" + "---:|" * len(rows[0]["relative_error_real_activations"])]
    for r in rows:
        if r["relative_error_real_activations"]:
            lines.append(f"| {r['model']} | "
                         + " | ".join(f"{e:.4f}" for e in r["relative_error_real_activations"].values()) + " |")
    atomic_write(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print(f"wrote {out}.json and .md", flush=True)


if __name__ == "__main__":
    main()
