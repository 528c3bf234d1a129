"""4-bit weights on a real x86 CPU kernel: torch's `_weight_int4pack_mm_for_cpu` (tinygemm), with our stored codes.

    weights = stored_weights(model, plan)                  # StoredWeight per layer (sq_plugin.backends.weights)
    report = apply_int4_kernel(model, weights)             # in place: every 4-bit Linear -> Int4KernelLinear
    report.int4_layers, report.other_layers                # what runs on the kernel, and what does not (why)

The kernel computes a bf16 activation against int4 weights packed for it, with a scale and a zero per group
of input channels. Our 4-bit codes c on -8..7 with a per-output-channel scale s are exactly that format:
tinygemm dequantizes q on 0..15 as (q - 8) * scale + zero, so q = c + 8, scale = s and zero = 0 for every
group of the row (`int4_tensor`). The stored codes are executed as they are; only the activations differ from
the INT8 path: bf16, not 8-bit (this is weight-only quantization, W4A16).

Scope, said rather than hidden: nn.Linear layers at 4 bits whose input width divides into groups of 32, 64
or 128 and whose output width is a multiple of 16 (what the kernel takes). The scales are held in bf16, the
kernel's format (a relative rounding of at most 2**-9 of each stored float32 scale). Every other stored layer
(convs, other widths) keeps its dequantized stored weight in float32 and is listed in `Int4Report.other_layers`
with the reason ("storage-only": compressed on disk, float at run time).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from sq_plugin.backends.weights import StoredWeight, install_stored_weights

GROUP_SIZES = (128, 64, 32)  # the kernel's group sizes, largest first (fewer scale/zero pairs)


def group_size_for(in_features: int) -> int | None:
    """The largest group size the kernel takes that divides the input width (None: none does)."""
    return next((g for g in GROUP_SIZES if in_features % g == 0), None)


def int4_tensor(stored: StoredWeight, group_size: int) -> torch.Tensor:
    """The stored 4-bit codes and scales as torchao's `Int4OpaqueTensor` (packed for the CPU tinygemm kernel)."""
    from torchao.prototype.quantization.int4 import Int4OpaqueTensor
    from torchao.quantization.utils import pack_tinygemm_scales_and_zeros

    if stored.bits != 4:
        raise ValueError(f"the int4 kernel takes 4-bit weights, not {stored.bits}-bit ones")
    if stored.codes.dim() != 2:
        raise ValueError(f"the int4 kernel takes a Linear's 2-D weight, not shape {tuple(stored.codes.shape)}")
    out_features, in_features = stored.codes.shape
    if in_features % group_size:
        raise ValueError(f"input width {in_features} is not a multiple of the group size {group_size}")
    if out_features % 16:
        raise ValueError(f"output width {out_features} is not a multiple of 16 (the kernel packs rows in 16s)")
    unsigned = (stored.codes.to(torch.int32) + 8).contiguous()  # tinygemm's 0..15 with its mid-point 8
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, 1)
    groups = in_features // group_size
    scale = stored.scale.to(torch.bfloat16)[:, None].expand(out_features, groups).contiguous()
    zero = torch.zeros_like(scale)
    return Int4OpaqueTensor(qdata=packed, scale_and_zero=pack_tinygemm_scales_and_zeros(scale, zero, scale.dtype),
                            block_size=[1, group_size], shape=stored.codes.shape, act_pre_scale=None)


class Int4KernelLinear(torch.nn.Module):
    """A Linear whose weight is the int4 kernel's: bf16 activations in, the caller's dtype out."""

    def __init__(self, linear: torch.nn.Linear, stored: StoredWeight, group_size: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = torch.nn.Parameter(int4_tensor(stored, group_size), requires_grad=False)
        self.bias = (None if linear.bias is None else
                     torch.nn.Parameter(linear.bias.detach().to(torch.bfloat16), requires_grad=False))
        self.group_size = group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.linear(x.to(torch.bfloat16), self.weight, self.bias)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int4 tinygemm, group {self.group_size}"


@dataclass
class Int4Report:
    """Which stored layers run on the int4 kernel, and why the others do not (dequantized float weights)."""

    int4_layers: list[str] = field(default_factory=list)
    other_layers: dict[str, str] = field(default_factory=dict)

    @property
    def backend(self) -> str:
        kept = f", {len(self.other_layers)} stored layer(s) dequantized to float" if self.other_layers else ""
        return (f"x86 int4 kernel (_weight_int4pack_mm_for_cpu, bf16 activations): {len(self.int4_layers)} "
                f"Linear(s){kept}")


def apply_int4_kernel(model: torch.nn.Module, weights: Mapping[str, StoredWeight]) -> Int4Report:
    """In place (use on a copy): every 4-bit nn.Linear of `weights` whose input width the kernel takes becomes an
    `Int4KernelLinear` with its stored codes; every other stored layer holds its dequantized stored weight."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        raise RuntimeError("this torch has no _weight_int4pack_mm_for_cpu kernel; use the INT8 path (storage-only)")
    # Every stored layer first gets its dequantized weight (checked against the model by name and shape): what the
    # layers the kernel does not take compute with, and what a module tied to a kernel layer (a token embedding
    # sharing proj_out's table) keeps reading after that layer is replaced.
    install_stored_weights(model, weights)
    report = Int4Report()
    modules = dict(model.named_modules())
    for name, stored in weights.items():
        module = modules[name]
        linear = isinstance(module, torch.nn.Linear)
        group = group_size_for(module.weight.shape[-1]) if linear else None
        rows_fit = module.weight.shape[0] % 16 == 0  # the kernel packs output channels in 16s
        if stored.bits == 4 and group is not None and rows_fit:
            parent_name, _, child = name.rpartition(".")
            setattr(modules[parent_name] if parent_name else model, child, Int4KernelLinear(module, stored, group))
            report.int4_layers.append(name)
            continue
        why = (f"{stored.bits}-bit weights" if stored.bits != 4 else
               "not an nn.Linear" if not linear else
               f"input width {module.weight.shape[-1]} is not a multiple of 32" if group is None else
               f"output width {module.weight.shape[0]} is not a multiple of 16")
        report.other_layers[name] = f"{why}: the int4 kernel does not take it; dequantized stored weight in float"
    return report

__all__ = ["GROUP_SIZES", "Int4KernelLinear", "Int4Report", "apply_int4_kernel", "group_size_for", "int4_tensor"]
