"""Intel Neural Compressor 3.x adapter: StableQuant as an INC algorithm, and INC's own static quant as a baseline.

Importing this module registers the "stablequant" config and algorithm with INC; then INC's own
entry points run StableQuant's PT2E path (`sq_plugin.backends.pt2e`):

    import sq_plugin.backends.inc  # noqa: F401  (the registration)
    from neural_compressor.torch.quantization import convert, prepare, quantize

    config = StableQuantConfig(plan=search.to_plan())        # or per_layer={name: RangeRule}, or {"stablequant": {...}}
    quantized = quantize(model, config, run_fn=calibrate_fn, example_inputs=(audio,))
    prepared = prepare(model, config, example_inputs=(audio,)); calibrate_fn(prepared); quantized = convert(prepared)

Translation only: the config becomes `stablequant_x86_quantizer(...)`, the model goes through
`prepare_stablequant` and torchao's `convert_pt2e`, exactly as `quantize_ctc_pt2e` does.

Like INC's built-in configs (`neural_compressor/torch/quantization/config.py`): `get_default_stablequant_config()`;
the tunable parameters (w_bits, a_bits, method, percentile, mse_grid, int8_grid) take a list of values to try,
which `config.expand()` turns into one config per combination, so INC's `autotune` tries them:

    from neural_compressor.torch.quantization import StaticQuantConfig, TuningConfig, autotune
    tune = TuningConfig(config_set=[StableQuantConfig(percentile=[99.9, 99.99]), StaticQuantConfig()])
    best = autotune(exported, tune, eval_fn=score, run_fn=calibrate_fn, example_inputs=(audio,))

`run_fn(prepared, *run_args)` calibrates (INC's `quantize(..., run_fn=calibrate, run_args=(batches,))`; INC's own
PT2E static path drops run_args, algorithm_entry.py:326, so give a run_fn that needs none when autotune mixes
in StaticQuantConfig).

Save and load: `neural_compressor.torch.quantization.save(quantized, "dir")` works on our output (it calls
`quantized.save("dir")`, save_load_entry.py:65) and writes INC's PT2E layout: qconfig.json
({"stablequant": config}) and quantized_weight.pt (`torch.export.save` of the re-exported graph, checked bit for
bit before writing). INC's `load("dir")` cannot give it back: it picks a loader by fixed keys and config classes
(save_load_entry.py:120-141, "static_quant"/"pt2e_dynamic_quant"/WOQ only, no registry) and reads any other
qconfig.json as per-op keys "('op', 'type')" (common/utils/save_load.py:60: "Invalid key format"). Use
`sq_plugin.backends.inc.load("dir")`, which checks qconfig.json and loads through INC's PT2E loader
(`neural_compressor.torch.algorithms.pt2e_quant.load`).

The baseline (`sq_plugin.families.ctc.quantize_ctc_inc`) is INC's built-in `StaticQuantConfig` as shipped:
X86InductorQuantizer with MovingAverageMinMaxObserver ("minmax") or HistogramObserver ("kl"), W8A8 only. INC's PT2E path
leaves standalone Conv1d (the wav2vec2/HuBERT front end and positional conv) in float; the op counts
report it.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from types import MethodType
from typing import Any

import torch

try:
    from neural_compressor.common.base_config import register_config
    from neural_compressor.common.utils import DEFAULT_WHITE_LIST, Mode
    from neural_compressor.torch.algorithms.base_algorithm import Quantizer
    from neural_compressor.torch.quantization.config import TorchBaseConfig
    from neural_compressor.torch.utils.utility import QCONFIG_NAME, WEIGHT_NAME, register_algo
except ImportError as exc:  # an optional extra: say how to get it
    raise ImportError(
        "sq_plugin.backends.inc needs Intel Neural Compressor 3.x (neural-compressor-pt 3.10): "
        'pip install "sq-plugin[inc]"'
    ) from exc

from sq_plugin.backends.x86_isa import GRID_CHOICES
from sq_plugin.core.defaults import DEFAULT_PERCENTILES
from sq_plugin.core.plan import QuantPlan
from sq_plugin.core.quant import check_bits
from sq_plugin.core.ranges import RangeRule

__all__ = [
    "STABLEQUANT",
    "StableQuantConfig",
    "StableQuantINCQuantizer",
    "get_default_stablequant_config",
    "load",
    "quantize_inc_static",
    "save",
    "stablequant_entry",
    "stablequant_quantizer_from_config",
]

STABLEQUANT = "stablequant"
INC_ACT_ALGOS = ("minmax", "kl")
# What INC's BaseConfig keeps in the instance __dict__ and hands back to __init__ through
# `_post_init` (`self.__class__(**get_params_dict(), white_list=None)`) and through `to_dict`.
_INC_INTERNAL_KWARGS = frozenset({"params_list", "non_tunable_params", "_is_initialized"})
# The tunable parameters (a list of values = the values to try) and the type of one value, which INC's
# `expand` checks a list against (it reads it from the signature; `from __future__ import annotations` makes
# that a string, hence this table, read by `get_the_default_value_of_param`).
TUNABLE_PARAMS: dict[str, type] = {"w_bits": int, "a_bits": int, "method": str, "percentile": float,
                                   "mse_grid": int, "int8_grid": str}
_RULE_PARAMS = ("method", "percentile", "mse_grid")

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

    Tunable, as in INC's configs: w_bits, a_bits, method, percentile, mse_grid and int8_grid also take a
    list of values to try (every value checked here); `expand()` gives one config per combination, which is
    what `autotune` runs. A config holding a list is a set of trials, not one quantization: `quantize` and
    `prepare` refuse it. While the rule parameters are lists, partial per_layer entries stay partial; each
    expanded config fills them in from its own global rule.
    Stored as plain dicts so the config round-trips through `to_dict`/`from_dict`/JSON.
    """

    name = STABLEQUANT
    supported_configs: list = []

    def __init__(self, w_bits: int | list[int] = 8, a_bits: int | list[int] = 8,
                 method: str | list[str] = RangeRule.method, percentile: float | list[float] = RangeRule.percentile,
                 mse_grid: int | list[int] = RangeRule.mse_grid, per_layer: PerLayerRules | None = None,
                 int8_grid: str | list[str] = "auto", plan: dict | None = None,
                 white_list: Any = DEFAULT_WHITE_LIST, **kwargs: Any) -> None:
        unknown = set(kwargs) - _INC_INTERNAL_KWARGS
        if unknown:
            raise TypeError(f"StableQuantConfig got unknown parameter(s) {sorted(unknown)}; valid: "
                            "w_bits, a_bits, method, percentile, mse_grid, per_layer, int8_grid, plan")
        given = {"w_bits": w_bits, "a_bits": a_bits, "method": method, "percentile": percentile,
                 "mse_grid": mse_grid, "int8_grid": int8_grid}
        values = {name: _checked_values(name, value) for name, value in given.items()}
        # white_list=None means "leaf config" to INC's _post_init, which re-creates the class with it:
        # pass it through unchanged (mapping None back to the default recurses forever).
        super().__init__(white_list=white_list)
        self.non_tunable_params = ["white_list", "per_layer", "plan"]
        tuned = [name for name, value in values.items() if isinstance(value, list)]
        for name, value in values.items():
            setattr(self, name, value)
        if any(name in _RULE_PARAMS for name in tuned):  # several global rules: fill per_layer in per trial
            self.per_layer = _per_layer_dicts(per_layer, None)
        else:
            self.per_layer = _per_layer_dicts(per_layer, RangeRule(method, percentile, mse_grid))
        if plan is not None and tuned:
            listed = ", ".join(f"{name}={values[name]!r}" for name in tuned)
            raise ValueError(f"StableQuantConfig: plan= fixes every layer's range and grid, so {listed} would try "
                             "the same model again. Fix: drop the plan to tune these, or tune plans with "
                             "TuningConfig(config_set=[StableQuantConfig(plan=a), StableQuantConfig(plan=b)])")
        # A QuantPlan, stored as its dict so the config round-trips through INC's to_dict/from_dict/JSON.
        self.plan = QuantPlan.from_dict(plan).to_dict() if isinstance(plan, dict) else (
            plan.to_dict() if isinstance(plan, QuantPlan) else None)
        if plan is not None and self.plan is None:
            raise TypeError(f"StableQuantConfig: plan must be a QuantPlan or its dict (got {type(plan).__name__})")
        self._post_init()

    @property
    def tuned_params(self) -> dict[str, list]:
        """The parameters given as lists of values to try ({} for a single configuration)."""
        return {name: getattr(self, name) for name in TUNABLE_PARAMS if isinstance(getattr(self, name), list)}

    def _require_single(self, what: str) -> None:
        tuned = self.tuned_params
        if tuned:
            listed = ", ".join(f"{name}={values!r}" for name, values in tuned.items())
            raise ValueError(f"StableQuantConfig({listed}) lists values to try, so it is a set of "
                             f"{len(self.expand())} configs, not one; {what} needs one. Fix: pass it to "
                             "autotune(model, TuningConfig(config_set=[config]), eval_fn=...), or quantize each of "
                             "config.expand()")

    @property
    def act_rule(self) -> RangeRule:
        self._require_single("act_rule")
        return RangeRule(method=self.method, percentile=self.percentile, mse_grid=self.mse_grid)  # type: ignore

    def per_layer_rules(self) -> dict[str, RangeRule | None]:
        self._require_single("per_layer_rules()")
        default = self.act_rule.to_dict()
        return {name: None if rule is None else RangeRule.from_dict({**default, **rule})
                for name, rule in self.per_layer.items()}

    @staticmethod
    def get_the_default_value_of_param(config: Any, param: str) -> Any:
        """The type of one value of `param`, which INC's `expand` checks a tunable list against."""
        return TUNABLE_PARAMS.get(param, Any)

    @classmethod
    def register_supported_configs(cls) -> None:
        cls.supported_configs = []

    def get_model_info(self, model: torch.nn.Module, example_inputs: Any = None) -> None:
        return None  # the PT2E quantizer picks the ops itself

    def to_config_mapping(self, config_list: Any = None, model_info: Any = None) -> OrderedDict:
        if self.local_config:
            raise ValueError("StableQuantConfig does not take INC set_local(...) overrides; pass per-layer "
                             "rules as per_layer={module_name: {'method': ..., 'percentile': ...}}")
        self._require_single("quantize/prepare/convert")
        return OrderedDict({self.name: self})

    @classmethod
    def get_config_set_for_tuning(cls) -> StableQuantConfig:
        """What INC's `get_all_config_set()` tunes: the search's candidate cut-offs (core.defaults)."""
        return cls(percentile=list(DEFAULT_PERCENTILES))


