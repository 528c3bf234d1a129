"""The recipe YAML: which model, which data, which calibration methods and bit widths to compare.

    name: wav2vec2-ref-w8a8            # optional; default: the file name without .yaml
    model: sq/wav2vec2-ref             # registry name, hub id, or a local save_pretrained directory (or a list)
    calibration: {dataset: corpus-dev, size: 48}
    evaluation: {dataset: corpus-test, size: 200}     # size: null = the whole split
    methods: [fp, stablequant, max, histogram]
    method_options:
      stablequant: {threshold: 0.0025, percentiles: [100, 99.99, 99.9, 99.8, 99.5, 99.0], metric: wer, mse_grid: 100}
                                       # activations: static | per_token | auto (Linears' inputs per token)
      percentile: {percentile: 99.99}
      mse: {mse_grid: 100}
    bits: [w8a8, w6a6]                 # or [{w: 8, a: 8}, ...]; per-layer weight widths under a budget:
                                       # {mixed: {budget_bits: 4.5}} (8-bit activations; widths: [...] optional)
    backend: x86                       # x86: real INT8 kernels for W8A8, fake-quant below; simulate: fake-quant always
    int8_grid: auto                    # auto: 7-bit weights on x86 without VNNI, else full; full;
                                       # narrow_weights; narrow_activations (sq_plugin.backends.x86_isa)
    int8_attention: false              # x86: attention's Q·Kᵀ and P·V on INT8 GEMMs too (VNNI/AMX CPUs only)
    output_dir: runs/recipes
    threads: 2                         # optional; torch intra-op threads

`load_recipe(path)` validates with pydantic (unknown keys are errors) and raises `RecipeError` whose
message names the file, the key path and the fix, e.g.
"recipe.yaml: methods[1]: unknown method 'kll'; choose one of fp, stablequant, ...".
This module imports neither torch nor the speech stack, so `stablequant validate` is instant.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

# Torch-free: the registry, the grids and the search defaults are imported, not copied.
from sq_plugin.core.defaults import (
    DEFAULT_BASELINE_PERCENTILE,
    DEFAULT_MSE_GRID,
    DEFAULT_PERCENTILES,
    METRIC_THRESHOLDS,
)
from sq_plugin.core.grid import GRID_CHOICES, PTQ_WIDTHS, WEIGHT_WIDTHS, check_budget, check_widths
from sq_plugin.methods import METHOD_NAMES as METHODS
from sq_plugin.methods import MIXED_ONLY_METHODS

# corpus-dev: the offline corpus's dev split (release v2: voices held out of train and test);
# corpus-dev-v1: release v1's dev split (the training voices), kept for comparison.
CALIBRATION_DATASETS: tuple[str, ...] = ("corpus-dev", "corpus-dev-v1", "librispeech-validation.clean")
EVALUATION_DATASETS: tuple[str, ...] = ("corpus-test", "librispeech-test.clean")
BACKENDS: tuple[str, ...] = ("x86", "simulate")
INT8_GRIDS: tuple[str, ...] = GRID_CHOICES
# Split sizes of the offline corpus (CorpusConfig defaults; tests/test_recipe.py checks they agree).
# Not imported from sq_plugin.speech.corpus: that pulls in scipy and makes `validate` slow.
CORPUS_SIZES: dict[str, int] = {"corpus-dev": 300, "corpus-dev-v1": 300, "corpus-test": 600}
# Whisper's teacher-forced search proxies (sq_plugin.families.whisper imports them from here: the schema owns them).
TEACHER_FORCED_METRICS: tuple[str, ...] = ("tf_loss", "tf_token_error", "tf_kl")
# Proxies that read CTC posteriors (sq_plugin.families.ctc): CTC models only.
CTC_METRICS: tuple[str, ...] = ("ctc_loss", "ctc_kl")
_BITS = re.compile(r"^w(\d+)a(\d+)$")


class RecipeError(ValueError):
    """A recipe that cannot be read or run. `errors` holds one "key.path: message" per problem."""

    def __init__(self, source: str, errors: list[str]):
        self.source = source
        self.errors = errors
        # One line: the CLI prints exactly this (no traceback).
        super().__init__(f"{source}: " + "; ".join(errors))


# --------------------------------------------------------------------------------------------------
# Item validators: they raise ValueError with the final wording (the formatter strips pydantic's prefix).
# --------------------------------------------------------------------------------------------------


def _choice(value: Any, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")
    return value


def _method(value: Any) -> str:
    return _choice(value, METHODS, "method")


def _bits(value: Any) -> Any:
    """'w8a8' -> {'w': 8, 'a': 8}; {mixed: {...}} -> a MixedBits; other dicts pass through to the Bits model."""
    # Validated here, into one model or the other, so that an error names the keys of the kind written.
    if isinstance(value, dict) and "mixed" in value:
        return MixedBits.model_validate(value)
    if isinstance(value, str):
        match = _BITS.match(value.strip().lower())
        if not match:
            raise ValueError(f"bad bits {value!r}; write 'w8a8', 'w6a6', 'w4a4' (weights, activations) "
                             "or {w: 8, a: 8}")
        return Bits.model_validate({"w": int(match.group(1)), "a": int(match.group(2))})
    if isinstance(value, dict):
        return Bits.model_validate(value)
    if isinstance(value, Bits | MixedBits):
        return value
    raise ValueError(f"bad bits {value!r}; write 'w8a8', 'w6a6', 'w4a4' or {{w: 8, a: 8}}")


def _percentile(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 100:
        raise ValueError(f"percentile must be a number in (0, 100] (got {value!r}); 100 = no clipping, "
                         "99.99 is typical")
    return float(value)


Method = Annotated[str, BeforeValidator(_method)]
Percentile = Annotated[float, BeforeValidator(_percentile)]


class _Strict(BaseModel):
    # extra="forbid": a misspelt key must be an error, not a silently ignored option.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Bits(_Strict):
    w: int
    a: int

    @field_validator("w", "a", mode="before")
    @classmethod
    def _in_range(cls, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not 2 <= v <= 8:
            raise ValueError(f"bit width must be an integer from 2 to 8 (got {v!r}); 8 runs real INT8 kernels")
        return v

    @property
    def label(self) -> str:
        return f"w{self.w}a{self.a}"


    @property
    def is_mixed(self) -> bool:
        return False


class MixedSpec(_Strict):
    """Per-layer weight widths: the parameter-weighted mean at most `budget_bits`, each one of `widths` (null: each
    method's default: the PTQ allocation `PTQ_WIDTHS` 4, 5, 6, 8; the trained methods all of `WEIGHT_WIDTHS`)."""

    budget_bits: float
    widths: tuple[int, ...] | None = None

    @field_validator("widths", mode="before")
    @classmethod
    def _widths(cls, v: Any) -> tuple[int, ...] | None:
        if v is None:
            return None
        if not isinstance(v, list | tuple):
            raise ValueError(f"widths must be a list of bit widths, e.g. {list(WEIGHT_WIDTHS)} (got {v!r})")
        return check_widths(v)

    @model_validator(mode="after")
    def _budget(self) -> MixedSpec:
        check_budget(self.budget_bits, self.widths or WEIGHT_WIDTHS)
        return self


class MixedBits(_Strict):
    """A bits item `{mixed: {budget_bits: 4.0}}`: weight widths per layer, activations on `a` bits (8 by default)."""

    mixed: MixedSpec
    a: int = 8

    @field_validator("a", mode="before")
    @classmethod
    def _in_range(cls, v: Any) -> int:
        return Bits._in_range(v)

    @property
    def w(self) -> int:
        """The widest weight width (what the search that decides the activation ranges runs at)."""
        return max(self.mixed.widths or WEIGHT_WIDTHS)

    @property
    def budget_bits(self) -> float:
        return self.mixed.budget_bits

    @property
    def widths(self) -> tuple[int, ...] | None:
        """The recipe's candidate widths, or None: each method's default."""
        return self.mixed.widths

    def widths_for(self, method: str) -> tuple[int, ...]:
        """The candidates `method` allocates from: the recipe's, or the method's default."""
        return self.mixed.widths or (PTQ_WIDTHS if method == "stablequant" else WEIGHT_WIDTHS)

    @property
    def label(self) -> str:
        return f"mixed{self.mixed.budget_bits:g}a{self.a}"

    @property
    def is_mixed(self) -> bool:
        return True


BitsItem = Annotated[Bits | MixedBits, BeforeValidator(_bits)]


class CalibrationSpec(_Strict):
    dataset: Annotated[str, BeforeValidator(lambda v: _choice(v, CALIBRATION_DATASETS, "calibration dataset"))]
    size: int = Field(description="number of utterances used by the search and by the observers")

    @field_validator("size", mode="before")
    @classmethod
    def _positive(cls, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"size must be an integer >= 1 (got {v!r}); calibration needs utterances "
                             "(48 takes minutes, 200 is the full comparison)")
        return v

    @model_validator(mode="after")
    def _fits(self) -> CalibrationSpec:
        _check_fits(self.dataset, self.size)
        return self


class EvaluationSpec(_Strict):
    dataset: Annotated[str, BeforeValidator(lambda v: _choice(v, EVALUATION_DATASETS, "evaluation dataset"))]
    size: int | None = Field(default=None, description="null = the whole split")

    @field_validator("size", mode="before")
    @classmethod
    def _positive(cls, v: Any) -> int | None:
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"size must be an integer >= 1 or null for the whole split (got {v!r})")
        return v

    @model_validator(mode="after")
    def _fits(self) -> EvaluationSpec:
        if self.size is not None:
            _check_fits(self.dataset, self.size)
        return self


