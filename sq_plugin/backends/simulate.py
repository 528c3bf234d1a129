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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sq_plugin.core.quant import fake_quantize, qparams_from_range, quant_bounds

QUANTIZABLE = (torch.nn.Linear, torch.nn.Conv1d)


def is_parametrized(model: torch.nn.Module) -> bool:
    """Whether any module of `model` has a torch parametrization (e.g. wav2vec2's weight-norm conv)."""
    from torch.nn.utils import parametrize

    return any(parametrize.is_parametrized(m) for m in model.modules())


def strip_weight_norm(model: torch.nn.Module) -> torch.nn.Module:
    """Fold parametrizations (wav2vec2/HuBERT's weight norm) into plain weights, in place (same outputs).

    Folded, the positional conv's weight is a plain parameter that can be fake-quantized here and
    prepacked as an INT8 constant by the x86 lowering. Unlike `parametrize.remove_parametrizations`,
    this never touches the class: torch creates one `Parametrized<Name>` class per module and shares
    it with every deep copy, so deleting the property from it (as remove_parametrizations does)
    would take `weight` away from the original model when a copy is folded.
    """
    from torch.nn.utils import parametrize

    for module in [m for m in model.modules() if parametrize.is_parametrized(m)]:
        folded = {}
        for name, chain in module.parametrizations.items():
            requires_grad = any(p.requires_grad for p in chain.parameters())
            folded[name] = torch.nn.Parameter(getattr(module, name).detach().clone(), requires_grad=requires_grad)
        module.__class__ = module.__class__.__bases__[0]  # the class parametrize derived Parametrized<Name> from
        del module._modules["parametrizations"]
        for name, value in folded.items():
            module.register_parameter(name, value)
    return model


def quantizable_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every Linear and Conv1d, by module name, in registration order (network order for HF models)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QUANTIZABLE)}


@dataclass(frozen=True)
class LayerQuant:
    """How one layer is simulated: its input activation range (None: input stays float), bits, and the
    weight's per-channel range rule ("max", the x86 PT2E default, or "mse": `backends.weights.quantize_weight`)."""

    act_range: tuple[float, float] | None
    a_bits: int = 8
    w_bits: int = 8
    quantize_weight: bool = True
    weight_rule: str = "max"
    # The input quantized per token (each row of its last dimension, on its own range) at run time; act_range None.
    per_token: bool = False


def fake_quantize_weight(weight: torch.Tensor, bits: int, rule: str = "max") -> torch.Tensor:
    """Per-output-channel symmetric fake-quant with MAX ranges (the x86 PT2E weight scheme), or MSE clipping."""
    if rule != "max":
        from sq_plugin.backends.weights import quantize_weight

        return quantize_weight(weight, bits, rule=rule).dequantize().to(weight.dtype)  # type: ignore[arg-type]
    qmin, qmax = quant_bounds(bits, signed=True)
    flat = weight.detach().reshape(weight.shape[0], -1)
    lo, hi = flat.min(dim=1).values.double().numpy(), flat.max(dim=1).values.double().numpy()
    scale, zp = qparams_from_range(lo, hi, qmin, qmax, symmetric=True)
    return fake_quantize(weight.detach(), torch.from_numpy(scale).float(), torch.from_numpy(zp).float(),
                         qmin, qmax, axis=0)


def _check_plan(layers: dict[str, torch.nn.Module], plan: dict[str, LayerQuant]) -> None:
    unknown = sorted(set(plan) - set(layers))
    if unknown:
        raise KeyError(f"not quantizable layers of this model: {unknown[:5]}; choose from Linear/Conv1d module "
                       "names, e.g. " + ", ".join(list(layers)[:3]))


def _swap_weight(module: torch.nn.Module, weight: torch.nn.Parameter) -> torch.nn.Parameter:
    # A new Parameter on this module only: a weight tied to another module (Whisper's proj_out and
    # its token embedding) must not change there.
    old = module._parameters["weight"]
    module._parameters["weight"] = weight
    return old


def _fake_quantize_layer(module: torch.nn.Module, spec: LayerQuant) -> tuple[torch.nn.Parameter | None, Any]:
    """Fake-quantize one layer's weight (a new Parameter) and hook its input. Returns the original
    weight (None if kept) and the hook's handle (None if no input range), to undo it."""
    old = None
    if spec.quantize_weight:
        fq = torch.nn.Parameter(fake_quantize_weight(module.weight, spec.w_bits, spec.weight_rule),
                                requires_grad=False)
        old = _swap_weight(module, fq)
    quantized_input = spec.act_range is not None or spec.per_token
    handle = module.register_forward_pre_hook(_input_hook(spec)) if quantized_input else None
    return old, handle


