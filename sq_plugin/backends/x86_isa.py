"""Which INT8 kernels are right on this x86 CPU: the one ISA policy of the x86 (oneDNN) backend.

oneDNN picks its INT8 kernels by the CPU's instruction set, and two of those choices compute
something other than the q/dq graph they lower (../shared/reference/turn2-facts.md §1):

| kind          | u8 x s8 products summed in   | W8A8 on the full grids     | grouped INT8 conv |
|---------------|------------------------------|----------------------------|-------------------|
| avx2 / avx512 | int16 pairs (`vpmaddubsw`)   | saturates: narrow one side | right             |
| vnni          | int32 (`vpdpbusd`)           | right                      | right             |
| amx           | int32 (tile `tdpbusd`)       | right                      | wrong (torch 2.13)|

Without VNNI the sum of two products must fit in int16: 2 * 255 * 128 = 65280 does not. Either
operand narrowed to 7 bits fits: 7-bit weights (-64..63) with 0..255 activations give 2 * 255 * 64 =
32640, 7-bit activations (0..127) with -128..127 weights 2 * 127 * 128 = 32512. Both are exact on every
kind; the default there narrows the *weights*, because per-channel weights lose far less than a
per-tensor activation grid (wav2vec2-ref, 600 test utterances, W8A8 StableQuant: +0.37 pp WER with
7-bit weights, +1.73 pp with 7-bit activations; MAX: +1.28 / +6.22; BENCHMARKS.md). `X86IsaPolicy` holds that table for
the CPU this process runs on; the quantizer configs, the search's scoring grid, the lowering check,
the artifact metadata and the report all read it from here.

The kind is what oneDNN will use: the CPU's flags (/proc/cpuinfo), capped by `ONEDNN_MAX_CPU_ISA`
(or its old name `DNNL_MAX_CPU_ISA`), which oneDNN reads once, when the process first uses it. So
`ONEDNN_MAX_CPU_ISA=AVX2 python ...` makes a VNNI or AMX machine behave as an AVX2-only one, and
the policy follows; setting the variable after torch has run a oneDNN kernel changes nothing in
oneDNN, so set it before starting Python.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import asdict, dataclass
from typing import Literal

from sq_plugin.core.grid import GRID_CHOICES, INT8_GRIDS, grid_bits

Int8Grid = Literal["full", "narrow_weights", "narrow_activations"]
KINDS = ("avx2", "avx512", "vnni", "amx")
INT16_MAX = 32767  # without VNNI, 2 * act_qmax * weight_absmax must fit: 2 * 255 * 64 does, 2 * 255 * 128 not

# ONEDNN_MAX_CPU_ISA values (oneDNN's names) -> the kernels they allow: (AVX512, AVX512-VNNI, AVX-VNNI, AMX).
# An unknown value is taken as allowing no VNNI: a narrowed grid is right on every kind.
_CAPS: dict[str, tuple[bool, bool, bool, bool]] = {
    "SSE41": (False, False, False, False), "AVX": (False, False, False, False), "AVX2": (False, False, False, False),
    "AVX2_VNNI": (False, False, True, False), "AVX2_VNNI_2": (False, False, True, False),
    "AVX512_CORE": (True, False, False, False),
    **{name: (True, True, False, False)
       for name in ("AVX512_CORE_VNNI", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512")},
    **{name: (True, True, False, True)
       for name in ("AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16")},
    "DEFAULT": (True, True, True, True), "ALL": (True, True, True, True),
}


# CPU `torch._int_mm` (int8 x int8 -> int32) is oneDNN too: measured under ONEDNN_MAX_CPU_ISA=AVX2, every
# shape with weights on the full int8 range is wrong, and every shape with |weights| <= 64 exact.
INT_MM_SATURATES = ("CPU torch._int_mm runs oneDNN's s8 x s8 GEMM, which on x86 without VNNI sums pairs of products "
                    "in int16 and saturates on full-range int8 weights")


class IsaError(RuntimeError):
    """The x86 INT8 backend cannot run as asked on this CPU. The message names the fix."""


@dataclass(frozen=True)
class X86IsaPolicy:
    """What oneDNN's INT8 kernels get right on one kind of x86 CPU, and the grids chosen for it.

    kind: "avx2" (no AVX512, no VNNI), "avx512" (AVX512 without VNNI), "vnni" (AVX512-VNNI or
        AVX-VNNI), "amx" (Xeon with AMX tiles).
    int8_grid: "full" (W8A8 on -128..127 / 0..255), "narrow_weights" (weights on -64..63 at 8 bits) or
        "narrow_activations" (activations on 0..127 at 8 bits). "full" at W8A8 is refused by `grid_bits`
        where products are summed in int16 pairs (avx2, avx512).
    grouped_conv_int8: whether a grouped conv1d may run on INT8 kernels (False on AMX: wrong results).
    cap: the ONEDNN_MAX_CPU_ISA value in force, if any.
    """

    kind: str
    int8_grid: Int8Grid
    grouped_conv_int8: bool
    cap: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown x86 ISA kind {self.kind!r}; one of {', '.join(KINDS)}")
        if self.int8_grid not in INT8_GRIDS:
            raise ValueError(f"int8_grid must be one of {', '.join(INT8_GRIDS)} (got {self.int8_grid!r})")

    @property
    def int32_accumulation(self) -> bool:
        """Whether u8 x s8 products are summed in int32 (VNNI/AMX) rather than in int16 pairs."""
        return self.kind in ("vnni", "amx")

    def grid_bits(self, w_bits: int, a_bits: int) -> tuple[int, int]:
        """(weight bits, activation bits) of the grids that execute for nominal `w_bits`/`a_bits`.
        Raises `IsaError`, naming the fix, for "full" grids that this CPU's kernels would saturate."""
        w, a = grid_bits(w_bits, a_bits, self.int8_grid)
        if self.op_problem("linear", 2**a - 1, 2 ** (w - 1)) is not None:
            raise IsaError(_full_grid_refused(self.kind, self.cap))
        return w, a

    def describe(self, w_bits: int | None, a_bits: int | None) -> str:
        """e.g. "avx2: 7-bit weights, 8-bit activations", "amx: 8-bit weights, 8-bit activations, grouped
        conv1d float"; the bits are those of the grids that run (`grid_bits`, or read off a graph)."""
        widths = [f"{bits}-bit {what}" for bits, what in ((w_bits, "weights"), (a_bits, "activations"))
                  if bits is not None]
        text = f"{self.kind}: {', '.join(widths)}" if widths else self.kind
        return text if self.grouped_conv_int8 else text + ", grouped conv1d float"

    def op_problem(self, op: str, act_qmax: int, weight_absmax: int, groups: int = 1) -> str | None:
        """Why one INT8 op (input grid 0..act_qmax, weight grid within +-weight_absmax) would be wrong
        on this CPU, or None when oneDNN computes it right."""
        if not self.int32_accumulation and 2 * act_qmax * weight_absmax > INT16_MAX:
            return (f"activations on 0..{act_qmax} with weights up to {weight_absmax} saturate oneDNN's int16 pair "
                    f"sums on {self.kind} (no VNNI): 2*{act_qmax}*{weight_absmax} > {INT16_MAX}")
        if op.startswith("conv") and groups > 1 and not self.grouped_conv_int8:
            return f"oneDNN's grouped INT8 conv ({groups} groups) is wrong on {self.kind} in torch 2.13"
        return None

    def grouped_conv_problem(self, groups: int, in_per_group: int, out_per_group: int) -> str | None:
        """Why a grouped INT8 conv should stay weight-only here (None: run it on INT8 kernels).

        Wrong on AMX (torch 2.13). Slow without VNNI when a group's channels are not a multiple of 4:
        oneDNN has no AVX2 INT8 kernel for them and runs its reference one (measured, 16 groups, kernel
        64: 10 channels per group 43.5 ms, 6 per group 16.9 ms, 8 or 12 per group 0.45-0.71 ms), which made
        hubert-ref's positional conv 86 % of its INT8 time."""
        if not self.grouped_conv_int8:
            return ("oneDNN's AMX INT8 grouped conv is wrong in torch 2.13 (set ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI "
                    "before starting Python to quantize it)")
        if not self.int32_accumulation and (in_per_group % 4 or out_per_group % 4):
            return (f"oneDNN has no {self.kind} INT8 kernel for {groups} groups of {in_per_group} -> {out_per_group} "
                    "channels (not multiples of 4) and would run its reference kernel, 20-70x slower")
        return None

    def to_dict(self) -> dict:
        return asdict(self)