def _check_fits(dataset: str, size: int) -> None:
    available = CORPUS_SIZES.get(dataset)
    if available is not None and size > available:
        raise ValueError(f"size {size} exceeds the {available} utterances of {dataset}; use at most {available}")


class StableQuantOptions(_Strict):
    # In the metric's units; None: the metric's default (core.defaults.METRIC_THRESHOLDS; wer: 0.0025, the paper's).
    threshold: float | None = None
    percentiles: tuple[Percentile, ...] = DEFAULT_PERCENTILES
    # wer/cer: decode the calibration set per candidate (the paper). ctc_loss / ctc_kl: CTC models only, CTC
    # loss per reference character, or the per-frame KL of the posteriors from the float model's
    # (sq_plugin.families.ctc). tf_loss / tf_token_error / tf_kl: Whisper only, teacher-forced proxies
    # (sq_plugin.families.whisper). The threshold is in the metric's units.
    metric: Literal["wer", "cer", "ctc_loss", "ctc_kl", "tf_loss", "tf_token_error", "tf_kl"] = "wer"
    mse_grid: int = Field(default=DEFAULT_MSE_GRID, ge=1)
    # Not in the paper: a flagged layer stays float when that beats its best cut-off by > threshold.
    float_fallback: bool = False
    # Layers (names or globs) that stay float, outside the search: user-chosen mixed precision.
    keep_float: list[str] = Field(default_factory=list)
    # Score the search's metric on the first metric_size calibration utterances only (the statistics use all of
    # them): each evaluation then costs metric_size / size of one over the whole set. None: all. A fidelity proxy
    # (ctc_kl) needs few: on wav2vec2-ref W8A8, 64 of 200 flagged and decided the same layers (BENCHMARKS.md).
    metric_size: int | None = Field(default=None, ge=1)
    # Memory for replaying unchanged layer outputs between the search's evaluations (prefix cache).
    cache_budget_mb: float = Field(default=1024.0, ge=0)
    # Not in the paper: start from the best built-in rule (MSE, MAX, moving average, L2 histogram) and offer their
    # ranges to every flagged layer, so the search never loses to one of them on its metric. false: the paper's.
    builtin_candidates: bool = True
    # Not in the paper: extra sweeps over the flagged layers once all are set.
    refine_passes: int = Field(default=0, ge=0)
    # Not in the paper (0: off): score each flagged layer's candidates on every 4th metric utterance first, then only
    # the best `shortlist` of them on all (approximate, faster; sq_plugin.search.SearchConfig.shortlist).
    shortlist: int = Field(default=0, ge=0)
    # Not in the paper (Whisper): decode the calibration set to pick between the searched model and each built-in
    # rule everywhere; auto = wer when the metric is a teacher-forced proxy. Off by default: on 16 calibration
    # utterances it misranked the W6A6 candidates (BENCHMARKS.md).
    referee: Literal["auto", "wer", "cer", "none"] = "none"
    # Not in the paper: the Linears' inputs per token at run time instead of the searched static ranges (x86 with
    # VNNI/AMX, or simulated). auto: whichever scores better on the metric over the calibration set
    # (sq_plugin.search.activations). Whisper base W8A8: +5.74 pp static, +1.81 per token (BENCHMARKS.md).
    activations: Literal["static", "per_token", "auto"] = "static"

    def threshold_for(self, metric: str | None = None) -> float:
        """The screen threshold: the one given, else the default of `metric` (default: this recipe's metric)."""
        return self.threshold if self.threshold is not None else METRIC_THRESHOLDS[metric or self.metric]

    def search_config(self, *, w_bits: int, a_bits: int, int8_grid: str, threshold: float | None = None) -> Any:
        """These options as the search's `SearchConfig` (imported here, not at import time: see the module note)."""
        from sq_plugin.search import SearchConfig

        threshold = self.threshold_for() if threshold is None else threshold
        return SearchConfig(w_bits=w_bits, a_bits=a_bits, threshold=threshold,
                            percentiles=tuple(self.percentiles), mse_grid=self.mse_grid,
                            float_fallback=self.float_fallback, keep_float=tuple(self.keep_float), int8_grid=int8_grid,
                            builtin_candidates=self.builtin_candidates, refine_passes=self.refine_passes,
                            shortlist=self.shortlist)

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, v: float | None) -> float | None:
        if v is not None and (not math.isfinite(v) or v < 0):
            raise ValueError(f"threshold must be a finite number >= 0 (got {v!r}); 0.0025 = 0.25 % absolute WER")
        return v

    @field_validator("percentiles")
    @classmethod
    def _has_100(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if 100.0 not in v:
            raise ValueError("percentiles must include 100 (the no-clipping candidate), e.g. [100, 99.99, 99.9]")
        return v


class PercentileOptions(_Strict):
    percentile: Percentile = DEFAULT_BASELINE_PERCENTILE


class MseOptions(_Strict):
    mse_grid: int = Field(default=DEFAULT_MSE_GRID, ge=1)


class MixedTrainingOptions(_Strict):
    """mixed_one_stage / mixed_two_stage: the training split (corpus-train) and the optimiser steps per stage."""

    train_size: int = Field(default=200, ge=1, le=6000)
    steps: int = Field(default=100, ge=1)
    batch_size: int = Field(default=4, ge=1)  # Whisper teacher-forced batches; CTC trains one utterance per step
    seed: int = 0


class MethodOptions(_Strict):
    stablequant: StableQuantOptions = StableQuantOptions()
    percentile: PercentileOptions = PercentileOptions()
    mse: MseOptions = MseOptions()
    mixed_training: MixedTrainingOptions = MixedTrainingOptions()


class Recipe(_Strict):
    name: str | None = None
    model: str | tuple[str, ...]  # one model, or a list compared in one report
    calibration: CalibrationSpec
    evaluation: EvaluationSpec
    methods: tuple[Method, ...]
    method_options: MethodOptions = MethodOptions()
    bits: tuple[BitsItem, ...] = (Bits(w=8, a=8),)
    backend: Annotated[str, BeforeValidator(lambda v: _choice(v, BACKENDS, "backend"))] = "x86"
    # The INT8 grids every method is calibrated, searched and run on (sq_plugin.backends.x86_isa).
    int8_grid: Annotated[str, BeforeValidator(lambda v: _choice(v, INT8_GRIDS, "int8_grid"))] = "auto"
    # Attention's two matmuls on INT8 GEMMs as well (sq_plugin.backends.int8_attention): x86 backend only.
    int8_attention: bool = False
    output_dir: str = "runs/recipes"
    threads: int | None = Field(default=None, ge=1)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        # The name becomes a directory name.
        if v is not None and not re.fullmatch(r"[A-Za-z0-9][\w.-]*", v):
            raise ValueError(f"name {v!r} must be a plain file name (letters, digits, '.', '_', '-')")
        return v

    @field_validator("model", mode="before")
    @classmethod
    def _model(cls, v: Any) -> str | tuple[str, ...]:
        names = (v,) if isinstance(v, str) else v
        if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"model must be a name or a list of names (got {v!r}); see `stablequant models`")
        v = v if isinstance(v, str) else tuple(v)
        if not names or any(not n.strip() for n in names):
            raise ValueError("model is empty; give a registry name (see `stablequant models`), a hub id or a path")
        if len(set(names)) != len(names):
            raise ValueError(f"model lists a name more than once: {list(names)}")
        return v

    @property
    def models(self) -> tuple[str, ...]:
        return (self.model,) if isinstance(self.model, str) else self.model

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError(f"methods is empty; list at least one of {', '.join(METHODS)}")
        dup = sorted({m for m in v if v.count(m) > 1})
        if dup:
            raise ValueError(f"methods lists {dup} more than once")
        return v

    @field_validator("bits", mode="before")
    @classmethod
    def _bits_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str | dict) else v  # `bits: w8a8` or `bits: {mixed: ...}` alone

    @field_validator("bits")
    @classmethod
    def _bits_unique(cls, v: tuple[Bits | MixedBits, ...]) -> tuple[Bits | MixedBits, ...]:
        if not v:
            raise ValueError("bits is empty; give at least one of w8a8, w6a6, w4a4")
        labels = [b.label for b in v]
        dup = sorted({b for b in labels if labels.count(b) > 1})
        if dup:
            raise ValueError(f"bits lists {dup} more than once")
        return v

    @model_validator(mode="after")
    def _int8_attention_needs_x86(self) -> Recipe:
        if self.int8_attention and self.backend != "x86":
            raise ValueError(f"int8_attention: true runs attention on oneDNN INT8 GEMMs, which backend: "
                             f"{self.backend} does not use. Fix: backend: x86, or drop int8_attention")
        return self

    @model_validator(mode="after")
    def _ptq_budget_fits_its_widths(self) -> Recipe:
        if "stablequant" not in self.methods:
            return self
        for i, b in enumerate(self.bits):
            if b.is_mixed and b.widths is None and b.budget_bits < min(PTQ_WIDTHS):
                raise ValueError(f"bits[{i}].mixed: stablequant's PTQ allocation takes {list(PTQ_WIDTHS)} bits unless "
                                 f"told otherwise (below 4 bits the layers' sensitivities stop adding up), so a "
                                 f"budget of {b.budget_bits:g} cannot be met. Fix: a budget >= {min(PTQ_WIDTHS)}, or "
                                 f"widths: {list(WEIGHT_WIDTHS)}")
        return self

    @model_validator(mode="after")
    def _mixed_methods_have_mixed_bits(self) -> Recipe:
        learned = [m for m in self.methods if m in MIXED_ONLY_METHODS]
        if learned and not any(b.is_mixed for b in self.bits):
            raise ValueError(f"methods {learned} learn per-layer weight widths, but bits has no mixed item. Fix: add "
                             "one, e.g. bits: [w8a8, {mixed: {budget_bits: 4.0}}]")
        return self

    @property
    def quantized_methods(self) -> list[str]:
        return [m for m in self.methods if m != "fp"]

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-able dict; `Recipe.model_validate(r.to_dict()) == r`."""
        data = self.model_dump(mode="json")
        data["bits"] = [{"mixed": {"budget_bits": b.budget_bits,
                                   "widths": list(b.widths) if b.widths is not None else None}, "a": b.a}
                        if b.is_mixed else b.label for b in self.bits]
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------------------
# Loading and error formatting
# --------------------------------------------------------------------------------------------------


def _key_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif str(part).startswith("function-"):  # pydantic's label for an Annotated validator step
            continue
        else:
            path += f".{part}" if path else str(part)
    return path or "(top level)"


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that holds the key at `loc` (to list its valid keys)."""
    import typing

    model: type[BaseModel] | None = Recipe
    for part in loc[:-1]:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        candidates = [field.annotation, *typing.get_args(field.annotation)]
        found = None
        for c in candidates:
            for t in (c, *typing.get_args(c)):
                if isinstance(t, type) and issubclass(t, BaseModel):
                    found = t
        model = found
    return model


