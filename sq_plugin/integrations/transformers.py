"""transformers: `quant_method: "stablequant"` in `from_pretrained`, `save_pretrained` and `pipeline`.

    import sq_plugin  # registers the method with transformers (when transformers' quantizers are imported)
    from transformers import AutoModelForCTC, pipeline

    model = AutoModelForCTC.from_pretrained(path, quantization_config={
        "quant_method": "stablequant", "calibration": {"dataset": "corpus-dev", "size": 8}})
    model.save_pretrained("w2v-int8")                     # + stablequant/: INT8 weights, graph, plan.json
    model = AutoModelForCTC.from_pretrained("w2v-int8")   # pre-quantized: no calibration, same outputs
    asr = pipeline("automatic-speech-recognition", model=model, feature_extractor=..., tokenizer=...)

The quantizer runs after the float weights load: it calibrates on the configured source (the offline corpus,
a local folder of 16 kHz WAV files, or a saved plan), builds the method's model through `sq_plugin.methods`
on the configured backend, and routes the HF model's `forward` through it (real INT8 kernels at W8A8 on x86;
`model.stablequant.backend` says what runs). CTC models (wav2vec2 / HuBERT) only for now.

A saved directory holds the float checkpoint as transformers writes it (the HF model object keeps its
float modules) plus `stablequant/`, the INT8 artifact of `sq_plugin.families.ctc.save_ctc_int8`; `config.json`
carries the `quantization_config`. The whole directory is written atomically.
"""

from __future__ import annotations

import os
import types
from pathlib import Path
from typing import Any

import torch
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from sq_plugin.integrations import register_with_transformers as _register_with_transformers

QUANT_METHOD = "stablequant"
ARTIFACT_DIR = "stablequant"
BUCKET_SECONDS = 2  # the INT8 graph compiles per input shape: audio is padded to whole buckets
_CONFIG_KEYS = ("quant_method", "method", "bits", "calibration", "plan", "backend", "int8_grid", "search",
                "artifact")
_CALIBRATION_KEYS = ("dataset", "audio_dir", "size")


class StableQuantConfigError(ValueError):
    """A `quantization_config` that cannot be used; the message names the key and the fix."""


