"""optimum-quanto baseline: W8A8 with quanto's absmax + EMA activation calibration.

    model = quantize_quanto(float_model, batches)            # a frozen, quantized deep copy
    n = count_int8_matmuls(model, (audio,))                  # torch._int_mm calls in one forward

What it runs on CPU (optimum-quanto 0.2.7, read in its source): `QLinear.forward` calls
`F.linear(qinput, qweight)`, which `WeightQBytesTensor.__torch_function__` sends to
`torch.ops.quanto.qbytes_mm(input._data, other._data, input._scale * other._scale)`
(tensor/weights/qbytes.py:73). Its CPU kernel (library/qbytes_mm.py, `qbytes_mm_impl_cpu`) takes
`qbytes_int_mm` -> `torch._int_mm` (an int8 x int8 -> int32 GEMM; oneDNN's `mkldnn_matmul_i8i8i32` on
x86) whenever torch >= 2.6 and both operands are int8, else a dequantized float matmul. So Linear layers
are real INT8 matmuls, run eagerly: activations are quantized and outputs rescaled per call in
PyTorch, and Conv1d stays float (quanto has no QConv1d). Rather than trust this reading,
`sq_plugin.families.ctc.quantize_ctc_quanto` counts the `_int_mm` calls of one forward and labels the run
simulated if there are none.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch

try:
    from optimum.quanto import Calibration, freeze, qint8, quantize
    from optimum.quanto.nn import QConv2d, QLinear
except ImportError as exc:  # an optional extra: say how to get it
    raise ImportError('sq_plugin.backends.quanto needs optimum-quanto 0.2.7: pip install "sq-plugin[quanto]"') from exc


# quanto's EMA over per-batch absmax scales (Calibration's default, the value its docs use).
CALIBRATION_MOMENTUM = 0.9


def check_quanto_bits(a_bits: int, w_bits: int) -> None:
    if a_bits != 8 or w_bits != 8:
        # Activations: quanto quantizes them to qint8 or qfloat8 only. Weights could go to qint4/qint2,
        # but then no int8 x int8 matmul runs; this baseline is W8A8.
        raise ValueError(f"the optimum-quanto baseline is W8A8 only (quanto quantizes activations to qint8 or "
                         f"qfloat8); got a_bits={a_bits}, w_bits={w_bits}. Use quantize_ctc_pt2e for W6A6/W4A4.")


def _check_int_mm_is_exact() -> None:
    from sq_plugin.backends.x86_isa import INT_MM_SATURATES, IsaError, is_x86, x86_policy

    policy = x86_policy()
    if is_x86() and not policy.int32_accumulation:
        raise IsaError(f"the optimum-quanto W8A8 baseline would compute wrong results on this CPU ({policy.kind}): "
                       f"{INT_MM_SATURATES}. Fix: run it on a CPU with VNNI or AMX, or compare against the "
                       "PT2E baselines (max, histogram, ...), which use 7-bit weights here.")


def quantize_quanto(model: torch.nn.Module, batches: Iterable[tuple | torch.Tensor], *, a_bits: int = 8,
                    w_bits: int = 8, momentum: float = CALIBRATION_MOMENTUM) -> torch.nn.Module:
    """quanto W8A8 on a deep copy of `model` (quanto swaps modules in place): qint8 weights and
    activations, `Calibration(momentum)` over `batches` (one forward each), then `freeze`."""
    from sq_plugin.backends.pt2e import calibrate

    check_quanto_bits(a_bits, w_bits)
    _check_int_mm_is_exact()
    quantized = copy.deepcopy(model).eval()
    quantize(quantized, weights=qint8, activations=qint8)
    with Calibration(momentum=momentum):
        calibrate(quantized, batches)
    freeze(quantized)
    return quantized


def count_int8_matmuls(model: torch.nn.Module, example_inputs: tuple) -> int:
    """How many `torch._int_mm` (INT8 GEMM) calls one forward on `example_inputs` makes, by the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(*example_inputs)
    return sum(1 for event in prof.events() if event.name == "aten::_int_mm")


def quanto_op_counts(model: torch.nn.Module) -> dict[str, int]:
    """Linear/Conv layers by whether quanto quantized them, keyed like `pt2e.count_quantized_ops`."""
    counts: dict[str, int] = {}
    for module in model.modules():
        # quanto's modules subclass the float ones, so check them first; isinstance (not type) also
        # covers parametrized modules such as the weight-normed positional conv.
        if isinstance(module, QLinear | QConv2d):
            key = "linear" if isinstance(module, QLinear) else "conv2d"
        elif isinstance(module, torch.nn.Linear):
            key = "linear_float"
        elif isinstance(module, torch.nn.Conv1d):
            key = "conv1d_float"
        elif isinstance(module, torch.nn.Conv2d):
            key = "conv2d_float"
        else:
            continue
        counts[key] = counts.get(key, 0) + 1
    return counts