def _message(err: dict[str, Any]) -> str:
    loc = tuple(err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        model = _model_at(loc)
        valid = f"; valid keys here: {', '.join(model.model_fields)}" if model else ""
        return f"{_key_path(loc)}: unknown key {str(loc[-1])!r}{valid}"
    if kind == "missing":
        return f"{_key_path(loc)}: required key is missing"
    msg = str(err["msg"])
    msg = msg.removeprefix("Value error, ")
    if kind.startswith(("int_", "float_", "string_", "greater_than", "less_than", "literal_", "bool_")):
        msg = f"{msg} (got {err.get('input')!r})"
    return f"{_key_path(loc)}: {msg}"


def parse_recipe(data: Any, *, source: str = "recipe", default_name: str | None = None) -> Recipe:
    """Validate an already-parsed YAML document."""
    if not isinstance(data, dict):
        raise RecipeError(source, [f"(top level): expected a mapping of keys (model:, calibration:, ...), got "
                                   f"{type(data).__name__}"])
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(source, [_message(e) for e in exc.errors()]) from None
    if recipe.name is None and default_name:
        recipe = recipe.model_copy(update={"name": default_name})
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe YAML file; RecipeError (file: key path: message; fix) on any problem."""
    path = Path(path)
    source = path.name
    try:
        text = path.read_text()
    except OSError as exc:
        raise RecipeError(source, [f"cannot read {str(path)!r} ({exc.strerror or exc})"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "somewhere"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(source, [f"malformed YAML at {where}: {problem}; check the indentation and that "
                                   "lists use [a, b] or '- a' lines"]) from None
    if data is None:
        raise RecipeError(source, ["the file is empty; start from recipes/wav2vec2-ref-w8a8.yaml"])
    stem = re.sub(r"[^\w.-]", "-", path.stem)
    return parse_recipe(data, source=source, default_name=stem)


def with_overrides(recipe: Recipe, *, source: str = "command line", output_dir: str | None = None,
                   eval_size: int | None = None, calib_size: int | None = None) -> Recipe:
    """The recipe with CLI overrides applied, validated again (so --calib-size 0 is an error too)."""
    data = recipe.to_dict()
    if output_dir is not None:
        data["output_dir"] = output_dir
    if eval_size is not None:
        data["evaluation"]["size"] = eval_size
    if calib_size is not None:
        data["calibration"]["size"] = calib_size
    return parse_recipe(data, source=source)
