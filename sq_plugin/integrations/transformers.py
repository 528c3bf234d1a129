"""transformers: `quant_method: "stablequant"` in `from_pretrained`, `save_pretrained` and `pipeline`.

    import sq_plugin  # registers the method with transformers (when transformers' quantizers are imported)
    from transformers import AutoModelForCTC, WhisperForConditionalGeneration, pipeline

    model = AutoModelForCTC.from_pretrained(path, quantization_config={
        "quant_method": "stablequant", "calibration": {"dataset": "corpus-dev", "size": 8}})
    model.save_pretrained("w2v-int8")                     # + stablequant/: INT8 weights, graph, plan.json
    model = AutoModelForCTC.from_pretrained("w2v-int8")   # pre-quantized: no calibration, same outputs
    asr = pipeline("automatic-speech-recognition", model=model, feature_extractor=..., tokenizer=...)

    whisper = WhisperForConditionalGeneration.from_pretrained(whisper_dir, quantization_config={
        "quant_method": "stablequant", "method": "max"})  # generate() and the pipeline decode on INT8 graphs

The quantizer runs after the float weights load: it calibrates on the configured source (the offline corpus,
a local folder of 16 kHz WAV files, or a saved plan), builds the method's model through `sq_plugin.methods`
on the configured backend, and routes the HF model through it (real INT8 kernels at W8A8 on x86;
`model.stablequant.backend` says what runs):

- CTC models (wav2vec2 / HuBERT): `forward` runs the INT8 graph.
- Whisper (`WhisperForConditionalGeneration`, English-only checkpoints): `generate` decodes greedily (or with
  `num_beams` 2 to 16, HF's beam search) on the two INT8 graphs of `sq_plugin.families.whisper_int8` (encoder +
  cross-attention K/V, one decoder step) and returns what HF Whisper's `generate` returns, so the ASR pipeline
  transcribes through them. What those graphs cannot do (sampling, beam groups, early stopping, timestamps,
  language/task, long-form audio, ...) is refused naming the option;
  `forward` is refused (it would run the float modules). Below W8A8 or on backend "simulate", `generate` and
  `forward` run the fake-quant simulation through HF's own generation instead (it cannot be saved).

A saved directory holds the float checkpoint as transformers writes it (the HF model object keeps its
float modules) plus `stablequant/`, the INT8 artifact (`sq_plugin.families.ctc.save_ctc_int8`, or
`sq_plugin.families.whisper_int8.save_whisper_int8` + plan.json); `config.json` carries the
`quantization_config`, whose `source` names the model the artifact was made for. The whole directory is
written atomically.
"""

from __future__ import annotations

import copy
import dataclasses
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
PLAN_FILE = "plan.json"  # beside a Whisper artifact's two graphs: the plan they were built from
BUCKET_SECONDS = 2  # the INT8 graph compiles per input shape: audio is padded to whole buckets
_CONFIG_KEYS = ("quant_method", "method", "bits", "calibration", "plan", "backend", "int8_grid", "search",
                "artifact", "source")