class StableQuantConfig(QuantizationConfigMixin):
    """The `quantization_config` of `quant_method: "stablequant"`.

    method: a plan method of `sq_plugin.methods` ("stablequant", "max", "percentile", "mse") or a torchao
        observer baseline ("histogram", "moving_average").
    bits: "w8a8" (real INT8 kernels on x86), "w6a6", ... (fake-quant simulation, labelled).
    calibration: {"dataset": "corpus-dev", "size": 8} (the offline corpus) or {"audio_dir": DIR, "size": n}
        (16 kHz WAV files; `<name>.txt` beside each holds its transcript, which the WER search needs).
    plan: a saved `QuantPlan` JSON to apply instead of deciding (calibration then runs one utterance, for
        the weights).
    backend: "x86" (oneDNN INT8 at W8A8) or "simulate". int8_grid: see `sq_plugin.backends.x86_isa`.
    search: StableQuant's options (threshold, percentiles, metric, mse_grid, ...), as in recipes.
    artifact: set by `save_pretrained`: the subfolder holding the INT8 artifact.
    """

    def __init__(self, method: str = "stablequant", bits: str = "w8a8", calibration: dict[str, Any] | None = None,
                 plan: str | None = None, backend: str = "x86", int8_grid: str = "auto",
                 search: dict[str, Any] | None = None, artifact: str | None = None, **kwargs: Any) -> None:
        kwargs.pop("quant_method", None)
        if kwargs:
            raise StableQuantConfigError(f"quantization_config: unknown key(s) {sorted(kwargs)}; valid keys: "
                                         f"{', '.join(_CONFIG_KEYS)}")
        self.quant_method = QUANT_METHOD
        self.method = method
        self.bits = bits
        self.calibration = dict(calibration) if calibration is not None else {"dataset": "corpus-dev", "size": 8}
        self.plan = plan
        self.backend = backend
        self.int8_grid = int8_grid
        self.search = dict(search or {})
        self.artifact = artifact
        self.post_init()

    def post_init(self) -> None:
        """Validate with the recipe schema's own rules, so the messages match `stablequant validate`'s."""
        from sq_plugin.methods import METHODS
        from sq_plugin.recipe import BACKENDS, INT8_GRIDS, Bits, StableQuantOptions, _bits

        usable = [name for name, m in METHODS.items() if m.decides != "none" and "ctc" in m.families
                  and m.extra is None]
        if self.method not in usable:
            raise StableQuantConfigError(f"quantization_config.method: unknown method {self.method!r}; choose one "
                                         f"of {', '.join(usable)}")
        try:
            self._bits = Bits.model_validate(_bits(self.bits))
        except ValueError as exc:
            raise StableQuantConfigError(f"quantization_config.bits: {_first_message(exc)}") from None
        for key, value, choices in (("backend", self.backend, BACKENDS), ("int8_grid", self.int8_grid, INT8_GRIDS)):
            if value not in choices:
                raise StableQuantConfigError(f"quantization_config.{key}: unknown {key} {value!r}; choose one of "
                                             f"{', '.join(choices)}")
        try:
            self._search = StableQuantOptions.model_validate(self.search)
        except ValueError as exc:
            raise StableQuantConfigError(f"quantization_config.search: {_first_message(exc)}") from None
        if not isinstance(self.calibration, dict) or set(self.calibration) - set(_CALIBRATION_KEYS):
            bad = sorted(set(self.calibration) - set(_CALIBRATION_KEYS)) if isinstance(self.calibration, dict) \
                else self.calibration
            raise StableQuantConfigError(f"quantization_config.calibration: unknown key(s) {bad}; valid keys: "
                                         f"{', '.join(_CALIBRATION_KEYS)}, e.g. {{'dataset': 'corpus-dev', "
                                         "'size': 8}")
        if ("dataset" in self.calibration) == ("audio_dir" in self.calibration):
            raise StableQuantConfigError("quantization_config.calibration: give exactly one of 'dataset' (e.g. "
                                         "'corpus-dev') or 'audio_dir' (a folder of 16 kHz WAV files)")
        size = self.calibration.get("size", 8)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise StableQuantConfigError(f"quantization_config.calibration.size: must be an integer >= 1 (got "
                                         f"{size!r}); 8 takes about a minute")

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "method": self.method, "bits": self.bits,
                "calibration": dict(self.calibration), "plan": self.plan, "backend": self.backend,
                "int8_grid": self.int8_grid, "search": dict(self.search), "artifact": self.artifact}

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()


def _first_message(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if not str(p).startswith("function-"))
        message = str(first.get("msg", exc)).removeprefix("Value error, ")
        return f"{where}: {message}" if where else message
    return str(exc)


# --------------------------------------------------------------------------------------------------
# Calibration sources
# --------------------------------------------------------------------------------------------------


def calibration_utterances(calibration: dict[str, Any]) -> list[Any]:
    """The utterances a `calibration` spec names (see `StableQuantConfig`)."""
    size = calibration.get("size", 8)
    if "dataset" in calibration:
        from sq_plugin.recipe import CALIBRATION_DATASETS
        from sq_plugin.runner import _load_data

        if calibration["dataset"] not in CALIBRATION_DATASETS:
            raise StableQuantConfigError(f"quantization_config.calibration.dataset: unknown dataset "
                                         f"{calibration['dataset']!r}; choose one of {', '.join(CALIBRATION_DATASETS)}"
                                         " or give audio_dir")
        return _load_data(calibration["dataset"], size)
    return _audio_dir_utterances(Path(calibration["audio_dir"]), size)