def _full_grid_refused(kind: str, cap: str | None) -> str:
    why = f" (ONEDNN_MAX_CPU_ISA={cap} caps it there)" if cap else ""
    return (f"int8_grid='full' needs a CPU whose INT8 kernels sum in int32 (AVX512-VNNI, AVX-VNNI or AMX); this one "
            f"runs oneDNN as {kind}{why}, where u8 x s8 products are summed in int16 pairs and W8A8 on the full "
            "grids saturates. Fix: use int8_grid='auto' or 'narrow_weights' (7-bit weights, exact here), "
            "or 'narrow_activations', or quantize and run on a VNNI/AMX CPU"
            + (" (unset ONEDNN_MAX_CPU_ISA)." if cap else "."))


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


def require_x86() -> None:
    """Raise `IsaError` naming the fix where the x86 oneDNN INT8 backend cannot exist."""
    if not is_x86():
        raise IsaError(f"the x86 INT8 backend (oneDNN through Inductor) needs an x86-64 CPU; this machine is "
                       f"{platform.machine() or 'unknown'}. Fix: use backend 'simulate' (fake-quant, labelled as "
                       "such) or the CUDA backend (sq_plugin.backends.cuda) on a GPU.")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it is not readable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _hardware(flags: frozenset[str]) -> tuple[bool, bool, bool, bool]:
    """(avx512, avx512_vnni, avx_vnni, amx) of this CPU; torch's own probes where /proc/cpuinfo is silent."""
    if flags:
        return ("avx512f" in flags, "avx512_vnni" in flags, "avx_vnni" in flags, "amx_tile" in flags)
    import torch

    probe = lambda name: bool(getattr(torch.cpu, name, lambda: False)())  # noqa: E731
    return (probe("_is_avx512_supported"), probe("_is_vnni_supported"), False, probe("_is_amx_tile_supported"))