# Whisper's search metric, when `search` does not set one: WER decoding per candidate is slow on Whisper (greedy
# generate of every calibration clip for each of ~70 layers), so the teacher-forced proxy (its default threshold,
# core.defaults.METRIC_THRESHOLDS, is the one of recipes/whisper-tiny-en-w8a8.yaml: 0.01 nats per token).
WHISPER_DEFAULT_METRIC = "tf_loss"
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
    search: StableQuant's options (threshold, percentiles, metric, mse_grid, ...), as in recipes. For Whisper
        `metric` defaults to "tf_loss" (and then `threshold` to 0.01 nats per token): "wer" would decode the
        calibration set once per screened layer.
    artifact: set by `save_pretrained`: the subfolder holding the INT8 artifact.
    source: set by `save_pretrained`: the model the artifact was quantized from (a Whisper artifact made for
        another model is refused on load).
    """

    def __init__(self, method: str = "stablequant", bits: str = "w8a8", calibration: dict[str, Any] | None = None,
                 plan: str | None = None, backend: str = "x86", int8_grid: str = "auto",
                 search: dict[str, Any] | None = None, artifact: str | None = None, source: str | None = None,
                 **kwargs: Any) -> None:
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
        self.source = source
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
                "int8_grid": self.int8_grid, "search": dict(self.search), "artifact": self.artifact,
                "source": self.source}

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


def _family(model: torch.nn.Module) -> str:
    """"whisper" (WhisperForConditionalGeneration) or "ctc" (a CTC head over input_values); else refused."""
    if type(model).__name__ == "WhisperForConditionalGeneration" or (
            getattr(model.config, "model_type", "") == "whisper" and hasattr(model, "proj_out")):
        return "whisper"
    if getattr(model, "main_input_name", "") == "input_values" and hasattr(model, "lm_head"):
        return "ctc"
    raise StableQuantConfigError(f"quant_method 'stablequant' takes CTC models (wav2vec2 / HuBERT) and Whisper "
                                 f"(WhisperForConditionalGeneration) through transformers; {type(model).__name__} is "
                                 "neither")


def _bundle(model: torch.nn.Module, kind: str = "ctc", name: str | None = None) -> Any:
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
    return SpeechModel(name or str(source), kind, model, processor)


def _runs_int8(config: StableQuantConfig) -> bool:
    return config.backend == "x86" and config._bits.label == "w8a8"


def _check_whisper_int8(model: torch.nn.Module, name: str) -> None:
    """Refuse, before calibrating, a Whisper checkpoint the INT8 greedy decoder cannot decode as HF does: one
    without <|notimestamps|>, or a multilingual one without the language and task ids of its prompt."""
    from sq_plugin.families.whisper_int8 import GreedySettings

    gen = model.generation_config
    if getattr(gen, "no_timestamps_token_id", None) is None:
        raise StableQuantConfigError(f"{name}: the stablequant INT8 Whisper decodes without timestamps (prompt "
                                     "<|startoftranscript|>[<|lang|><|task|>]<|notimestamps|>), and this one's "
                                     "generation_config is missing no_timestamps_token_id: set it, or use backend "
                                     "'simulate' (fake-quant, decoded by HF generate)")
    try:
        GreedySettings.from_model(model)
    except ValueError as exc:
        raise StableQuantConfigError(f"{name}: {exc}; or use backend 'simulate' (fake-quant, decoded by HF "
                                     "generate)") from None


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


# --------------------------------------------------------------------------------------------------
# Whisper: generate() on the INT8 graphs
# --------------------------------------------------------------------------------------------------

# HF Whisper generate() arguments that are not GenerationConfig fields, with the value(s) the INT8 greedy decode
# matches (None: any value, as it changes nothing for one 30-s window without timestamps). Anything else is refused.
_WHISPER_NEUTRAL_ARGS: dict[str, tuple[Any, ...] | None] = {
    "attention_mask": None,  # HF reads it only to find long-form lengths; one window needs none
    "force_unique_generate_call": None,  # one 30-s window: one call
    "time_precision": None, "time_precision_features": None,  # timestamps only (refused)
    "synced_gpus": (None, False),
    "return_segments": (None, False), "return_token_timestamps": (None, False),
    "prompt_ids": (None,),
    "prompt_condition_type": (None,), "condition_on_prev_tokens": (None, False), "temperature": (None, 0, 0.0),
    "compression_ratio_threshold": (None,), "logprob_threshold": (None,), "no_speech_threshold": (None,),
    "num_segment_frames": (None,), "monitor_progress": (None,), "logits_processor": (None,),
    "stopping_criteria": (None,), "prefix_allowed_tokens_fn": (None,), "decoder_input_ids": (None,),
    "streamer": (None,), "assistant_model": (None,), "negative_prompt_ids": (None,), "encoder_outputs": (None,),
}
# GenerationConfig fields the INT8 decode honours per call; any other one that differs from the model's
# generation_config is refused.
_HONOURED = ("max_new_tokens", "max_length", "suppress_tokens", "begin_suppress_tokens", "pad_token_id",
             "return_dict_in_generate", "use_cache", "num_beams", "length_penalty", "no_repeat_ngram_size",
             "do_sample", "num_return_sequences", "return_timestamps")
# Beam search settings `beam_decode` does not implement (it is HF's default beam search), with their neutral values.
_BEAM_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "early_stopping": (None, False), "num_beam_groups": (None, 1), "diversity_penalty": (None, 0.0),
    "constraints": (None,),
}
MAX_BEAMS = 16  # beam_decode's widest beam (each width compiles the decoder step once more)
# Fields that change greedy decoding, with their neutral values: refused otherwise, even from the checkpoint.
_GREEDY_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0),
    "encoder_no_repeat_ngram_size": (None, 0), "min_length": (None, 0), "min_new_tokens": (None, 0),
    "bad_words_ids": (None,), "force_words_ids": (None,), "forced_decoder_ids": (None,),
    "forced_bos_token_id": (None,), "forced_eos_token_id": (None,), "sequence_bias": (None,),
    "exponential_decay_length_penalty": (None,), "guidance_scale": (None, 1.0), "stop_strings": (None,),
    "max_time": (None,), "renormalize_logits": (None, False), "output_scores": (None, False),
    "output_logits": (None, False), "output_attentions": (None, False), "output_hidden_states": (None, False),
}
_FLOAT_FIX = "or load the float model (without quantization_config) for it"


class WhisperGenerateError(ValueError):
    """A generate() / pipeline option the INT8 Whisper graphs cannot honour; the message names it and the fix."""


def _refuse(option: str, value: Any, why: str, fix: str) -> WhisperGenerateError:
    return WhisperGenerateError(f"generate({option}={value!r}): the stablequant INT8 Whisper {why}; {fix}")


def _same(a: Any, b: Any) -> bool:
    return (list(a) if isinstance(a, tuple) else a) == (list(b) if isinstance(b, tuple) else b)


@dataclasses.dataclass(frozen=True)
class WhisperGenerateRequest:
    """What one `generate(...)` call asks of the INT8 Whisper decoder."""

    settings: Any  # GreedySettings: prompt, eos, max_new_tokens, suppressed tokens
    pad: int  # pads the rows of the returned tensor
    return_dict: bool  # return a GenerateEncoderDecoderOutput (GenerateBeam... with beams)
    num_beams: int = 1  # 1: greedy, the batch decoded together; k > 1: HF's beam search per utterance
    length_penalty: float = 1.0  # beam search only: finished hypotheses' log-prob sum / length ** length_penalty
    detect_language: bool = False  # a multilingual checkpoint without a language: detect it, as HF does


def whisper_generate_request(model: torch.nn.Module, int8: Any, generation_config: Any = None,
                             **kwargs: Any) -> WhisperGenerateRequest:
    """What one `generate(...)` call asks of the INT8 decoder (`WhisperGenerateRequest`). The call's
    `generation_config` and kwargs are merged over `model.generation_config` as HF does; whatever the graphs
    cannot honour raises `WhisperGenerateError` naming the option and the fix."""
    from transformers import GenerationConfig

    base = model.generation_config
    effective = copy.deepcopy(base)
    if generation_config is not None:
        for key, value in generation_config.to_diff_dict().items():
            if key != "transformers_version":
                setattr(effective, key, value)
    return_dict = None
    asked: dict[str, Any] = {}  # language / task / is_multilingual, as generate(...) was called
    fields = {k for k in vars(GenerationConfig()) if not k.startswith("_")} | set(vars(base))
    refused: list[WhisperGenerateError] = []  # raised after the main checks, which name what the caller asked for
    for key, value in kwargs.items():
        if key == "return_timestamps":
            effective.return_timestamps = value
        elif key == "return_dict_in_generate":
            return_dict = value
        elif key in ("language", "task", "is_multilingual"):
            asked[key] = value
        elif key in _WHISPER_NEUTRAL_ARGS:
            allowed = _WHISPER_NEUTRAL_ARGS[key]
            if allowed is not None and not any(value is a or (type(value) is type(a) and value == a)
                                               for a in allowed):
                fix = f"drop {key} ({_FLOAT_FIX})"
                if key == "temperature":
                    why = "decodes greedily (argmax; a temperature > 0 makes Whisper sample)"
                elif key == "return_segments":
                    why = "returns token ids, not segments (the ASR pipeline asks for them for return_language)"
                    fix = f"drop return_segments / pipeline(..., return_language=True) ({_FLOAT_FIX})"
                else:
                    why = "decodes one 30-s window greedily, with the settings it was quantized with"
                refused.append(_refuse(key, value, why, fix))
        elif key in fields and not key.startswith("_"):
            setattr(effective, key, value)
        else:
            refused.append(_refuse(key, value, "does not take this option (it is neither a generation setting nor "
                                   "a Whisper generate() argument)", "drop it"))
    if return_dict is None:
        return_dict = bool(getattr(effective, "return_dict_in_generate", False))

    # What the graphs cannot do, whether the call or the checkpoint's generation_config asks for it.
    if getattr(effective, "return_timestamps", False):
        raise _refuse("return_timestamps", effective.return_timestamps, "decodes without timestamps (its prompt "
                      "ends in <|notimestamps|>)", f"drop return_timestamps (pipeline(...) without it), {_FLOAT_FIX}")
    num_beams = effective.num_beams or 1
    if not (isinstance(num_beams, int) and 1 <= num_beams <= MAX_BEAMS):
        raise _refuse("num_beams", effective.num_beams, f"decodes greedily or with a beam of width 2 to {MAX_BEAMS}",
                      f"pass num_beams between 1 and {MAX_BEAMS}")
    if effective.do_sample:
        raise _refuse("do_sample", effective.do_sample, "decodes greedily (argmax)", "pass do_sample=False")
    if (effective.num_return_sequences or 1) != 1:
        raise _refuse("num_return_sequences", effective.num_return_sequences, "returns one sequence per input "
                      "(the best beam)", "pass num_return_sequences=1")
    for key, neutral in _BEAM_NEUTRAL.items() if num_beams > 1 else ():  # greedy decoding ignores them, as HF's
        value = getattr(effective, key, None)
        if not any(_same(value, n) for n in neutral):
            raise _refuse(key, value, "runs HF's default beam search (early_stopping=False, one beam group, no "
                          "constraints)", f"drop {key} from the call and the model's generation_config ({_FLOAT_FIX})")
    length_penalty = 1.0 if effective.length_penalty is None else float(effective.length_penalty)
    if refused:
        raise refused[0]
    for key, neutral in _GREEDY_NEUTRAL.items():
        value = getattr(effective, key, None)
        if not any(_same(value, n) for n in neutral):
            raise _refuse(key, value, "runs plain greedy decoding (suppress_tokens, begin_suppress_tokens and "
                          "no_repeat_ngram_size only)",
                          f"drop {key} from the call and the model's generation_config ({_FLOAT_FIX})")
    ours, theirs = effective.to_dict(), base.to_dict()
    for key in sorted(set(ours) | set(theirs)):
        if (key.startswith("_") or key in _HONOURED or key == "transformers_version" or key in _GREEDY_NEUTRAL
                or key in _BEAM_NEUTRAL):
            continue
        if not _same(ours.get(key), theirs.get(key)):
            raise _refuse(key, ours.get(key), "honours only max_new_tokens, max_length, suppress_tokens, "
                          "begin_suppress_tokens, pad_token_id, num_beams, length_penalty, "
                          "no_repeat_ngram_size and return_dict_in_generate per call",
                          f"drop {key} ({_FLOAT_FIX})")

    from sq_plugin.families.whisper_int8 import max_new_tokens_limit

    settings = int8.settings
    detect = _check_prompt(base, effective, asked, tuple(settings.prompt))
    eos = effective.eos_token_id
    if (eos[0] if isinstance(eos, list | tuple) and len(eos) == 1 else eos) != settings.eos:
        raise _refuse("eos_token_id", eos, f"stops at token {settings.eos}", "keep the model's eos_token_id")
    limit = max_new_tokens_limit(int8.whisper, settings.prompt)
    if effective.max_new_tokens is not None:
        if effective.max_new_tokens > limit:
            raise _refuse("max_new_tokens", effective.max_new_tokens, f"decoder step's static cache holds "
                          f"{int8.whisper.config.max_target_positions} positions: at most {limit} new tokens after "
                          f"the {len(settings.prompt)}-token prompt", f"ask for max_new_tokens <= {limit}")
        new_tokens = effective.max_new_tokens
    elif not _same(effective.max_length, base.max_length):
        new_tokens = min(effective.max_length or limit, limit)  # Whisper's max_length counts new tokens
    else:
        new_tokens = settings.max_new_tokens
    settings = dataclasses.replace(settings, max_new_tokens=new_tokens,
                                   suppress=tuple(effective.suppress_tokens or ()),
                                   begin_suppress=tuple(effective.begin_suppress_tokens or ()),
                                   no_repeat_ngram_size=effective.no_repeat_ngram_size or 0)
    pad = effective.pad_token_id if effective.pad_token_id is not None else settings.eos
    return WhisperGenerateRequest(settings, pad, return_dict, num_beams, length_penalty, detect)


def _check_prompt(base: Any, effective: Any, asked: dict[str, Any], prompt: tuple[int, ...]) -> bool:
    """Refuse a call whose prompt is not the one the graphs were calibrated with: <|startoftranscript|>, then for
    a multilingual checkpoint its language and task tokens, then <|notimestamps|>. language / task resolve as HF
    does (the call's, else the generation_config's; a code, a name or a token). Returns True when the language is
    unset on a multilingual checkpoint: HF detects it per utterance, and so must the caller (`detect_language`).
    An unset task is the graphs' (transcribe by default), where HF would leave the task token out of a prompt
    whose language it detects."""
    from sq_plugin.families.whisper_int8 import language_name, language_token_id

    multilingual = bool(getattr(base, "is_multilingual", False))
    kind = "multilingual" if multilingual else "English-only"
    if asked.get("is_multilingual") is not None and bool(asked["is_multilingual"]) != multilingual:
        raise _refuse("is_multilingual", asked["is_multilingual"], f"was quantized from a {kind} checkpoint",
                      "drop is_multilingual")
    language = asked["language"] if asked.get("language") is not None else getattr(effective, "language", None)
    task = asked["task"] if asked.get("task") is not None else getattr(effective, "task", None)
    head = (effective.decoder_start_token_id, getattr(effective, "no_timestamps_token_id", None))
    if head != (prompt[0], prompt[-1]):
        raise _refuse("decoder_start_token_id / no_timestamps_token_id", head, f"was compiled and calibrated with "
                      f"the prompt {prompt}", "keep the model's generation_config prompt")
    if not multilingual:  # the call's language / task are refused; its prompt has no token for them
        for key, value in (("language", asked.get("language")), ("task", asked.get("task"))):
            if value is not None:
                raise _refuse(key, value, f"decodes English-only checkpoints (prompt {prompt}, no language or task "
                              "token)", f"drop {key} ({_FLOAT_FIX})")
        return False
    fix = ("quantize again with generation_config.language / task set to it (and calibration audio in that "
           f"language), or {_FLOAT_FIX}")
    calibrated = f"was calibrated and compiled with the prompt {prompt} ({language_name(base, prompt[1])})"
    for value in (language if isinstance(language, list | tuple) else [language]) if language is not None else ():
        try:
            token = language_token_id(base, value)
        except ValueError as exc:
            raise _refuse("language", value, f"takes the checkpoint's languages: {exc}", "pass one it has") from None
        if token != prompt[1]:
            raise _refuse("language", value, calibrated, fix)
    task_to_id = getattr(base, "task_to_id", None) or {}
    if task is not None and task_to_id.get(task) != prompt[2]:
        raise _refuse("task", task, calibrated, fix)
    return language is None


def _route_whisper(model: torch.nn.Module, quantized: Any) -> None:
    """model.generate(...) (what the ASR pipeline calls) decodes on the INT8 graphs, or, for a simulation, on the
    fake-quant copy through HF's own generate; model(...) is refused on the INT8 graphs."""
    target = quantized.bundle.model
    model.stablequant = quantized
    if isinstance(target, torch.nn.Module):  # the fake-quant simulation: HF's generate and forward on it
        target.generation_config = model.generation_config
        model.generate = target.generate
        model.forward = target.forward
        return
    int8 = target
    # Greedy by default, as the checkpoint's own generation_config: say so, so that pipelines do not apply their
    # default beam search (the ASR pipeline's num_beams=5 applies when the checkpoint leaves num_beams unset);
    # a call asks for beams with num_beams.
    model.generation_config.num_beams = 1
    model.generation_config.do_sample = False

    def generate(self: torch.nn.Module, input_features: torch.Tensor | None = None, generation_config: Any = None,
                 **kwargs: Any) -> Any:
        """HF Whisper's short-form `generate` (greedy, or beam search with num_beams > 1), on the INT8 graphs: new
        tokens (no prompt, no <|endoftext|>) right-padded with pad_token_id; with return_dict_in_generate, a
        GenerateEncoderDecoderOutput (GenerateBeamEncoderDecoderOutput with beams) whose sequences hold the prompt
        and <|endoftext|> too."""
        from transformers.generation.utils import GenerateBeamEncoderDecoderOutput, GenerateEncoderDecoderOutput

        from sq_plugin.families.whisper_int8 import encoder_input_shape

        request = whisper_generate_request(self, int8, generation_config, **kwargs)
        settings = request.settings
        if input_features is None:
            raise WhisperGenerateError("generate(): the stablequant INT8 Whisper needs input_features (the "
                                       "processor's log-mel features, [batch, 80, 3000])")
        window = encoder_input_shape(int8.whisper)[1:]
        if input_features.dim() != 3 or tuple(input_features.shape[1:]) != window:
            frames = input_features.shape[-1]
            raise _refuse("input_features", f"tensor of shape {tuple(input_features.shape)}",
                          f"takes one 30-s window per utterance, features [batch, {window[0]}, {window[1]}]"
                          + (" (longer audio is Whisper's long-form decoding)" if frames > window[1] else ""),
                          "cut the audio into clips of at most 30 s (pipeline(..., chunk_length_s=30) does), "
                          "and pad features to 30 s as the feature extractor does")
        features = input_features.to(torch.float32)
        if request.detect_language:
            _check_detected_language(int8, features)
        if request.num_beams == 1:
            rows = int8.transcribe_batch(features, settings=settings)
        else:
            rows = [int8.beam_search(f[None], request.num_beams, settings=settings,
                                     length_penalty=request.length_penalty) for f in features]
        if request.return_dict:
            full = [[*settings.prompt, *r, *([settings.eos] if len(r) < settings.max_new_tokens else [])]
                    for r in rows]
            output = GenerateEncoderDecoderOutput if request.num_beams == 1 else GenerateBeamEncoderDecoderOutput
            return output(sequences=_padded(full, request.pad))
        return _padded(rows, request.pad)

    def forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("the stablequant INT8 Whisper runs model.generate(input_features) (greedy, what "
                                  "pipeline('automatic-speech-recognition') calls) on its INT8 graphs; model(...) "
                                  "would run the float modules, so it is refused. Teacher-forced logits on the INT8 "
                                  "graphs: model.stablequant.bundle.model.step, one token at a time "
                                  "(sq_plugin.families.whisper_int8)")

    model.generate = types.MethodType(generate, model)
    model.forward = types.MethodType(forward, model)


