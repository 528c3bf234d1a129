"""Synthesized corpus: format, determinism (across caches and limits), held-out splits, cache safety."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from sq_plugin.speech.audio import SAMPLE_RATE
from sq_plugin.speech.corpus import (
    CORPUS_VERSION,
    DEV_VOICES,
    SPLITS,
    TEST_VOICES,
    TRAIN_VOICES,
    CorpusCacheError,
    CorpusConfig,
    Utterance,
    corpus_config,
    default_cache_dir,
    load_split,
    split_hash,
    split_paths,
)
from sq_plugin.speech.espeak import ESPEAK_SAMPLE_RATE, synthesize
from sq_plugin.speech.sentences import CHARSET

# Small splits keep the file fast (~10 ms per utterance); the default sizes are checked separately.
SMALL = CorpusConfig(train_size=10, dev_size=6, test_size=8)


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("corpus_a")


@pytest.fixture(scope="module")
def small_splits(small_cache) -> dict[str, list[Utterance]]:
    return {s: load_split(s, config=SMALL, cache_dir=small_cache, progress=False) for s in SPLITS}


def test_default_config_sizes_and_voices() -> None:
    cfg = CorpusConfig()
    assert cfg.train_size >= 4000
    assert cfg.dev_size >= 200
    assert cfg.test_size >= 500
    assert cfg.snr_db is None
    assert cfg.version == CORPUS_VERSION
    assert len(cfg.train_voices) >= 10 and len(cfg.test_voices) >= 5
    # Held-out speakers, as in LibriSpeech: no variant is shared by two splits.
    variants = {split: {v.split("+")[1] for v in cfg.voices(split)} for split in SPLITS}
    assert not variants["test"] & (variants["train"] | variants["dev"])
    assert not variants["dev"] & variants["train"]
    assert len(variants["dev"]) == len(variants["test"]) == 3
    assert not set(TEST_VOICES) & set(TRAIN_VOICES) and not set(DEV_VOICES) & set(TRAIN_VOICES + TEST_VOICES)


def test_release_v1_keeps_the_training_voices_in_dev_and_shares_train_and_test() -> None:
    v1, v2 = corpus_config("v1"), corpus_config("v2")
    assert v2 == CorpusConfig() and v2.version == CORPUS_VERSION
    assert v1.dev_voices == TRAIN_VOICES and v1.version != v2.version
    assert dataclasses.replace(v1, dev_voices=v2.dev_voices) == v2  # only dev differs
    with pytest.raises(ValueError, match="unknown corpus release 'v3'; releases: v2, v1"):
        corpus_config("v3")


def test_dev_voices_are_synthesized_as_named(tmp_path) -> None:
    # A named variant eSpeak did not know would silently fall back to the accent's default voice.
    u = load_split("dev", limit=1, config=SMALL, cache_dir=tmp_path, progress=False)[0]
    accent, _, variant = u.voice.partition("+")
    again, sr = synthesize(u.text, voice=accent, rate=u.rate, pitch=u.pitch, variant=variant, seed=1)
    plain, _ = synthesize(u.text, voice=accent, rate=u.rate, pitch=u.pitch, variant=None, seed=1)
    assert variant in {v.split("+")[1] for v in DEV_VOICES} and sr == ESPEAK_SAMPLE_RATE
    assert len(again) != len(plain) or not np.array_equal(again, plain)


def test_utterance_format(small_splits: dict[str, list[Utterance]]) -> None:
    for split, utts in small_splits.items():
        assert len(utts) == SMALL.size(split)
        assert [u.id for u in utts] == [f"{split}-{i:05d}" for i in range(len(utts))]
        for u in utts:
            assert u.audio.dtype == np.float32 and u.audio.ndim == 1
            assert -1.0 <= float(u.audio.min()) and float(u.audio.max()) <= 1.0
            assert 0.8 < u.duration_s < 8.0, (u.text, u.duration_s)
            assert float(np.sqrt(np.mean(u.audio**2))) > 0.01  # not silence
            assert set(u.text) <= set(CHARSET)
            assert u.voice in SMALL.voices(split)
            assert SMALL.rate_range[0] <= u.rate <= SMALL.rate_range[1]
            assert SMALL.pitch_range[0] <= u.pitch <= SMALL.pitch_range[1]
            assert u.snr_db is None
            # stored as 16-bit PCM: every sample is an exact multiple of 1/32768
            np.testing.assert_array_equal(u.audio * 32768, np.round(u.audio * 32768))


def test_splits_disjoint_sentences_and_test_voices(small_splits: dict[str, list[Utterance]]) -> None:
    texts = {s: {u.text for u in utts} for s, utts in small_splits.items()}
    assert not texts["train"] & texts["dev"]
    assert not texts["train"] & texts["test"]
    assert not texts["dev"] & texts["test"]
    test_voices = {u.voice for u in small_splits["test"]}
    seen_voices = {u.voice for s in ("train", "dev") for u in small_splits[s]}
    assert not test_voices & seen_voices
    assert not test_voices & set(SMALL.train_voices + SMALL.dev_voices)


def test_deterministic_across_cache_dirs_and_reload(small_splits, small_cache, tmp_path) -> None:
    other = load_split("dev", config=SMALL, cache_dir=tmp_path, progress=False)
    assert split_hash(other) == split_hash(small_splits["dev"])
    reloaded = load_split("dev", config=SMALL, cache_dir=small_cache, progress=False)
    assert split_hash(reloaded) == split_hash(small_splits["dev"])
    manifests = [json.loads(split_paths("dev", config=SMALL, cache_dir=d)[1].read_text())
                 for d in (small_cache, tmp_path)]
    assert manifests[0]["sha256"] == manifests[1]["sha256"] == split_hash(other)
    assert manifests[0]["count"] == 6 and manifests[0]["version"] == SMALL.version


def test_split_hash_sensitive_to_content(small_splits) -> None:
    utts = small_splits["dev"]
    h = split_hash(utts)
    changed_audio = [dataclasses.replace(utts[0], audio=utts[0].audio * 0.5)] + utts[1:]
    changed_text = [dataclasses.replace(utts[0], text=utts[0].text + " again")] + utts[1:]
    assert len({h, split_hash(changed_audio), split_hash(changed_text), split_hash(utts[:-1])}) == 4


def test_limit_is_prefix_of_full_split(small_splits, small_cache, tmp_path) -> None:
    # Not cached in tmp_path: only the prefix is synthesized, and it equals the full split's prefix.
    prefix = load_split("test", limit=3, config=SMALL, cache_dir=tmp_path, progress=False)
    assert len(prefix) == 3
    assert split_hash(prefix) == split_hash(small_splits["test"][:3])
    assert split_paths("test", config=SMALL, cache_dir=tmp_path, limit=3)[0].name == "test.first3.npz"
    # Full split cached: limit slices it.
    sliced = load_split("test", limit=5, config=SMALL, cache_dir=small_cache, progress=False)
    assert split_hash(sliced) == split_hash(small_splits["test"][:5])
    assert len(load_split("test", limit=100, config=SMALL, cache_dir=small_cache, progress=False)) == 8
    assert load_split("test", limit=0, config=SMALL, cache_dir=small_cache, progress=False) == []


def test_version_changes_with_every_parameter() -> None:
    base = CorpusConfig()
    assert len(base.version) == 12 and int(base.version, 16) >= 0
    assert CorpusConfig().version == base.version
    variants = [
        dict(seed=1), dict(train_size=4001), dict(dev_size=201), dict(test_size=501),
        dict(train_voices=TRAIN_VOICES[:-1], dev_voices=TRAIN_VOICES[:-1]), dict(dev_voices=TRAIN_VOICES[:3]),
        dict(test_voices=TEST_VOICES[:-1]), dict(rate_range=(150, 200)), dict(pitch_range=(30, 60)),
        dict(snr_db=20.0), dict(noise="white"),
    ]
    versions = {dataclasses.replace(base, **kw).version for kw in variants}
    assert len(versions) == len(variants) and base.version not in versions


def test_noise_at_stated_snr(tmp_path) -> None:
    clean = load_split("dev", limit=2, config=SMALL, cache_dir=tmp_path, progress=False)
    for kind in ("white", "pink"):
        cfg = dataclasses.replace(SMALL, snr_db=10.0, noise=kind)
        noisy = load_split("dev", limit=2, config=cfg, cache_dir=tmp_path, progress=False)
        for c, n in zip(clean, noisy, strict=True):
            assert n.snr_db == 10.0 and n.text == c.text and n.voice == c.voice
            noise = n.audio.astype(np.float64) - c.audio
            snr = 10 * np.log10(np.mean(c.audio.astype(np.float64) ** 2) / np.mean(noise**2))
            assert abs(snr - 10.0) < 0.3, (kind, snr)


def test_corrupted_cache_detected(tmp_path) -> None:
    utts = load_split("dev", limit=2, config=SMALL, cache_dir=tmp_path, progress=False)
    data_path, _ = split_paths("dev", config=SMALL, cache_dir=tmp_path, limit=2)
    with np.load(data_path) as z:
        arrays = {k: z[k].copy() for k in z.files}
    arrays["audio"][100] += 1  # one flipped sample
    with open(data_path, "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(CorpusCacheError, match=r"does not match its manifest.*corrupted.*delete"):
        load_split("dev", limit=2, config=SMALL, cache_dir=tmp_path, progress=False)
    data_path.write_bytes(b"not a zip file")
    with pytest.raises(CorpusCacheError, match=r"unreadable.*delete"):
        load_split("dev", limit=2, config=SMALL, cache_dir=tmp_path, progress=False)
    # Removing both files regenerates identical content.
    data_path.unlink()
    split_paths("dev", config=SMALL, cache_dir=tmp_path, limit=2)[1].unlink()
    again = load_split("dev", limit=2, config=SMALL, cache_dir=tmp_path, progress=False)
    assert split_hash(again) == split_hash(utts)


def test_interrupted_write_is_regenerated(tmp_path) -> None:
    utts = load_split("test", limit=1, config=SMALL, cache_dir=tmp_path, progress=False)
    data_path, manifest_path = split_paths("test", config=SMALL, cache_dir=tmp_path, limit=1)
    manifest_path.unlink()  # data written, manifest not: the write never completed
    again = load_split("test", limit=1, config=SMALL, cache_dir=tmp_path, progress=False)
    assert manifest_path.exists() and split_hash(again) == split_hash(utts)
    assert not list(data_path.parent.glob("*.tmp"))


def test_cache_dir_default_from_env(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("SQ_PLUGIN_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    data, manifest = split_paths("train")
    assert data == tmp_path / "c" / "corpus" / CORPUS_VERSION / "train.npz"
    assert manifest.name == "train.manifest.json"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"unknown split 'validation'; valid splits: train, dev, test"):
        load_split("validation", config=SMALL)
    with pytest.raises(ValueError, match="limit must be >= 0"):
        load_split("dev", limit=-1, config=SMALL)
    with pytest.raises(ValueError, match="must be held out"):
        CorpusConfig(test_voices=TRAIN_VOICES[:2])
    with pytest.raises(ValueError, match="low <= high"):
        CorpusConfig(rate_range=(200, 100))
    with pytest.raises(ValueError, match="sentences_version"):
        CorpusConfig(sentences_version=999)


def test_espeak_is_deterministic_regardless_of_history() -> None:
    text = "the old farmer carried seven heavy boxes to the market"
    a, sr = synthesize(text, voice="en-us", rate=170, pitch=50, variant="f2", seed=5)
    synthesize("something else entirely", voice="en-029", rate=200, pitch=70, variant="m7", seed=9)
    b, _ = synthesize(text, voice="en-us", rate=170, pitch=50, variant="f2", seed=5)
    assert sr == ESPEAK_SAMPLE_RATE == 22050 and a.dtype == np.int16
    np.testing.assert_array_equal(a, b)
    assert 1.5 < len(a) / sr < 6.0
    assert SAMPLE_RATE == 16000


def test_espeak_errors() -> None:
    with pytest.raises(ValueError, match=r"no voice variant 'nosuchvariant'"):
        synthesize("hello there", voice="en-us", variant="nosuchvariant")
    with pytest.raises(ValueError, match=r"no voice 'xx-nosuchvoice'"):
        synthesize("hello there", voice="xx-nosuchvoice")
    with pytest.raises(ValueError, match="text is empty"):
        synthesize("   ")