def _audio_dir_utterances(folder: Path, size: int) -> list[Any]:
    from sq_plugin.speech.audio import load_wav, prepare_audio
    from sq_plugin.speech.corpus import Utterance

    if not folder.is_dir():
        raise StableQuantConfigError(f"quantization_config.calibration.audio_dir: {str(folder)!r} is not a "
                                     "directory; give a folder of 16 kHz WAV files (optionally <name>.txt "
                                     "transcripts beside them)")
    files = sorted(folder.glob("*.wav"))[:size]
    if not files:
        raise StableQuantConfigError(f"quantization_config.calibration.audio_dir: no .wav file in {str(folder)!r}; "
                                     "calibration needs at least one utterance")
    utterances = []
    for path in files:
        samples, rate = load_wav(path)
        text_file = path.with_suffix(".txt")
        text = text_file.read_text().strip() if text_file.is_file() else ""
        utterances.append(Utterance(id=path.stem, audio=prepare_audio(samples, rate, name=str(path)), text=text,
                                    voice="", rate=0, pitch=0, snr_db=None))
    return utterances


# --------------------------------------------------------------------------------------------------
# The HF model, routed through the quantized graph
# --------------------------------------------------------------------------------------------------


def _bundle(model: torch.nn.Module) -> Any:
    """The model as the package's `SpeechModel`, with the processor saved beside its weights."""
    from transformers import AutoProcessor

    from sq_plugin.speech.models import SpeechModel

    source = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    try:
        processor = AutoProcessor.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise StableQuantConfigError(f"stablequant needs the model's processor (feature extractor + tokenizer) "
                                     f"beside its weights, and {source!r} has none ({exc}); save it there with "
                                     "processor.save_pretrained(path)") from exc
    return SpeechModel(str(source), "ctc", model, processor)