def _check_detected_language(int8: Any, features: torch.Tensor) -> None:
    """HF detects the language of each utterance when a multilingual call sets none; the graphs decode only the
    language they were calibrated with, so an utterance detected as another is refused (naming it)."""
    from sq_plugin.families.whisper_int8 import language_name

    gen, prompt = int8.whisper.generation_config, tuple(int8.settings.prompt)
    for row, token in enumerate(int8.detect_language(features)):
        if token != prompt[1]:
            raise WhisperGenerateError(
                f"generate(language=None): utterance {row} is detected as {language_name(gen, token)}, and the "
                f"stablequant INT8 Whisper was calibrated and compiled with the prompt {prompt} "
                f"({language_name(gen, prompt[1])}); pass language={language_name(gen, prompt[1])[2:-2]!r} to "
                f"decode it so, or quantize again with generation_config.language set to its language "
                f"(and calibration audio in it), {_FLOAT_FIX}")


def _padded(rows: list[list[int]], pad: int) -> torch.Tensor:
    out = torch.full((len(rows), max((len(r) for r in rows), default=0)), pad, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def _whisper_as_quantized_model(int8: Any, bundle: Any, plan: Any) -> Any:
    """A loaded `QuantizedWhisper` as the `QuantizedModel` that quantization gives (`model.stablequant`)."""
    from sq_plugin.families.ctc import QuantizedModel

    counts = {f"{graph}_{op}": n for graph, ops in int8.report["lowering"].items() for op, n in ops.items()}
    return QuantizedModel(dataclasses.replace(bundle, model=int8), int8.report["backend"], False, counts,
                          sum(counts.values()), 0.0, 0.0, None, plan=plan)


def _save_with_artifact(model: torch.nn.Module) -> None:
    """save_pretrained also writes the INT8 artifact; the directory appears whole or not at all."""
    original = type(model).save_pretrained

    def save_pretrained(self: torch.nn.Module, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        from sq_plugin.core.files import atomic_directory

        quantized = self.stablequant
        whisper = quantized.bundle.kind == "whisper"
        if whisper and isinstance(quantized.bundle.model, torch.nn.Module):
            raise StableQuantConfigError(f"save_pretrained: this Whisper runs {quantized.backend!r}, which has no "
                                         "INT8 artifact to save; save_pretrained saves Whisper at bits 'w8a8' on "
                                         "backend 'x86' (a plan, model.stablequant.plan.save(path), can be "
                                         "re-applied with quantization_config plan=path)")
        config = self.config.quantization_config
        config.artifact = ARTIFACT_DIR
        config.source = quantized.bundle.model.model_name if whisper else quantized.bundle.name
        with atomic_directory(save_directory) as tmp:
            original(self, tmp, *args, **kwargs)
            if whisper:
                from sq_plugin.families import whisper_int8

                whisper_int8.save_whisper_int8(quantized.bundle.model, tmp / ARTIFACT_DIR,
                                               metadata={"source": config.source})
                if quantized.plan is not None:
                    quantized.plan.save(tmp / ARTIFACT_DIR / PLAN_FILE)
            else:
                from sq_plugin.families import ctc

                ctc.save_ctc_int8(self.stablequant, tmp / ARTIFACT_DIR, metadata={"source": str(self.name_or_path)})
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
        config: StableQuantConfig = self.quantization_config
        kind = _family(model)
        # A saved directory names the model its artifact was made for (config.source); a Whisper load checks it.
        name = config.source if self.pre_quantized and config.source else None
        bundle = _bundle(model.eval(), kind, name=name)
        if kind == "whisper" and _runs_int8(config):
            _check_whisper_int8(model, bundle.name)
        if self.pre_quantized:
            directory = Path(getattr(model, "name_or_path", "") or model.config._name_or_path)
            folder = directory / (config.artifact or ARTIFACT_DIR)
            if not folder.is_dir():
                raise StableQuantConfigError(f"{directory} says quant_method 'stablequant' but has no "
                                             f"{config.artifact or ARTIFACT_DIR}/ INT8 artifact; save it with "
                                             "model.save_pretrained(dir) from a quantized model")
            if kind == "whisper":
                from sq_plugin.core.plan import QuantPlan
                from sq_plugin.families.whisper_int8 import load_whisper_int8

                plan = QuantPlan.load(folder / PLAN_FILE) if (folder / PLAN_FILE).is_file() else None
                quantized = _whisper_as_quantized_model(load_whisper_int8(folder, bundle), bundle, plan)
            else:
                from sq_plugin.families.ctc import load_ctc_int8

                quantized = load_ctc_int8(folder, bundle, lower=_runs_int8(config))
        else:
            quantized = quantize_hf(bundle, config)
        model._stablequant_processor = bundle.processor
        if kind == "whisper":
            _route_whisper(model, quantized)
        else:
            _route_forward(model, quantized)
        _save_with_artifact(model)
        return model

    def is_serializable(self, safe_serialization: Any = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _with_transcripts(bundle: Any, calibration: list[Any]) -> list[Any]:
    """Whisper calibrates teacher-forced on each clip's transcript: a WAV without one gets the float model's own
    greedy transcript (what the tf_loss screen scores against too)."""
    missing = [i for i, u in enumerate(calibration) if not u.text.strip()]
    if bundle.kind != "whisper" or not missing:
        return calibration
    from sq_plugin.speech.evaluate import transcribe

    texts = transcribe(bundle, [calibration[i].audio for i in missing], batch_size=8, progress=False)
    filled = list(calibration)
    for i, text in zip(missing, texts, strict=True):
        filled[i] = dataclasses.replace(filled[i], text=text.strip())
    return filled


def quantize_hf(bundle: Any, config: StableQuantConfig) -> Any:
    """Calibrate and quantize a CTC or Whisper model (`bundle.kind`) as `config` says, through the method
    registry: a `QuantizedModel` (for Whisper at W8A8 on x86, its `bundle.model` is the `QuantizedWhisper`)."""
    from sq_plugin.backends.x86_isa import resolve_int8_grid
    from sq_plugin.core.plan import QuantPlan
    from sq_plugin.methods import METHODS, QuantizeJob, apply_plan, family_statistics
    from sq_plugin.recipe import CTC_METRICS, TEACHER_FORCED_METRICS

    whisper = bundle.kind == "whisper"
    method = METHODS[config.method]
    if bundle.kind not in method.families:
        raise StableQuantConfigError(f"quantization_config.method: {config.method!r} runs on "
                                     f"{' / '.join(method.families)} models; {bundle.name} is {bundle.kind}")
    opts = config._search
    metric = config.search.get("metric", WHISPER_DEFAULT_METRIC if whisper else opts.metric)
    threshold = opts.threshold_for(metric)
    if config.method == "stablequant" and config.plan is None:
        if whisper and metric in CTC_METRICS:
            raise StableQuantConfigError(f"quantization_config.search.metric {metric!r} needs a CTC model; "
                                         f"{bundle.name} is Whisper: use tf_loss (the default), tf_kl, tf_token_error, "
                                         "wer or cer")
        if not whisper and metric in TEACHER_FORCED_METRICS:
            raise StableQuantConfigError(f"quantization_config.search.metric {metric!r} is a Whisper proxy; "
                                         f"{bundle.name} is a CTC model: use wer, cer, ctc_loss or ctc_kl")
    calibration = calibration_utterances(config.calibration)
    if config.method == "stablequant" and config.plan is None and metric in ("wer", "cer", "ctc_loss"):
        missing = [u.id for u in calibration if not u.text]
        if missing:
            raise StableQuantConfigError(f"quantization_config.search.metric {metric!r} scores transcripts, "
                                         f"and calibration utterance(s) {missing[:3]} have none; add <name>.txt "
                                         "beside each WAV, or use method 'max' / 'mse'"
                                         + (" (or metric 'tf_loss')" if whisper else ""))
    lower = False if config.backend == "simulate" else None
    w_bits, a_bits = config._bits.w, config._bits.a
    grid = resolve_int8_grid(config.int8_grid)
    job = QuantizeJob(w_bits=w_bits, a_bits=a_bits, lower=lower, int8_grid=grid,
                      provenance={"model": bundle.name, "calibration": dict(config.calibration)})
    # Teacher-forced statistics need transcripts; the INT8 Whisper's own observers and a plan's weights do not.
    if whisper and config.plan is None and not (method.decides == "observers" and job.runs_int8):
        calibration = _with_transcripts(bundle, calibration)
    if whisper:
        from sq_plugin.families.whisper import search_whisper as search
    else:
        from sq_plugin.families.ctc import search_ctc as search
    job = dataclasses.replace(job, statistics=lambda: family_statistics(bundle, calibration))
    if config.plan is not None:
        plan = QuantPlan.load(config.plan)
        return apply_plan(bundle, calibration, plan, job)
    if config.method == "stablequant":
        result = search(bundle, calibration, opts.search_config(w_bits=w_bits, a_bits=a_bits, int8_grid=grid,
                                                                threshold=threshold),
                        metric=metric, progress=False, cache_budget_mb=opts.cache_budget_mb,
                        metric_size=opts.metric_size,
                        **({"referee": None if opts.referee == "none" else opts.referee} if whisper else {}))
        job = dataclasses.replace(job, plan=result.to_plan({**job.provenance, "metric": metric,
                                                            "threshold": threshold}))
    return method.build(bundle, calibration, job)


__all__ = ["ARTIFACT_DIR", "QUANT_METHOD", "StableQuantConfig", "StableQuantConfigError", "StableQuantHfQuantizer",
           "WhisperGenerateError", "calibration_utterances", "quantize_hf",
           "whisper_generate_request", "WhisperGenerateRequest"]

READY = True  # fully imported: the registration below (and the import hook's) may use this module
_register_with_transformers()
