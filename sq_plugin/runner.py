"""Run a recipe: FP once, then every bits x method, into one comparison report.

    recipe = load_recipe("recipes/wav2vec2-ref-w8a8.yaml")
    result = run_recipe(recipe)          # -> output_dir/<name>-<timestamp>/{report.md, results.json, *.png}

Everything is computed in memory first; the files are then written into a hidden temp directory
next to the final one and moved into place with one `os.replace`. So a failure (an exception, a NaN
metric, Ctrl-C) leaves no partial report behind.

Methods are the entries of `sq_plugin.methods.METHODS` (its families, bits, optional extra and builder):
- stablequant: the layer-adaptive search, whose `QuantPlan` the family applies on the backend;
- max / percentile / mse: one rule for every layer, decided on the same input histograms (collected once per
  model, by the search when it runs) and written as a `QuantPlan` too;
- moving_average / histogram: torchao's own observers on the same x86 scheme (histogram = L2 search, the x86
  default);
- inc_minmax / inc_kl: Intel Neural Compressor 3.10's built-in static quant as shipped (W8A8 only; it leaves
  standalone Conv1d float); quanto_absmax: optimum-quanto W8A8 (absmax + EMA). CTC only.
Backend x86 runs W8A8 on oneDNN INT8 kernels: CTC models as one lowered graph, Whisper as its INT8 encoder
and static-cache decoder step (`sq_plugin.families.whisper_int8`). Below 8 bits, or with backend "simulate",
the model runs as a float fake-quant simulation, labelled `simulated`. A (method, bits) pair a framework cannot
express (INC/quanto below 8 bits) is skipped and listed in the report with the reason, not silently dropped.
Every plan is saved next to the report (`plan_<model>_<method>_<bits>.json`).
"""

from __future__ import annotations

import gc
import importlib.util
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sq_plugin.methods import METHODS, MIXED_ONLY_METHODS, QuantizeJob, family_statistics
from sq_plugin.recipe import Recipe, RecipeError

ROW_KEYS: tuple[str, ...] = ("model", "method", "w_bits", "a_bits", "simulated", "backend", "int8_kernels", "wer",
                             "cer", "fp_wer", "fp_cer", "calib_seconds", "search_seconds", "n_eval")
N_EXAMPLES = 5


@dataclass
class RunResult:
    """What `run_recipe` produced. `rows` follow ROW_KEYS (plus lower/eval seconds)."""

    recipe: Recipe
    output_dir: Path
    rows: list[dict[str, Any]]
    fp: dict[str, dict[str, float]]  # model -> {wer, cer, n}
    searches: dict[str, dict[str, Any]] = field(default_factory=dict)  # "<model> <bits>" -> SearchResult.to_dict()+
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # model -> example transcripts
    skipped: list[dict[str, Any]] = field(default_factory=list)  # {model, method, bits, reason}
    plans: dict[str, Any] = field(default_factory=dict)  # "<model> <method> <bits>" -> its QuantPlan
    sensitivities: dict[str, Any] = field(default_factory=dict)  # model -> SensitivityResult.to_dict() (mixed bits)
    statistics_seconds: dict[str, float] = field(default_factory=dict)  # model -> the one statistics pass
    peak_rss_mb: float = 0.0
    seconds: float = 0.0


def _find_spec(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package raises instead of returning None
        return False


def _is_whisper(model: str) -> bool:
    return "whisper" in model.lower()


def _family(model: str) -> str:
    """The family a model name points to, before loading it (checked again after loading)."""
    return "whisper" if _is_whisper(model) else "ctc"


_FAMILY_NAMES = {"ctc": "CTC", "whisper": "Whisper"}


def _family_error(model: str, family: str, methods: list[str]) -> str:
    takes = " / ".join(_FAMILY_NAMES[f] for f in METHODS[methods[0]].families)
    return (f"model: {model!r} is a {_FAMILY_NAMES[family]} model; methods {methods} run on {takes} models only: "
            "drop them or the model")


def check_runnable(recipe: Recipe) -> None:
    """Refuse, before loading anything, what this version cannot run (RecipeError: CLI exit 2)."""
    from sq_plugin.recipe import CTC_METRICS, TEACHER_FORCED_METRICS

    source = f"{recipe.name or 'recipe'}.yaml"
    errors = []
    metric = recipe.method_options.stablequant.metric
    searches = "stablequant" in recipe.methods or any(m in recipe.methods for m in MIXED_ONLY_METHODS)
    for model in recipe.models:
        family = _family(model)
        bad = [m for m in recipe.methods if family not in METHODS[m].families]
        if bad:
            errors.append(_family_error(model, family, bad))
        if family == "whisper" and searches and metric in CTC_METRICS:
            errors.append(f"method_options.stablequant.metric: {metric!r} needs a CTC model; {model!r} is "
                          "Whisper: use tf_loss, tf_kl, tf_token_error, wer or cer")
        elif family == "ctc" and searches and metric in TEACHER_FORCED_METRICS:
            errors.append(f"method_options.stablequant.metric: {metric!r} is a Whisper proxy; model {model!r} "
                          "is a CTC model: use wer, cer, ctc_loss or ctc_kl")
    for i, method in enumerate(recipe.methods):
        extra = METHODS[method].extra
        if extra is not None and not _find_spec(extra[0]):
            errors.append(f"methods[{i}]: {method!r} needs {extra[0]}, which is not installed; run `{extra[1]}` "
                          "or drop the method")
    errors += _isa_errors(recipe)
    if errors:
        raise RecipeError(source, errors)


def _isa_errors(recipe: Recipe) -> list[str]:
    """What the x86 backend cannot run on this machine: no x86 CPU, the full grid or INT8 attention without VNNI."""
    if recipe.backend != "x86":
        return []
    from sq_plugin.backends.x86_isa import IsaError, int8_attention_problem, is_x86, x86_policy

    if not is_x86():
        return ["backend: 'x86' runs oneDNN INT8 kernels on an x86-64 CPU; this machine is not one: use "
                "backend: simulate (fake-quant, labelled as such)"]
    problem = int8_attention_problem(x86_policy()) if recipe.int8_attention else None
    if problem:
        return [f"int8_attention: true: {problem}. Fix: int8_attention: false (attention stays float), or run on "
                "a CPU with VNNI or AMX"]
    per_token = "stablequant" in recipe.methods and recipe.method_options.stablequant.activations == "per_token"
    problem = int8_attention_problem(x86_policy()) if per_token else None
    if problem:
        return [f"method_options.stablequant.activations: per_token runs the Linears on torch._int_mm: {problem}. "
                "Fix: activations: auto (stays static here) or static, or run on a CPU with VNNI or AMX"]
    if recipe.int8_grid != "full":
        return []
    try:
        for bits in recipe.bits:
            x86_policy("full").grid_bits(bits.w, bits.a)
    except IsaError as exc:
        return [f"int8_grid: 'full': {exc}"]
    return []


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


class _Progress(Sequence):
    """The calibration set, with a progress bar over every full pass a builder makes through it (calibration runs
    inside the builders; this shows it without threading a flag through each one)."""

    def __init__(self, items: Sequence[Any], desc: str, enabled: bool) -> None:
        self.items, self.desc, self.enabled = items, desc, enabled

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: Any) -> Any:
        return self.items[index]

    def __iter__(self) -> Any:
        from tqdm.auto import tqdm

        return iter(tqdm(self.items, desc=self.desc, unit="utt", disable=not self.enabled, leave=False))