@contextlib.contextmanager
def simulate(model: torch.nn.Module, plan: dict[str, LayerQuant]) -> Iterator[None]:
    """Within the block, the layers named in `plan` run fake-quantized; everything is restored after."""
    layers = quantizable_layers(model)
    _check_plan(layers, plan)
    saved: dict[str, torch.nn.Parameter] = {}
    handles = []
    try:
        for name, spec in plan.items():
            weight, handle = _fake_quantize_layer(layers[name], spec)
            if weight is not None:
                saved[name] = weight
            if handle is not None:
                handles.append(handle)
        yield
    finally:
        for handle in handles:
            handle.remove()
        for name, weight in saved.items():
            _swap_weight(layers[name], weight)


def apply_fake_quant(model: torch.nn.Module, plan: dict[str, LayerQuant]) -> torch.nn.Module:
    """Fake-quantize the layers of `plan` permanently, in place (use on a copy): what `simulate` does
    inside its block, for a model that is then evaluated or served as a simulation."""
    layers = quantizable_layers(model)
    _check_plan(layers, plan)
    for name, spec in plan.items():
        _fake_quantize_layer(layers[name], spec)
    return model


def plan_layer_quants(plan: Any) -> dict[str, LayerQuant]:
    """A `QuantPlan` as the simulation's per-layer specs: the plan's input range on its activation grid,
    per-channel MAX weights on its weight grid; float layers are left out (they stay float).
    Raises `PlanError` for what this simulation does not model (another weight rule, per-tensor weights,
    signed or symmetric activations)."""
    from sq_plugin.core.plan import PlanError

    quants = {}
    for name in plan.quantized:
        layer = plan.layers[name]
        problem = layer.x86_scheme_problem(name)
        if problem is not None:
            raise PlanError(problem)
        if layer.weight_rule not in ("max", "stored"):
            raise PlanError(f"layers.{name}: the simulation quantizes weights with per-channel MAX ranges, not "
                            f"{layer.weight_rule!r}. Fix: use weight_rule 'max', or the x86 backend")
        # "stored": the model already holds the dequantized stored weight (backends.weights.install_stored_weights)
        quants[name] = LayerQuant(act_range=layer.act_range, a_bits=layer.activation.bits, w_bits=layer.weight.bits,
                                  quantize_weight=layer.weight_rule == "max", per_token=layer.per_token)
    return quants


def observer_ranges(model: torch.nn.Module, run_calibration: Callable[[], None], layers: Sequence[str],
                    make_observer: Callable[[], torch.nn.Module]) -> dict[str, tuple[float, float]]:
    """Feed every layer's input activation to its own observer (e.g. torchao's HistogramObserver) in
    one float pass, and return the range its qparams encode: (qmin - zp) * scale .. (qmax - zp) * scale."""
    observers = {name: make_observer() for name in layers}
    observe_inputs(model, run_calibration, layers, lambda name, x: observers[name](x))
    ranges = {}
    for name, obs in observers.items():
        scale, zp = obs.calculate_qparams()
        scale_f, zp_f = float(scale.reshape(-1)[0]), float(zp.reshape(-1)[0])
        ranges[name] = ((obs.quant_min - zp_f) * scale_f, (obs.quant_max - zp_f) * scale_f)
    return ranges


def observe_inputs(model: torch.nn.Module, run_calibration: Callable[[], None], layers: Sequence[str],
                   on_input: Callable[[str, torch.Tensor], None]) -> None:
    """Run `run_calibration` once in inference mode, calling `on_input(layer, input)` with the input
    activation of every layer in `layers` on each call; the hooks are removed afterwards, always."""
    modules = quantizable_layers(model)
    handles = []
    for name in layers:
        def hook(_m: torch.nn.Module, args: tuple, name: str = name) -> None:
            on_input(name, args[0].detach())
        handles.append(modules[name].register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            run_calibration()
    finally:
        for handle in handles:
            handle.remove()


def _input_hook(spec: LayerQuant):  # type: ignore[no-untyped-def]
    qmin, qmax = quant_bounds(spec.a_bits, signed=False)
    if spec.per_token:
        from sq_plugin.backends.per_token import fake_quantize_per_token
        from sq_plugin.core.grid import X86_ACTIVATION_PER_TOKEN

        grid = X86_ACTIVATION_PER_TOKEN.narrowed(spec.a_bits)
        return lambda _module, args: (fake_quantize_per_token(args[0], grid), *args[1:])
    scale, zp = qparams_from_range(spec.act_range[0], spec.act_range[1], qmin, qmax, symmetric=False)
    scale_f, zp_f = float(scale), float(zp)

    def hook(_module: torch.nn.Module, args: tuple) -> tuple:
        return (fake_quantize(args[0], scale_f, zp_f, qmin, qmax), *args[1:])

    return hook
