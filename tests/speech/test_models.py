"""Model registry: shipped CTC checkpoints, local directories, hub ids offline, unknown names."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from sq_plugin.speech import models
from sq_plugin.speech.models import HubUnavailableError, SpeechModel, load_model

SHIPPED = {"sq/wav2vec2-ref": "Wav2Vec2ForCTC", "sq/hubert-ref": "HubertForCTC"}
# The recorded subset CER must be reproduced within this absolute tolerance (same corpus version,
# same per-utterance greedy decode; only float summation order may differ across machines).
CER_TOLERANCE = 0.02
TRAIN_CTC = Path(__file__).resolve().parents[2] / "tools" / "train_ctc.py"


def _train_ctc() -> ModuleType:
    """tools/train_ctc.py, the script that trained the shipped checkpoints (a repository tool, not part of
    the installed package), imported by file path so that it works from any working directory."""
    name = "_sq_tools_train_ctc"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, TRAIN_CTC)
        assert spec is not None and spec.loader is not None, f"cannot import {TRAIN_CTC}"
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their defining module up here
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every test here must work without network: any hub access would be a bug.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_list_models_names_the_offline_defaults() -> None:
    assert models.list_models() == ["sq/wav2vec2-ref", "sq/hubert-ref", "openai/whisper-tiny.en"]


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_checkpoint_reaches_recorded_cer(name: str) -> None:
    from sq_plugin.speech.corpus import CORPUS_VERSION, load_split

    bundle = load_model(name)
    assert isinstance(bundle, SpeechModel) and bundle.kind == "ctc" and bundle.name == name
    assert type(bundle.model).__name__ == SHIPPED[name]
    assert not bundle.model.training
    training = json.loads(Path(bundle.info["training_json"]).read_text())
    assert training["status"] == "final"
    assert bundle.info["params"] == training["params"] == sum(p.numel() for p in bundle.model.parameters())
    # The shipped models must be usable references: recorded FP test figures well below 50 % WER.
    assert bundle.info["fp_test_wer"] < 0.5 and bundle.info["fp_test_cer"] < 0.2
    # Figures are tied to the corpus they were measured on (it may differ from the training corpus).
    eval_version = training.get("eval_corpus_version", training["corpus_version"])
    assert eval_version == CORPUS_VERSION, "corpus changed since evaluation: re-run tools/train_ctc.py --eval-only"
    assert training["test_voices_held_out"]

    subset = training["test_subset"]
    utts = load_split("test", limit=subset["first_n"], progress=False)
    got = _train_ctc().evaluate_local(bundle, utts)
    assert got["cer"] == pytest.approx(subset["cer"], abs=CER_TOLERANCE)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_checkpoint_loads_with_plain_transformers(name: str) -> None:
    """The directory is a normal save_pretrained folder: the processor round-trips text offline."""
    from transformers import AutoModelForCTC, Wav2Vec2Processor

    path = models.checkpoint_dir(name)
    processor = Wav2Vec2Processor.from_pretrained(path, local_files_only=True)
    model = AutoModelForCTC.from_pretrained(path, local_files_only=True)
    assert type(model).__name__ == SHIPPED[name]
    assert (path / "preprocessor_config.json").exists()
    ids = processor.tokenizer("the cat's hat").input_ids
    assert processor.tokenizer.decode(ids) == "the cat's hat"
    assert model.config.vocab_size == len(processor.tokenizer)
    # Architecture the quantizer expects: 7 conv layers, positional conv, pre-LN transformer.
    assert len(model.config.conv_dim) == 7 and model.config.do_stable_layer_norm


def _tiny_ctc(tmp_path: Path, cls_name: str) -> Path:
    import transformers

    from sq_plugin.speech.sentences import CHARSET

    config_cls = {"Wav2Vec2ForCTC": transformers.Wav2Vec2Config, "HubertForCTC": transformers.HubertConfig}
    config_cls = config_cls[cls_name]
    train_ctc = _train_ctc()
    vocab = train_ctc.build_vocab(CHARSET)
    config = config_cls(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32,
        conv_dim=(8,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer", do_stable_layer_norm=True, pad_token_id=0,
    )
    out = tmp_path / cls_name
    out.mkdir()
    getattr(transformers, cls_name)(config).save_pretrained(out)
    train_ctc.build_processor(vocab, out).save_pretrained(out)
    return out


@pytest.mark.parametrize("cls_name", ["Wav2Vec2ForCTC", "HubertForCTC"])
def test_local_ctc_directory_loads_like_a_hub_model(tmp_path: Path, cls_name: str) -> None:
    path = _tiny_ctc(tmp_path, cls_name)
    bundle = load_model(str(path))
    assert bundle.kind == "ctc" and type(bundle.model).__name__ == cls_name
    assert bundle.info["model_config"].conv_stride == bundle.model.config.conv_stride
    audio = np.zeros(16000, dtype=np.float32)
    inputs = bundle.processor(audio, sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        logits = bundle.model(inputs.input_values).logits
    assert logits.shape == (1, 49, len(bundle.processor.tokenizer))


def test_local_whisper_directory_loads(tmp_path: Path) -> None:
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    # A byte-level vocabulary with no merges: the smallest valid Whisper (GPT-2 style) tokenizer.
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    for special in ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"):
        vocab[special] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = WhisperTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    feature_extractor = WhisperFeatureExtractor(feature_size=80)
    processor = WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer)
    eot = vocab["<|endoftext|>"]
    config = WhisperConfig(
        vocab_size=len(vocab), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=80,
        max_target_positions=32, decoder_start_token_id=vocab["<|startoftranscript|>"], pad_token_id=eot,
        eos_token_id=eot, bos_token_id=eot,
    )
    out = tmp_path / "whisper"
    WhisperForConditionalGeneration(config).save_pretrained(out)
    processor.save_pretrained(out)

    bundle = load_model(str(out))
    assert bundle.kind == "whisper" and type(bundle.model).__name__ == "WhisperForConditionalGeneration"
    feats = bundle.processor(np.zeros(16000, dtype=np.float32), sampling_rate=16000, return_tensors="pt")
    assert feats.input_features.shape == (1, 80, 3000)


@pytest.mark.parametrize(
    "name", ["facebook/hubert-large-ls960-ft", "facebook/wav2vec2-base-960h", "openai/whisper-small"]
)
def test_hub_model_offline_error_names_the_fix(name: str) -> None:
    with pytest.raises(HubUnavailableError) as info:
        load_model(name)
    msg = str(info.value)
    assert name in msg and "unreachable" in msg
    assert "network" in msg and "local directory" in msg and "cache" in msg
    for offline_name in models.list_models():
        assert offline_name in msg


def test_whisper_tiny_hub_version_is_a_hub_model() -> None:
    """offline=False asks for the hub copy of tiny.en, which is unreachable here."""
    with pytest.raises(HubUnavailableError, match="unreachable"):
        load_model("openai/whisper-tiny.en", offline=False)


def test_whisper_tiny_offline_delegates_to_ct2(monkeypatch: pytest.MonkeyPatch) -> None:
    import sq_plugin.speech.whisper_ct2 as whisper_ct2

    sentinel = SpeechModel(name="whisper-tiny.en", kind="whisper", model=torch.nn.Identity(), processor=None)
    monkeypatch.setattr(whisper_ct2, "load_whisper_tiny_en", lambda: sentinel)
    bundle = load_model("openai/whisper-tiny.en")
    assert bundle.model is sentinel.model and bundle.name == "openai/whisper-tiny.en"


@pytest.mark.parametrize("name", ["sq/no-such-model", "./no/such/dir", "not a model id!"])
def test_unknown_names_raise_value_error_with_choices(name: str) -> None:
    with pytest.raises(ValueError, match="unknown model") as info:
        load_model(name)
    assert "sq/wav2vec2-ref" in str(info.value)


def test_checkpoint_dir_rejects_non_shipped_names() -> None:
    with pytest.raises(ValueError, match="shipped"):
        models.checkpoint_dir("openai/whisper-tiny.en")


def test_load_librispeech_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="validation.clean"):
        models.load_librispeech("train.clean.100")
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="pip install datasets"):
            models.load_librispeech("test.clean", limit=2)
