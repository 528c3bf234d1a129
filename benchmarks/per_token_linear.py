"""Can a per-token activation grid run fast on x86? One Linear of Whisper base's shapes, four ways.

`whisper_loss_groups.py` found that Whisper base's W8A8 loss is the static per-tensor activation grid, and that one
range per token removes most of it. oneDNN's qlinear (what PT2E lowers to) takes one activation scale per tensor, so
a per-token grid needs another kernel. This times, per shape (tokens M x in K x out N):

- FP32: `F.linear`, compiled by Inductor;
- static INT8: the x86 backend's own path (PT2E, per-tensor uint8 input from MAX calibration, per-channel int8
  weights, `lower_x86` to oneDNN qlinear);
- per-token INT8: each row of the input quantized to int8 with its own symmetric scale, `torch._int_mm` (oneDNN
  s8 x s8 -> s32) against the int8 weight, rescaled by the row and channel scales; compiled by Inductor.

and the relative L2 error of each INT8 output against float on inputs with a few outlier channels (as transformer
activations have), where one range per tensor spends most of its levels on the outliers.

    python benchmarks/per_token_linear.py --threads 2

Writes benchmarks/results/per_token_linear.json and .md. `_int_mm` saturates without VNNI (see
`sq_plugin.backends.x86_isa`); the script refuses to run there.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from common import RESULTS, atomic_write, device_name, require_unsaturated_int_mm
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

from sq_plugin.backends.pt2e import calibrate, lower_x86, prepare_stablequant

# (what, tokens, in, out): Whisper base's encoder layers over a 30-s window, and the decoder step at batch 1 and 8.
SHAPES = [
    ("encoder q/k/v/out_proj", 1500, 512, 512),
    ("encoder fc1", 1500, 512, 2048),
    ("encoder fc2", 1500, 2048, 512),
    ("step fc1, batch 1", 1, 512, 2048),
    ("step fc1, batch 8", 8, 512, 2048),
    ("step proj_out, batch 1", 1, 512, 51865),
    ("step proj_out, batch 8", 8, 512, 51865),
]


class PerTokenInt8Linear(torch.nn.Module):
    """y = (x_q · W_qᵀ) * s_x[row] * s_w[col] + b: int8 weights per output channel, the input per row.

    symmetric: each row on int8 [-127, 127] around 0. asymmetric: each row on 256 levels over its own [min, max]
    (as uint8 with a zero point), fed to `_int_mm` shifted to int8 (x_u - 128), the shift and the zero point put
    back through the weight's column sums: (x_u - zp) · W = (x_u - 128) · W + (128 - zp) · sum(W)."""

    def __init__(self, linear: torch.nn.Linear, *, symmetric: bool = True) -> None:
        super().__init__()
        w = linear.weight.detach()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127
        weight_q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.symmetric = symmetric
        self.register_buffer("weight_t", weight_q.t().contiguous())
        self.register_buffer("weight_sums", weight_q.to(torch.float32).sum(dim=1))
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", linear.bias.detach().clone() if linear.bias is not None
                             else torch.zeros(w.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if self.symmetric:
            scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127
            q = torch.round(rows / scale).clamp(-127, 127).to(torch.int8)
            acc = torch.ops.aten._int_mm(q, self.weight_t).to(torch.float32)
        else:
            lo = rows.amin(dim=1, keepdim=True).clamp(max=0.0)
            hi = rows.amax(dim=1, keepdim=True).clamp(min=0.0)
            scale = ((hi - lo) / 255).clamp(min=1e-8)
            zero_point = torch.round(-lo / scale).clamp(0, 255)
            q = (torch.round(rows / scale) + zero_point).clamp(0, 255) - 128
            acc = torch.ops.aten._int_mm(q.to(torch.int8), self.weight_t).to(torch.float32)
            acc = acc + (128 - zero_point) * self.weight_sums
        out = acc * scale * self.weight_scale + self.bias
        return out.reshape(*x.shape[:-1], -1)


def activations(tokens: int, width: int, seed: int) -> torch.Tensor:
    """Normal activations with 4 outlier channels 30x larger."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, tokens, width, generator=gen)
    x[..., :4] *= 30
    return x


def timed(fn, x: torch.Tensor, runs: int) -> float:
    with torch.no_grad():
        for _ in range(3):
            fn(x)
        start = time.perf_counter()
        for _ in range(runs):
            fn(x)
    return (time.perf_counter() - start) / runs * 1000


def relative_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    require_unsaturated_int_mm()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for what, tokens, width, out in SHAPES:
        linear = torch.nn.Linear(width, out).eval()
        x = activations(tokens, width, seed=1)
        with torch.no_grad():
            want = linear(x)
        fp32 = torch.compile(linear)
        prepared = prepare_stablequant(linear, (x,))
        calibrate(prepared, [activations(tokens, width, seed=s) for s in range(2, 6)])
        static, _ = lower_x86(convert_pt2e(prepared), (x,))
        per_token = torch.compile(PerTokenInt8Linear(linear))
        with torch.no_grad():
            errors = {"static": relative_l2(static(x), want), "per_token": relative_l2(per_token(x), want)}
        ms = {"fp32": timed(fp32, x, args.runs), "static": timed(static, x, args.runs),
              "per_token": timed(per_token, x, args.runs)}
        row = {"shape": what, "m": tokens, "k": width, "n": out, "ms": ms, "relative_l2": errors,
               "per_token_over_static": ms["per_token"] / ms["static"], "static_over_fp32": ms["static"] / ms["fp32"],
               "per_token_over_fp32": ms["per_token"] / ms["fp32"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"rows": rows, "cpu": device_name(), "threads": args.threads, "runs": args.runs,
              "torch": torch.__version__, "command": f"python benchmarks/per_token_linear.py --threads {args.threads}"}
    lines = ["# One Linear, static per-tensor INT8 (oneDNN qlinear) against per-token INT8 (`torch._int_mm`)", "",
             f"{device_name()}, {args.threads} thread(s), mean of {args.runs} calls after 3 warm-up; inputs with 4 "
             "outlier channels (30x). Relative L2 error against the float output.", "",
             "| shape | M x K x N | FP32 compiled ms | static INT8 ms | per-token INT8 ms | per-token / static | "
             "static / FP32 | per-token / FP32 | static error | per-token error |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['m']} x {r['k']} x {r['n']} | {r['ms']['fp32']:.3f} | "
                     f"{r['ms']['static']:.3f} | {r['ms']['per_token']:.3f} | {r['per_token_over_static']:.2f} | "
                     f"{r['static_over_fp32']:.2f} | {r['per_token_over_fp32']:.2f} | "
                     f"{r['relative_l2']['static']:.4f} | {r['relative_l2']['per_token']:.4f} |")
    lines += ["", f"`{result['command']}`", ""]
    atomic_write(RESULTS / "per_token_linear.json", json.dumps(result, indent=2))
    atomic_write(RESULTS / "per_token_linear.md", "\n".join(lines))


if __name__ == "__main__":
    main()
