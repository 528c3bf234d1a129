"""Fake-quant simulation on plain `nn.Module`s (torch only, no quantization framework).

The layer-adaptive search needs to quantize *some* layers, with ranges it is still choosing, and
evaluate the model many times. Doing that through export + prepare + convert for every candidate
would cost a graph capture each time, so the search simulates: a forward pre-hook fake-quantizes a
layer's input activation (per-tensor, asymmetric, unsigned grid as on oneDNN) and the layer's weight
is swapped for its fake-quantized copy (per output channel, symmetric, signed grid). The math is the
core's (`sq_plugin.core.quant`) and matches what `convert_pt2e` produces for the same ranges.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from sq_plugin.core.quant import fake_quantize, qparams_from_range, quant_bounds

QUANTIZABLE = (torch.nn.Linear, torch.nn.Conv1d)


def strip_weight_norm(model: torch.nn.Module) -> torch.nn.Module:
    """Fold weight-norm parametrizations into plain weights, in place (same outputs).

    wav2vec2/HuBERT's positional conv uses `weight_norm`; folded, its weight is a plain parameter
    that can be fake-quantized here and prepacked as an INT8 constant by the x86 lowering.
    """
    from torch.nn.utils import parametrize

    for module in model.modules():
        if parametrize.is_parametrized(module):
            for tensor_name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
    return model


def quantizable_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every Linear and Conv1d, by module name, in registration order (network order for HF models)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QUANTIZABLE)}


@dataclass(frozen=True)
class LayerQuant:
    """How one layer is simulated: its input activation range (None: input stays float) and bits."""

    act_range: tuple[float, float] | None
    a_bits: int = 8
    w_bits: int = 8
    quantize_weight: bool = True


def fake_quantize_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel symmetric fake-quant with MAX ranges (the x86 PT2E weight scheme)."""
    qmin, qmax = quant_bounds(bits, signed=True)
    flat = weight.detach().reshape(weight.shape[0], -1)
    lo, hi = flat.min(dim=1).values.double().numpy(), flat.max(dim=1).values.double().numpy()
    scale, zp = qparams_from_range(lo, hi, qmin, qmax, symmetric=True)
    return fake_quantize(weight.detach(), torch.from_numpy(scale).float(), torch.from_numpy(zp).float(),
                         qmin, qmax, axis=0)


@contextlib.contextmanager
def simulate(model: torch.nn.Module, plan: dict[str, LayerQuant]) -> Iterator[None]:
    """Within the block, the layers named in `plan` run fake-quantized; everything is restored after."""
    layers = quantizable_layers(model)
    unknown = sorted(set(plan) - set(layers))
    if unknown:
        raise KeyError(f"not quantizable layers of this model: {unknown[:5]}; choose from Linear/Conv1d module "
                       "names, e.g. " + ", ".join(list(layers)[:3]))
    saved: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name, spec in plan.items():
            module = layers[name]
            if spec.quantize_weight:
                saved[name] = module.weight.data
                module.weight.data = fake_quantize_weight(module.weight.data, spec.w_bits)
            if spec.act_range is not None:
                handles.append(module.register_forward_pre_hook(_input_hook(spec)))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for name, weight in saved.items():
            layers[name].weight.data = weight


def _input_hook(spec: LayerQuant):  # type: ignore[no-untyped-def]
    qmin, qmax = quant_bounds(spec.a_bits, signed=False)
    scale, zp = qparams_from_range(spec.act_range[0], spec.act_range[1], qmin, qmax, symmetric=False)
    scale_f, zp_f = float(scale), float(zp)

    def hook(_module: torch.nn.Module, args: tuple) -> tuple:
        return (fake_quantize(args[0], scale_f, zp_f, qmin, qmax), *args[1:])

    return hook