def _int8_nbytes(bundle: Any, plan: Any) -> int | None:
    """Bytes of the model as INT8 storage holds it: every quantized layer's weight at 1 byte per value plus float32
    per-channel scales, the rest float32 (None without a plan: a framework's observers chose the layers)."""
    if plan is None:
        return None
    from sq_plugin.backends.packed import fp32_nbytes
    from sq_plugin.backends.simulate import quantizable_layers
    from sq_plugin.families.mixed import folded_model

    model = folded_model(bundle)
    layers = quantizable_layers(model)
    saved = sum(3 * layers[name].weight.numel() - 4 * layers[name].weight.shape[0] for name in plan.quantized
                if name in layers)
    return fp32_nbytes(model) - saved


class DataUnavailableError(RuntimeError):
    """A data set that cannot be fetched here (LibriSpeech without `datasets` or the hub)."""


def _load_data(dataset: str, size: int | None) -> list[Any]:
    if dataset.startswith("corpus-"):
        from sq_plugin.speech.corpus import corpus_config, load_split

        split, _, release = dataset.removeprefix("corpus-").partition("-")  # "dev-v1": release v1's dev split
        return load_split(split, limit=size, config=corpus_config(release or "v2"))
    from sq_plugin.speech.models import load_librispeech

    try:
        return load_librispeech(dataset.removeprefix("librispeech-"), limit=size)
    except RuntimeError as exc:  # its message says what to install or where the cache goes
        raise DataUnavailableError(f"{dataset}: {exc}") from exc


def _finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise RuntimeError(f"{what} is {value}; refusing to write a report with an undefined metric")
    return float(value)


def run_recipe(recipe: Recipe, *, progress: bool = True, log: Callable[[str], None] | None = None) -> RunResult:
    """Run every model x bits x method of `recipe`, then write the report atomically (see module docstring)."""
    import torch

    from sq_plugin import parallel

    main_rank = parallel.is_main()
    progress = progress and main_rank  # under torchrun, rank 0 speaks for all

    def say(msg: str) -> None:
        if log is not None and main_rank:
            log(msg)
        elif progress:
            print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    check_runnable(recipe)
    start = time.perf_counter()
    if recipe.threads is not None:
        torch.set_num_threads(recipe.threads)
    calibration = _load_data(recipe.calibration.dataset, recipe.calibration.size)
    evaluation = _load_data(recipe.evaluation.dataset, recipe.evaluation.size)
    say(f"data: {len(calibration)} calibration ({recipe.calibration.dataset}), {len(evaluation)} evaluation "
        f"({recipe.evaluation.dataset}) utterances")
    if parallel.active():  # refuse a world larger than the data before any work (each rank needs a share)
        parallel.batch_shard(len(calibration), 8, what="calibration utterances")  # the search scores batches of 8
        parallel.batch_shard(len(evaluation), 1, what="evaluation utterances")
        say(f"torch.distributed: {parallel.rank_and_world()[1]} ranks share every evaluation; rank 0 writes the report")
    run = RunResult(recipe=recipe, output_dir=Path(), rows=[], fp={})
    for model in recipe.models:
        _run_model(run, model, calibration, evaluation, say, progress)
    run.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB
    run.seconds = time.perf_counter() - start
    if not main_rank:  # rank 0 writes; the others computed the same result
        return run
    run.output_dir = write_outputs(run)
    say(f"report: {run.output_dir / 'report.md'}")
    return run


def _unsupported(method: str, bits: Any, recipe: Recipe) -> str | None:
    """Why a method cannot run at these bits (uniform or a mixed item), on this grid and CPU (None: it can)."""
    return METHODS[method].refusal(w_bits=bits.w, a_bits=bits.a, int8_grid=_int8_grid(recipe), mixed=bits.is_mixed)


def _packed_size(quantized: Any, bundle: Any) -> dict[str, Any]:
    """A mixed-precision row's size: its packed checkpoint (`backends.packed`, written to a temporary directory and
    measured on disk) against the float32 state_dict, and how it executes."""
    from sq_plugin.backends.packed import fp32_nbytes, packed_size
    from sq_plugin.families.mixed import folded_model

    model = folded_model(bundle)
    plan = quantized.plan
    info = packed_size(model, plan, quantized.stored_weights)
    fp32 = fp32_nbytes(model)
    bits = {n: plan.layers[n].weight.bits for n in plan.quantized}
    return {"avg_bits": round(info.avg_bits, 3), "bytes": info.bytes, "fp32_bytes": fp32,
            "compression_ratio": round(fp32 / info.bytes, 3),
            "executed": "simulated" if quantized.simulated else (
                "int8-kernels" if min(bits.values()) >= 7 else "storage-only"),
            "weight_bits": bits}


