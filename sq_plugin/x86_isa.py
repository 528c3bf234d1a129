"""Which INT8 kernels are right on this x86 CPU: the one ISA policy of the x86 (oneDNN) backend.

oneDNN picks its INT8 kernels by the CPU's instruction set, and two of those choices compute
something other than the q/dq graph they lower (../shared/reference/turn2-facts.md §1):

| kind          | u8 x s8 products summed in   | full 0..255 activations  | grouped INT8 conv |
|---------------|------------------------------|--------------------------|-------------------|
| avx2 / avx512 | int16 pairs (`vpmaddubsw`)   | saturate: use 0..127     | right             |
| vnni          | int32 (`vpdpbusd`)           | right                    | right             |
| amx           | int32 (tile `tdpbusd`)       | right                    | wrong (torch 2.13)|

Without VNNI the sum of two products must fit in int16: 2 * 255 * 128 = 65280 does not, 2 * 127 * 128
= 32512 does, so 7-bit activations (0..127) are exact on every kind. `X86IsaPolicy` holds that table
for the CPU this process runs on; the quantizer configs, the search's scoring grid, the lowering check,
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

from sq_plugin.core.quant import ACTIVATION_GRIDS, activation_grid_bits

ActivationGrid = Literal["full", "reduced"]
GRID_CHOICES = ("auto", *ACTIVATION_GRIDS)
KINDS = ("avx2", "avx512", "vnni", "amx")
INT16_MAX = 32767  # without VNNI, 2 * act_qmax * weight_absmax must fit: 2 * 127 * 128 does, 2 * 255 * 128 not

# ONEDNN_MAX_CPU_ISA values (oneDNN's names) -> the kernels they allow: (AVX512, AVX512-VNNI, AVX-VNNI, AMX).
# An unknown value is taken as allowing no VNNI: the reduced grid is right on every kind.
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
    """What oneDNN's INT8 kernels get right on one kind of x86 CPU, and the grid chosen for it.

    kind: "avx2" (no AVX512, no VNNI), "avx512" (AVX512 without VNNI), "vnni" (AVX512-VNNI or
        AVX-VNNI), "amx" (Xeon with AMX tiles).
    activation_grid: "full" (0..2**a_bits-1) or "reduced" (at most 0..127). "full" is only allowed
        where products are summed in int32 (vnni, amx).
    grouped_conv_int8: whether a grouped conv1d may run on INT8 kernels (False on AMX: wrong results).
    cap: the ONEDNN_MAX_CPU_ISA value in force, if any.
    """

    kind: str
    activation_grid: ActivationGrid
    grouped_conv_int8: bool
    cap: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown x86 ISA kind {self.kind!r}; one of {', '.join(KINDS)}")
        if self.activation_grid not in ("full", "reduced"):
            raise ValueError(f"activation_grid must be 'full' or 'reduced' (got {self.activation_grid!r})")
        if self.activation_grid == "full" and not self.int32_accumulation:
            raise IsaError(_full_grid_refused(self.kind, self.cap))

    @property
    def int32_accumulation(self) -> bool:
        """Whether u8 x s8 products are summed in int32 (VNNI/AMX) rather than in int16 pairs."""
        return self.kind in ("vnni", "amx")

    def activation_bits(self, a_bits: int) -> int:
        """The bits of the activation grid that executes for a nominal `a_bits` (7 at most when reduced)."""
        return activation_grid_bits(a_bits, self.activation_grid)

    def activation_qmax(self, a_bits: int) -> int:
        return 2 ** self.activation_bits(a_bits) - 1

    def describe(self, activation_bits: int | None) -> str:
        """e.g. "avx2: 7-bit activations", "amx: 8-bit activations, grouped conv1d float"; the bits
        are those of the grid that runs (`activation_bits(a_bits)`, or read off a graph)."""
        text = self.kind if activation_bits is None else f"{self.kind}: {activation_bits}-bit activations"
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

    def to_dict(self) -> dict:
        return asdict(self)


def _full_grid_refused(kind: str, cap: str | None) -> str:
    why = f" (ONEDNN_MAX_CPU_ISA={cap} caps it there)" if cap else ""
    return (f"activation_grid='full' needs a CPU whose INT8 kernels sum in int32 (AVX512-VNNI, AVX-VNNI or AMX); "
            f"this one runs oneDNN as {kind}{why}, where u8 x s8 products are summed in int16 pairs and the full "
            "0..255 grid saturates. Fix: use activation_grid='auto' or 'reduced' (7-bit activations, exact here), "
            "or quantize and run on a VNNI/AMX CPU" + (" (unset ONEDNN_MAX_CPU_ISA)." if cap else "."))


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


def require_x86() -> None:
    """Raise `IsaError` naming the fix where the x86 oneDNN INT8 backend cannot exist."""
    if not is_x86():
        raise IsaError(f"the x86 INT8 backend (oneDNN through Inductor) needs an x86-64 CPU; this machine is "
                       f"{platform.machine() or 'unknown'}. Fix: use backend 'simulate' (fake-quant, labelled as "
                       "such) or the CUDA backend (sq_plugin.cuda) on a GPU.")


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
def _policy(kind: str, activation_grid: str, cap: str | None) -> X86IsaPolicy:
    grid = ("full" if kind in ("vnni", "amx") else "reduced") if activation_grid == "auto" else activation_grid
    return X86IsaPolicy(kind=kind, activation_grid=grid, grouped_conv_int8=kind != "amx",  # type: ignore[arg-type]
                        cap=cap)


def resolve_activation_grid(activation_grid: str) -> ActivationGrid:
    """"auto" -> this CPU's grid ("full" with VNNI/AMX, "reduced" without); "full"/"reduced" as given."""
    if activation_grid not in GRID_CHOICES:
        raise ValueError(f"activation_grid must be one of {', '.join(GRID_CHOICES)} (got {activation_grid!r})")
    if activation_grid == "auto":
        return x86_policy().activation_grid
    return activation_grid  # type: ignore[return-value]


def x86_policy(activation_grid: str = "auto") -> X86IsaPolicy:
    """The policy for this process's CPU. activation_grid: "auto" (full where VNNI/AMX sum in int32,
    reduced elsewhere), "full" (refused with `IsaError` without VNNI) or "reduced" (right everywhere)."""
    if activation_grid not in GRID_CHOICES:
        raise ValueError(f"activation_grid must be one of {', '.join(GRID_CHOICES)} (got {activation_grid!r})")
    cap = onednn_cap()
    return _policy(detect_kind(cap=cap), activation_grid, cap)
