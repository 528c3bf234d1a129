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
    plan: StableQuant's searched plan (other methods make their own).
    provenance: what every plan records (model, calibration set and hash, ISA policy).
    """

    w_bits: int
    a_bits: int
    lower: bool | None
    int8_grid: str
    options: Any = None
    statistics: Callable[[], dict[str, Any]] | None = None
    plan: Any = None
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def runs_int8(self) -> bool:
        return self.lower is not False and (self.w_bits, self.a_bits) == (8, 8)


Builder = Callable[[Any, Any, QuantizeJob], Any]


@dataclass(frozen=True)
class Method:
    """One calibration method. `bits`: "any" (2-8 bits) or "w8a8" (the framework cannot express less).
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

    def refusal(self, *, w_bits: int, a_bits: int, int8_grid: str) -> str | None:
        """Why this method cannot run at these bits on this grid (None: it can)."""
        if self.bits == "w8a8" and (w_bits, a_bits) != (8, 8):
            return self.bits_reason
        return self.grid_refusal(int8_grid) if self.grid_refusal is not None else None


# --------------------------------------------------------------------------------------------------
# Builders: they import the families and backends when called.
# --------------------------------------------------------------------------------------------------


def _rule(name: str, options: Any) -> Any:
    from sq_plugin.core.ranges import RangeRule

    if name == "max":
        return RangeRule("max")
    if name == "percentile":
        return RangeRule("percentile", percentile=options.percentile.percentile if options else 99.99)
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
            return quantize_whisper_x86(bundle, calibration, plan)
        return quantize_whisper_simulated(bundle, calibration, plan=plan)
    from sq_plugin.families.ctc import quantize_ctc_pt2e

    return quantize_ctc_pt2e(bundle, calibration, plan=plan, lower=job.lower)


def _build_stablequant(bundle: Any, calibration: Any, job: QuantizeJob) -> Any:
    if job.plan is None:
        raise ValueError("stablequant builds from its searched plan: run the search first (QuantizeJob.plan)")
    return apply_plan(bundle, calibration, job.plan, job)


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
                    observer, a_bits=job.a_bits, w_bits=job.w_bits, int8_grid=job.int8_grid))
            return quantize_whisper_simulated(bundle, calibration, observer=observer, a_bits=job.a_bits,
                                              w_bits=job.w_bits, int8_grid=job.int8_grid)
        from sq_plugin.families.ctc import quantize_ctc_pt2e

        return quantize_ctc_pt2e(bundle, calibration, observer=observer, a_bits=job.a_bits, w_bits=job.w_bits,
                                 lower=job.lower, int8_grid=job.int8_grid)

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
    Method("stablequant", "StableQuant: screen by the metric, percentile cut-off for flagged layers, MSE range",
           build=_build_stablequant),
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
)}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)

__all__ = ["FAMILIES", "METHODS", "METHOD_NAMES", "OBSERVER_EPS", "Method", "QuantizeJob", "apply_plan",
           "family_statistics"]