def _search(bundle: Any, calibration: Sequence[Any], recipe: Recipe, w_bits: int, a_bits: int, progress: bool) -> Any:
    from sq_plugin.families.ctc import search_ctc

    opts = recipe.method_options.stablequant
    config = opts.search_config(w_bits=w_bits, a_bits=a_bits, int8_grid=_int8_grid(recipe))
    if bundle.kind == "whisper":
        from sq_plugin.families.whisper import search_whisper

        return search_whisper(bundle, calibration, config, metric=opts.metric, progress=progress,
                              referee=None if opts.referee == "none" else opts.referee,
                              cache_budget_mb=opts.cache_budget_mb, metric_size=opts.metric_size)
    return search_ctc(bundle, calibration, config, metric=opts.metric, progress=progress,
                      cache_budget_mb=opts.cache_budget_mb, metric_size=opts.metric_size)


def _choose_activations(bundle: Any, calibration: Sequence[Any], recipe: Recipe, plan: Any,
                        macs: dict[str, int]) -> tuple[Any, float | None]:
    """The searched plan with the recipe's `activations` choice applied (static, per_token, auto: scored on the
    search's metric over the calibration set, or its first `metric_size`; with float_fallback, the per-token plan's
    remaining static layers float is a candidate too, by the search's threshold), and the seconds it took (None:
    "static", nothing done)."""
    from sq_plugin.search.activations import choose_activations

    opts = recipe.method_options.stablequant
    if opts.activations == "static":
        return plan, None
    t0 = time.perf_counter()
    from sq_plugin.families import metric_subset

    calibration = metric_subset(calibration, opts.metric_size)  # scored on what the search scored
    if bundle.kind == "whisper":
        from sq_plugin.families.whisper import whisper_score

        score, _ = whisper_score(bundle, calibration, opts.metric)
        exclude: tuple[str, ...] = ("proj_out",)  # the embedding reads its INT8 table through oneDNN's qlinear
    else:
        from sq_plugin.families.ctc import ctc_score, unchanged_caller_model

        # weight norm folded in a copy, as the search scores it: the simulation swaps plain weights in and out
        bundle = unchanged_caller_model(bundle)
        score, exclude = ctc_score(bundle, calibration, opts.metric), ()
    runs_here = None
    # On x86, and for CTC models on either backend (their simulation is the PT2E graph, per-token Linears included,
    # so `_int_mm` runs there too); Whisper's simulation is fake-quant alone.
    if recipe.backend == "x86" or bundle.kind != "whisper":
        from sq_plugin.backends.x86_isa import int8_attention_problem, is_x86, x86_policy

        runs_here = int8_attention_problem(x86_policy()) if is_x86() else "this is not an x86 CPU"
    chosen, _ = choose_activations(bundle.model, plan, score, opts.activations, exclude=exclude,
                                   per_token_runs=runs_here, macs=macs,
                                   float_margin=opts.threshold_for() if opts.float_fallback else None)
    return chosen, time.perf_counter() - t0


def _delta_ci(references: dict[str, str], fp_errors: list[int], words: list[int], result: Any, what: str) -> Any:
    """ΔWER against FP with its 95% paired-bootstrap interval over the evaluation utterances."""
    from sq_plugin.core.significance import paired_bootstrap
    from sq_plugin.speech.evaluate import word_errors

    by_id = {u.id: u.hypothesis for u in result.utterances}
    if set(by_id) != set(references):
        raise RuntimeError(f"{what}: scored other utterances than FP ({len(by_id)} vs {len(references)}); the "
                           "paired comparison needs the same ones")
    errors, _ = word_errors(list(references.values()), [by_id[i] for i in references])
    return paired_bootstrap(fp_errors, errors, words)


def _int8_grid(recipe: Recipe) -> str:
    """The recipe's grid, "auto" resolved for this CPU ("narrow_weights" without VNNI)."""
    from sq_plugin.backends.x86_isa import resolve_int8_grid

    return resolve_int8_grid(recipe.int8_grid)


