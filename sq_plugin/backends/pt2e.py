"""torchao PT2E adapter: StableQuant observers, an x86 quantizer that also covers Conv1d, and lowering.

Translation only: statistics and range decisions live in `sq_plugin.core`.

    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, convert_pt2e
    quantizer = StableQuantX86Quantizer().set_global(stablequant_x86_config())
    prepared = prepare_pt2e(export_for_quantization(model, (audio,)), quantizer)
    calibrate(prepared, batches)
    compiled, report = lower_x86(convert_pt2e(prepared), (audio,))   # report.int8_kernels > 0, or it raises

A calibration lives in the observers' buffers, so it can be saved, resumed and merged across processes
exactly (the histograms merge bin for bin; see `merge_observer_states`):

    torch.save(prepared.state_dict(), "calibration-0.pt")          # each process, over its shard
    prepared.load_state_dict(merge_observer_states(torch.load(f, weights_only=True) for f in files))

Why a quantizer subclass: torchao's `X86InductorQuantizer` annotates `aten.conv1d` only inside a
Conv1d+ReLU fusion pattern, so wav2vec2/HuBERT's feature extractor (Conv1d -> LayerNorm/GroupNorm
-> GELU) and positional conv stay float. `StableQuantX86Quantizer` annotates standalone conv1d
nodes too; Inductor's x86 lowering accepts them ("conv1d/2d"), which `lower_x86` verifies.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import time
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.export import Dim
from torchao.quantization.pt2e.observer import UniformQuantizationObserverBase
from torchao.quantization.pt2e.quantizer import QuantizationConfig, QuantizationSpec
from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
    QUANT_ANNOTATION_KEY,
    X86InductorQuantizer,
    _skip_annotate,
    _X86InductorQuantizationAnnotation,
)

from sq_plugin.backends.simulate import is_parametrized, strip_weight_norm
from sq_plugin.backends.x86_isa import X86IsaPolicy, require_x86, x86_policy
from sq_plugin.core.plan import LayerPlan, PlanError, QuantPlan
from sq_plugin.core.quant import DEFAULT_EPS, check_bits
from sq_plugin.core.ranges import RangeRule, compute_range
from sq_plugin.core.stats import DEFAULT_BINS, Histogram

_SYMMETRIC = (torch.per_tensor_symmetric, torch.per_channel_symmetric)


def _rule_from(rule: RangeRule | dict | str | None, method: str | None, percentile: float | None,
               mse_grid: int | None, default: RangeRule) -> RangeRule:
    if isinstance(rule, str):
        rule = RangeRule(method=rule)  # type: ignore[arg-type]
    elif isinstance(rule, dict):
        rule = RangeRule.from_dict(rule)
    base = rule if rule is not None else default
    return RangeRule(
        method=method if method is not None else base.method,  # type: ignore[arg-type]
        percentile=percentile if percentile is not None else base.percentile,
        mse_grid=mse_grid if mse_grid is not None else base.mse_grid,
    )


# What a StableQuant observer keeps in its state_dict: the five arrays of its `Histogram`, one buffer each
# (buffer -> Histogram field). They have 0 rows while the observer has seen no data; the per-channel
# observer adds `hist_ch_axis`, the axis its rows run along.
_HIST_BUFFERS = {"hist_counts": "counts", "hist_exponents": "exponents", "hist_min": "min_val",
                 "hist_max": "max_val", "hist_count": "count"}
_CH_AXIS_BUFFER = "hist_ch_axis"
_UNNAMED = "an unnamed PT2E observer"
_STATE_FIX = ("Fix: load a state_dict saved from the same model prepared the same way (same quantizer and bins); "
              "a model of another architecture or layer shape has to be calibrated from scratch.")


class StableQuantObserver(UniformQuantizationObserverBase):
    """Per-tensor PT2E observer: collects a mergeable histogram, decides the range with a `RangeRule`.

    Knobs go through `with_args`: `StableQuantObserver.with_args(method="percentile_then_mse",
    percentile=99.8)`, or `rule=RangeRule(...)`. `layer_name` only improves error messages; left
    unset, it is read from the prepared graph (the layer that consumes the observed tensor) when
    `StableQuantX86Quantizer` made the observer, with `prepare_stablequant` or torchao's `prepare_pt2e`.

    The statistics are buffers (`hist_counts`, `hist_exponents`, `hist_min`, `hist_max`, `hist_count`:
    the `Histogram`'s arrays, 0 rows before any data), so a calibration survives `state_dict()` /
    `load_state_dict()`: resume it, or merge several (`merge_observer_states`).
    """

    default_rule = RangeRule("percentile_then_mse", percentile=100.0)

    def __init__(self, dtype: torch.dtype = torch.uint8, qscheme: torch.qscheme = torch.per_tensor_affine,
                 quant_min: int | None = None, quant_max: int | None = None, is_dynamic: bool = False,
                 eps: float = DEFAULT_EPS, rule: RangeRule | dict | str | None = None, method: str | None = None,
                 percentile: float | None = None, mse_grid: int | None = None, bins: int = DEFAULT_BINS,
                 layer_name: str | None = None, **kwargs: Any) -> None:
        if is_dynamic:
            raise ValueError("StableQuant observers compute static ranges; use PlaceholderObserver for dynamic "
                             "quantization")
        super().__init__(dtype=dtype, qscheme=qscheme, quant_min=quant_min, quant_max=quant_max,
                         is_dynamic=is_dynamic, eps=eps, **kwargs)
        self.rule = _rule_from(rule, method, percentile, mse_grid, self.default_rule)
        levels = self.quant_max - self.quant_min + 1
        bits = int(round(math.log2(levels)))
        if 2**bits != levels:
            raise ValueError(f"quant range [{self.quant_min}, {self.quant_max}] is not a power-of-two grid")
        check_bits(bits)
        self.bits = bits
        self.bins = bins
        self.layer_name = layer_name
        self.hist: Histogram | None = None
        self._last_weight: tuple[weakref.ref, int] | None = None  # see forward
        # The prepared graph (a weak reference, set by StableQuantX86Quantizer): where the layer name and,
        # for a weight, the channel count the statistics must have, are read.
        self._graph_ref: weakref.ref | None = None
        self._label_tried = False
        self._check_loaded_weight = False  # see forward
        self._sync_buffers()

    @property
    def name(self) -> str:
        if self.layer_name is None:
            self._resolve_label()
        return self.layer_name or _UNNAMED

    # ---- the graph this observer sits in (labels, shape checks) ----

    def _graph_node(self) -> tuple[torch.fx.GraphModule, torch.fx.Node] | None:
        graph = self._graph_ref() if self._graph_ref is not None else None
        module = getattr(graph, "owning_module", None)
        if module is None:
            return None
        for node, observer in _observer_nodes(module):
            if observer is self:
                return module, node
        return None

    def _resolve_label(self) -> None:
        """Name this observer (and every unnamed one of its graph, in one pass) after the layer it serves."""
        if self.layer_name is not None or self._label_tried:
            return
        self._label_tried = True
        graph = self._graph_ref() if self._graph_ref is not None else None
        module = getattr(graph, "owning_module", None)
        if module is not None:
            for node, observer in _observer_nodes(module):
                if observer.layer_name is None:
                    observer.layer_name = _observer_label(node)

    # ---- statistics <-> buffers ----

    def _sync_buffers(self) -> None:
        """Point the statistics buffers at the histogram's arrays (no copy; rows = 0 without a histogram)."""
        arrays = (self.hist if self.hist is not None else Histogram.empty(rows=0, bins=self.bins)).arrays()
        for buffer, name in _HIST_BUFFERS.items():
            tensor = torch.from_numpy(arrays[name])
            if buffer in self._buffers:
                setattr(self, buffer, tensor)
            else:
                self.register_buffer(buffer, tensor)

    def _state_names(self) -> tuple[str, ...]:
        return tuple(_HIST_BUFFERS)

    def _layout_problem(self, hist: Histogram) -> tuple[str, str] | None:
        """(what is wrong, the fix) when loaded statistics do not fit this observer."""
        if hist.bins != self.bins:
            return (f"the saved statistics have {hist.bins} histogram bins, this observer {self.bins}",
                    f"Fix: prepare the model with the bins it was calibrated with (stablequant_x86_config("
                    f"bins={hist.bins})), or calibrate from scratch.")
        if hist.rows not in (0, 1):
            return (f"the saved statistics have {hist.rows} rows (per-channel statistics), this per-tensor "
                    "observer keeps 1: the state_dict comes from another model or quantizer", _STATE_FIX)
        return None

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        self._sync_buffers()  # the histogram is the reference (`module.to(...)` may have converted the buffers)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        names = self._state_names()
        present = [n for n in names if prefix + n in state_dict]
        before_hist, before = self.hist, {n: self._buffers[n] for n in names}
        for n in present:
            value = state_dict[prefix + n]
            if isinstance(value, torch.Tensor):  # the statistics change shape with the data: take the saved one
                setattr(self, n, torch.empty(value.shape, dtype=before[n].dtype))
        if present and local_metadata.get("version") is None:
            # A state_dict copied into a plain dict loses its version metadata, and torchao then takes it for a
            # version-1 state and resets eps; statistics buffers exist only in states saved since version 3.
            local_metadata = {**local_metadata, "version": self._version}
        errors = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        problem = None
        if present and len(error_msgs) == errors:
            if len(present) < len(names):
                lacking = ", ".join(prefix + n for n in names if n not in present)
                problem = (f"the saved statistics are incomplete: {lacking} missing", _STATE_FIX)
            else:
                problem = self._restore_from_buffers()
        if problem is not None or len(error_msgs) > errors:
            self.hist = before_hist
            for n, tensor in before.items():
                setattr(self, n, tensor)
        if problem is not None:
            what, fix = problem
            error_msgs.append(f"{prefix.rstrip('.') or type(self).__name__}, the observer of {self.name}: "
                              f"{what}. {fix}")

    def _restore_from_buffers(self) -> tuple[str, str] | None:
        try:
            hist = Histogram.from_arrays(**{name: self._buffers[b] for b, name in _HIST_BUFFERS.items()})
        except ValueError as exc:
            return f"the saved statistics are not a valid histogram ({exc})", _STATE_FIX
        problem = self._layout_problem(hist)
        if problem is not None:
            return problem
        self.hist = hist if hist.rows else None
        self._sync_buffers()
        # A loaded weight statistic already counts its weight; see forward.
        self._last_weight = None
        self._check_loaded_weight = self.hist is not None and self._channel_axis() is not None
        return None

    def __getstate__(self) -> dict[str, Any]:
        # The weak references (last weight, graph) cannot be pickled (torch.save of a prepared model, deepcopy);
        # dropping the last weight only means that weight is counted once more after loading. A copy has no
        # graph to read its layer name from, so it takes the name along. The histogram travels as the buffers.
        self._resolve_label()
        self._sync_buffers()
        state = self.__dict__.copy()
        state.update(_last_weight=None, _graph_ref=None, hist=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for attr, default in (("_graph_ref", None), ("_label_tried", False), ("_check_loaded_weight", False)):
            self.__dict__.setdefault(attr, default)
        if self.hist is None and "hist_counts" in self._buffers:  # else: pickled before the buffers existed
            hist = Histogram.from_arrays(**{name: self._buffers[b] for b, name in _HIST_BUFFERS.items()})
            self.hist = hist if hist.rows else None
        self._sync_buffers()

    # ---- observing, deciding ----

    def _channel_axis(self) -> int | None:
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return x
        axis = self._channel_axis()
        # A weight is the same tensor on every call (a Whisper decode step runs once per token).
        # Observing it again only scales all of its histogram counts, which no range rule sees (max,
        # percentile and MSE are invariant to it), yet costs a pass over the tensor. Identity plus
        # version means "this tensor, unchanged"; only per-channel (weight) observers track it.
        if axis is not None and self._last_weight is not None:
            ref, version = self._last_weight
            if ref() is x and x._version == version:
                return x
        if axis is not None and self.hist is not None and x.shape[axis] != self.hist.rows:
            raise ValueError(
                f"{self.name}: this weight has {x.shape[axis]} channels along axis {axis}, its statistics "
                f"{self.hist.rows} (loaded from a state_dict of another model or layer shape?). {_STATE_FIX}")
        if self._check_loaded_weight:
            # Statistics loaded from a state_dict (resumed or merged calibration) that hold exactly this weight
            # already count it: it is not added a second time, so resuming gives the one-go histogram.
            self._check_loaded_weight = False
            fresh = Histogram.of(x.detach(), bins=self.bins, name=self.name, channel_axis=axis)
            if not fresh.equals(self.hist):
                self.hist = self.hist.merge(fresh)
                self._sync_buffers()
        else:
            hist = self.hist
            if hist is None:
                hist = Histogram.empty(rows=1 if axis is None else x.shape[axis], bins=self.bins)
            hist.update(x.detach(), name=self.name, channel_axis=axis)  # raises (NaN/Inf) before changing it
            self.hist = hist
            self._sync_buffers()
        if axis is not None:
            self._last_weight = (weakref.ref(x), x._version)
        return x

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The float range [lo, hi] the rule picks (per channel for the per-channel observer)."""
        if self.hist is None:
            raise RuntimeError(
                f"{self.name}: the observer never saw data, so its range is unknown. Run calibration "
                "batches through the prepared model before convert_pt2e (is the calibration set empty?)."
            )
        lo, hi = compute_range(self.hist, self.rule, bits=self.bits, symmetric=self.qscheme in _SYMMETRIC,
                               signed=self.quant_min < 0, name=self.name)
        if (lo == 0).all() and (hi == 0).all():
            raise RuntimeError(
                f"{self.name}: every calibration value was 0, so the range is empty. Use calibration audio "
                "that exercises this layer, or exclude the layer from quantization (a per-layer None config)."
            )
        return torch.as_tensor(lo, dtype=torch.float32), torch.as_tensor(hi, dtype=torch.float32)

    @torch.jit.export
    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.compute_range()
        if self._channel_axis() is None:
            lo, hi = lo.reshape(()), hi.reshape(())
        return self._calculate_qparams(lo, hi)

    def extra_repr(self) -> str:
        return f"rule={self.rule}, bits={self.bits}, layer={self.layer_name}"


class StableQuantPerChannelObserver(StableQuantObserver):
    """Per-channel variant (weights). The class name contains "PerChannel" on purpose: PT2E's
    prepare drops `ch_axis` for observers whose name does not. Its state_dict also holds the layout
    (`hist_ch_axis`); loading statistics of another channel count fails, naming the layer."""

    default_rule = RangeRule("max")

    def __init__(self, dtype: torch.dtype = torch.int8, qscheme: torch.qscheme = torch.per_channel_symmetric,
                 ch_axis: int = 0, **kwargs: Any) -> None:
        super().__init__(dtype=dtype, qscheme=qscheme, **kwargs)
        self.ch_axis = ch_axis
        self._sync_buffers()

    def _channel_axis(self) -> int | None:
        return self.ch_axis

    def _sync_buffers(self) -> None:
        super()._sync_buffers()
        if "ch_axis" not in self.__dict__:
            return  # in the base __init__, before ch_axis is set
        current = self._buffers.get(_CH_AXIS_BUFFER)
        if current is None or current.shape != () or int(current) != self.ch_axis:
            tensor = torch.tensor(self.ch_axis, dtype=torch.int64)
            if current is None:
                self.register_buffer(_CH_AXIS_BUFFER, tensor)
            else:
                setattr(self, _CH_AXIS_BUFFER, tensor)

    def _state_names(self) -> tuple[str, ...]:
        return (*_HIST_BUFFERS, _CH_AXIS_BUFFER)

    def _layout_problem(self, hist: Histogram) -> tuple[str, str] | None:
        if hist.bins != self.bins:
            return super()._layout_problem(hist)
        saved_axis = self._buffers[_CH_AXIS_BUFFER]
        if saved_axis.numel() != 1 or int(saved_axis) != self.ch_axis:
            return (f"the saved statistics run along axis {saved_axis.tolist()}, this observer's along "
                    f"{self.ch_axis}", _STATE_FIX)
        expected = self._expected_channels()
        if hist.rows and expected is not None and hist.rows != expected:
            return (f"the saved statistics cover {hist.rows} channels, this layer's weight has {expected} "
                    f"(along axis {self.ch_axis}): the state_dict comes from another model or layer shape",
                    _STATE_FIX)
        return None

    def _expected_channels(self) -> int | None:
        """The channel count of the weight this observer watches, read from the prepared graph (None: unknown)."""
        found = self._graph_node()
        if found is None or not found[1].args or not isinstance(found[1].args[0], torch.fx.Node):
            return None
        module, arg = found[0], found[1].args[0]
        value = arg.meta.get("val")
        if not isinstance(value, torch.Tensor) and arg.op == "get_attr":
            try:
                value = functools.reduce(getattr, str(arg.target).split("."), module)
            except AttributeError:
                return None
        shape = getattr(value, "shape", None)
        if shape is None or not -len(shape) <= self.ch_axis < len(shape):
            return None
        return int(shape[self.ch_axis])


class PercentileObserver(StableQuantObserver):
    """Baseline: percentile calibration (none ships in torchao or INC 3.x). Default p = 99.99."""

    default_rule = RangeRule("percentile", percentile=99.99)


class MSEObserver(StableQuantObserver):
    """Baseline: MSE-optimal range over the whole histogram, no percentile clipping."""

    default_rule = RangeRule("mse")


def stablequant_x86_config(act_rule: RangeRule | None = None, weight_rule: RangeRule | None = None, *,
                           a_bits: int = 8, w_bits: int = 8, bins: int = DEFAULT_BINS,
                           int8_grid: str = "auto") -> QuantizationConfig:
    """A `QuantizationConfig` for `X86InductorQuantizer` with StableQuant observers.

    Activations: unsigned per-tensor affine on [0, 2**a_bits - 1] (what oneDNN's qlinear/qconv take).
    Weights: signed per-output-channel symmetric on [-2**(w_bits-1), 2**(w_bits-1) - 1].
    int8_grid: "auto" (this CPU's policy, `sq_plugin.backends.x86_isa`: W8A8 in full with VNNI, 7-bit weights
    without), "full" (refused without VNNI), "narrow_weights", "narrow_activations" (7-bit at 8 bits).
    Bits below 8 keep int8 storage with a narrower grid: real INT8 kernels computing a W6A6/W4A4 grid.
    """
    check_bits(a_bits, name="a_bits")
    check_bits(w_bits, name="w_bits")
    w_bits, a_bits = x86_policy(int8_grid).grid_bits(w_bits, a_bits)  # the grids that will execute
    act_rule = act_rule or StableQuantObserver.default_rule
    weight_rule = weight_rule or StableQuantPerChannelObserver.default_rule
    act = QuantizationSpec(
        dtype=torch.uint8, quant_min=0, quant_max=2**a_bits - 1, qscheme=torch.per_tensor_affine,
        is_dynamic=False, observer_or_fake_quant_ctr=StableQuantObserver.with_args(rule=act_rule, bins=bins),
    )
    weight = QuantizationSpec(
        dtype=torch.int8, quant_min=-(2 ** (w_bits - 1)), quant_max=2 ** (w_bits - 1) - 1,
        qscheme=torch.per_channel_symmetric, ch_axis=0, is_dynamic=False,
        observer_or_fake_quant_ctr=StableQuantPerChannelObserver.with_args(rule=weight_rule, bins=bins),
    )
    return QuantizationConfig(act, act, weight, None, False)


class PlanRangeObserver(StableQuantObserver):
    """An input-activation observer whose range is fixed by a `QuantPlan` (`act_range`): it collects
    nothing, so the plan's decision reaches the graph unchanged, with no second statistics pass."""

    def __init__(self, *, act_range: tuple[float, float], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.act_range = (float(act_range[0]), float(act_range[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(self.act_range[0]), torch.tensor(self.act_range[1])

    def extra_repr(self) -> str:
        return f"plan range={self.act_range}, bits={self.bits}, layer={self.layer_name}"


class StoredScalePerChannelObserver(StableQuantPerChannelObserver):
    """A weight observer whose per-channel scales are given: those of a `StoredWeight`
    (`sq_plugin.backends.weights`), decided before export (a mixed-precision allocation's MSE clipping, or
    the learned step sizes of the one-stage method). The model must already hold the dequantized weight
    (`install_stored_weights`); convert then rounds it back to exactly the stored codes. A weight that is
    not on that grid (the float weight was left in place) is refused, naming the layer."""

    def __init__(self, *, stored_scale: torch.Tensor, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stored_scale = stored_scale.detach().to(torch.float32).clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return x
        if x.shape[self.ch_axis] != self.stored_scale.numel():
            raise PlanError(f"{self.name}: the stored weight has {self.stored_scale.numel()} channels, this layer "
                            f"{x.shape[self.ch_axis]}. Fix: store the weights of this model")
        shape = [1] * x.dim()
        shape[self.ch_axis] = -1
        scale = self.stored_scale.reshape(shape)
        off_grid = (x.detach().float() - torch.round(x.detach().float() / scale) * scale).abs().max()
        if float(off_grid) > 1e-3 * float(scale.min()):
            raise PlanError(f"{self.name}: the weight is not on its stored grid (off by up to {float(off_grid):.3g}). "
                            "Fix: install the stored weights first (sq_plugin.backends.weights.install_stored_weights)")
        return x

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        half = (self.quant_max - self.quant_min) / 2.0
        return -self.stored_scale * half, self.stored_scale * half

    @torch.jit.export
    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        # The scales themselves, not re-derived from a range (which would round them by an ulp).
        return self.stored_scale.clone(), torch.zeros(self.stored_scale.numel(), dtype=torch.int64)

    def extra_repr(self) -> str:
        return f"stored scales, bits={self.bits}, layer={self.layer_name}"


STORED = "stored"  # a plan layer's weight_rule when its codes and scales are stored (a StoredWeight)


def plan_layer_config(layer: LayerPlan, *, name: str, bins: int = DEFAULT_BINS,
                      stored_scale: torch.Tensor | None = None) -> QuantizationConfig:
    """The x86 `QuantizationConfig` of one quantized plan layer: its activation grid with the plan's range,
    its weight grid with the plan's weight rule, or (weight_rule "stored") the given per-channel scales.
    Raises `PlanError` for grids oneDNN's ops cannot take."""
    problem = layer.x86_scheme_problem(name)
    if problem is not None:
        raise PlanError(problem)
    if (layer.weight_rule == STORED) != (stored_scale is not None):
        raise PlanError(f"layers.{name}: weight_rule {layer.weight_rule!r} "
                        + ("takes the stored weights' scales; none were given. Fix: pass weights= (the StoredWeights "
                           "saved with the plan, sq_plugin.backends.packed.load_packed)" if stored_scale is None else
                           "re-derives the weight's scales; stored scales were given. Fix: mark the layer 'stored'"))
    act, weight = layer.activation, layer.weight
    act_spec = QuantizationSpec(
        dtype=torch.uint8, quant_min=act.qmin, quant_max=act.qmax, qscheme=torch.per_tensor_affine, is_dynamic=False,
        observer_or_fake_quant_ctr=PlanRangeObserver.with_args(act_range=layer.act_range, bins=bins))
    # An op whose *output* the quantizer annotates (a fused pattern) still calibrates it from data.
    out_spec = dataclasses.replace(act_spec, observer_or_fake_quant_ctr=StableQuantObserver.with_args(bins=bins))
    if stored_scale is not None:
        weight_observer = StoredScalePerChannelObserver.with_args(stored_scale=stored_scale, bins=bins)
    else:
        weight_observer = StableQuantPerChannelObserver.with_args(rule=RangeRule(layer.weight_rule),  # type: ignore
                                                                  bins=bins)
    weight_spec = QuantizationSpec(
        dtype=torch.int8, quant_min=weight.qmin, quant_max=weight.qmax, qscheme=torch.per_channel_symmetric, ch_axis=0,
        is_dynamic=False, observer_or_fake_quant_ctr=weight_observer)
    return QuantizationConfig(act_spec, out_spec, weight_spec, None, False)


def check_plan_runs_here(plan: QuantPlan, policy: X86IsaPolicy | None = None) -> None:
    """Refuse (IsaError, layers named) a plan whose grids this CPU's oneDNN would compute wrong."""
    from sq_plugin.backends.per_token import check_per_token_runs_here
    from sq_plugin.backends.x86_isa import IsaError

    policy = policy or x86_policy()
    check_per_token_runs_here(plan, policy)
    problems = {}
    for name, layer in plan.layers.items():
        if layer.activation is not None and layer.weight is not None and not layer.per_token:
            # grids only: a grouped conv the policy cannot run is made weight-only by the quantizer instead
            why = policy.op_problem(layer.op, layer.activation.qmax, max(-layer.weight.qmin, layer.weight.qmax))
            if why is not None:
                problems[name] = why
    if problems:
        first = next(iter(problems))
        raise IsaError(f"{len(problems)} plan layer(s) use grids this CPU ({policy.kind}) computes wrong, e.g. "
                       f"{first}: {problems[first]}. Fix: make the plan on this CPU (int8_grid 'auto' narrows the "
                       "weights to 7 bits without VNNI), or run it on a CPU with VNNI/AMX.")


def plan_deviations(converted: torch.fx.GraphModule, plan: QuantPlan,
                    graph_names: dict[str, str] | None = None) -> dict[str, str]:
    """Per plan layer, how the converted graph departs from the plan (empty: it honours every layer).

    PT2E quantizes a tensor once for all its consumers, so layers that share an input (q/k/v
    projections) run with one range: the plan's range of the first of them.
    """
    from sq_plugin.backends.artifact import layer_qparams
    from sq_plugin.core.quant import qparams_from_range

    graph = layer_qparams(converted)
    deviations = {}
    for name, layer in plan.layers.items():
        entry = graph.get((graph_names or {}).get(name, name))
        if entry is None:
            continue
        if layer.is_float:
            if entry["input"] is not None:
                deviations[name] = "quantized in the graph, float in the plan"
            continue
        if layer.per_token:  # a swapped layer is no aten.linear any more: it has no entry
            deviations[name] = ("a Linear of the graph, not the plan's per-token INT8 Linear. Fix: swap it before "
                                "export (sq_plugin.backends.per_token.swap_per_token_linears)")
            continue
        if entry["input"] is None or entry["weight"] is None:
            deviations[name] = f"{'weight-only' if entry['weight'] else 'float'} in the graph (this CPU's ISA policy)"
            continue
        scale, zero = qparams_from_range(layer.act_range[0], layer.act_range[1], layer.activation.qmin,
                                         layer.activation.qmax, symmetric=False)
        got = entry["input"]
        if abs(got["scale"] - float(scale)) > 1e-6 * float(scale) or got["zero_point"] != int(zero):
            deviations[name] = (f"input quantized with range {[round(v, 6) for v in got['range']]}, not the plan's "
                                f"{[round(v, 6) for v in layer.act_range]}: it shares its input with another layer "
                                "(PT2E quantizes a tensor once)")
    return deviations


def stablequant_x86_quantizer_from_plan(plan: QuantPlan, *, graph_names: dict[str, str] | None = None,
                                        bins: int = DEFAULT_BINS, weights: Mapping[str, Any] | None = None
                                        ) -> StableQuantX86Quantizer:
    """The quantizer that applies `plan`: every plan layer gets its own config (fixed input range, its
    grids); float layers get none; layers the plan does not name stay float.

    graph_names: plan layer name -> module name in the graph being quantized, for graphs that hold the
    model's layers under other paths (Whisper's INT8 graphs; `sq_plugin.families.whisper_int8.graph_layer_names`).
    weights: plan layer name -> `StoredWeight` for the layers whose weight_rule is "stored" (a mixed-precision
    plan): their scales go to PT2E unchanged; the model must hold the dequantized weights.
    """
    check_plan_runs_here(plan)
    stray = sorted(set(weights or {}) - set(plan.layers))
    if stray:
        raise PlanError(f"stored weights for {len(stray)} layer(s) the plan does not name (e.g. {stray[:3]}). Fix: "
                        "pass the weights saved with this plan")
    quantizer = StableQuantX86Quantizer()
    for name, layer in plan.layers.items():
        if graph_names is not None and name not in graph_names:
            continue  # not in this graph (e.g. a decoder layer when quantizing the encoder graph)
        target = graph_names[name] if graph_names is not None else name
        stored = (weights or {}).get(name)
        # A per-token layer is a PerTokenInt8Linear by now (swap_per_token_linears): nothing for PT2E to observe.
        config = None if layer.is_float or layer.per_token else plan_layer_config(
            layer, name=name, bins=bins, stored_scale=stored.scale if stored is not None else None)
        quantizer.set_module_name_qconfig(target, config)
    return quantizer


def cpu_has_amx() -> bool:
    """Whether oneDNN picks its AMX INT8 kernels here (an AMX Xeon, not capped below AMX)."""
    return x86_policy().kind == "amx"


def grouped_qconv_is_safe() -> bool:
    """False where oneDNN's grouped INT8 conv gives wrong results: with AMX in torch 2.13, a grouped
    conv with a long kernel (wav2vec2/HuBERT's positional conv: 16 groups, kernel 128) comes out
    several times its own norm away from the fake-quant graph (kernel 16 and 8+ channels per group
    already), while the same kernels capped at AVX512-VNNI (ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI)
    agree to rounding. Setting that variable before torch starts makes grouped convs safe again.
    The rule is one row of the ISA table in `sq_plugin.backends.x86_isa`."""
    return x86_policy().grouped_conv_int8


def _conv_groups(node: torch.fx.Node) -> int:
    return int(node.args[6]) if len(node.args) > 6 else int(node.kwargs.get("groups", 1))


class StableQuantX86Quantizer(X86InductorQuantizer):
    """`X86InductorQuantizer` that also annotates standalone `aten.conv1d` (wav2vec2/HuBERT front end).

    quantize_grouped_conv1d: None (default) asks this CPU's policy per grouped conv1d (the positional
    conv; `X86IsaPolicy.grouped_conv_problem`: wrong on AMX, oneDNN's slow reference kernel without
    VNNI for groups of channels that are not multiples of 4); a conv it refuses runs in float and is
    listed in `skipped_layers`, with its weight still quantized (weight-only: stored INT8 with
    per-channel scales, dequantized for a float conv; Inductor folds the dequantize at compile time).
    The artifact thus stays INT8-sized, and the numbers are those of the fake-quant graph's weights
    with a float activation. True / False: quantize every grouped conv1d / none.
    """

    def __init__(self, *, quantize_conv1d: bool = True, quantize_grouped_conv1d: bool | None = None) -> None:
        super().__init__()
        self.quantize_conv1d = quantize_conv1d
        self.quantize_grouped_conv1d = quantize_grouped_conv1d
        self.skipped_layers: dict[str, str] = {}  # module name -> why it stays float

    def prepare_obs_or_fq_callback(self, model: torch.fx.GraphModule, edge_or_node_to_obs_or_fq: dict) -> None:
        """Give each StableQuant observer a weak reference to the graph it is inserted into: that is where it
        reads its layer name for error messages (and a weight observer its channel count when statistics are
        loaded), with torchao's plain `prepare_pt2e` too (`prepare_stablequant` also labels them at once)."""
        super().prepare_obs_or_fq_callback(model, edge_or_node_to_obs_or_fq)
        graph = weakref.ref(model.graph)  # prepare_pt2e wraps this graph in its returned GraphModule
        for observer in edge_or_node_to_obs_or_fq.values():
            if isinstance(observer, StableQuantObserver):
                observer._graph_ref = graph

    def _grouped_conv_problem(self, node: torch.fx.Node) -> str | None:
        groups = _conv_groups(node)
        if groups == 1 or self.quantize_grouped_conv1d:
            return None
        if self.quantize_grouped_conv1d is False:
            return "quantize_grouped_conv1d=False"
        out_channels, in_per_group = node.args[1].meta["val"].shape[:2]
        return x86_policy().grouped_conv_problem(groups, int(in_per_group), int(out_channels) // groups)

    def _annotate_with_config(self, model: torch.fx.GraphModule, quantization_config: QuantizationConfig | None,
                              filter_fn: Any) -> None:
        if self.quantize_conv1d:
            for node in model.graph.nodes:
                if node.op == "call_function" and node.target == torch.ops.aten.conv1d.default:
                    if _skip_annotate([node], filter_fn):
                        continue
                    why = self._grouped_conv_problem(node)
                    if why is not None:
                        self.skipped_layers[_module_name(node) or node.name] = (
                            f"grouped conv1d runs in float (INT8 weight, float activation): {why}")
                        if quantization_config is not None:
                            node.meta[QUANT_ANNOTATION_KEY] = _X86InductorQuantizationAnnotation(
                                input_qspec_map={node.args[1]: quantization_config.weight}, _annotated=True)
                        continue
                    self._annotate_conv_node_helper(node, True, quantization_config)
        super()._annotate_with_config(model, quantization_config, filter_fn)


def stablequant_x86_quantizer(config: QuantizationConfig | None = None,
                              per_layer: dict[str, QuantizationConfig | RangeRule | None] | None = None, *,
                              a_bits: int = 8, w_bits: int = 8, int8_grid: str = "auto") -> StableQuantX86Quantizer:
    """The quantizer with a global config and per-module overrides.

    `per_layer` maps a module name (e.g. "wav2vec2.feature_extractor.conv_layers.2.conv") to a full
    `QuantizationConfig`, to a `RangeRule` for that layer's input activation, or to None (keep float).
    int8_grid: see `stablequant_x86_config`.
    """
    quantizer = StableQuantX86Quantizer().set_global(
        config or stablequant_x86_config(a_bits=a_bits, w_bits=w_bits, int8_grid=int8_grid))
    for name, override in (per_layer or {}).items():
        if isinstance(override, RangeRule):
            override = stablequant_x86_config(act_rule=override, a_bits=a_bits, w_bits=w_bits, int8_grid=int8_grid)
        quantizer.set_module_name_qconfig(name, override)
    return quantizer  # type: ignore[return-value]


def observer_x86_quantizer(observer: Any, *, a_bits: int = 8, w_bits: int = 8,
                           int8_grid: str = "auto") -> StableQuantX86Quantizer:
    """A framework baseline on the same x86 scheme: StableQuant's specs (grids, per-channel MAX weights) with
    `observer` (e.g. torchao's `HistogramObserver.with_args(eps=2**-12)`) deciding every input range."""
    config = stablequant_x86_config(a_bits=a_bits, w_bits=w_bits, int8_grid=int8_grid)
    act = dataclasses.replace(config.input_activation, observer_or_fake_quant_ctr=observer)
    return stablequant_x86_quantizer(dataclasses.replace(config, input_activation=act, output_activation=act),
                                     a_bits=a_bits, w_bits=w_bits, int8_grid=int8_grid)


def export_for_quantization(model: torch.nn.Module, example_inputs: tuple, *,
                            dynamic_dims: dict[int, int] | None = None,
                            dynamic_batch: bool = False, strict: bool = False) -> torch.fx.GraphModule:
    """`torch.export` a speech model for PT2E (eval mode, weight norm folded, dynamic audio length).

    The caller's model is left as it was: weight norm is folded on a copy (only when there is
    any), and the train/eval flag of every module is restored after the export.

    `dynamic_dims` maps input index -> dynamic dimension; default: dimension 1 of every input, the
    time axis of a (batch, samples) waveform and of its attention mask. `Dim.AUTO` is used because a
    named `Dim` with bounds fails on the conv stride arithmetic of wav2vec2-style front ends.
    `dynamic_batch=True` also makes dimension 0 of every input dynamic, so that one graph (and one
    saved artifact) serves any batch size. Export specializes a size-1 dimension to 1, so the
    examples are traced repeated to batch 2; the graph then accepts batch 1 as well.
    strict: `torch.export`'s strict mode (TorchDynamo tracing). Off by default; models with in-place
    residual adds (`out += identity`) need it on, or PT2E fails with "Input partition has more than
    one output node".
    """
    if is_parametrized(model):
        model = strip_weight_norm(copy.deepcopy(model))
    dims = {i: 1 for i in range(len(example_inputs))} if dynamic_dims is None else dynamic_dims
    shapes: list[dict[int, Any] | None] = [{dims[i]: Dim.AUTO} if i in dims else None
                                           for i in range(len(example_inputs))]
    if dynamic_batch:
        shapes = [{0: Dim.AUTO, **(s or {})} for s in shapes]
        example_inputs = tuple(torch.cat([x, x]) if x.shape[0] == 1 else x for x in example_inputs)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        return torch.export.export(model, tuple(example_inputs), dynamic_shapes=tuple(shapes), strict=strict).module()
    finally:
        for module, training in modes.items():
            module.training = training


def label_observers(prepared: torch.fx.GraphModule) -> dict[str, str]:
    """Give each StableQuant observer the name of the layer it serves; returns {observer: label}.

    Observers made by `StableQuantX86Quantizer` find the same label by themselves when they first need
    it (plain `prepare_pt2e`); this names them all at once, and any others (e.g. another quantizer's)."""
    labels: dict[str, str] = {}
    for node, observer in _observer_nodes(prepared):
        observer.layer_name = _observer_label(node)
        labels[node.target] = observer.layer_name
    return labels


def _observer_nodes(prepared: torch.fx.GraphModule) -> Iterable[tuple[torch.fx.Node, StableQuantObserver]]:
    """The (call_module node, observer) pairs of the StableQuant observers in a prepared graph."""
    for node in prepared.graph.nodes:
        if node.op != "call_module":
            continue
        try:
            observer = prepared.get_submodule(node.target)
        except AttributeError:
            continue
        if isinstance(observer, StableQuantObserver):
            yield node, observer


def _observer_label(node: torch.fx.Node) -> str:
    """The label "<layer> (input)" or "<layer> (weight)": the module of the op that consumes the observed tensor."""
    users = [u for u in node.users if u.op == "call_function"]
    role = "weight" if node.args and getattr(node.args[0], "op", None) == "get_attr" else "input"
    layer = _module_name(users[0]) if users else None
    return f"{layer or node.target} ({role})"


def merge_observer_states(state_dicts: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Merge calibrations: one state_dict whose StableQuant statistics are those of all the given ones together.

    Each state_dict is `prepared.state_dict()` of the same model prepared the same way (same quantizer,
    same bins), e.g. one per process, each over its shard of the calibration set:

        torch.save(prepared.state_dict(), f"calibration-{rank}.pt")          # in every process
        merged = merge_observer_states(torch.load(f, weights_only=True) for f in files)
        prepared.load_state_dict(merged)                                   # a prepared model, any process
        converted = convert_pt2e(prepared)

    The merge is exact (`Histogram.merge`): the qparams equal those of one calibration over all the
    shards. A weight (per-channel) observer counts its weight once, as it does within one process:
    identical weight statistics (the same weight seen in every process) are taken once. Observers that
    saw no data add nothing. Everything else (the model's weights, `eps`) must be equal in all of them
    and is kept. Raises ValueError, naming the key, for state_dicts of different models or layouts.
    `merge_calibration` adds state_dicts to a prepared model's own calibration.
    """
    return _merge_states(list(state_dicts), lambda prefix: prefix.rstrip(".") or "the observer")


def merge_calibration(prepared: torch.fx.GraphModule, state_dicts: Iterable[Mapping[str, Any]]) -> torch.fx.GraphModule:
    """Add the calibrations in `state_dicts` (saved `state_dict()`s of the same model prepared the same way,
    e.g. by other processes) to `prepared`'s own, in place: afterwards it holds the statistics of all of
    them, as if it had seen all their data (see `merge_observer_states`). Returns `prepared`."""
    names = {f"{name}.": module.name for name, module in prepared.named_modules()
             if isinstance(module, StableQuantObserver)}
    merged = _merge_states([prepared.state_dict(), *state_dicts],
                           lambda prefix: f"{prefix.rstrip('.')} ({names[prefix]})" if prefix in names else prefix)
    prepared.load_state_dict(merged)
    return prepared


def _stats_prefixes(keys: Iterable[str]) -> list[str]:
    keys = set(keys)
    prefixes = [k[: -len("hist_counts")] for k in keys if k == "hist_counts" or k.endswith(".hist_counts")]
    return sorted(p for p in prefixes if all(p + b in keys for b in _HIST_BUFFERS))


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a.cpu(), b.cpu()))
    return type(a) is type(b) and a == b


def _merge_states(states: list[Mapping[str, Any]], describe: Any) -> dict[str, Any]:
    if not states:
        raise ValueError("merge_observer_states needs at least one state_dict")
    first = states[0]
    fix = "Fix: merge only state_dicts of the same model prepared the same way (same quantizer and bins)."
    for i, other in enumerate(states[1:], 1):
        if set(other) != set(first):
            diff = sorted(set(other) ^ set(first))
            raise ValueError(f"state_dict {i} and state_dict 0 have different keys ({', '.join(diff[:3])}"
                             f"{', ...' if len(diff) > 3 else ''}): they come from different models or quantizers. "
                             f"{fix}")
    prefixes = _stats_prefixes(first)
    stats_keys = {p + b for p in prefixes for b in (*_HIST_BUFFERS, _CH_AXIS_BUFFER)}
    for key in first:
        if key in stats_keys:
            continue
        for i, other in enumerate(states[1:], 1):
            if not _same_value(first[key], other[key]):
                raise ValueError(f"{key} differs between state_dict 0 and state_dict {i}: calibrations of "
                                 f"different models (or of changed weights) cannot be merged. {fix}")
    merged: dict[str, Any] = {}
    for prefix in prefixes:
        axis_key = prefix + _CH_AXIS_BUFFER
        per_channel = axis_key in first
        hists: list[Histogram] = []
        bins = None
        for i, state in enumerate(states):
            if per_channel and not _same_value(state[axis_key], first[axis_key]):
                raise ValueError(f"{describe(prefix)}: state_dict {i} holds per-channel statistics along axis "
                                 f"{state[axis_key].tolist()}, state_dict 0 along {first[axis_key].tolist()}. {fix}")
            try:
                hist = Histogram.from_arrays(**{name: state[prefix + b] for b, name in _HIST_BUFFERS.items()})
            except ValueError as exc:
                raise ValueError(f"{describe(prefix)}: state_dict {i} holds no valid histogram ({exc}). {fix}") from exc
            if bins is not None and hist.bins != bins:
                raise ValueError(f"{describe(prefix)}: state_dict {i} has {hist.bins} histogram bins, the others "
                                 f"{bins}. {fix}")
            bins = hist.bins
            if hist.rows == 0 or (per_channel and any(hist.equals(h) for h in hists)):
                continue
            if hists and hist.rows != hists[0].rows:
                raise ValueError(f"{describe(prefix)}: state_dict {i} has statistics of {hist.rows} channels, an "
                                 f"earlier one of {hists[0].rows}: another layer shape. {fix}")
            hists.append(hist)
        total = Histogram.empty(rows=0, bins=bins or DEFAULT_BINS) if not hists else hists[0].copy()
        for hist in hists[1:]:
            total = total.merge(hist)
        for b, name in _HIST_BUFFERS.items():
            merged[prefix + b] = torch.from_numpy(total.arrays()[name])
        if per_channel:
            merged[axis_key] = first[axis_key].clone()
    result = OrderedDict((key, merged.get(key, value)) for key, value in first.items())
    # state_dict()'s per-module versions: without them torchao takes the observers for version 1 (resets eps)
    metadata = next((m for m in (getattr(s, "_metadata", None) for s in states) if m is not None), None)
    if metadata is not None:
        result._metadata = copy.deepcopy(metadata)  # type: ignore[attr-defined]
    return result


def _module_name(node: torch.fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path.removeprefix("L['self'].")


def prepare_stablequant(model: torch.nn.Module, example_inputs: tuple,
                        quantizer: X86InductorQuantizer | None = None, *,
                        dynamic_dims: dict[int, int] | None = None,
                        dynamic_batch: bool = False, strict: bool = False) -> torch.fx.GraphModule:
    """Export + `prepare_pt2e` with StableQuant observers (default: `stablequant_x86_quantizer()`),
    each observer labelled with its layer. `dynamic_dims`, `dynamic_batch`, `strict`: see
    `export_for_quantization`."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    exported = export_for_quantization(model, example_inputs, dynamic_dims=dynamic_dims, dynamic_batch=dynamic_batch,
                                       strict=strict)
    try:
        prepared = prepare_pt2e(exported, quantizer or stablequant_x86_quantizer())
    except ValueError as exc:
        if strict or "more than one output node" not in str(exc):
            raise
        # A module called twice (torchvision's shared ReLU) or an in-place add (`out += identity`) gives a
        # source partition with two outputs in the non-strict export; TorchDynamo's strict trace does not.
        raise ValueError(f"{exc}: the quantizer's fusion patterns cannot read this non-strict export (a module "
                         "used twice, or an in-place residual add). Fix: pass strict=True "
                         "(prepare_stablequant(..., strict=True)).") from exc
    label_observers(prepared)
    return prepared


@torch.no_grad()
def calibrate(prepared: torch.fx.GraphModule, batches: Iterable[tuple | torch.Tensor]) -> int:
    """Run calibration batches through a prepared model; returns how many ran. Raises if none did."""
    n = 0
    for batch in batches:
        prepared(*(batch if isinstance(batch, tuple) else (batch,)))
        n += 1
    if n == 0:
        raise ValueError("the calibration set is empty: pass at least one batch of audio (a few hundred "
                         "utterances are typical)")
    return n


_QUANT_OPS = {
    torch.ops.aten.linear.default: "linear",
    torch.ops.aten.conv1d.default: "conv1d",
    torch.ops.aten.conv2d.default: "conv2d",
}


def count_quantized_ops(converted: torch.fx.GraphModule) -> dict[str, int]:
    """Per op kind, in a `convert_pt2e` output: how many take dequantized INT8 weights and
    activations ("linear": INT8 kernels once lowered), how many only an INT8 weight
    ("conv1d_weight_only": float compute) and how many stay float ("linear_float")."""
    counts: dict[str, int] = {}
    for node in converted.graph.nodes:
        kind = _QUANT_OPS.get(node.target) if node.op == "call_function" else None
        if kind is None:
            continue
        weight, activation = node.args[1], node.args[0]
        quantized = getattr(weight, "op", None) == "call_function" and "dequantize" in str(weight.target)
        act_quantized = getattr(activation, "op", None) == "call_function" and "dequantize" in str(activation.target)
        key = (kind if act_quantized else f"{kind}_weight_only") if quantized else f"{kind}_float"
        counts[key] = counts.get(key, 0) + 1
    return counts


def count_int_mm(converted: torch.fx.GraphModule) -> int:
    """How many `torch._int_mm` GEMMs a graph holds (the per-token Linears of `backends.per_token`)."""
    int_mm = torch.ops.aten._int_mm.default
    return sum(1 for n in converted.graph.nodes if n.op == "call_function" and n.target == int_mm)


@dataclass
class LoweringReport:
    """What Inductor's x86 lowering produced: INT8 kernel counts from its pattern-matcher counters."""

    counters: dict[str, int] = field(default_factory=dict)

    @property
    def qlinear(self) -> int:
        return sum(v for k, v in self.counters.items() if k.startswith("qlinear") and k.endswith("_lower_count"))

    @property
    def qconv(self) -> int:
        return sum(v for k, v in self.counters.items() if k.startswith("qconv") and k.endswith("_lower_count"))

    @property
    def int8_kernels(self) -> int:
        """oneDNN qlinear/qconv kernels plus the per-token Linears' `_int_mm` GEMMs."""
        return self.qlinear + self.qconv + self.per_token_linear

    isa: str = ""  # the ISA policy and grids it was lowered under, e.g. "avx2: 7-bit weights, 8-bit activations"
    int8_attention: int = 0  # attention blocks whose Q·Kᵀ and P·V run on INT8 GEMMs (torch._int_mm)
    per_token_linear: int = 0  # Linears on per-token INT8 activations (torch._int_mm; backends.per_token)

    @property
    def backend(self) -> str:
        parts = [self.isa] if self.isa else []
        if self.per_token_linear:
            parts.append(f"{self.per_token_linear} per-token Linears on torch._int_mm")
        if self.int8_attention:
            parts.append(f"INT8 attention in {self.int8_attention} blocks")
        return f"x86-onednn-int8 ({', '.join(parts)})" if parts else "x86-onednn-int8"


def graph_grid_bits(converted: torch.fx.GraphModule) -> tuple[int | None, int | None]:
    """(weight bits, activation bits) of the widest grids of the INT8 ops in a converted graph (None:
    nothing quantized on that side)."""
    from sq_plugin.backends.artifact import layer_qparams

    weights, activations = [], []
    for entry in layer_qparams(converted).values():
        if entry["input"] is not None and entry["weight"] is not None:
            activations.append(entry["input"]["quant_max"] - entry["input"]["quant_min"] + 1)
            w = entry["weight"]
            if w["quant_min"] is not None and w["quant_max"] is not None:
                weights.append(w["quant_max"] - w["quant_min"] + 1)
    return (int(round(math.log2(max(weights)))) if weights else None,
            int(round(math.log2(max(activations)))) if activations else None)


def graph_weight_widths(converted: torch.fx.GraphModule) -> list[int]:
    """Every weight width of the INT8 ops in a converted graph, ascending (one entry unless mixed precision)."""
    from sq_plugin.backends.artifact import layer_qparams

    widths = set()
    for entry in layer_qparams(converted).values():
        w = entry["weight"]
        if entry["input"] is not None and w is not None and w["quant_min"] is not None and w["quant_max"] is not None:
            widths.add(int(round(math.log2(w["quant_max"] - w["quant_min"] + 1))))
    return sorted(widths)


def isa_problems(converted: torch.fx.GraphModule, policy: X86IsaPolicy | None = None) -> dict[str, str]:
    """Per layer of a converted graph, why oneDNN would compute it wrong on this CPU (empty: all right).

    Reads the grids in the graph itself, so it judges any PT2E graph: ours, torchao's default X86
    config (full 0..255 activations) or a loaded artifact made on another CPU.
    """
    from sq_plugin.backends.artifact import layer_qparams

    policy = policy or x86_policy()
    problems = {}
    for name, entry in layer_qparams(converted).items():
        act, weight = entry["input"], entry["weight"]
        if act is None or weight is None:
            continue  # float, or weight-only (float compute): no INT8 kernel
        weight_absmax = max(abs(weight["quant_min"] if weight["quant_min"] is not None else -128),
                            abs(weight["quant_max"] if weight["quant_max"] is not None else 127))
        why = policy.op_problem(entry["op"], act["quant_max"], weight_absmax, entry.get("groups", 1))
        if why is not None:
            problems[name] = why
    return problems


def check_runs_right_here(converted: torch.fx.GraphModule) -> X86IsaPolicy:
    """Refuse (IsaError, every layer named) a graph whose INT8 ops oneDNN would compute wrong on this
    CPU; return the policy it will run under."""
    from sq_plugin.backends.x86_isa import IsaError, int8_attention_problem

    require_x86()
    policy = x86_policy()
    int_mm = count_int_mm(converted)
    problem = int8_attention_problem(policy) if int_mm else None
    if problem:
        raise IsaError(f"{int_mm} per-token INT8 Linear(s) of this graph run on torch._int_mm: {problem}. Fix: "
                       "quantize on this CPU (a plan with static activation ranges), or run the graph on a CPU "
                       "with VNNI or AMX")
    problems = isa_problems(converted, policy)
    if problems:
        by_reason: dict[str, list[str]] = {}
        for name, why in problems.items():
            by_reason.setdefault(why, []).append(name)
        listed = "; ".join(f"{why}: {', '.join(names[:3])}" + (f" and {len(names) - 3} more" if len(names) > 3 else "")
                           for why, names in by_reason.items())
        raise IsaError(
            f"{len(problems)} INT8 op(s) of this graph would be computed wrong by oneDNN on this CPU "
            f"({policy.kind}{', ONEDNN_MAX_CPU_ISA=' + policy.cap if policy.cap else ''}): {listed}. Fix: "
            "quantize on this CPU with the default int8_grid='auto' (7-bit weights without VNNI, "
            "grouped conv1d weight-only on AMX), or run the graph on a CPU of the kind it was made for; "
            "an artifact made with 7-bit weights or 7-bit activations runs right on every x86 CPU.")
    return policy


def install_conv1d_meta_fix() -> None:
    """Work around a shape bug in torch's meta function for `onednn.qconv_pointwise` (torch 2.13).

    The prepacked weight of a conv1d is 4-D (O, I, 1, K); the meta function takes the kernel size
    from weight.shape[2:] = (1, K) and zips it with the single spatial dim, so it computes the output
    length with kernel 1. Whenever Inductor re-runs that meta (e.g. for wav2vec2's positional conv,
    whose output feeds a residual add) compilation fails with a broadcast error. The fix drops the
    unit dim for exactly that (3-D input, 4-D weight) case, which the original never handles correctly.
    It stays installed (idempotent): a later recompilation for a new audio length needs it too.
    """
    import torch._meta_registrations as meta

    original = meta.calc_conv_nd_return_shape
    if getattr(original, "_sq_conv1d_fix", False):
        return

    def fixed(input_tensor, weight, *args, **kwargs):  # type: ignore[no-untyped-def]
        if input_tensor.dim() == 3 and weight.dim() == 4 and weight.shape[2] == 1:
            weight = weight.squeeze(2)
        return original(input_tensor, weight, *args, **kwargs)

    fixed._sq_conv1d_fix = True  # type: ignore[attr-defined]
    meta.calc_conv_nd_return_shape = fixed


# INT8 kernels vs the converted fake-quant graph, relative L2 on the output: rounding ties measured
# 0.005 on the tiny test models; a wrong kernel measured 0.74 (whole model) and 3-5 (the op alone).
MAX_KERNEL_ERROR = 0.1
# Past MAX_KERNEL_ERROR, with the float model at hand: right kernels are as close to float as the fake-quant graph
# (they only round some ties the other way), a wrong kernel is much further. A deep model amplifies those ties:
# Whisper base's encoder at W8A8 measured 0.109 from its q/dq graph, 0.444 from float against the graph's 0.435
# (a saturating oneDNN kernel: 0.089 from q/dq on an MLP whose q/dq graph is within 0.01 of float).
MAX_KERNEL_FLOAT_EXCESS = 0.25  # INT8's distance to float may exceed the q/dq graph's by this fraction
# The known ways oneDNN computes something else than the q/dq graph, and the fix of each.
KNOWN_KERNEL_DEFECTS = (
    "(1) AVX2/AVX512 without VNNI: u8 x s8 products are summed in int16 pairs, which saturate on the full "
    "W8A8 grids (fix: quantize with int8_grid='auto', 7-bit weights there, or 'narrow_activations'; "
    "sq_plugin.backends.x86_isa detects it, but a CPU or ONEDNN_MAX_CPU_ISA cap it does not know may slip through); "
    "(2) AMX: grouped INT8 conv1d is wrong in torch 2.13 (fix: StableQuantX86Quantizer keeps it weight-only "
    "by default, or set ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI before starting Python)"
)
# Inductor's x86 INT8 lowering builds a tensor from a tensor (torch/_inductor/mkldnn_lowerings.py);
# harmless, and shown once per compiled layer. Only that message is silenced, only while compiling.
_INDUCTOR_COPY_WARNING = "To copy construct from a tensor"


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict):
        return _first_tensor(next(iter(out.values())))
    if isinstance(out, list | tuple):
        return _first_tensor(out[0])
    raise TypeError(f"cannot find an output tensor in {type(out).__name__}")


def _int8_lowered() -> int:
    from torch._dynamo.utils import counters

    return sum(v for k, v in counters["inductor"].items() if k.startswith(("qlinear", "qconv"))
               and k.endswith("_lower_count"))


class Int8Module:
    """A converted model compiled to oneDNN INT8 kernels, that refuses to run in float.

    Compiled with static shapes: Inductor (torch 2.13) fails to lower INT8 conv1d with dynamic
    shapes (a channels-last stride assertion in the qconv lowering), and a recompilation outside the
    freezing setting would silently run the q/dq graph in float. So every call runs with freezing on,
    each new input shape compiles once, and a compilation that lowers no INT8 kernel raises. Feed a
    bounded set of lengths (e.g. pad audio to whole seconds) to bound the number of compilations.
    """

    def __init__(self, converted: torch.fx.GraphModule, quantized_ops: int, *,
                 max_error: float | None = MAX_KERNEL_ERROR, cpp_wrapper: bool = False,
                 runs: torch.fx.GraphModule | None = None, reference: Callable[..., Any] | None = None,
                 batch_dims: dict[int, int] | None = None, output_batch_dim: int = 0) -> None:
        self.converted = converted
        # batch_dims (input index -> its batch dimension; the first output's is output_batch_dim): the check then
        # runs the fake-quant graph one row at a time, so its memory is one row's, not the batch's (Whisper tiny.en
        # at batch 8: 325 MB of the process's peak otherwise). Rows must not interact (no padding across them).
        self.batch_dims = dict(batch_dims or {})
        self.output_batch_dim = output_batch_dim
        self.cpp_wrapper = cpp_wrapper
        self.quantized_ops = quantized_ops
        self.max_error = max_error
        # reference: the float model `converted` was quantized from (same inputs, same first output); when the
        # INT8 output is more than max_error from the fake-quant graph's, it decides whether that is rounding
        # amplified by the model (INT8 as close to float as fake-quant) or a kernel computing something else.
        self.reference = reference
        self.errors: dict[tuple, float] = {}  # input shapes -> relative error against the fake-quant graph
        # input shapes -> {"int8": INT8's, "fake_quant": the q/dq graph's} relative error against `reference`
        # (measured only for a shape past max_error)
        self.float_errors: dict[tuple, dict[str, float]] = {}
        self.refused: dict[tuple, str] = {}  # input shapes whose compilation failed the check -> why
        # runs: the graph compiled, if not `converted` itself (its attention rewritten to INT8): the check still
        # compares against `converted`, so the error it reports includes what INT8 attention changes.
        self.compiled = torch.compile(converted if runs is None else runs, dynamic=False)
        self.shapes: set[tuple] = set()
        # Seconds spent in calls that compiled a new input shape (compilation and that first run): reports keep
        # them apart from steady-state time.
        self.compile_seconds = 0.0

    def __call__(self, *args: torch.Tensor) -> Any:
        key = (tuple(tuple(a.shape) for a in args), torch.is_inference_mode_enabled())
        if key in self.refused:  # the compiled graph is cached: calling it again would skip the check
            raise RuntimeError(self.refused[key])
        if key in self.shapes:
            # A shape compiled and checked before runs its cached graph without the compile-time config patches:
            # entering them costs ~0.2 ms a call, a twentieth of a Whisper decoder step. `fail_on_recompile` keeps
            # this path from ever compiling: an input the cached graph's guards refuse (the same shape in another
            # memory layout) raises here and takes the path below, which compiles with freezing, as INT8 needs.
            try:
                with torch.compiler.set_stance("fail_on_recompile"), torch.no_grad():
                    return self.compiled(*args)
            except RuntimeError as exc:
                if "fail_on_recompile" not in str(exc):
                    raise
        import torch._dynamo.config as dynamo_config
        import torch._inductor.config as inductor_config

        # Importing the quantizer module registers torchao's x86 fusion passes with Inductor.
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401

        before = _int8_lowered()
        start = time.perf_counter()
        with inductor_config.patch(freezing=True, cpp_wrapper=self.cpp_wrapper), \
                dynamo_config.patch(recompile_limit=256), torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_INDUCTOR_COPY_WARNING, category=UserWarning)
            out = self.compiled(*args)
        if key not in self.shapes:
            self.compile_seconds += time.perf_counter() - start
            lowered = _int8_lowered() - before
            if self.quantized_ops and lowered == 0:
                raise RuntimeError(
                    f"compiling for input shapes {key[0]} lowered no INT8 kernel for the {self.quantized_ops} "
                    "quantized ops: the model would run in float. Is this an x86 CPU with oneDNN "
                    "(torch.backends.mkldnn.is_available())?"
                )
            if self.max_error is not None:
                self._check_against_fake_quant(key, args, out)
            self.shapes.add(key)
        return out

    def _check_against_fake_quant(self, key: tuple, args: tuple, out: Any) -> None:
        """Compare a new compilation with the converted graph (float q/dq) on the same input: INT8
        kernels agree with it up to rounding ties; a kernel that computes something else does not."""
        want = self._by_rows(self.converted, args)
        got = _first_tensor(out).float()
        error = _relative_l2(got, want)
        self.errors[key] = error
        if math.isfinite(error) and error <= self.max_error:
            return
        versus_float = ""
        if math.isfinite(error) and self.reference is not None:
            exact = self._by_rows(self.reference, args)
            measured = {"int8": _relative_l2(got, exact), "fake_quant": _relative_l2(want, exact)}
            self.float_errors[key] = measured
            if measured["int8"] <= measured["fake_quant"] * (1 + MAX_KERNEL_FLOAT_EXCESS):
                return  # rounding ties, amplified by the model: INT8 is as close to float as the q/dq graph
            versus_float = (f"; against the float model the INT8 output is {measured['int8']:.3g} off, the "
                            f"fake-quant graph {measured['fake_quant']:.3g} (allowed: "
                            f"{1 + MAX_KERNEL_FLOAT_EXCESS:g}x)")
        self.refused[key] = (
            f"the INT8 kernels compiled for input shapes {key[0]} disagree with the fake-quant graph: "
            f"relative error {error:.3g} > {self.max_error} (rounding alone stays near 0.01){versus_float}. A "
            f"oneDNN kernel computes something else on this CPU ({x86_policy().kind}). Known cases: "
            f"{KNOWN_KERNEL_DEFECTS}."
        )
        raise RuntimeError(self.refused[key])

    def _by_rows(self, model: Callable[..., Any], args: tuple) -> torch.Tensor:
        """`model(*args)`'s first output as float: one batch row at a time when `batch_dims` are known (the rows
        joined again along `output_batch_dim`), else in one call."""
        with torch.no_grad():
            if not self.batch_dims:
                return _first_tensor(model(*args)).float()
            index, dim = next(iter(self.batch_dims.items()))
            rows = args[index].shape[dim]
            outputs = []
            for row in range(rows):
                sliced = tuple(a.narrow(self.batch_dims[i], row, 1) if i in self.batch_dims else a
                               for i, a in enumerate(args))
                outputs.append(_first_tensor(model(*sliced)).float())
            return torch.cat(outputs, dim=self.output_batch_dim)


def _relative_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-12))


def int8_modules(obj: Any) -> list[Int8Module]:
    """The `Int8Module`s `obj` is or holds, up to three attributes deep (a `QuantizedModel`'s CTC graph at
    .bundle.model, Whisper's encoder and decoder step at .bundle.model.encode / .step), each once."""
    found: dict[int, Int8Module] = {}
    stack, seen = [(obj, 0)], set()
    while stack:
        item, depth = stack.pop()
        if id(item) in seen or item is None or isinstance(item, str | int | float | bool | torch.Tensor):
            continue
        seen.add(id(item))
        if isinstance(item, Int8Module):
            found[id(item)] = item
            continue
        if depth < 3:
            stack += [(v, depth + 1) for v in getattr(item, "__dict__", {}).values() if not isinstance(v, dict | list)]
    return list(found.values())


def lower_x86(converted: torch.fx.GraphModule, example_inputs: tuple, *,
              require_int8: bool = True, cpp_wrapper: bool = False,
              int8_attention: bool = False, reference: Callable[..., Any] | None = None,
              batch_dims: dict[int, int] | None = None, output_batch_dim: int = 0
              ) -> tuple[Int8Module, LoweringReport]:
    """Compile a converted model with Inductor freezing so q/dq patterns become oneDNN INT8 kernels.

    Runs `example_inputs` once (that is when compilation happens) and returns an `Int8Module` and a
    `LoweringReport` of that compilation. If the graph has quantized ops but nothing was lowered to
    INT8, it raises instead of silently running the model in float (`require_int8=False` reports it).
    `cpp_wrapper=True` has Inductor call the kernels from generated C++ instead of Python: it costs
    compile time and saves per-call overhead, which matters for graphs of many small kernels (a
    decoder step).
    Before compiling, `check_runs_right_here` refuses a graph whose INT8 ops this CPU's oneDNN would
    compute wrong (`sq_plugin.backends.x86_isa`), naming each layer and the fix.
    int8_attention=True also runs attention's Q·Kᵀ and P·V on INT8 GEMMs (`sq_plugin.backends.int8_attention`;
    refused on CPUs without VNNI, where they would saturate); `converted` itself is left as it is.
    reference: the float model `converted` came from; `Int8Module` then tells a deep model's amplified rounding
    (INT8 as close to float as the fake-quant graph) from a wrong kernel when the two graphs differ by more
    than `MAX_KERNEL_ERROR`.
    batch_dims, output_batch_dim: where the inputs' and the first output's batch rows are, when rows are independent:
    the kernel check then runs the fake-quant graph row by row, in a row's memory (`Int8Module`).
    """
    if int8_attention:
        from sq_plugin.backends.x86_isa import IsaError, int8_attention_problem

        problem = int8_attention_problem(x86_policy())
        if problem:
            raise IsaError(f"int8_attention: {problem}. Fix: leave int8_attention off here (attention stays float), "
                           "or run on a CPU with VNNI or AMX")
    policy = check_runs_right_here(converted)
    install_conv1d_meta_fix()
    quantized = sum(v for k, v in count_quantized_ops(converted).items() if k in _QUANT_OPS.values())
    runs, attention_blocks = None, 0
    if int8_attention:
        from sq_plugin.backends.int8_attention import use_int8_attention

        # A second graph over the same weights (no copy of them), its attention nodes rewritten. Copying the graph
        # copies torch's pytree specs, which warn about their own deprecated LeafSpec check (not ours to fix).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            runs = torch.fx.GraphModule(converted, copy.deepcopy(converted.graph))
        attention_blocks = use_int8_attention(runs)
    from torch._dynamo.utils import counters

    counters.clear()
    module = Int8Module(converted, quantized if require_int8 else 0, cpp_wrapper=cpp_wrapper, runs=runs,
                        reference=reference, batch_dims=batch_dims, output_batch_dim=output_batch_dim)
    module(*example_inputs)
    report = LoweringReport({k: int(v) for k, v in counters["inductor"].items() if k.startswith(("qlinear", "qconv"))},
                            isa=policy.describe(*graph_grid_bits(converted)), int8_attention=attention_blocks,
                            per_token_linear=count_int_mm(converted))
    widths = graph_weight_widths(converted)
    if len(widths) > 1:  # a mixed-precision plan: say so, not just the widest grid
        report.isa = report.isa.replace(f"{widths[-1]}-bit weights",
                                        f"mixed {'/'.join(map(str, widths))}-bit weights", 1)
    return module, report
