"""A deterministic, transcribed, synthesized English speech corpus (eSpeak NG voices).

Splits follow LibriSpeech's roles:
- `train`: trains the small CTC reference models;
- `dev`: calibration data for quantization, with sentences AND voices disjoint from both train and test,
  as LibriSpeech dev-clean's speakers are disjoint from its training and test speakers;
- `test`: evaluation, with held-out sentences AND held-out voices: the test voice variants (speaker
  identities such as "+m6") never occur in train or dev.

Corpus releases (`corpus_config`): "v2" (the default) holds the dev voices out; "v1" drew dev from the
training voices. On v1 a quantization search calibrated where the model is confident and missed a layer
that costs WER on unseen voices (BENCHMARKS.md, the wav2vec2 waveform conv); it stays reachable for
comparison (recipe dataset `corpus-dev-v1`). Both releases share train and test content.

Every utterance is a pure function of (config, split, index): its sentence comes from
`sentences.generate_sentences` (prefix-stable), its voice, rate, pitch and noise from a
`random.Random` seeded with "(seed, split, index)", and eSpeak is reset before every utterance
(see `espeak.py`). Hence `limit=N` returns exactly the first N utterances of the full split, and two
caches built independently hold identical bytes.

Cache layout (default root `$SQ_PLUGIN_CACHE` or `~/.cache/sq_plugin`):
    corpus/<config.version>/<split>.npz            all utterances of a split
    corpus/<config.version>/<split>.manifest.json  config, counts, duration, content hash
    corpus/<config.version>/<split>.first<N>.npz   (+ manifest) when only a prefix was requested
Audio is stored as 16 kHz int16 PCM (like LibriSpeech's FLAC) and returned as float32 = int16/32768.
The manifest is written last, so it marks a complete file; a file without a manifest is an
interrupted write and is regenerated. A file whose content hash differs from its manifest raises
`CorpusCacheError`: it is never silently replaced by regenerated content.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from sq_plugin.core.files import atomic_write
from sq_plugin.speech.audio import SAMPLE_RATE, prepare_audio
from sq_plugin.speech.espeak import synthesize
from sq_plugin.speech.sentences import SENTENCES_VERSION, generate_sentences

# Bump when the generation procedure changes (synthesis, resampling, noise, storage): it is part of
# `CorpusConfig.version`, so old caches are never reused for new content.
GENERATOR_VERSION = 1

SPLITS = ("train", "dev", "test")

# eSpeak English accents shared by all splits, and voice variants ("speakers"). Test variants are
# held out: no test voice+variant combination can occur in train or dev. Accents "en-gb-scotland",
# "en-029" and "en-us-nyc" were left out: Whisper tiny.en scored WER 0.6-0.9 on them (vs ~0.35-0.45
# on these three), so they would mostly measure accent robustness rather than quantization damage.
ACCENTS = ("en-us", "en", "en-gb-x-rp")
TRAIN_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "f1", "f2", "f3", "f4")
TEST_VARIANTS = ("m6", "m7", "f5")
# Dev variants, held out of train and test. eSpeak has no numbered variant left (m8 is unintelligible to
# both references: WER ~100 %), so these are named ones, picked (2026-12-01, 60 utterances per variant)
# as test's are: two male, one female, whose float WER on both references brackets test's (max 18-19 %,
# john 24-25 %, Annie 28-34 %; test m6 16-21 %, f5 17-24 %, m7 38-42 %; train voices 11-14 %).
DEV_VARIANTS = ("max", "john", "Annie")
TRAIN_VOICES = tuple(f"{a}+{v}" for a in ACCENTS for v in TRAIN_VARIANTS)
DEV_VOICES = tuple(f"{a}+{v}" for a in ACCENTS for v in DEV_VARIANTS)
TEST_VOICES = tuple(f"{a}+{v}" for a in ACCENTS for v in TEST_VARIANTS)


class CorpusCacheError(RuntimeError):
    """A cached split does not match its manifest (corrupted or modified)."""


@dataclass(frozen=True, eq=False)  # eq=False: comparing numpy arrays with == is ambiguous
class Utterance:
    """One utterance. `audio` is float32 mono 16 kHz in [-1, 1]; `text` uses `sentences.CHARSET`.

    voice: eSpeak voice name "<accent>+<variant>"; rate in words per minute; pitch 0..99;
    snr_db: SNR of the added noise, None for clean audio.
    """

    id: str
    audio: np.ndarray
    text: str
    voice: str
    rate: int
    pitch: int
    snr_db: float | None = None

    @property
    def duration_s(self) -> float:
        return len(self.audio) / SAMPLE_RATE


@dataclass(frozen=True)
class CorpusConfig:
    """Generator parameters. `version` (a hash of all of them) names the cache directory.

    seed: master seed of sentences, voices, rates, pitches and noise.
    train_size / dev_size / test_size: utterances per split.
    train_voices / dev_voices / test_voices: eSpeak voices "<accent>+<variant>" drawn per utterance;
        test voices must not appear in train or dev; dev voices may be train's (release "v1").
    rate_range / pitch_range: inclusive ranges drawn uniformly per utterance (eSpeak words per minute
        and pitch 0..99).
    snr_db: if set, add `noise` ("white" or "pink" 1/f) at this SNR in dB, measured against the mean
        power of the whole utterance; None keeps the audio clean.
    sentences_version: the sentence grammar version; must equal `sentences.SENTENCES_VERSION`
        (older grammars are not kept), recorded so that a grammar change changes `version`.
    """

    seed: int = 0
    train_size: int = 6000
    dev_size: int = 300
    test_size: int = 600
    train_voices: tuple[str, ...] = TRAIN_VOICES
    dev_voices: tuple[str, ...] = DEV_VOICES
    test_voices: tuple[str, ...] = TEST_VOICES
    rate_range: tuple[int, int] = (140, 200)
    pitch_range: tuple[int, int] = (35, 65)
    snr_db: float | None = None
    noise: Literal["white", "pink"] = "pink"
    sentences_version: int = field(default=SENTENCES_VERSION)

    def __post_init__(self) -> None:
        for split in SPLITS:
            if self.size(split) < 0:
                raise ValueError(f"CorpusConfig.{split}_size must be >= 0, got {self.size(split)}")
            if not self.voices(split):
                raise ValueError(f"CorpusConfig.{split}_voices is empty; give at least one eSpeak voice")
        leaked = set(self.test_voices) & (set(self.train_voices) | set(self.dev_voices))
        if leaked:
            raise ValueError(
                f"CorpusConfig: test voices {sorted(leaked)} also occur in train/dev; test voices must be "
                "held out"
            )
        for name in ("rate_range", "pitch_range"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise ValueError(f"CorpusConfig.{name}={(lo, hi)}: need low <= high")
        if not (0 <= self.pitch_range[0] and self.pitch_range[1] <= 99):
            raise ValueError(f"CorpusConfig.pitch_range={self.pitch_range}: eSpeak pitch is 0..99")
        if self.noise not in ("white", "pink"):
            raise ValueError(f"CorpusConfig.noise={self.noise!r}: use 'white' or 'pink'")
        if self.sentences_version != SENTENCES_VERSION:
            raise ValueError(
                f"CorpusConfig.sentences_version={self.sentences_version}: this code only generates "
                f"version {SENTENCES_VERSION}; use that or check out the matching sq_plugin version"
            )

    def size(self, split: str) -> int:
        return getattr(self, f"{_check_split(split)}_size")

    def voices(self, split: str) -> tuple[str, ...]:
        return getattr(self, f"{_check_split(split)}_voices")

    @property
    def version(self) -> str:
        """12 hex chars of sha256 over all parameters + GENERATOR_VERSION."""
        payload = json.dumps(
            {"generator_version": GENERATOR_VERSION, **asdict(self)}, sort_keys=True, default=list
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    return split


# Version of the default corpus (cache directory name); recorded by training runs for provenance.
CORPUS_VERSION = CorpusConfig().version

# Named releases of the default corpus. v1's dev split used the training voices.
CORPUS_RELEASES: dict[str, CorpusConfig] = {"v2": CorpusConfig(), "v1": CorpusConfig(dev_voices=TRAIN_VOICES)}


def corpus_config(release: str = "v2") -> CorpusConfig:
    """The generator parameters of a named corpus release ("v2", the default, or "v1")."""
    try:
        return CORPUS_RELEASES[release]
    except KeyError:
        raise ValueError(f"unknown corpus release {release!r}; releases: {', '.join(CORPUS_RELEASES)} (v2 holds "
                         "the dev voices out of train and test; v1 drew dev from the training voices)") from None


def split_hash(utterances: Iterable[Utterance]) -> str:
    """sha256 over every utterance's id, text, voice and float32 audio bytes (in order)."""
    h = hashlib.sha256()
    for u in utterances:
        h.update(f"{u.id}\0{u.text}\0{u.voice}\0".encode())
        h.update(np.ascontiguousarray(u.audio, dtype="<f4").tobytes())
    return h.hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get("SQ_PLUGIN_CACHE") or Path.home() / ".cache" / "sq_plugin")