def _run_model(run: RunResult, model: str, calibration: Sequence[Any], evaluation: Sequence[Any],
               say: Callable[[str], None], progress: bool) -> None:
    """FP once, then every bits x method of one model; appends to `run` (rows, fp, searches, examples)."""
    import torch

    from sq_plugin.backends.packed import fp32_nbytes
    from sq_plugin.backends.pt2e import int8_modules
    from sq_plugin.families.ctc import EVAL_KWARGS
    from sq_plugin.families.mixed import folded_model
    from sq_plugin.speech.audio import SAMPLE_RATE
    from sq_plugin.speech.evaluate import evaluate, word_errors
    from sq_plugin.speech.models import load_model

    recipe = run.recipe
    say(f"loading {model}")
    bundle = load_model(model)
    if bundle.kind == "whisper":
        from sq_plugin.families.whisper import EVAL_BATCH

        # Whisper pads every clip to 30 s itself; batches only change the speed of generate().
        eval_kwargs: dict[str, Any] = {"batch_size": EVAL_BATCH}
    else:
        # batch_size=1 with 2-s buckets: the quantized graphs run one utterance at a time, and the FP
        # reference must see the same inputs for the difference to measure quantization only.
        eval_kwargs = dict(EVAL_KWARGS)
    wrong_family = [m for m in recipe.quantized_methods if bundle.kind not in METHODS[m].families]
    if wrong_family:  # a name that did not say its family (e.g. a local directory)
        raise RecipeError(f"{recipe.name or 'recipe'}.yaml", [_family_error(model, bundle.kind, wrong_family)])
    fp = evaluate(bundle, evaluation, progress=progress, desc=f"evaluate {model} fp", **eval_kwargs)
    fp_wer, fp_cer = _finite(fp.wer, f"{model} FP WER"), _finite(fp.cer, f"{model} FP CER")
    audio_seconds = sum(len(u.audio) for u in evaluation) / SAMPLE_RATE
    run.fp[model] = {"wer": fp_wer, "cer": fp_cer, "n": fp.n}
    say(f"{model} fp: WER {fp_wer:.4f} CER {fp_cer:.4f} on {fp.n} utterances ({fp.seconds:.0f} s)")
    hypotheses: dict[str, dict[str, str]] = {"fp": {u.id: u.hypothesis for u in fp.utterances}}
    references = {u.id: u.reference for u in fp.utterances}
    fp_errors, words = word_errors(list(references.values()), [u.hypothesis for u in fp.utterances])

    if "fp" in recipe.methods:
        run.rows.append({"model": model, "method": "fp", "w_bits": 32, "a_bits": 32, "simulated": False,
                         "backend": "eager float32", "int8_kernels": 0, "wer": fp_wer, "cer": fp_cer,
                         "fp_wer": fp_wer, "fp_cer": fp_cer, "calib_seconds": None, "search_seconds": None,
                         "n_eval": fp.n, "lower_seconds": None, "eval_seconds": fp.seconds,
                         "compile_seconds": None, "rtf": fp.seconds / audio_seconds,
                         "model_bytes": fp32_nbytes(folded_model(bundle))})
        if any(b.is_mixed for b in recipe.bits):  # the size the mixed rows are compared with
            run.rows[-1].update({"bytes": run.rows[-1]["model_bytes"], "avg_bits": 32.0,
                                 "compression_ratio": 1.0, "wer_ci95": [0.0, 0.0], "executed": "float32"})
    lower = False if recipe.backend == "simulate" else None  # None: real INT8 for W8A8, simulated below
    provenance = {"model": model, "calibration": f"{recipe.calibration.dataset}[:{len(calibration)}]",
                  "calibration_sha256": _utterance_hash(calibration), "x86_isa": _isa_record(recipe)}
    histograms: dict[str, Any] = {}
    searched: dict[tuple[int, int], Any] = {}  # (w_bits, a_bits) -> (search, plan): one search per model and bits
    cached: dict[str, Any] = {}  # the sensitivity and the training split, once per model

    def run_search(w_bits: int, a_bits: int, label: str) -> tuple[Any, Any, float | None]:
        """The search at these bits (run once per model: a mixed item reuses a w8a8 item's), its plan, and its
        wall seconds when it ran here (None: reused)."""
        if (w_bits, a_bits) in searched:
            search, plan = searched[(w_bits, a_bits)]
            return search, plan, None
        key = f"w{w_bits}a{a_bits}"
        say(f"{model} {label}: searching ({len(calibration)} calibration utterances, metric "
            f"{recipe.method_options.stablequant.metric}, {key})")
        t0 = time.perf_counter()
        search = _search(bundle, calibration, recipe, w_bits, a_bits, progress)
        seconds = time.perf_counter() - t0
        run.searches[f"{model} {key}"] = {**search.to_dict(), "model": model, "bits": key, "wall_seconds": seconds}
        plan = search.to_plan({**provenance, "metric": recipe.method_options.stablequant.metric})
        if not histograms:
            histograms.update(search.histograms)
            run.statistics_seconds[model] = search.seconds.get("statistics", 0.0)
        say(f"{model} {label}: search {seconds:.0f} s, {search.evaluations} evaluations "
            f"({search.stopped_early} stopped early"
            + (f", {search.quick_evaluations} on the quick metric" if search.quick_evaluations else "") + "), flagged "
            f"{search.flagged or 'none'}")
        searched[(w_bits, a_bits)] = (search, plan)
        return search, plan, seconds

    def sensitivity(plan: Any, widths: tuple[int, ...]) -> Any:
        """The sensitivity of the plan's quantized layers (the W8A8 search's plan: the same for every mixed item) at
        `widths`, measured once per model for all the widths the mixed items ask for so far."""
        have = cached.get("sensitivity")
        if have is None or not set(widths) <= set(have.widths):
            from sq_plugin.families.mixed import family_sensitivity

            wanted = tuple(sorted(set(widths) | set(have.widths if have is not None else ())))
            say(f"{model}: sensitivity of {len(plan.quantized)} layers at {list(wanted)} bits (dev metric)")
            cached["sensitivity"] = have = family_sensitivity(bundle, calibration, widths=wanted,
                                                              layers=plan.quantized, progress=progress)
            run.sensitivities[model] = have.to_dict()
            say(f"{model}: sensitivity: {have.evaluations} evaluations in {have.seconds:.0f} s")
        return have

    def train() -> Any:
        if "train" not in cached:
            from sq_plugin.speech.corpus import load_split

            cached["train"] = load_split("train", limit=recipe.method_options.mixed_training.train_size,
                                         progress=progress)
        return cached["train"]

    def statistics() -> dict[str, Any]:
        """Every layer's input histogram, computed once per model (or taken from the search)."""
        if not histograms:
            t0 = time.perf_counter()
            histograms.update(family_statistics(bundle, calibration))
            run.statistics_seconds[model] = time.perf_counter() - t0
            say(f"{model}: statistics of {len(histograms)} layers in {run.statistics_seconds[model]:.1f} s")
        return histograms

    for bits in recipe.bits:
        # StableQuant first: its search collects the statistics the plan baselines then reuse.
        order = sorted(recipe.quantized_methods, key=lambda m: m != "stablequant")
        rows: dict[str, dict[str, Any]] = {}
        for method in order:
            label = f"{method} {bits.label}"
            reason = _unsupported(method, bits, recipe)
            if reason is not None:
                run.skipped.append({"model": model, "method": method, "bits": bits.label, "reason": reason})
                say(f"{model} {label}: skipped: {reason}")
                continue
            search_seconds = None
            searched_plan = None
            if method == "stablequant" or bits.is_mixed:
                # mixed precision keeps the ranges of the W8A8 search (8-bit activations): one search serves all
                search, searched_plan, search_seconds = run_search(8 if bits.is_mixed else bits.w, bits.a, label)
            if method == "stablequant" and not bits.is_mixed:
                searched_plan, seconds = _choose_activations(bundle, calibration, recipe, searched_plan,
                                                             {d.name: d.macs for d in search.layers})
                if seconds is not None:
                    search_seconds = (search_seconds or 0.0) + seconds
                    say(f"{model} {label}: activations {searched_plan.provenance['activation_choice']}")
            job = QuantizeJob(w_bits=bits.w, a_bits=bits.a, lower=lower, int8_grid=_int8_grid(recipe),
                              int8_attention=recipe.int8_attention, options=recipe.method_options,
                              statistics=statistics, plan=searched_plan,
                              provenance=provenance, mixed=bits if bits.is_mixed else None,
                              sensitivity=lambda plan=searched_plan, item=bits: sensitivity(
                                  plan, item.widths_for("stablequant")), train=train)
            if bits.is_mixed:
                say(f"{model} {label}: budget {bits.budget_bits:g} bits per weight over widths "
                    f"{list(bits.widths_for(method if method == 'stablequant' else 'trained'))}")
            say(f"{model} {label}: calibrating on {len(calibration)} utterances"
                + (", then compiling to INT8 kernels" if job.runs_int8 else ""))
            quantized = METHODS[method].build(bundle, _Progress(calibration, f"calibrate {method} {bits.label}",
                                                                progress), job)
            if quantized.plan is not None:
                run.plans[f"{model} {method} {bits.label}"] = quantized.plan
            compiled = int8_modules(quantized)
            compile_before = sum(m.compile_seconds for m in compiled)  # lowering compiled the first shape
            result = evaluate(quantized.bundle, evaluation, progress=progress, desc=f"evaluate {method} {bits.label}",
                              **eval_kwargs)
            compile_seconds = sum(m.compile_seconds for m in compiled)
            # Steady-state evaluation: without the first call of each new input shape (its compilation).
            eval_seconds = result.seconds - (compile_seconds - compile_before)
            wer_q = _finite(result.wer, f"{model} {label} WER")
            cer_q = _finite(result.cer, f"{model} {label} CER")
            delta = _delta_ci(references, fp_errors, words, result, f"{model} {label}")
            size = _packed_size(quantized, bundle) if bits.is_mixed else {}
            rows[method] = {"model": model, "method": method, "w_bits": bits.w, "a_bits": bits.a,
                            "simulated": quantized.simulated, "backend": quantized.backend,
                            "int8_kernels": quantized.int8_kernels, "wer": wer_q, "cer": cer_q, "fp_wer": fp_wer,
                            "fp_cer": fp_cer, "calib_seconds": quantized.calib_seconds,
                            "search_seconds": search_seconds, "n_eval": result.n,
                            "lower_seconds": quantized.lower_seconds, "eval_seconds": eval_seconds,
                            "compile_seconds": compile_seconds if compiled else None,
                            "rtf": eval_seconds / audio_seconds,
                            "model_bytes": _int8_nbytes(bundle, quantized.plan) if not quantized.simulated else None,
                            "plan_deviations": quantized.plan_deviations,
                            "wer_delta": delta.delta, "wer_ci95": [delta.low, delta.high],
                            "wer_delta_p": delta.p_value,
                            "plan": f"plan_{_slug(f'{model} {method} {bits.label}')}.json"
                            if quantized.plan is not None else None}
            if bits.is_mixed:
                lossless = not delta.low > 0  # no significant WER increase (the interval does not lie above 0)
                rows[method].update({"w_bits": "mixed", "bits": bits.label, "budget_bits": bits.budget_bits,
                                     "lossless": lossless, **size})
                say(f"{model} {label}: mean {size['avg_bits']:.2f} weight bits, {size['bytes'] / 1e6:.2f} MB packed "
                    f"({size['compression_ratio']:.2f}x smaller than float32; {size['executed']}); "
                    f"{'lossless' if lossless else 'not lossless'} at p < 0.05")
            hypotheses[label] = {u.id: u.hypothesis for u in result.utterances}
            say(f"{model} {label}: WER {wer_q:.4f} ({(wer_q - fp_wer) * 100:+.2f} pp, 95% "
                f"[{delta.low * 100:+.2f}, {delta.high * 100:+.2f}]) CER {cer_q:.4f}; "
                f"{quantized.backend}, {quantized.int8_kernels} INT8 kernels; calibration "
                f"{quantized.calib_seconds:.1f} s, " + (f"compilation {compile_seconds:.0f} s, " if compiled else "")
                + f"evaluation {eval_seconds:.0f} s (RTF {eval_seconds / audio_seconds:.3f})")
            # Free the compiled graph before the next method: Inductor keeps every compiled model alive.
            del quantized
            torch._dynamo.reset()
            gc.collect()
        run.rows += [rows[m] for m in recipe.quantized_methods if m in rows]  # in the recipe's order
    run.examples[model] = _pick_examples(references, hypotheses)


