"""The quantization plan: what the range decision hands to every backend, as versioned JSON.

    plan = search_result.to_plan(provenance={"model": "sq/wav2vec2-ref"})
    plan.save("w2v.plan.json")                        # human-readable, diffable
    plan = QuantPlan.load("w2v.plan.json")
    plan.check_layers(model_layer_names)              # a plan for another model fails here, by name
    print(plan.table())                               # `stablequant plan show w2v.plan.json`

For each layer, by the model's own module name: the activation grid and its float range, the weight
grid and its rule, or "float" with the reason. The grids are `sq_plugin.core.grid.Grid`s.

Torch-free and numpy-free on purpose: reading, validating and printing a plan imports nothing heavy.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from sq_plugin.core.files import atomic_write
from sq_plugin.core.grid import X86_ACTIVATION, X86_ACTIVATION_PER_TOKEN, X86_WEIGHT, Grid, PlanError, x86_grids

PLAN_FORMAT = "sq-plugin-quant-plan"
# Version 2 adds per-token activation grids; a plan without one is still written as version 1, which older readers take.
PLAN_VERSION = 2
__all__ = ["PLAN_FORMAT", "PLAN_VERSION", "X86_ACTIVATION", "X86_ACTIVATION_PER_TOKEN", "X86_WEIGHT", "Grid",
           "LayerPlan", "PlanError", "QuantPlan", "x86_grids"]


@dataclass(frozen=True)
class LayerPlan:
    """One layer: quantized (activation grid + range, weight grid + rule) or float (`why_float`)."""

    op: str
    activation: Grid | None = None
    act_range: tuple[float, float] | None = None
    weight: Grid | None = None
    weight_rule: str = "max"
    why_float: str | None = None
    # How the range was decided (e.g. {"method": "percentile_then_mse", "percentile": 99.9}).
    decision: dict[str, Any] = field(default_factory=dict)

    @property
    def is_float(self) -> bool:
        return self.activation is None and self.weight is None

    @property
    def per_token(self) -> bool:
        """Whether the input is quantized per token at run time (no range in the plan)."""
        return self.activation is not None and self.activation.per_token

    def x86_scheme_problem(self, name: str) -> str | None:
        """Why this quantized layer is not on the x86 scheme (uint8 affine per-tensor input, int8 symmetric
        per-output-channel weight, both quantized), which the x86 backend and the simulation take; None if it is."""
        act, weight = self.activation, self.weight
        if act is None or weight is None:
            return (f"layers.{name}: the x86 scheme quantizes weight and input together; the plan quantizes only "
                    f"the {'weight' if act is None else 'input'}. Fix: quantize both, or mark it float")
        if act.per_token and self.op != "linear":
            return (f"layers.{name}: a per-token activation grid runs on Linear layers only (torch._int_mm), not "
                    f"on a {self.op}. Fix: give it the static grid (core.grid.X86_ACTIVATION) and a range")
        if act.signed or act.symmetric or act.channel_axis is not None:
            return (f"layers.{name}: the x86 scheme takes uint8 affine per-tensor activations, not "
                    f"{act.describe()}. Fix: make the plan for the x86 scheme (core.grid.x86_grids)")
        if not weight.signed or not weight.symmetric or weight.channel_axis != 0:
            return (f"layers.{name}: the x86 scheme takes int8 symmetric per-output-channel weights, not "
                    f"{weight.describe()}. Fix: make the plan for the x86 scheme (core.grid.x86_grids)")
        return None

    def check(self, name: str) -> None:
        if self.is_float:
            if not self.why_float:
                raise PlanError(f"layers.{name}: a float layer needs why_float (say why it stays float)")
            return
        if self.per_token:
            if self.act_range is not None:
                raise PlanError(f"layers.{name}: a per-token activation grid takes its ranges at run time; the "
                                "plan's act_range must be null")
        elif (self.activation is None) != (self.act_range is None):
            raise PlanError(f"layers.{name}: activation and act_range go together (both set, or both null)")
        if self.act_range is not None:
            lo, hi = self.act_range
            if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi and (lo, hi) != (0.0, 0.0)):
                raise PlanError(f"layers.{name}: act_range {list(self.act_range)} must be finite, lo <= hi, and not "
                                "[0, 0]; re-run calibration")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("activation", "weight"):
            if data[key] is not None and not data[key]["per_token"]:
                del data[key]["per_token"]  # version 1's grid keys: older readers still take a plan without one
        data["act_range"] = list(self.act_range) if self.act_range is not None else None
        return data

    @classmethod
    def from_dict(cls, name: str, data: Any) -> LayerPlan:
        if not isinstance(data, dict):
            raise PlanError(f"layers.{name}: expected a mapping, got {type(data).__name__}")
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise PlanError(f"layers.{name}: unknown key(s) {sorted(unknown)}; valid: "
                            f"{', '.join(cls.__dataclass_fields__)}")
        try:
            grids = {k: Grid(**data[k]) if data.get(k) is not None else None for k in ("activation", "weight")}
            rng = data.get("act_range")
            layer = cls(op=str(data["op"]), activation=grids["activation"],
                        act_range=(float(rng[0]), float(rng[1])) if rng is not None else None,
                        weight=grids["weight"], weight_rule=str(data.get("weight_rule", "max")),
                        why_float=data.get("why_float"), decision=dict(data.get("decision") or {}))
        except PlanError as exc:
            raise PlanError(f"layers.{name}: {exc}") from None
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise PlanError(f"layers.{name}: malformed entry ({type(exc).__name__}: {exc})") from None
        layer.check(name)
        return layer


@dataclass
class QuantPlan:
    """Per layer (module name -> LayerPlan) plus provenance: method, metric, calibration hash, ISA policy."""

    layers: dict[str, LayerPlan]
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.layers:
            raise PlanError("the plan has no layers; make it from a search or a baseline rule over the model")
        for name, layer in self.layers.items():
            layer.check(name)

    @property
    def quantized(self) -> list[str]:
        return [n for n, layer in self.layers.items() if not layer.is_float]

    @property
    def per_token_layers(self) -> list[str]:
        return [n for n, layer in self.layers.items() if layer.per_token]

    @property
    def float_layers(self) -> list[str]:
        return [n for n, layer in self.layers.items() if layer.is_float]

    def with_per_token_activations(self, names: Iterable[str]) -> QuantPlan:
        """A copy in which the quantized Linears `names` take their input per token at run time
        (`X86_ACTIVATION_PER_TOKEN` at the layer's activation width) instead of the plan's static range; their
        weights stay as planned. Raises `PlanError` for a name that is not a quantized Linear of the plan."""
        layers = dict(self.layers)
        for name in names:
            layer = layers.get(name)
            if layer is None or layer.is_float or layer.op != "linear" or layer.activation is None:
                what = "not in the plan" if layer is None else "float" if layer.is_float else f"a {layer.op}"
                raise PlanError(f"layers.{name}: only a quantized Linear takes a per-token grid; this one is {what}. "
                                "Fix: name the plan's quantized Linears")
            layers[name] = replace(layer, activation=X86_ACTIVATION_PER_TOKEN.narrowed(layer.activation.bits),
                                   act_range=None, decision={**layer.decision, "activations": "per_token"})
        return QuantPlan(layers, dict(self.provenance))

    def check_layers(self, names: Iterable[str], *, model: str = "this model") -> None:
        """Raise `PlanError` unless the plan names exactly the quantizable layers `names`."""
        names = list(names)
        unknown = [n for n in self.layers if n not in set(names)]
        missing = [n for n in names if n not in self.layers]
        if unknown or missing:
            made_for = self.provenance.get("model", "another model")
            parts = []
            if unknown:
                parts.append(f"{len(unknown)} plan layer(s) are not layers of {model} (e.g. {unknown[:3]})")
            if missing:
                parts.append(f"{len(missing)} layer(s) of {model} are not in the plan (e.g. {missing[:3]})")
            raise PlanError(f"the plan was made for {made_for!r}: " + "; ".join(parts) + ". Fix: make a plan for "
                            f"{model} (search or a baseline rule), or pass the model the plan was made for.")

    def to_dict(self) -> dict[str, Any]:
        version = PLAN_VERSION if any(layer.per_token for layer in self.layers.values()) else 1
        return {"format": PLAN_FORMAT, "version": version, "provenance": self.provenance,
                "layers": {n: layer.to_dict() for n, layer in self.layers.items()}}

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "plan") -> QuantPlan:
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise PlanError(f"{source}: not an sq-plugin quantization plan (its \"format\" is not {PLAN_FORMAT!r})")
        version = data.get("version")
        if not isinstance(version, int) or version > PLAN_VERSION:
            raise PlanError(f"{source}: plan schema version {version!r} is newer than this sq-plugin reads "
                            f"({PLAN_VERSION}). Fix: upgrade sq-plugin, or re-make the plan with this version.")
        layers = data.get("layers")
        if not isinstance(layers, dict):
            raise PlanError(f"{source}: \"layers\" must be a mapping of module name -> layer plan")
        try:
            return cls({n: LayerPlan.from_dict(n, v) for n, v in layers.items()}, dict(data.get("provenance") or {}))
        except PlanError as exc:
            raise PlanError(f"{source}: {exc}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n"

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan as JSON, atomically (`sq_plugin.core.files.atomic_write`)."""
        text = self.to_json().encode()
        return atomic_write(path, lambda f: f.write(text))

    @classmethod
    def load(cls, path: str | os.PathLike) -> QuantPlan:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as exc:
            raise PlanError(f"{path}: cannot read the plan ({exc.strerror or exc})") from None
        except ValueError as exc:
            raise PlanError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(data, source=str(path))

    def table(self) -> str:
        """One row per layer: op, activation grid and range, weight grid and rule, or float and why."""
        lines = ["| layer | op | activations | range | weights | decided by |", "|---|---|---|---|---|---|"]
        for name, layer in self.layers.items():
            if layer.is_float:
                lines.append(f"| {name} | {layer.op} | float | - | float | {layer.why_float} |")
                continue
            act = layer.activation.describe() if layer.activation else "float"
            rng = (f"[{layer.act_range[0]:.4g}, {layer.act_range[1]:.4g}]" if layer.act_range else
                   "per token, at run time" if layer.per_token else "-")
            weight = f"{layer.weight.describe()}, {layer.weight_rule}" if layer.weight else "float"
            decided = ", ".join(f"{k}={v}" for k, v in layer.decision.items()) or "-"
            lines.append(f"| {name} | {layer.op} | {act} | {rng} | {weight} | {decided} |")
        head = ", ".join(f"{k}: {v}" for k, v in self.provenance.items() if not isinstance(v, dict | list))
        summary = f"{len(self.quantized)} quantized, {len(self.float_layers)} float"
        return "\n".join([f"{head}; {summary}" if head else summary, "", *lines]) + "\n"