def get_default_stablequant_config() -> StableQuantConfig:
    """The default StableQuant config (as INC's `get_default_static_config` etc.): W8A8, the default
    `RangeRule` (percentile_then_mse at 100), this CPU's int8 grid."""
    return StableQuantConfig()


def _check_one(name: str, value: Any) -> None:
    if name in ("w_bits", "a_bits"):
        check_bits(value, name=name)
    elif name == "int8_grid":
        if not isinstance(value, str) or value not in GRID_CHOICES:
            raise ValueError(f"StableQuantConfig: int8_grid must be one of {', '.join(GRID_CHOICES)} "
                             f"(got {value!r})")
    else:
        RangeRule(**{name: value})  # the rule's own checks and messages


def _checked_values(name: str, value: Any) -> Any:
    """`value` checked: one value, or a non-empty list of them (a tuple is taken as a list)."""
    if not isinstance(value, list | tuple):
        _check_one(name, value)
        return value
    values = list(value)
    if not values:
        raise ValueError(f"StableQuantConfig: {name}=[] gives nothing to try. Fix: pass one value, or a list of the "
                         f"values autotune should try, e.g. {name}={_EXAMPLES[name]!r}")
    for i, one in enumerate(values):
        if isinstance(one, list | tuple):
            raise ValueError(f"StableQuantConfig: {name}[{i}] is a {type(one).__name__}; a tunable list holds single "
                             f"values. Fix: flatten it, e.g. {name}={_EXAMPLES[name]!r}")
        try:
            _check_one(name, one)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{exc} (in {name}={values!r}, item {i}: every value to try is checked)") from None
    return values