def _route_forward(model: torch.nn.Module, quantized: Any) -> None:
    """model(...) runs the quantized graph: audio zero-padded to whole BUCKET_SECONDS (each new length compiles
    the INT8 graph once; the padding is masked out for models that take a mask), logits cut back to the frames
    of the real length."""
    from sq_plugin.speech.audio import SAMPLE_RATE

    graph = quantized.bundle.model
    bucket = BUCKET_SECONDS * SAMPLE_RATE
    takes_mask = len(quantized.example_inputs or ()) > 1

    def forward(self: torch.nn.Module, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> Any:
        from transformers.modeling_outputs import CausalLMOutput

        if input_values.shape[0] != 1:
            raise ValueError(f"the stablequant INT8 model runs one utterance at a time (got batch "
                             f"{input_values.shape[0]}); call it per utterance or use pipeline(..., batch_size=1)")
        length = input_values.shape[-1]
        padded = torch.nn.functional.pad(input_values, (0, -length % bucket))
        if takes_mask:  # the padding is masked out, as sq_plugin.speech.evaluate pads
            mask = torch.ones(input_values.shape, dtype=torch.long) if attention_mask is None else attention_mask
            inputs = (padded, torch.nn.functional.pad(mask.to(torch.long), (0, -length % bucket)))
        else:
            inputs = (padded,)
        with torch.no_grad():
            logits = graph(*inputs).logits
        frames = int(self._get_feat_extract_output_lengths(torch.tensor(length)))
        return CausalLMOutput(logits=logits[:, :frames])

    model.forward = types.MethodType(forward, model)
    model.stablequant = quantized


def _save_with_artifact(model: torch.nn.Module) -> None:
    """save_pretrained also writes the INT8 artifact; the directory appears whole or not at all."""
    original = type(model).save_pretrained

    def save_pretrained(self: torch.nn.Module, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        from sq_plugin.core.files import atomic_directory
        from sq_plugin.families.ctc import save_ctc_int8

        self.config.quantization_config.artifact = ARTIFACT_DIR
        with atomic_directory(save_directory) as tmp:
            original(self, tmp, *args, **kwargs)
            save_ctc_int8(self.stablequant, tmp / ARTIFACT_DIR, metadata={"source": str(self.name_or_path)})
            processor = getattr(self, "_stablequant_processor", None)
            if processor is not None:
                processor.save_pretrained(tmp)

    model.save_pretrained = types.MethodType(save_pretrained, model)


class StableQuantHfQuantizer(HfQuantizer):
    """Quantizes after the weights load (calibration from the config's source), or, for a directory that
    `save_pretrained` wrote, loads its INT8 artifact (no calibration)."""

    requires_calibration = False

    def validate_environment(self, *args: Any, device_map: Any = None, **kwargs: Any) -> None:
        devices = {str(d) for d in device_map.values()} if isinstance(device_map, dict) else \
            ({str(device_map)} if device_map is not None else set())
        if devices - {"cpu"}:
            raise StableQuantConfigError(f"stablequant runs on CPU here (device_map={device_map!r}); load with "
                                         "device_map=None or 'cpu' (the CUDA path is sq_plugin.backends.cuda)")

    def _process_model_before_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
        return model

    def _process_model_after_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
        from sq_plugin.families.ctc import load_ctc_int8

        config: StableQuantConfig = self.quantization_config
        if getattr(model, "main_input_name", "") != "input_values" or not hasattr(model, "lm_head"):
            raise StableQuantConfigError(f"quant_method 'stablequant' takes CTC models (wav2vec2 / HuBERT) through "
                                         f"transformers; {type(model).__name__} is not one (Whisper: use "
                                         "sq_plugin.families.whisper_int8)")
        bundle = _bundle(model.eval())
        if self.pre_quantized:
            folder = Path(bundle.name) / (config.artifact or ARTIFACT_DIR)
            if not folder.is_dir():
                raise StableQuantConfigError(f"{bundle.name} says quant_method 'stablequant' but has no "
                                             f"{config.artifact or ARTIFACT_DIR}/ INT8 artifact; save it with "
                                             "model.save_pretrained(dir) from a quantized model")
            quantized = load_ctc_int8(folder, bundle, lower=config.backend == "x86" and config._bits.label == "w8a8")
        else:
            quantized = quantize_hf_ctc(bundle, config)
        model._stablequant_processor = bundle.processor
        _route_forward(model, quantized)
        _save_with_artifact(model)
        return model

    def is_serializable(self, safe_serialization: Any = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def quantize_hf_ctc(bundle: Any, config: StableQuantConfig) -> Any:
    """Calibrate and quantize a CTC model as `config` says, through the method registry."""
    from sq_plugin.backends.x86_isa import resolve_int8_grid
    from sq_plugin.core.plan import QuantPlan
    from sq_plugin.families.ctc import ctc_statistics, search_ctc
    from sq_plugin.methods import METHODS, QuantizeJob, apply_plan
    from sq_plugin.search import SearchConfig

    calibration = calibration_utterances(config.calibration)
    lower = False if config.backend == "simulate" else None
    w_bits, a_bits = config._bits.w, config._bits.a
    grid = resolve_int8_grid(config.int8_grid)
    job = QuantizeJob(w_bits=w_bits, a_bits=a_bits, lower=lower, int8_grid=grid,
                      statistics=lambda: ctc_statistics(bundle, calibration),
                      provenance={"model": bundle.name, "calibration": dict(config.calibration)})
    if config.plan is not None:
        plan = QuantPlan.load(config.plan)
        return apply_plan(bundle, calibration, plan, job)
    if config.method == "stablequant":
        opts = config._search
        if opts.metric in ("wer", "cer", "ctc_loss"):
            missing = [u.id for u in calibration if not u.text]
            if missing:
                raise StableQuantConfigError(f"quantization_config.search.metric {opts.metric!r} scores transcripts, "
                                             f"and calibration utterance(s) {missing[:3]} have none; add <name>.txt "
                                             "beside each WAV, or use method 'max' / 'mse'")
        search = search_ctc(bundle, calibration, SearchConfig(
            w_bits=w_bits, a_bits=a_bits, threshold=opts.threshold, percentiles=tuple(opts.percentiles),
            mse_grid=opts.mse_grid, float_fallback=opts.float_fallback, keep_float=tuple(opts.keep_float),
            int8_grid=grid), metric=opts.metric, progress=False, cache_budget_mb=opts.cache_budget_mb)
        job = QuantizeJob(**{**job.__dict__, "plan": search.to_plan({**job.provenance, "metric": opts.metric})})
    return METHODS[config.method].build(bundle, calibration, job)


__all__ = ["ARTIFACT_DIR", "QUANT_METHOD", "StableQuantConfig", "StableQuantConfigError", "StableQuantHfQuantizer",
           "calibration_utterances", "quantize_hf_ctc"]

READY = True  # fully imported: the registration below (and the import hook's) may use this module
_register_with_transformers()