def _pick_examples(references: dict[str, str], hypotheses: dict[str, dict[str, str]]) -> list[dict[str, Any]]:
    """N_EXAMPLES utterances, preferring those where some quantized model disagrees with FP (ties: corpus order)."""
    fp = hypotheses["fp"]
    ids = list(references)
    differs = [i for i in ids if any(h.get(i) != fp[i] for k, h in hypotheses.items() if k != "fp")]
    chosen = (differs + [i for i in ids if i not in differs])[:N_EXAMPLES]
    return [{"id": i, "reference": references[i], "hypotheses": {k: h.get(i, "") for k, h in hypotheses.items()}}
            for i in chosen]


# --------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "torchao", "transformers", "sq-plugin"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def write_outputs(run: RunResult) -> Path:
    """Write report.md, results.json and the plots into output_dir/<name>-<timestamp>/, atomically."""
    recipe = run.recipe
    root = Path(recipe.output_dir)
    created = [p for p in (root, *root.parents) if not p.exists()]
    root.mkdir(parents=True, exist_ok=True)
    name = recipe.name or "recipe"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", suffix=".partial", dir=root))
    try:
        payload = {
            "recipe": recipe.to_dict(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "fp": run.fp,
            "rows": run.rows, "searches": run.searches, "examples": run.examples, "skipped": run.skipped,
            "peak_rss_mb": run.peak_rss_mb, "statistics_seconds": run.statistics_seconds,
            "sensitivities": run.sensitivities,
            "seconds": run.seconds, "versions": _versions(), "x86_isa": _isa_record(recipe),
        }
        # allow_nan=False: the rows were checked finite; anything else here is a bug, not a report.
        (tmp / "results.json").write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
        for key, plan in run.plans.items():  # `stablequant plan show <file>` prints one
            plan.save(tmp / f"plan_{_slug(key)}.json")
        plots = _plot(run, tmp)
        (tmp / "report.md").write_text(_report_md(run, plots))
        final = root / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        n = 1
        while final.exists():  # two runs in the same second
            n += 1
            final = root / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
        tmp.chmod(0o755)  # mkdtemp makes it 0700; a report directory is shared output, like its files
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for path in created:  # only directories this call created, innermost first, and only if empty
            try:
                path.rmdir()
            except OSError:
                break
        raise
    return final


def _utterance_hash(utterances: Sequence[Any]) -> str:
    """sha256 over the utterance ids (the corpus ids carry its version and split)."""
    import hashlib

    return hashlib.sha256("\n".join(str(u.id) for u in utterances).encode()).hexdigest()


def _deviations_md(run: RunResult, search: dict[str, Any]) -> str:
    """The plan layers the backend ran otherwise than planned (never silently)."""
    row = next((r for r in run.rows if r["model"] == search["model"] and r["method"] == "stablequant"
                and f"w{r['w_bits']}a{r['a_bits']}" == search["bits"]), None)
    deviations = (row or {}).get("plan_deviations") or {}
    if not deviations:
        return " The backend ran it as planned." if row is not None else ""
    listed = "; ".join(f"`{name}`: {why}" for name, why in deviations.items())
    return f" The backend ran {len(deviations)} layer(s) otherwise: {listed}."


def _isa_record(recipe: Recipe) -> dict[str, Any]:
    """The CPU policy and the INT8 grid the run used (sq_plugin.backends.x86_isa)."""
    from sq_plugin.backends.x86_isa import x86_policy

    return {**x86_policy().to_dict(), "int8_grid": _int8_grid(recipe)}


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in text)