def onednn_cap() -> str | None:
    value = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return value.strip().upper() if value and value.strip() else None


def detect_kind(flags: frozenset[str] | None = None, cap: str | None = None) -> str:
    """The kind oneDNN runs as: the CPU's flags capped by ONEDNN_MAX_CPU_ISA (`cap`)."""
    hardware = _hardware(cpu_flags() if flags is None else flags)
    allowed = _CAPS.get(cap, (False, False, False, False)) if cap else (True, True, True, True)
    avx512, avx512_vnni, avx_vnni, amx = (have and allow for have, allow in zip(hardware, allowed, strict=True))
    if amx:
        return "amx"
    if avx512_vnni or avx_vnni:
        return "vnni"
    return "avx512" if avx512 else "avx2"


@functools.cache
def _policy(kind: str, int8_grid: str, cap: str | None) -> X86IsaPolicy:
    auto = "full" if kind in ("vnni", "amx") else "narrow_weights"
    grid = auto if int8_grid == "auto" else int8_grid
    return X86IsaPolicy(kind=kind, int8_grid=grid, grouped_conv_int8=kind != "amx", cap=cap)  # type: ignore[arg-type]


def resolve_int8_grid(int8_grid: str) -> Int8Grid:
    """"auto" -> this CPU's grid ("full" with VNNI/AMX, "narrow_weights" without); others as given."""
    return x86_policy(int8_grid).int8_grid


def x86_policy(int8_grid: str = "auto") -> X86IsaPolicy:
    """The policy for this process's CPU. int8_grid: "auto" (full where VNNI/AMX sum in int32,
    narrow_weights elsewhere), "full" (refused with `IsaError` without VNNI), "narrow_weights" or
    "narrow_activations" (right everywhere)."""
    if int8_grid not in GRID_CHOICES:
        raise ValueError(f"int8_grid must be one of {', '.join(GRID_CHOICES)} (got {int8_grid!r})")
    cap = onednn_cap()
    return _policy(detect_kind(cap=cap), int8_grid, cap)


def int8_attention_problem(policy: X86IsaPolicy) -> str | None:
    """Why INT8 attention (activation x activation `torch._int_mm`) would be wrong on this policy's CPU, or None."""
    return None if policy.int32_accumulation else f"{INT_MM_SATURATES}; this CPU is {policy.kind}"
