"""`quant_method: "stablequant"` through transformers: from_pretrained quantizes, save_pretrained writes the INT8
artifact, from_pretrained reloads it pre-quantized, pipeline transcribes; bad configs name the key."""

import shutil
import subprocess
import sys
import wave

import numpy as np
import pytest
import torch

import sq_plugin  # noqa: F401  (the registration)
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
    with pytest.raises(StableQuantConfigError, match=r"have none; add <name>.txt beside each WAV"):
        AutoModelForCTC.from_pretrained(path, quantization_config={
            "quant_method": "stablequant", "calibration": {"audio_dir": str(write_wavs(tmp_path / "wavs"))}})


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