# ---------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------
def _pink_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    """1/f (pink) noise: white noise shaped by 1/sqrt(f) in the frequency domain."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.arange(len(spectrum), dtype=np.float64)
    freqs[0] = 1.0  # leave DC alone instead of dividing by zero
    return np.fft.irfft(spectrum / np.sqrt(freqs), n)


def _add_noise(x: np.ndarray, snr_db: float, kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(len(x)) if kind == "white" else _pink_noise(rng, len(x))
    signal_power = float(np.mean(x.astype(np.float64) ** 2))
    noise_power = float(np.mean(noise**2))
    scale = np.sqrt(signal_power / (noise_power * 10 ** (snr_db / 10))) if noise_power > 0 else 0.0
    return (x + scale * noise).astype(np.float32)


def _generate(config: CorpusConfig, split: str, n: int, progress: bool) -> dict[str, np.ndarray]:
    """Synthesize the first `n` utterances of `split` into the arrays stored in the cache file."""
    from tqdm.auto import tqdm

    texts = generate_sentences(n, seed=config.seed, split=split)
    voices = config.voices(split)
    pcm: list[np.ndarray] = []
    meta: dict[str, list[Any]] = {"voices": [], "rates": [], "pitches": []}
    for i, text in enumerate(tqdm(texts, desc=f"synthesizing {split}", unit="utt", disable=not progress)):
        # Per-utterance generator: utterance i does not depend on how many others are generated.
        rng = random.Random(f"sq_plugin.corpus:{config.seed}:{split}:{i}")
        voice = rng.choice(voices)
        rate = rng.randint(*config.rate_range)
        pitch = rng.randint(*config.pitch_range)
        espeak_seed = rng.randrange(2**31)
        noise_seed = rng.randrange(2**63)
        accent, _, variant = voice.partition("+")
        raw, sr = synthesize(
            text, voice=accent, rate=rate, pitch=pitch, variant=variant or None, seed=espeak_seed
        )
        x = prepare_audio(raw, sr, name=f"{split}[{i}] ({voice}: {text!r})")
        if config.snr_db is not None:
            x = _add_noise(x, config.snr_db, config.noise, noise_seed)
        pcm.append(np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int16))
        meta["voices"].append(voice)
        meta["rates"].append(rate)
        meta["pitches"].append(pitch)
    offsets = np.zeros(n + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(p) for p in pcm])
    return {
        "audio": np.concatenate(pcm) if pcm else np.zeros(0, dtype=np.int16),
        "offsets": offsets,
        "texts": np.array(texts, dtype=str),
        "voices": np.array(meta["voices"], dtype=str),
        "rates": np.array(meta["rates"], dtype=np.int32),
        "pitches": np.array(meta["pitches"], dtype=np.int32),
    }


def _to_utterances(arrays: dict[str, np.ndarray], split: str, snr_db: float | None) -> list[Utterance]:
    audio = arrays["audio"].astype(np.float32) / np.float32(32768.0)
    offsets = arrays["offsets"]
    return [
        Utterance(
            id=f"{split}-{i:05d}",
            audio=audio[offsets[i] : offsets[i + 1]],
            text=str(arrays["texts"][i]),
            voice=str(arrays["voices"][i]),
            rate=int(arrays["rates"][i]),
            pitch=int(arrays["pitches"][i]),
            snr_db=snr_db,
        )
        for i in range(len(offsets) - 1)
    ]


# ---------------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------------
def _load_cached(data_path: Path, manifest_path: Path, split: str, snr_db: float | None) -> list[Utterance]:
    fix = f"delete {data_path} and {manifest_path} to regenerate it"
    try:
        manifest = json.loads(manifest_path.read_text())
        with np.load(data_path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        utterances = _to_utterances(arrays, split, snr_db)
    except (OSError, ValueError, KeyError, IndexError, zipfile.BadZipFile) as exc:
        raise CorpusCacheError(f"cached corpus {data_path} is unreadable ({exc!r}); {fix}") from exc
    got = split_hash(utterances)
    if len(utterances) != manifest.get("count") or got != manifest.get("sha256"):
        raise CorpusCacheError(
            f"cached corpus {data_path} does not match its manifest: {len(utterances)} utterances with "
            f"hash {got[:16]}..., manifest says {manifest.get('count')} with hash "
            f"{str(manifest.get('sha256'))[:16]}...; the file is corrupted or was modified; {fix}"
        )
    return utterances


def _store(
    config: CorpusConfig, split: str, arrays: dict[str, np.ndarray], data_path: Path, manifest_path: Path
) -> list[Utterance]:
    utterances = _to_utterances(arrays, split, config.snr_db)
    atomic_write(data_path, lambda f: np.savez(f, **arrays))
    manifest = {
        "split": split,
        "version": config.version,
        "generator_version": GENERATOR_VERSION,
        "config": asdict(config),
        "count": len(utterances),
        "hours": sum(u.duration_s for u in utterances) / 3600,
        "sample_rate": SAMPLE_RATE,
        "voices": sorted(set(arrays["voices"].tolist())),
        "sha256": split_hash(utterances),
        "file_bytes": data_path.stat().st_size,
    }
    atomic_write(manifest_path, lambda f: f.write(json.dumps(manifest, indent=2).encode()))
    return utterances


def split_paths(split: str, *, config: CorpusConfig | None = None, cache_dir: str | Path | None = None,
                limit: int | None = None) -> tuple[Path, Path]:
    """(data file, manifest) of a split; `limit` < size names the prefix file."""
    config = config or CorpusConfig()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    stem = split if limit is None or limit >= config.size(split) else f"{split}.first{limit}"
    directory = root / "corpus" / config.version
    return directory / f"{stem}.npz", directory / f"{stem}.manifest.json"


def load_split(
    split: str,
    *,
    limit: int | None = None,
    config: CorpusConfig | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> list[Utterance]:
    """The utterances of `split` ("train", "dev" or "test"), generated and cached on first use.

    limit: only the first `limit` utterances (the same ones, in the same order, as in the full split).
        If the full split is cached it is sliced; otherwise only the prefix is synthesized and cached
        as its own file. None or >= the split size means the whole split.
    config: generator parameters (default `CorpusConfig()`); cache_dir: cache root (default
        `$SQ_PLUGIN_CACHE` or `~/.cache/sq_plugin`); progress: show a tqdm bar while synthesizing.
    Raises CorpusCacheError if a cached file does not match its manifest's content hash.
    """
    _check_split(split)
    config = config or CorpusConfig()
    if limit is not None and limit < 0:
        raise ValueError(f"load_split(limit={limit}): limit must be >= 0 or None")
    size = config.size(split)
    full_data, full_manifest = split_paths(split, config=config, cache_dir=cache_dir)
    if full_manifest.exists() and full_data.exists():
        return _load_cached(full_data, full_manifest, split, config.snr_db)[:limit]
    n = size if limit is None else min(limit, size)
    data_path, manifest_path = split_paths(split, config=config, cache_dir=cache_dir, limit=n)
    if manifest_path.exists() and data_path.exists():
        return _load_cached(data_path, manifest_path, split, config.snr_db)
    arrays = _generate(config, split, n, progress)
    return _store(config, split, arrays, data_path, manifest_path)


def describe(utterances: Sequence[Utterance]) -> dict[str, Any]:
    """Counts, hours and voices of a list of utterances (for reports and logs)."""
    return {
        "count": len(utterances),
        "hours": sum(u.duration_s for u in utterances) / 3600,
        "voices": sorted({u.voice for u in utterances}),
    }
