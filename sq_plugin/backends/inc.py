"""Intel Neural Compressor 3.x adapter: StableQuant as an INC algorithm, and INC's own static quant as a baseline.

Importing this module registers the "stablequant" config and algorithm with INC; then INC's own
entry points run StableQuant's PT2E path (`sq_plugin.backends.pt2e`):

    import sq_plugin.backends.inc  # noqa: F401  (the registration)
    from neural_compressor.torch.quantization import convert, prepare, quantize

    config = StableQuantConfig(per_layer=search.per_layer_rules())        # or {"stablequant": {...}}
    quantized = quantize(model, config, run_fn=calibrate_fn, example_inputs=(audio,))
    prepared = prepare(model, config, example_inputs=(audio,)); calibrate_fn(prepared); quantized = convert(prepared)

Translation only: the config becomes `stablequant_x86_quantizer(...)`, the model goes through
`prepare_stablequant` and torchao's `convert_pt2e`, exactly as `quantize_ctc_pt2e` does.

The baseline (`sq_plugin.families.ctc.quantize_ctc_inc`) is INC's built-in `StaticQuantConfig` as shipped:
X86InductorQuantizer with MovingAverageMinMaxObserver ("minmax") or HistogramObserver ("kl"), W8A8 only. INC's PT2E path
leaves standalone Conv1d (the wav2vec2/HuBERT front end and positional conv) in float; the op counts
report it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import torch

try:
    from neural_compressor.common.base_config import register_config
    from neural_compressor.common.utils import DEFAULT_WHITE_LIST, Mode
    from neural_compressor.torch.algorithms.base_algorithm import Quantizer
    from neural_compressor.torch.quantization.config import TorchBaseConfig
    from neural_compressor.torch.utils.utility import register_algo
except ImportError as exc:  # an optional extra: say how to get it
    raise ImportError(
        "sq_plugin.backends.inc needs Intel Neural Compressor 3.x (neural-compressor-pt 3.10): "
        'pip install "sq-plugin[inc]"'
    ) from exc

from sq_plugin.backends.x86_isa import GRID_CHOICES
from sq_plugin.core.plan import QuantPlan
from sq_plugin.core.quant import check_bits
from sq_plugin.core.ranges import RangeRule

STABLEQUANT = "stablequant"
INC_ACT_ALGOS = ("minmax", "kl")
# What INC's BaseConfig keeps in the instance __dict__ and hands back to __init__ through
# `_post_init` (`self.__class__(**get_params_dict(), white_list=None)`) and through `to_dict`.
_INC_INTERNAL_KWARGS = frozenset({"params_list", "non_tunable_params", "_is_initialized"})

PerLayerRules = dict[str, RangeRule | dict | None]


@register_config(framework_name="torch", algo_name=STABLEQUANT)
class StableQuantConfig(TorchBaseConfig):
    """INC config for StableQuant's PT2E quantization.

    w_bits, a_bits: 2..8 (below 8 the grid narrows inside int8 storage, as in `stablequant_x86_config`).
    method, percentile, mse_grid: the global activation `RangeRule` (defaults: `RangeRule()`).
    per_layer: module name -> RangeRule, its dict ({"method", "percentile", "mse_grid"}, missing keys
    taken from the global rule) or None (keep that layer float). `SearchResult.per_layer_rules()` fits.
    int8_grid: "auto" (this CPU's x86 policy: 7-bit weights without VNNI), "full", "narrow_weights",
    "narrow_activations" (`sq_plugin.backends.x86_isa`).
    plan: a `QuantPlan` (or its dict), e.g. `search.to_plan()`: applied as is (fixed input ranges and
    grids); the rule and bit arguments are then unused.
    Stored as plain dicts so the config round-trips through `to_dict`/`from_dict`/JSON.
    """

    name = STABLEQUANT
    supported_configs: list = []

    def __init__(self, w_bits: int = 8, a_bits: int = 8, method: str = RangeRule.method,
                 percentile: float = RangeRule.percentile, mse_grid: int = RangeRule.mse_grid,
                 per_layer: PerLayerRules | None = None, int8_grid: str = "auto", plan: dict | None = None,
                 white_list: Any = DEFAULT_WHITE_LIST, **kwargs: Any) -> None:
        unknown = set(kwargs) - _INC_INTERNAL_KWARGS
        if unknown:
            raise TypeError(f"StableQuantConfig got unknown parameter(s) {sorted(unknown)}; valid: "
                            "w_bits, a_bits, method, percentile, mse_grid, per_layer, int8_grid, plan")
        if int8_grid not in GRID_CHOICES:
            raise ValueError(f"StableQuantConfig: int8_grid must be one of {', '.join(GRID_CHOICES)} "
                             f"(got {int8_grid!r})")
        # white_list=None means "leaf config" to INC's _post_init, which re-creates the class with it:
        # pass it through unchanged (mapping None back to the default recurses forever).
        super().__init__(white_list=white_list)
        check_bits(w_bits, name="w_bits")
        check_bits(a_bits, name="a_bits")
        rule = RangeRule(method=method, percentile=percentile, mse_grid=mse_grid)  # validates early
        self.w_bits = w_bits
        self.a_bits = a_bits
        self.method = rule.method
        self.percentile = rule.percentile
        self.mse_grid = rule.mse_grid
        self.per_layer = _per_layer_dicts(per_layer, rule)
        self.int8_grid = int8_grid
        # A QuantPlan, stored as its dict so the config round-trips through INC's to_dict/from_dict/JSON.
        self.plan = QuantPlan.from_dict(plan).to_dict() if isinstance(plan, dict) else (
            plan.to_dict() if isinstance(plan, QuantPlan) else None)
        if plan is not None and self.plan is None:
            raise TypeError(f"StableQuantConfig: plan must be a QuantPlan or its dict (got {type(plan).__name__})")
        self._post_init()

    @property
    def act_rule(self) -> RangeRule:
        return RangeRule(method=self.method, percentile=self.percentile, mse_grid=self.mse_grid)  # type: ignore

    def per_layer_rules(self) -> dict[str, RangeRule | None]:
        return {name: None if rule is None else RangeRule.from_dict(rule) for name, rule in self.per_layer.items()}

    @classmethod
    def register_supported_configs(cls) -> None:
        cls.supported_configs = []

    def get_model_info(self, model: torch.nn.Module, example_inputs: Any = None) -> None:
        return None  # the PT2E quantizer picks the ops itself

    def to_config_mapping(self, config_list: Any = None, model_info: Any = None) -> OrderedDict:
        if self.local_config:
            raise ValueError("StableQuantConfig does not take INC set_local(...) overrides; pass per-layer "
                             "rules as per_layer={module_name: {'method': ..., 'percentile': ...}}")
        return OrderedDict({self.name: self})

    @classmethod
    def get_config_set_for_tuning(cls) -> StableQuantConfig:
        return cls()


def _per_layer_dicts(per_layer: PerLayerRules | None, default: RangeRule) -> dict[str, dict | None]:
    out: dict[str, dict | None] = {}
    for name, rule in (per_layer or {}).items():
        if rule is None or isinstance(rule, RangeRule):
            out[name] = None if rule is None else rule.to_dict()
        elif isinstance(rule, dict):
            out[name] = RangeRule.from_dict({**default.to_dict(), **rule}).to_dict()
        else:
            raise TypeError(f"per_layer[{name!r}] must be a RangeRule, a dict or None (got {type(rule).__name__})")
    return out


def stablequant_quantizer_from_config(config: StableQuantConfig) -> Any:
    """The `StableQuantX86Quantizer` that `quantize_ctc_pt2e` builds for the same settings."""
    from sq_plugin.backends.pt2e import (
        stablequant_x86_config,
        stablequant_x86_quantizer,
        stablequant_x86_quantizer_from_plan,
    )

    if config.plan is not None:
        return stablequant_x86_quantizer_from_plan(QuantPlan.from_dict(config.plan))
    grid = config.int8_grid
    global_config = stablequant_x86_config(config.act_rule, a_bits=config.a_bits, w_bits=config.w_bits,
                                           int8_grid=grid)
    return stablequant_x86_quantizer(global_config, config.per_layer_rules(), a_bits=config.a_bits,
                                     w_bits=config.w_bits, int8_grid=grid)


class StableQuantINCQuantizer(Quantizer):
    """INC's algorithm interface (prepare/convert; `quantize` and `execute` come from INC's base)."""

    def prepare(self, model: torch.nn.Module, example_inputs: Any = None, **kwargs: Any) -> torch.fx.GraphModule:
        from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

        from sq_plugin.backends.pt2e import label_observers, prepare_stablequant

        quantizer = stablequant_quantizer_from_config(self.quant_config)
        if getattr(model, "_exported", False):  # already exported with neural_compressor.torch.export.export
            prepared = prepare_pt2e(model, quantizer)
            label_observers(prepared)
            return prepared
        if example_inputs is None:
            raise ValueError("StableQuant through INC exports the model: pass example_inputs=(audio,), e.g. a "
                             "(1, samples) waveform")
        inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        return prepare_stablequant(model, inputs, quantizer)

    def convert(self, model: torch.fx.GraphModule, *args: Any, **kwargs: Any) -> torch.fx.GraphModule:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

        return convert_pt2e(model)  # fold_quantize=True, as the direct PT2E path


@register_algo(STABLEQUANT)
def stablequant_entry(model: torch.nn.Module, configs_mapping: dict, mode: Mode = Mode.QUANTIZE, *args: Any,
                      **kwargs: Any) -> torch.nn.Module:
    """INC algorithm entry: `quantize`/`prepare`/`convert` call it when the config is a StableQuantConfig."""
    config = configs_mapping[STABLEQUANT]
    return StableQuantINCQuantizer(config).execute(model, mode, *args, **kwargs)


# ----------------------------------------------------------------------------------------------------
# Baseline: INC's built-in static quantization
# ----------------------------------------------------------------------------------------------------

def check_inc_static(act_algo: str, a_bits: int, w_bits: int) -> None:
    if act_algo not in INC_ACT_ALGOS:
        raise ValueError(f"unknown INC act_algo {act_algo!r}; INC 3.10 static quant offers {', '.join(INC_ACT_ALGOS)}")
    if a_bits != 8 or w_bits != 8:
        # neural_compressor/torch/algorithms/pt2e_quant/utility.py:create_quant_spec_from_config maps the
        # dtype ("int8"/"uint8") straight to the full [-128, 127] / [0, 255] grid: no narrower grids.
        raise ValueError(f"INC 3.10 static quant is int8-only (dtype int8/uint8 on the full 8-bit grid); got "
                         f"a_bits={a_bits}, w_bits={w_bits}. Use quantize_ctc_pt2e for W6A6/W4A4.")


def quantize_inc_static(model: torch.nn.Module, example_inputs: tuple, batches: Iterable[tuple | torch.Tensor], *,
                        act_algo: str, a_bits: int = 8, w_bits: int = 8) -> torch.fx.GraphModule:
    """INC's built-in W8A8 static quant, as shipped: INC export, prepare, calibrate, convert.

    act_algo: "minmax" (MovingAverageMinMaxObserver) or "kl" (HistogramObserver). Returns the
    converted q/dq graph (INC converts with fold_quantize=False).
    """
    from neural_compressor.torch.export import export
    from neural_compressor.torch.quantization import StaticQuantConfig, convert, prepare
    from torch.export import Dim

    from sq_plugin.backends.pt2e import calibrate

    check_inc_static(act_algo, a_bits, w_bits)
    # A dynamic audio length, for calibration utterances of any length. Dim.AUTO because a bounded Dim
    # fails on the conv-stride arithmetic of wav2vec2-style front ends (see pt2e.export_for_quantization).
    dynamic_shapes = tuple({1: Dim.AUTO} for _ in example_inputs)  # the waveform's and the mask's time axis
    exported = export(model.eval(), example_inputs, dynamic_shapes=dynamic_shapes)
    prepared = prepare(exported, StaticQuantConfig(act_algo=act_algo), example_inputs=example_inputs)
    calibrate(prepared, batches)
    return convert(prepared)
