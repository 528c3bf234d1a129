"""Normalization, WER/CER, CTC greedy decoding (frame trimming, order) and evaluate() bookkeeping."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from sq_plugin.speech.evaluate import (
    EvalResult,
    cer,
    ctc_greedy_decode,
    ctc_num_frames,
    evaluate,
    normalize_text,
    number_to_words,
    transcribe,
    wer,
)
from sq_plugin.speech.models import SpeechModel


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Hello, World!", "hello world"),
        ("It's 5 o'clock.", "it's five o'clock"),
        ("Don’t STOP", "don't stop"),
        ("'quoted' dogs' bones", "quoted dogs bones"),
        ("twenty-one  U.S.\n", "twenty one u s"),
        ("I have 1,250 apples and 3.5 pears",
         "i have one thousand two hundred fifty apples and three point five pears"),
        ("the 21st of May, 2nd and 3rd", "the twenty first of may second and third"),
        ("50% off", "fifty percent off"),
        ("9999", "nine thousand nine hundred ninety nine"),
        ("room 101", "room one hundred one"),
        ("   ", ""),
    ],
)
def test_normalize_text(raw: str, expected: str) -> None:
    assert normalize_text(raw) == expected


def test_number_to_words() -> None:
    assert [number_to_words(n) for n in (0, 13, 40, 99, 100, 7010)] == [
        "zero", "thirteen", "forty", "ninety nine", "one hundred", "seven thousand ten"]
    assert number_to_words(2_000_005) == "two million five"


def test_wer_cer_known_strings() -> None:
    # 1 substitution in 3 words + 1 deletion in 2 words = 2 edits / 5 words (corpus level, not the mean).
    assert wer(["a b c", "d e"], ["a x c", "d"]) == pytest.approx(0.4)
    # Normalization first: case, punctuation and digits do not count as errors.
    assert wer(["it's five o'clock"], ["It's 5 o'clock."]) == 0.0
    assert cer(["abcd"], ["abxd"]) == pytest.approx(0.25)
    assert wer(["one two"], [""]) == 1.0
    with pytest.raises(ValueError, match="empty"):
        wer(["..."], ["x"])
    with pytest.raises(ValueError, match="pair up"):
        wer(["a"], ["a", "b"])


def test_ctc_num_frames_matches_wav2vec2() -> None:
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    cfg = Wav2Vec2Config()  # wav2vec2-base conv stack: kernels (10,3,3,3,3,2,2), strides (5,2,2,2,2,2,2)
    model = Wav2Vec2ForCTC.__new__(Wav2Vec2ForCTC)  # only the length helper is needed, not the weights
    model.config = cfg
    lengths = torch.tensor([400, 401, 719, 720, 16000, 16319, 16320, 48000])
    expected = model._get_feat_extract_output_lengths(lengths).tolist()
    got = [ctc_num_frames(int(n), cfg.conv_kernel, cfg.conv_stride) for n in lengths]
    assert got == expected
    assert got[4] == 49  # 1 s of 16 kHz audio -> 49 frames (20 ms hop, 25 ms receptive field)
    assert ctc_num_frames(100, cfg.conv_kernel, cfg.conv_stride) == 0


def _char_tokenizer(tmp_path):
    from transformers import Wav2Vec2CTCTokenizer

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, "a": 5, "b": 6, "c": 7}
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps(vocab))
    return Wav2Vec2CTCTokenizer(str(path), pad_token="<pad>", word_delimiter_token="|")


def _processor(tmp_path, do_normalize: bool):
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Processor

    fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                  do_normalize=do_normalize, return_attention_mask=False)
    return Wav2Vec2Processor(feature_extractor=fe, tokenizer=_char_tokenizer(tmp_path))


def test_ctc_greedy_decode(tmp_path) -> None:
    tok = _char_tokenizer(tmp_path)
    # a a _ a b | | c _ c   ->  "aab c" ... blanks separate real repeats, "|" is the word boundary.
    assert ctc_greedy_decode([5, 5, 0, 5, 6, 4, 4, 7, 0, 7], tok) == "aab cc"
    assert ctc_greedy_decode([0, 0, 0], tok) == ""


class _ProbeCTC(torch.nn.Module):
    """A conv-only CTC 'model' whose frame j reads the LAST input sample of its receptive field.

    So a frame is a real frame iff its whole receptive field lies in the unpadded clip, and the first
    frame past the valid count reads padding. The value read picks the token: 0.0 -> "a" (so padding
    that leaks into the transcript shows up as extra "a"s), 1.0 -> "b", 2.0 -> "c", 3.0 -> "|",
    5.0 -> blank. No attention, so batching/padding cannot change the valid frames.
    """

    kernels = (10, 3, 3)
    strides = (5, 2, 2)

    def __init__(self) -> None:
        super().__init__()
        self.config = type("Cfg", (), {"conv_kernel": self.kernels, "conv_stride": self.strides})()
        convs = []
        for k, s in zip(self.kernels, self.strides, strict=True):
            conv = torch.nn.Conv1d(1, 1, k, stride=s, bias=False)
            with torch.no_grad():
                conv.weight.zero_()
                conv.weight[0, 0, k - 1] = 1.0
            convs.append(conv)
        self.convs = torch.nn.Sequential(*convs)
        # centre value of each vocab id: <pad>=blank, <s>, </s>, <unk> unreachable, "|", a, b, c
        self.register_buffer("centres", torch.tensor([5.0, 50.0, 50.0, 50.0, 3.0, 0.0, 1.0, 2.0]))

    def forward(self, input_values: torch.Tensor) -> tuple[torch.Tensor]:
        x = self.convs(input_values[:, None, :])[:, 0, :, None]  # (B, T, 1)
        return (-((x - self.centres) ** 2),)


def _clip(symbols: str, seg: int = 200) -> np.ndarray:
    value = {"b": 1.0, "c": 2.0, "|": 3.0, "_": 5.0}
    return np.concatenate([np.full(seg, value[s], dtype=np.float32) for s in symbols])


def test_ctc_transcribe_trims_frames_and_keeps_order(tmp_path) -> None:
    model = _ProbeCTC()
    bundle = SpeechModel("probe", "ctc", model, _processor(tmp_path, do_normalize=False))
    # Different lengths (so batches are padded) ending in a blank: without exact trimming the frame
    # right after the last valid one reads the zero padding and adds an "a".
    specs = ["b_c_", "c_b|c_", "bb_", "b|b_c_b_", "c_", "b_b_b_"]
    expected = ["bc", "cb c", "b", "b bcb", "c", "bbb"]
    # Odd lengths so that the valid frame count is not a multiple of anything convenient.
    clips = [np.concatenate([_clip(s), np.full(7 * i + 3, 5.0, dtype=np.float32)])
             for i, s in enumerate(specs)]
    assert transcribe(bundle, clips, batch_size=4, progress=False) == expected
    assert transcribe(bundle, clips, batch_size=1, progress=False) == expected
    # Sanity: the probe really does leak padding when not trimmed.
    longest = max(len(c) for c in clips)
    padded = np.zeros((1, longest), dtype=np.float32)
    padded[0, : len(clips[4])] = clips[4]
    ids = model(torch.from_numpy(padded))[0].argmax(-1)[0].tolist()
    assert ctc_greedy_decode(ids, bundle.processor.tokenizer) == "ca"
    # A replaced module without .config works when the config is recorded in info.
    bare = torch.nn.Sequential()
    bare.forward = model.forward  # type: ignore[method-assign]
    bundle2 = SpeechModel("probe", "ctc", bare, bundle.processor, info={"model_config": {
        "conv_kernel": list(model.kernels), "conv_stride": list(model.strides)}})
    assert transcribe(bundle2, clips, batch_size=3, progress=False) == expected


def _tiny_wav2vec2(tmp_path) -> SpeechModel:
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    torch.manual_seed(0)
    cfg = Wav2Vec2Config(
        vocab_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16, 16, 16), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2, feat_extract_norm="group", pad_token_id=0,
    )
    model = Wav2Vec2ForCTC(cfg).eval()
    return SpeechModel("tiny-w2v2", "ctc", model, _processor(tmp_path, do_normalize=True))


def test_ctc_transcribe_random_wav2vec2(tmp_path) -> None:
    bundle = _tiny_wav2vec2(tmp_path)
    rng = np.random.default_rng(0)
    clips = [rng.standard_normal(n).astype(np.float32) for n in (3000, 1200, 2400, 1999)]
    # Each clip alone (no padding) is the reference; with batch_size=1 order handling is trivial.
    alone = transcribe(bundle, clips, batch_size=1, progress=False)
    with torch.inference_mode():
        for clip, text in zip(clips, alone, strict=True):
            x = torch.from_numpy((clip - clip.mean()) / np.sqrt(clip.var() + 1e-7))[None]
            logits = bundle.model(x).logits
            assert logits.shape[1] == ctc_num_frames(len(clip), (10, 3, 3), (5, 2, 2))
            assert ctc_greedy_decode(logits.argmax(-1)[0].tolist(), bundle.processor.tokenizer) == text
    assert all(isinstance(t, str) for t in alone) and any(alone)
    # Batched: a group-norm wav2vec2 sees the padding, so only the shape of the result is comparable.
    batched = transcribe(bundle, clips, batch_size=3, progress=False)
    assert len(batched) == len(clips)


@dataclass
class _Utt:
    id: str
    audio: np.ndarray
    text: str


def test_evaluate_reports_empty_references(tmp_path) -> None:
    bundle = SpeechModel("probe", "ctc", _ProbeCTC(), _processor(tmp_path, do_normalize=False))
    utts = [
        _Utt("u1", _clip("b_c_"), "b c"),  # hyp "bc": 1 sub + 1 del of 2 words
        _Utt("u2", _clip("c_b|c_"), "cb c"),  # exact
        _Utt("u3", _clip("c_"), "?!"),  # empty after normalization
    ]
    with pytest.warns(UserWarning, match="empty reference"):
        res = evaluate(bundle, utts, batch_size=2, progress=False)
    assert isinstance(res, EvalResult)
    assert res.n == 2 and [u.id for u in res.utterances] == ["u1", "u2"]
    assert res.wer == pytest.approx(2 / 4)
    assert res.utterances[0].wer == 1.0 and res.utterances[1].wer == 0.0
    assert [e.id for e in res.empty_references] == ["u3"] and math.isnan(res.empty_references[0].wer)
    d = res.to_dict()
    assert d["empty_references"][0]["wer"] is None and d["n"] == 2
    json.dumps(d)
    with pytest.raises(ValueError, match="every reference"), pytest.warns(UserWarning):
        evaluate(bundle, [utts[2]], progress=False)


def test_word_errors_sum_to_the_corpus_wer():
    from sq_plugin.speech.evaluate import wer, word_errors

    refs = ["the cat sat on the mat", "a dog", "hello there world"]
    hyps = ["the cat sat on mat", "a big dog", "hello world"]
    errors, words = word_errors(refs, hyps)
    assert errors == [1, 1, 1] and words == [6, 2, 3]
    assert sum(errors) / sum(words) == pytest.approx(wer(refs, hyps))