_EXAMPLES: dict[str, list] = {"w_bits": [6, 8], "a_bits": [6, 8], "method": ["percentile", "percentile_then_mse"],
                              "percentile": [99.9, 99.99], "mse_grid": [50, 100],
                              "int8_grid": ["narrow_weights", "narrow_activations"]}


def _per_layer_dicts(per_layer: PerLayerRules | None, default: RangeRule | None) -> dict[str, dict | None]:
    """per_layer as plain dicts; partial entries are filled in from `default`, or kept partial (checked)
    when there is no single default (the global rule is being tuned)."""
    if per_layer is not None and not isinstance(per_layer, dict):
        raise TypeError(f"StableQuantConfig: per_layer must be a dict {{module name: RangeRule, dict or None}} (got "
                        f"{type(per_layer).__name__}). To try several per-layer rule sets, give autotune one "
                        "StableQuantConfig per set: TuningConfig(config_set=[StableQuantConfig(per_layer=a), ...])")
    out: dict[str, dict | None] = {}
    for name, rule in (per_layer or {}).items():
        if rule is None or isinstance(rule, RangeRule):
            out[name] = None if rule is None else rule.to_dict()
        elif isinstance(rule, dict):
            full = RangeRule.from_dict({**(default or RangeRule()).to_dict(), **rule})  # validates
            out[name] = full.to_dict() if default is not None else {k: getattr(full, k) for k in rule}
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
    """INC's algorithm interface: prepare, calibrate with `run_fn(prepared, *run_args)`, convert."""

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
        return prepare_stablequant(model, _as_tuple(example_inputs), quantizer)

    def quantize(self, model: torch.nn.Module, *args: Any, run_fn: Any = None, run_args: Any = None,
                 example_inputs: Any = None, **kwargs: Any) -> torch.fx.GraphModule:
        """INC's `quantize(model, config, run_fn=..., run_args=(...), example_inputs=...)`: prepare, then
        `run_fn(prepared, *run_args)` (INC's convention: run_args are run_fn's positional arguments after the
        model), then convert."""
        if run_fn is None:
            raise ValueError("StableQuant calibrates before it converts: pass run_fn (and its arguments as "
                             "run_args), e.g. quantize(model, config, run_fn=sq_plugin.backends.pt2e.calibrate, "
                             "run_args=(batches,), example_inputs=(audio,)); or prepare, calibrate, convert")
        if run_args is None:
            run_args = ()
        elif not isinstance(run_args, tuple | list):
            raise TypeError(f"run_args must be a tuple of run_fn's positional arguments after the model (INC calls "
                            f"run_fn(model, *run_args)); got a {type(run_args).__name__}. Fix: wrap it, e.g. "
                            "run_args=(batches,)")
        prepared = self.prepare(model, example_inputs=example_inputs)
        run_fn(prepared, *run_args)
        return self.convert(prepared)

    def convert(self, model: torch.fx.GraphModule, *args: Any, **kwargs: Any) -> torch.fx.GraphModule:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

        return convert_pt2e(model)  # fold_quantize=True, as the direct PT2E path


