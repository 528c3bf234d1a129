"""The calibration methods, one registry entry each: what model families and bits it takes, which optional
extra it needs, and the builder that makes one quantized model. Recipe validation and the runner read this.

    method = METHODS["percentile"]
    method.refusal(w_bits=6, a_bits=6, int8_grid="full")     # None: it can run; else why not
    quantized = method.build(bundle, calibration, job)        # -> a QuantizedModel

How each decides its ranges:
- plan methods (stablequant, max, percentile, mse) decide on the same input histograms, collected once
  per model (`QuantizeJob.statistics`), and write a `QuantPlan` that the family applies on the backend;
- framework baselines keep their own observers as shipped: torchao's (moving_average, histogram) on the same
  x86 scheme, INC 3.10's static quant and optimum-quanto (CTC only, W8A8 only).

This module imports neither torch nor a framework at import time (the builders import them when called),
so that `stablequant validate` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

FAMILIES: tuple[str, ...] = ("ctc", "whisper")
# torchao's x86 default activation spec uses eps=2**-12 (smallest scale); its observer baselines keep it.
OBSERVER_EPS = 2**-12


@dataclass(frozen=True)
class QuantizeJob:
    """What one (method, bits) build of one model needs; the runner fills it.

    lower: None = real INT8 kernels where the bits allow (W8A8), fake-quant below; False = always simulate.
    int8_grid: resolved for this CPU ("full", "narrow_weights", "narrow_activations").
    options: the recipe's `method_options`.
    statistics: returns every layer's input histogram (computed once per model, then shared).
    plan: StableQuant's searched plan (other methods make their own); at mixed bits, the W8A8 (a_bits) search's
    plan, whose activation ranges every mixed-precision method keeps.
    provenance: what every plan records (model, calibration set and hash, ISA policy).
    mixed: a recipe's mixed-precision bits item (`recipe.MixedBits`: budget_bits, widths), or None (uniform bits).
    sensitivity: returns the layers' measured sensitivity (`SensitivityResult`, computed once per model).
    train: returns the training utterances (mixed_one_stage / mixed_two_stage).
    int8_attention: also run attention's Q·Kᵀ and P·V on INT8 GEMMs where the build lowers to oneDNN (the PT2E
    x86 graphs; `sq_plugin.backends.int8_attention`).
    """

    w_bits: int
    a_bits: int
    lower: bool | None
    int8_grid: str
    options: Any = None
    statistics: Callable[[], dict[str, Any]] | None = None
    plan: Any = None
    provenance: dict[str, Any] = field(default_factory=dict)
    mixed: Any = None
    sensitivity: Callable[[], Any] | None = None
    train: Callable[[], Any] | None = None
    int8_attention: bool = False

    @property
    def runs_int8(self) -> bool:
        return self.lower is not False and (self.w_bits, self.a_bits) == (8, 8)


Builder = Callable[[Any, Any, QuantizeJob], Any]


@dataclass(frozen=True)
class Method:
    """One calibration method. `bits`: "any" (2-8 bits), "w8a8" (the framework cannot express less) or "mixed"
    (per-layer weight widths only: a recipe bits item {mixed: {budget_bits: ...}}); `mixed`: whether it also
    runs at a mixed item (stablequant: the PTQ allocation on its ranges).
    `extra`: (module, install command) of the optional framework it needs, or None. `decides`: "plan" (writes
    a QuantPlan from the shared statistics), "observers" (a framework's own), or "none" (fp)."""

    name: str
    summary: str
    families: tuple[str, ...] = FAMILIES
    bits: str = "any"
    bits_reason: str = ""  # why bits="w8a8": what the framework cannot express
    extra: tuple[str, str] | None = None
    decides: str = "plan"
    build: Builder | None = field(default=None, repr=False)
    # Why it cannot run on this grid and CPU (None: it can); bits and families are checked apart.
    grid_refusal: Callable[[str], str | None] | None = field(default=None, repr=False)
    mixed: bool = False

    def refusal(self, *, w_bits: int, a_bits: int, int8_grid: str, mixed: bool = False) -> str | None:
        """Why this method cannot run at these bits on this grid (None: it can)."""
        if mixed and not (self.mixed or self.bits == "mixed"):
            return (f"{self.name} decides one width for every layer; at mixed bits run stablequant (the allocation "
                    "on its ranges), mixed_one_stage or mixed_two_stage")
        if not mixed and self.bits == "mixed":
            return (f"{self.name} learns per-layer widths: list it with a bits item {{mixed: {{budget_bits: 4.0}}}}, "
                    "not uniform bits")
        if self.bits == "w8a8" and (w_bits, a_bits) != (8, 8):
            return self.bits_reason
        return self.grid_refusal(int8_grid) if self.grid_refusal is not None else None


# --------------------------------------------------------------------------------------------------
# Builders: they import the families and backends when called.
# --------------------------------------------------------------------------------------------------


def _rule(name: str, options: Any) -> Any:
    from sq_plugin.core.defaults import DEFAULT_BASELINE_PERCENTILE
    from sq_plugin.core.ranges import RangeRule

    if name == "max":
        return RangeRule("max")
    if name == "percentile":
        return RangeRule("percentile", percentile=options.percentile.percentile if options else
                         DEFAULT_BASELINE_PERCENTILE)
    return RangeRule("mse", mse_grid=options.mse.mse_grid if options else 100)


def family_statistics(bundle: Any, calibration: Any) -> dict[str, Any]:
    """The family's one statistics pass: every quantizable layer's input histogram (what the plan methods
    decide on, when no search supplies its own)."""
    if bundle.kind == "whisper":
        from sq_plugin.families.whisper import whisper_statistics

        return whisper_statistics(bundle, calibration)
    from sq_plugin.families.ctc import ctc_statistics

    return ctc_statistics(bundle, calibration)


def apply_plan(bundle: Any, calibration: Any, plan: Any, job: QuantizeJob) -> Any:
    """Apply a plan on the job's backend: x86 INT8 kernels at W8A8 (both families), else the simulation."""
    if bundle.kind == "whisper":
        from sq_plugin.families.whisper import quantize_whisper_simulated, quantize_whisper_x86

        if job.runs_int8:
            return quantize_whisper_x86(bundle, calibration, plan, int8_attention=job.int8_attention)
        return quantize_whisper_simulated(bundle, calibration, plan=plan)
    from sq_plugin.families.ctc import quantize_ctc_pt2e

    return quantize_ctc_pt2e(bundle, calibration, plan=plan, lower=job.lower, int8_attention=job.int8_attention)


def _build_stablequant(bundle: Any, calibration: Any, job: QuantizeJob) -> Any:
    if job.plan is None:
        raise ValueError("stablequant builds from its searched plan: run the search first (QuantizeJob.plan)")
    if job.mixed is not None:
        return _build_mixed_ptq(bundle, calibration, job)
    return apply_plan(bundle, calibration, job.plan, job)


def _build_mixed_ptq(bundle: Any, calibration: Any, job: QuantizeJob) -> Any:
    """StableQuant at mixed bits: its W8A8 ranges, the widths allocated on the measured sensitivity (ILP)."""
    import time

    from sq_plugin.families.mixed import folded_model, quantize_mixed
    from sq_plugin.search.mixed_precision import mixed_plan, stored_weights

    if job.sensitivity is None:
        raise ValueError("stablequant at mixed bits allocates on the layers' sensitivity: QuantizeJob.sensitivity "
                         "is missing")
    sens = job.sensitivity()
    start = time.perf_counter()
    bits = sens.allocate(job.mixed.budget_bits, widths=job.mixed.widths_for("stablequant"), layers=job.plan.quantized)
    plan = mixed_plan(job.plan, bits, method="mixed-ptq",
                      provenance={"budget_bits": job.mixed.budget_bits, "predicted_metric": sens.predicted(bits)})
    weights = stored_weights(folded_model(bundle), plan)
    decide_seconds = time.perf_counter() - start
    quantized = quantize_mixed(bundle, calibration, plan, weights, simulate=job.lower is False)
    quantized.calib_seconds += decide_seconds + sens.seconds
    return quantized


def _build_mixed_training(method: str) -> Builder:
    def build(bundle: Any, calibration: Any, job: QuantizeJob) -> Any:
        from sq_plugin.families.mixed import quantize_mixed, train_mixed
        from sq_plugin.search.mixed_precision import mixed_plan
        from sq_plugin.search.mixed_training import MixedTrainConfig

        if job.plan is None or job.train is None:
            raise ValueError(f"mixed_{method.replace('-', '_')} trains on the search's W8A8 ranges and the training "
                             "split: QuantizeJob.plan and QuantizeJob.train are needed")
        opts = job.options.mixed_training
        config = MixedTrainConfig(budget_bits=job.mixed.budget_bits, widths=job.mixed.widths_for(method),
                                  steps=opts.steps, seed=opts.seed)
        result = train_mixed(bundle, job.train(), job.plan, config, method=method, batch_size=opts.batch_size)
        plan = mixed_plan(job.plan, result.bits, method=f"mixed-{method}",
                          provenance={"budget_bits": job.mixed.budget_bits, "train_steps": opts.steps,
                                      "stage_seconds": result.stage_seconds})
        quantized = quantize_mixed(bundle, calibration, plan, result.weights, simulate=job.lower is False)
        quantized.calib_seconds += result.seconds
        return quantized

    return build


def _build_rule(name: str) -> Builder:
    def build(bundle: Any, calibration: Any, job: QuantizeJob) -> Any:
        import time

        from sq_plugin.search.rules import layer_ops, rule_plan

        if job.statistics is None:
            raise ValueError(f"{name} decides on the shared statistics: QuantizeJob.statistics is missing")
        histograms = job.statistics()
        start = time.perf_counter()
        plan = rule_plan(histograms, layer_ops(bundle.model), _rule(name, job.options), w_bits=job.w_bits,
                         a_bits=job.a_bits, int8_grid=job.int8_grid, provenance={**job.provenance, "method": name})
        decide_seconds = time.perf_counter() - start
        quantized = apply_plan(bundle, calibration, plan, job)
        quantized.calib_seconds += decide_seconds
        return quantized

    return build


def _build_torchao_observer(name: str) -> Builder:
    def build(bundle: Any, calibration: Any, job: QuantizeJob) -> Any:
        # These take quant_min/quant_max from the spec (so they work below 8 bits), but torchao's
        # HistogramObserver scores its L2 search on 2**8 bins whatever the range: its sub-8-bit rows are
        # torchao's behaviour as shipped, not a tuned baseline.
        from torchao.quantization.pt2e import HistogramObserver, MovingAverageMinMaxObserver

        observer = (MovingAverageMinMaxObserver if name == "moving_average" else HistogramObserver).with_args(
            eps=OBSERVER_EPS)
        if bundle.kind == "whisper":
            from sq_plugin.families.whisper import quantize_whisper_simulated, quantize_whisper_x86

            if job.runs_int8:
                from sq_plugin.backends.pt2e import observer_x86_quantizer

                return quantize_whisper_x86(bundle, calibration, quantizer=observer_x86_quantizer(
                    observer, a_bits=job.a_bits, w_bits=job.w_bits, int8_grid=job.int8_grid),
                    int8_attention=job.int8_attention)
            return quantize_whisper_simulated(bundle, calibration, observer=observer, a_bits=job.a_bits,
                                              w_bits=job.w_bits, int8_grid=job.int8_grid)
        from sq_plugin.families.ctc import quantize_ctc_pt2e

        return quantize_ctc_pt2e(bundle, calibration, observer=observer, a_bits=job.a_bits, w_bits=job.w_bits,
                                 lower=job.lower, int8_grid=job.int8_grid, int8_attention=job.int8_attention)

    return build


def _build_inc(algo: str) -> Builder:
    def build(bundle: Any, calibration: Any, job: QuantizeJob) -> Any:
        from sq_plugin.families.ctc import quantize_ctc_inc

        return quantize_ctc_inc(bundle, calibration, act_algo=algo, a_bits=job.a_bits, w_bits=job.w_bits,
                                lower=job.lower)

    return build


def _build_quanto(bundle: Any, calibration: Any, job: QuantizeJob) -> Any:
    from sq_plugin.families.ctc import quantize_ctc_quanto

    return quantize_ctc_quanto(bundle, calibration, a_bits=job.a_bits, w_bits=job.w_bits)


def _inc_needs_full_grid(int8_grid: str) -> str | None:
    if int8_grid == "full":
        return None
    return ("INC 3.10 static quant always uses the full W8A8 grids (-128..127 weights, 0..255 activations), not the "
            "narrowed grid this recipe runs (int8_grid, or an x86 CPU without VNNI whose oneDNN kernels saturate on "
            "the full grids); run it on a VNNI/AMX CPU with int8_grid: auto or full")


def _quanto_needs_int32_sums(int8_grid: str) -> str | None:
    from sq_plugin.backends.x86_isa import INT_MM_SATURATES, is_x86, x86_policy

    if is_x86() and not x86_policy().int32_accumulation:
        return f"optimum-quanto W8A8 would be wrong on this CPU: {INT_MM_SATURATES}"
    return None


_INC = ("neural_compressor", 'pip install "sq-plugin[inc]"')
_INC_BITS = "INC 3.10 static quant is int8-only (its observers use the full 8-bit grid)"
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("fp", "the float32 model, the reference every row is compared with", decides="none"),
    Method("stablequant", "StableQuant: screen by the metric, percentile cut-off for flagged layers, MSE range; "
           "at mixed bits, per-layer weight widths allocated on the measured sensitivity (ILP)",
           build=_build_stablequant, mixed=True),
    Method("max", "MinMax: every layer's input range is its calibration min..max", build=_build_rule("max")),
    Method("percentile", "percentile: one cut-off for every layer (method_options.percentile)",
           build=_build_rule("percentile")),
    Method("mse", "MSE: every layer's range minimizes the quantization MSE on its histogram",
           build=_build_rule("mse")),
    Method("moving_average", "torchao MovingAverageMinMaxObserver, as shipped", decides="observers",
           build=_build_torchao_observer("moving_average")),
    Method("histogram", "torchao HistogramObserver (L2 search; the x86 default), as shipped", decides="observers",
           build=_build_torchao_observer("histogram")),
    Method("inc_minmax", "INC 3.10 static quant (MinMax): W8A8 only, standalone Conv1d left float",
           families=("ctc",), bits="w8a8", bits_reason=_INC_BITS, extra=_INC, decides="observers",
           build=_build_inc("minmax"),
           grid_refusal=_inc_needs_full_grid),
    Method("inc_kl", "INC 3.10 static quant (KL): W8A8 only, standalone Conv1d left float", families=("ctc",),
           bits="w8a8", bits_reason=_INC_BITS, extra=_INC, decides="observers", build=_build_inc("kl"),
           grid_refusal=_inc_needs_full_grid),
    Method("quanto_absmax", "optimum-quanto: W8A8 (int8 or float8 activations only), absmax + EMA",
           families=("ctc",), bits="w8a8", bits_reason="optimum-quanto quantizes activations to int8 or float8 only",
           extra=("optimum.quanto", 'pip install "sq-plugin[quanto]"'),
           decides="observers", build=_build_quanto, grid_refusal=_quanto_needs_int32_sums),
    Method("mixed_one_stage", "Xu et al. 2025: widths (Gumbel-softmax) and quantized weights learned in one stage, "
           "KL to the float model, on StableQuant's W8A8 ranges (method_options.mixed_training)", bits="mixed",
           build=_build_mixed_training("one-stage")),
    Method("mixed_two_stage", "the two-stage baseline: the widths searched first, then quantization-aware "
           "fine-tuning at those widths (method_options.mixed_training)", bits="mixed",
           build=_build_mixed_training("two-stage")),
)}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)
MIXED_ONLY_METHODS: tuple[str, ...] = tuple(m.name for m in METHODS.values() if m.bits == "mixed")

__all__ = ["FAMILIES", "METHODS", "METHOD_NAMES", "MIXED_ONLY_METHODS", "OBSERVER_EPS", "Method", "QuantizeJob",
           "apply_plan", "family_statistics"]