def _bits_label(row: dict[str, Any]) -> str:
    if row["method"] == "fp":
        return "fp32"
    return row.get("bits") or f"w{row['w_bits']}a{row['a_bits']}"


def _plot(run: RunResult, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    files: list[str] = []
    for key, search in run.searches.items():
        layers = search["layers"]
        x = list(range(len(layers)))
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8.0, len(layers) * 0.18), 8.0), sharex=True)
        colors = ["tab:red" if d["flagged"] else "tab:blue" for d in layers]
        percentiles = [d["percentile"] for d in layers]
        on_cut_off = [d.get("choice", "percentile") == "percentile" for d in layers]
        for marker, keep in (("o", True), ("x", False)):  # x: the layer took a built-in rule's range
            idx = [i for i in x if on_cut_off[i] == keep]
            ax1.scatter(idx, [percentiles[i] for i in idx], c=[colors[i] for i in idx], s=14, marker=marker)
        ax1.set_ylim(min(min(percentiles), 99.0) - 0.1, 100.0)  # a percentile stops at 100
        ax1.set_ylabel("chosen percentile")
        ax1.set_title(f"StableQuant {key}: per-layer cut-off (red = flagged by the screen; x = a built-in rule's "
                      f"range, base {search.get('base_rule', 'mse')})")
        ax2.semilogy(x, [max(d["max_range"][1] - d["max_range"][0], 1e-12) for d in layers], ".-", label="MAX range")
        ax2.semilogy(x, [max(d["act_range"][1] - d["act_range"][0], 1e-12) for d in layers], ".-",
                     label="StableQuant range")
        ax2.set_ylabel("activation range width (hi - lo)")
        ax2.set_xticks(x, [d["name"] for d in layers], rotation=90, fontsize=6)
        ax2.legend()
        files.append(_save_figure(plt, fig, out, f"stablequant_layers_{_slug(key)}.png"))

    for model in run.fp:
        rows = [r for r in run.rows if r["model"] == model and r["method"] != "fp" and r.get("wer_ci95")]
        if not rows:
            continue
        labels = [f"{r['method']} {_bits_label(r)}" for r in rows]
        deltas = [r["wer_delta"] * 100 for r in rows]  # the paired ΔWER, the centre of its interval
        lows = [d - r["wer_ci95"][0] * 100 for d, r in zip(deltas, rows, strict=True)]
        highs = [r["wer_ci95"][1] * 100 - d for d, r in zip(deltas, rows, strict=True)]
        fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows)), 4.5))
        for i, r in enumerate(rows):
            ax.errorbar([i], [deltas[i]], yerr=[[lows[i]], [highs[i]]], fmt="o", capsize=4,
                        color="tab:orange" if r["simulated"] else "tab:blue")
        ax.axhline(0.0, color="black", linestyle="--", linewidth=1, label="FP32")
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right")
        ax.set_ylabel("ΔWER vs FP32 (pp), 95% interval")
        ax.set_title(f"{model}: ΔWER per method (blue: INT8 kernels, orange: simulated; n = {rows[0]['n_eval']})")
        ax.legend()
        files.append(_save_figure(plt, fig, out, f"wer_by_method_{_slug(model)}.png"))
    return files + _plot_mixed(run, out)


def _plot_mixed(run: RunResult, out: Path) -> list[str]:
    """Per model with mixed-precision rows: each layer's weight width per row, and WER against size."""
    from sq_plugin.mixed_report import bits_chart, pareto_chart

    files = []
    for model in run.fp:
        rows = [r for r in run.rows if r["model"] == model and r.get("weight_bits")]
        if not rows:
            continue
        params = run.sensitivities.get(model, {}).get("params")
        if params:
            name = f"mixed_bits_{_slug(model)}.png"
            bits_chart(out / name, {f"{r['method']} {r['bits']}": r["weight_bits"] for r in rows}, params,
                       title=f"{model}: weight bits per layer")
            files.append(name)
        sized = [r for r in run.rows if r["model"] == model and r.get("bytes") and r.get("wer_ci95")]
        name = f"mixed_pareto_{_slug(model)}.png"
        pareto_chart(out / name, sized, title=f"{model}: WER against size")
        files.append(name)
    return files