@register_algo(STABLEQUANT)
def stablequant_entry(model: torch.nn.Module, configs_mapping: dict, mode: Mode = Mode.QUANTIZE, *args: Any,
                      **kwargs: Any) -> torch.nn.Module:
    """INC algorithm entry: `quantize`/`prepare`/`convert` call it when the config is a StableQuantConfig.

    Like INC's PT2E entries (algorithm_entry.py:329-331) the result carries `qconfig` (the config mapping,
    which INC's `save` reads) and a bound `save(checkpoint_dir)`; it also keeps `example_inputs`, which the
    re-export in `save` traces."""
    config = configs_mapping[STABLEQUANT]
    model = StableQuantINCQuantizer(config).execute(model, mode, *args, **kwargs)
    model.qconfig = OrderedDict(configs_mapping)
    if kwargs.get("example_inputs") is not None:
        model.example_inputs = _as_tuple(kwargs["example_inputs"])
    model.save = MethodType(save, model)
    return model


def _as_tuple(example_inputs: Any) -> tuple:
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


# ----------------------------------------------------------------------------------------------------
# Save / load in INC's PT2E layout
# ----------------------------------------------------------------------------------------------------

def _stablequant_config_of(model: torch.nn.Module) -> StableQuantConfig:
    mapping = getattr(model, "qconfig", None)
    config = mapping.get(STABLEQUANT) if isinstance(mapping, dict) else None
    if not isinstance(config, StableQuantConfig):
        raise ValueError("sq_plugin.backends.inc.save saves what INC's quantize/convert made with a "
                         "StableQuantConfig (it reads model.qconfig['stablequant']); this model has "
                         f"qconfig={mapping!r}. Fix: quantize it with quantize(model, StableQuantConfig(...), ...)")
    return config