def _mixed_md(run: RunResult) -> list[str]:
    rows = [r for r in run.rows if r.get("weight_bits")]
    if not rows:
        return []
    lines = ["## Mixed precision", "",
             "Weight widths per layer under the budget (mean weight bits, weighted by parameters); activations "
             "keep the W8A8 search's ranges. Size: the packed checkpoint (`sq_plugin.backends.packed`: codes at "
             "each layer's width, per-channel float32 scales, the float rest) against the float32 state_dict. "
             "**storage-only**: the packed weights are unpacked at load onto int8 INT8-kernel weights (no low-bit "
             "kernel runs); **int8-kernels**: every layer at 8 (7) bits. Lossless: the ΔWER interval does not lie "
             "above 0 (no significant increase at p < 0.05).", "",
             "| model | method | budget | mean bits | size MB | vs float32 | executed | ΔWER pp [95%] | lossless |",
             "|---|---|---:|---:|---:|---:|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['budget_bits']:g} | {r['avg_bits']:.2f} | "
                     f"{r['bytes'] / 1e6:.2f} | {r['compression_ratio']:.2f}x | {r['executed']} | {_delta_md(r)} | "
                     f"{'yes' if r['lossless'] else 'no'} |")
    lines.append("")
    for model, sens in run.sensitivities.items():
        lines += [f"Sensitivity ({model}): {sens['evaluations']} evaluations of the dev metric in "
                  f"{sens['seconds']:.0f} s (float {sens['fp_metric']:.4f}; each layer alone at each width).", ""]
    return lines


def _save_figure(plt: Any, fig: Any, out: Path, name: str) -> str:
    """Lay out, write and close one plot; returns its file name."""
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


SMALL_EVALUATION = 100  # utterances: below this the report warns that small differences are noise


def _delta_md(row: dict[str, Any]) -> str:
    delta = (row["wer"] - row["fp_wer"]) * 100
    ci = row.get("wer_ci95")
    if ci is None:
        return f"{delta:+.2f}"
    mark = "" if ci[0] <= 0 <= ci[1] else " *"
    return f"{delta:+.2f} [{ci[0] * 100:+.2f}, {ci[1] * 100:+.2f}]{mark}"


def _resolution_md(run: RunResult) -> list[str]:
    """How large a difference these evaluation sets can show, and a warning when they are small."""
    rows = [r for r in run.rows if r.get("wer_ci95")]
    if not rows:
        return []
    widest = max((r["wer_ci95"][1] - r["wer_ci95"][0]) / 2 for r in rows) * 100
    lines = ["Intervals: 95% paired bootstrap over the evaluation utterances (10,000 resamples, the same utterances "
             "for FP and the method); `*` marks a ΔWER whose interval excludes 0. The widest interval here is "
             f"±{widest:.2f} pp: smaller differences are not resolved by this evaluation set.", ""]
    small = sorted({(r["model"], r["n_eval"]) for r in rows if r["n_eval"] < SMALL_EVALUATION})
    for model, n in small:
        lines += [f"**Warning:** {model} was evaluated on {n} utterances only; a ΔWER of a few pp, better or worse "
                  f"than FP, can be noise there. Use evaluation.size >= {SMALL_EVALUATION} (or null for the "
                  "whole split) before drawing conclusions.", ""]
    return lines


def _referee_md(search: dict[str, Any]) -> str:
    if not search.get("referee_metrics"):
        return ""
    choice = search["referee_choice"]
    scores = ", ".join(f"{k} {v:.4f}" for k, v in search["referee_metrics"].items())
    return (f" Referee (decoding the calibration set): {scores}; the decision is "
            f"{'the search' if choice == 'search' else 'every layer on ' + choice}.")