def save(model: torch.fx.GraphModule, checkpoint_dir: str | os.PathLike = "saved_results", *,
         example_inputs: Any = None) -> Path:
    """Save a StableQuant model quantized through INC in INC's PT2E layout; returns the directory.

    `neural_compressor.torch.quantization.save(model, checkpoint_dir)` calls this (as `model.save`). Writes
    qconfig.json ({"stablequant": config dict}) and quantized_weight.pt: `torch.export.save` of the graph
    re-exported with its dynamic dims (the audio length stays dynamic), without the float weights that
    `convert_pt2e` leaves unused. Nothing is written unless the re-exported program reproduces the model bit
    for bit on `example_inputs` (default: those given to quantize/prepare). `load` reads it back.
    (INC's own PT2E `save(model, example_inputs, output_dir)`, algorithms/pt2e_quant/save_load.py:25, cannot be
    reached that way: the entry's `model.save(checkpoint_dir)` passes the directory as example_inputs.)
    """
    from torchao.quantization.pt2e import ObserverBase

    from sq_plugin.backends.artifact import reexport_checked
    from sq_plugin.core.files import atomic_write

    _stablequant_config_of(model)
    if any(isinstance(m, ObserverBase) for m in model.modules()):
        raise ValueError("this model is prepared, not quantized (it still has observers): calibrate it and call "
                         "convert(prepared) first, then save the converted model")
    inputs = example_inputs if example_inputs is not None else getattr(model, "example_inputs", None)
    if inputs is None:
        raise ValueError("save re-exports the quantized graph and needs inputs to trace: pass "
                         "example_inputs=(audio,) (a model from INC's quantize/convert keeps the ones it was given)")
    inputs = _as_tuple(inputs)
    program, _ = reexport_checked(model, inputs)
    path = Path(checkpoint_dir).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / WEIGHT_NAME, lambda f: torch.export.save(program, f))
    qconfig = {name: cfg.to_dict() for name, cfg in model.qconfig.items()}  # model.qconfig itself left as is
    atomic_write(path / QCONFIG_NAME, lambda f: f.write(json.dumps(qconfig, indent=4).encode()))
    return path


def load(checkpoint_dir: str | os.PathLike = "saved_results") -> torch.fx.GraphModule:
    """Load what `save` (or INC's `save` on our output) wrote: the quantized q/dq graph module, outputs bit for
    bit those of the saved model, with `qconfig` and `save` as after quantize (re-saving needs example_inputs=).

    INC's own `neural_compressor.torch.quantization.load` cannot: it only knows its built-in algorithms
    (save_load_entry.py:120-141) and fails on a {"stablequant": ...} qconfig.json (common/utils/save_load.py:60).
    """
    import importlib.util

    from neural_compressor.torch.algorithms import pt2e_quant

    path = Path(checkpoint_dir).expanduser()
    qconfig_path = path / QCONFIG_NAME
    if not qconfig_path.is_file() or not (path / WEIGHT_NAME).is_file():
        raise FileNotFoundError(f"{path} is not a StableQuant INC checkpoint (it needs {QCONFIG_NAME} and "
                                f"{WEIGHT_NAME}). Fix: save the quantized model with "
                                "neural_compressor.torch.quantization.save(q_model, checkpoint_dir)")
    try:
        qconfig = json.loads(qconfig_path.read_text())
    except ValueError as exc:
        raise ValueError(f"{qconfig_path} is damaged (not valid JSON: {exc}). Fix: save the model again") from exc
    if not isinstance(qconfig, dict) or STABLEQUANT not in qconfig:
        keys = sorted(qconfig) if isinstance(qconfig, dict) else type(qconfig).__name__
        raise ValueError(f"{qconfig_path} describes {keys}, not a StableQuant model. Fix: load INC's own algorithms "
                         "with neural_compressor.torch.quantization.load")
    config = StableQuantConfig.from_dict(qconfig[STABLEQUANT])
    # The output pytree may be a transformers ModelOutput; its class registers with pytree on import.
    if importlib.util.find_spec("transformers") is not None:
        import transformers.modeling_outputs  # noqa: F401
    module = pt2e_quant.load(str(path))  # INC's PT2E loader: torch.export.load(quantized_weight.pt).module()
    module.qconfig = OrderedDict({STABLEQUANT: config})
    module.save = MethodType(save, module)
    return module


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