def _report_md(run: RunResult, plots: Sequence[str]) -> str:
    r = run.recipe
    n_eval = ", ".join(str(v["n"]) for v in run.fp.values())
    lines = [
        f"# {r.name}: {', '.join(r.models)}",
        "",
        f"Calibration: {r.calibration.size} utterances of {r.calibration.dataset}; evaluation: "
        f"{n_eval} utterances of {r.evaluation.dataset}; backend `{r.backend}`; "
        f"peak RSS {run.peak_rss_mb:.0f} MiB; total {run.seconds:.0f} s.",
        "",
        f"CPU: x86 kind `{_isa_record(r)['kind']}`; INT8 grid `{_int8_grid(r)}` (recipe: `{r.int8_grid}`; "
        "`narrow_weights` / `narrow_activations` = 7-bit weights / activations at W8A8, what oneDNN computes "
        "exactly without VNNI). Attention's matmuls: "
        + ("INT8 GEMMs (`int8_attention: true`; each row's backend says in how many blocks)." if r.int8_attention
           else "float (`int8_attention: false`)."),
        "",
        "ΔWER/ΔCER are in percentage points vs FP32 on the same utterances (batch size 1). "
        "**simulated** = fake-quant q/dq run in float (below 8 bits, or backend `simulate`); "
        "otherwise the model ran on real INT8 kernels (count in the INT8 column).",
        "",
        "| model | method | bits | WER % | ΔWER pp [95% interval] | CER % | ΔCER pp | backend | INT8 kernels | size MB "
        "| calib s | search s | compile s | eval s | RTF |",
        "|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in run.rows:
        backend = row["backend"] + (" — **simulated**" if row["simulated"] else "")
        size = row.get("bytes") or row.get("model_bytes")
        lines.append(
            f"| {row['model']} | {row['method']} | {_bits_label(row)} | {row['wer'] * 100:.2f} | "
            f"{_delta_md(row)} | {row['cer'] * 100:.2f} | "
            f"{(row['cer'] - row['fp_cer']) * 100:+.2f} | {backend} | {row['int8_kernels']} | "
            f"{_fmt(None if size is None else size / 1e6, '.2f')} | {_fmt(row['calib_seconds'])} | "
            f"{_fmt(row['search_seconds'])} | {_fmt(row.get('compile_seconds'))} | {_fmt(row.get('eval_seconds'))} | "
            f"{_fmt(row.get('rtf'), '.3f')} |")
    lines.append("")
    lines += ["Size: float32 for FP; INT8 rows as INT8 storage holds them (1 byte per quantized weight, float32 "
              "per-channel scales, the rest float32; `-` where a framework's observers chose the layers, or the row "
              "is simulated); mixed rows: packed bytes on disk. compile s: the calls that compiled a new input shape "
              "(lowering included); eval s: the evaluation without them (CTC at batch size 1); RTF = eval s / "
              "seconds of evaluation audio.", ""]
    lines += _resolution_md(run)
    planned = [r for r in run.rows if r.get("plan")]
    if planned:
        shared = "; ".join(f"{m}: {secs:.1f} s" for m, secs in run.statistics_seconds.items())
        lines += ["Plans (one per row, `stablequant plan show FILE`): "
                  + ", ".join(f"`{row['plan']}`" for row in planned) + ". "
                  f"The plan methods decide on one statistics pass per model ({shared or 'none'}); their calib s "
                  "is making and applying the plan.", ""]
        for row in planned:
            if row["method"] != "stablequant" and row.get("plan_deviations"):  # stablequant's: in its section
                listed = "; ".join(f"`{name}`: {why}" for name, why in row["plan_deviations"].items())
                lines += [f"- {row['model']} {row['method']} {_bits_label(row)}: the backend ran "
                          f"{len(row['plan_deviations'])} layer(s) otherwise: {listed}", ""]
    lines += _mixed_md(run)
    if run.skipped:
        lines += ["Not run (the method cannot express these bits):", ""]
        lines += [f"- {s['model']} {s['method']} {s['bits']}: {s['reason']}" for s in run.skipped]
        lines.append("")

    for key, search in run.searches.items():
        calib = {row["method"]: row["calib_seconds"] for row in run.rows
                 if row["model"] == search["model"] and _bits_label(row) == search["bits"]}
        cfg = search["config"]
        plan_file = f"plan_{_slug(search['model'] + ' stablequant ' + search['bits'])}.json"
        secs = search["seconds"]
        minmax = (f"; MAX's plan from the same statistics, applied, takes {calib['max']:.1f} s" if "max" in calib
                  else "")
        cache = search.get("cache") or {}
        replay = (f" Prefix cache: {cache['replayed_calls']} block calls replayed, {cache['computed_calls']} computed; "
                  f"peak {cache['peak_mb']:.0f} of {cache['budget_mb']:.0f} MiB." if cache else "")
        if "quick_budget_mb" in cache:
            replay += (f" The quick metric's own cache: {cache['quick_replayed_calls']} replayed, "
                       f"{cache['quick_computed_calls']} computed; peak {cache['quick_peak_mb']:.0f} of "
                       f"{cache['quick_budget_mb']:.0f} MiB.")
        lines += [
            f"## StableQuant search: {key}",
            "",
            f"Threshold {cfg['threshold']} ({r.method_options.stablequant.metric.upper()} on the calibration set), "
            f"candidate percentiles {cfg['percentiles']}. {search['evaluations']} evaluations"
            + (f" ({search['stopped_early']} of them stopped early, once they could not win)"
               if search.get("stopped_early") else "")
            + (f"; {search['quick_evaluations']} on the quick metric (shortlist {cfg['shortlist']})"
               if search.get("quick_evaluations") else "") + " in "
            f"{search['wall_seconds']:.1f} s (statistics {secs.get('statistics', 0):.1f} s, screen "
            f"{secs.get('screen', 0):.1f} s, clip {secs.get('clip', 0):.1f} s), then PT2E calibration "
            f"{_fmt(calib.get('stablequant'))} s{minmax}.{replay}",
            "",
            f"Calibration metric: FP {search['fp_metric']:.4f}, all layers MAX {search['max_metric']:.4f}, "
            + "".join(f"all {rule} {value:.4f}, " for rule, value in search.get("rule_metrics", {}).items()
                      if rule != "max")
            + f"StableQuant {search['final_metric']:.4f}"
            + (f" (started from the best built-in rule, {search['base_rule']})"
               if len(search.get("rule_metrics", {})) > 1 else "")
            + f". Flagged layers: {', '.join(search['flagged']) or 'none'}."
            + _referee_md(search)
            + (f" Kept float: {', '.join(search['float_layers'])} ({100 * search.get('float_mac_share', 0):.2f} % of "
               "the MACs)." if search.get("float_layers") else ""),
            "",
            f"The per-layer decision is `{plan_file}` (`stablequant plan show {plan_file}`)."
            + _deviations_md(run, search),
            "",
            "| layer | kind | screen Δ | flagged | range rule | range (lo, hi) | MAX range (lo, hi) |",
            "|---|---|---:|---|---|---|---|",
        ]
        for d in sorted(search["layers"], key=lambda d: not d["flagged"]):  # flagged first, then network order
            choice = d.get("choice", "percentile")
            cut_off = ("float" if d.get("keep_float") else
                       f"p{d['percentile']:g}, MSE" if choice == "percentile" else choice)
            lines.append(
                f"| `{d['name']}` | {d['kind']} | {d['screen_delta']:+.4f} | {'yes' if d['flagged'] else ''} | "
                f"{cut_off} | ({d['act_range'][0]:.3g}, {d['act_range'][1]:.3g}) | "
                f"({d['max_range'][0]:.3g}, {d['max_range'][1]:.3g}) |")
        lines.append("")

    lines += ["## Example transcripts", "",
              "Utterances where a quantized model's transcript differs from FP come first.", ""]
    for model, examples in run.examples.items():
        lines += [f"### {model}", ""]
        for ex in examples:
            lines += [f"**{ex['id']}** — reference: {ex['reference']}", ""]
            lines += [f"- {k}: {v}" for k, v in ex["hypotheses"].items()]
            lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def summary_table(run: RunResult) -> str:
    """A plain-text table for the terminal."""
    head = (f"{'model':<28} {'method':<15} {'bits':<6} {'WER%':>7} {'dWER pp [95%]':>24} {'CER%':>7} "
            f"{'runs on':<16} {'calib s':>8} {'search s':>9}")
    out = [head, "-" * len(head)]
    for row in run.rows:
        if row["method"] == "fp":
            runs_on = "float32"
        else:
            runs_on = "simulated" if row["simulated"] else f"{row['int8_kernels']} INT8 kernels"
        out.append(f"{row['model']:<28} {row['method']:<15} {_bits_label(row):<6} {row['wer'] * 100:>7.2f} "
                   f"{_delta_md(row):>24} {row['cer'] * 100:>7.2f} {runs_on:<16} "
                   f"{_fmt(row['calib_seconds']):>8} {_fmt(row['search_seconds']):>9}")
    return "\n".join(out)


__all__ = ["ROW_KEYS", "DataUnavailableError", "RunResult", "check_runnable", "run_recipe", "summary_table",
           "write_outputs"]
