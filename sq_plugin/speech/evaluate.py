"""Transcribe audio with a `SpeechModel` and score it (WER / CER) against reference transcripts.

Text normalization (applied to references and hypotheses before scoring; `normalize_text`):
  1. lowercase; typographic apostrophes (’ ‘ ʼ) become "'".
  2. numbers are spelled out in plain cardinal words with no "and" and no hyphens, because our references
     spell numbers out and Whisper often writes digits: "1,250" -> "one thousand two hundred fifty",
     "3.5" -> "three point five", "21st" -> "twenty first", "50%" -> "fifty percent". Years are read
     as cardinals too ("1990" -> "one thousand nine hundred ninety"), a known mismatch with "nineteen
     ninety" that we accept (the corpus has no years read that way, and it is the same for every model).
  3. every character that is not a letter, digit, apostrophe or whitespace becomes a space (so
     "twenty-one" -> "twenty one", "u.s." -> "u s").
  4. apostrophes are kept only inside words ("it's", "o'clock"); leading/trailing ones are dropped.
  5. whitespace is collapsed and stripped.
"""

from __future__ import annotations

import math
import re
import time
import unicodedata
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from itertools import groupby
from typing import Any

import jiwer
import numpy as np
import torch

from sq_plugin import parallel
from sq_plugin.speech.models import SpeechModel

SAMPLE_RATE = 16000
_WHISPER_MAX_SECONDS = 30.0

# ---------------------------------------------------------------------------------------------------
# Normalization
# ---------------------------------------------------------------------------------------------------

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (1000, "thousand"))
_ORDINAL_WORDS = {
    "one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
    "nine": "ninth", "twelve": "twelfth",
}


def number_to_words(n: int) -> str:
    """Cardinal English words for a non-negative integer (< 10**15), e.g. 1205 -> "one thousand two
    hundred five". No "and", no hyphens: the form our references use."""
    if n < 0:
        return "minus " + number_to_words(-n)
    if n >= 10**15:
        # Too large to be a spoken quantity; read it digit by digit as people read long codes.
        return " ".join(_ONES[int(d)] for d in str(n))
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (" " + _ONES[ones] if ones else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return _ONES[hundreds] + " hundred" + (" " + number_to_words(rest) if rest else "")
    for scale, name in _SCALES:
        if n >= scale:
            head, rest = divmod(n, scale)
            return number_to_words(head) + " " + name + (" " + number_to_words(rest) if rest else "")
    raise AssertionError("unreachable")


def ordinal_to_words(n: int) -> str:
    """21 -> "twenty first", 100 -> "one hundredth"."""
    words = number_to_words(n).split()
    last = words[-1]
    if last in _ORDINAL_WORDS:
        words[-1] = _ORDINAL_WORDS[last]
    elif last.endswith("y"):
        words[-1] = last[:-1] + "ieth"
    else:
        words[-1] = last + "th"
    return " ".join(words)


def _decimal_to_words(match: re.Match[str]) -> str:
    whole, frac = match.group(1), match.group(2)
    return f" {number_to_words(int(whole))} point {' '.join(_ONES[int(d)] for d in frac)} "


def normalize_text(s: str) -> str:
    """Normalize a transcript for scoring; see the module docstring for the exact rules."""
    s = unicodedata.normalize("NFKC", s).lower()
    s = re.sub(r"[’‘ʼ`]", "'", s)
    s = s.replace("%", " percent ")
    s = s.replace("&", " and ")
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)  # thousands separators: 1,250 -> 1250
    s = re.sub(r"(\d+)\.(\d+)", _decimal_to_words, s)
    s = re.sub(r"(\d+)(?:st|nd|rd|th)\b", lambda m: f" {ordinal_to_words(int(m.group(1)))} ", s)
    s = re.sub(r"\d+", lambda m: f" {number_to_words(int(m.group(0)))} ", s)
    s = re.sub(r"[^\w\s']|_", " ", s)
    s = re.sub(r"(?<!\w)'+|'+(?!\w)", " ", s)  # keep apostrophes only between word characters
    return " ".join(s.split())


# ---------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------


def _check_pairs(refs: Sequence[str], hyps: Sequence[str]) -> tuple[list[str], list[str]]:
    if len(refs) != len(hyps):
        raise ValueError(f"got {len(refs)} references but {len(hyps)} hypotheses; they must pair up")
    r = [normalize_text(x) for x in refs]
    h = [normalize_text(x) for x in hyps]
    empty = [i for i, x in enumerate(r) if not x]
    if empty:
        raise ValueError(
            f"references at positions {empty[:10]} are empty after normalization; WER is undefined for "
            "them. Drop them first (evaluate() does that and reports them)."
        )
    return r, h


def _finite(name: str, value: float) -> float:
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"{name} is {value}: the metric is undefined (empty references or hypotheses?)")
    return float(value)


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus-level word error rate (total edits / total reference words) on normalized text."""
    if not refs:
        raise ValueError("wer(): no utterances to score")
    r, h = _check_pairs(refs, hyps)
    return _finite("WER", jiwer.wer(r, h))


def word_errors(refs: Sequence[str], hyps: Sequence[str]) -> tuple[list[int], list[int]]:
    """Per utterance, on normalized text: (word edits, reference words). Their sums give the corpus WER; a paired
    bootstrap (`sq_plugin.core.significance.paired_bootstrap`) resamples them."""
    if not refs:
        raise ValueError("word_errors(): no utterances to score")
    r, h = _check_pairs(refs, hyps)
    out = jiwer.process_words(r, h)
    errors = [sum(c.ref_end_idx - c.ref_start_idx if c.type in ("substitute", "delete") else
                  c.hyp_end_idx - c.hyp_start_idx if c.type == "insert" else 0 for c in chunks)
              for chunks in out.alignments]
    return errors, [len(x.split()) for x in r]


def cer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus-level character error rate on normalized text (spaces count as characters)."""
    if not refs:
        raise ValueError("cer(): no utterances to score")
    r, h = _check_pairs(refs, hyps)
    return _finite("CER", jiwer.cer(r, h))


# ---------------------------------------------------------------------------------------------------
# Transcription
# ---------------------------------------------------------------------------------------------------


def _progress(total: int, enabled: bool, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="utt")


def _logits_of(out: Any) -> torch.Tensor:
    """Logits from a HF ModelOutput, a dict, a tuple/list, or a bare tensor (an exported GraphModule
    may return any of these)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict):
        return out["logits"]
    if isinstance(out, (tuple, list)):
        return _logits_of(out[0])
    raise TypeError(f"cannot find logits in model output of type {type(out).__name__}")


def _conv_stack(bundle: SpeechModel) -> tuple[list[int], list[int]]:
    """(kernels, strides) of the CTC model's feature-extractor convolutions.

    Read from `bundle.model.config`; a quantized / exported module has no config, so fall back to
    `bundle.info["model_config"]` (a PretrainedConfig or dict) that loaders can record."""
    cfg = getattr(bundle.model, "config", None) or bundle.info.get("model_config")
    if cfg is None:
        raise ValueError(
            f"{bundle.name}: cannot compute the number of valid CTC frames: bundle.model has no .config. "
            "Fix: keep the original config in bundle.info['model_config'] when replacing the model."
        )
    get = cfg.get if isinstance(cfg, dict) else lambda k: getattr(cfg, k)
    return list(get("conv_kernel")), list(get("conv_stride"))


def ctc_num_frames(num_samples: int, kernels: Sequence[int], strides: Sequence[int]) -> int:
    """Output frames of a stack of unpadded 1-D convolutions: L -> floor((L - k) / s) + 1 per layer
    (what Wav2Vec2's `_get_feat_extract_output_lengths` computes)."""
    length = num_samples
    for k, s in zip(kernels, strides, strict=True):
        length = max((length - k) // s + 1, 0)
    return length


def ctc_greedy_decode(frame_ids: Sequence[int], tokenizer: Any) -> str:
    """Greedy CTC: collapse repeated frame labels, drop blanks (the tokenizer's pad id), then map to text."""
    blank = tokenizer.pad_token_id
    ids = [int(i) for i, _ in groupby(frame_ids) if int(i) != blank]
    # group_tokens=False: repeats were already collapsed *before* removing blanks, so "l <pad> l" stays "ll".
    return tokenizer.decode(ids, group_tokens=False, skip_special_tokens=True).strip()


def uses_attention_mask(bundle: SpeechModel) -> bool:
    """Whether the CTC model takes an attention mask with padded input (the processor's flag, the HF
    convention: True for layer-norm models such as hubert-large-ls960-ft and our references; False for
    group-norm wav2vec2-base, which was trained on zero-padded batches without one)."""
    return bool(getattr(bundle.processor.feature_extractor, "return_attention_mask", False))


def length_batches(audios: Sequence[np.ndarray], batch_size: int) -> list[list[int]]:
    """The batches transcription runs, as indices: clips sorted by length (little padding), `batch_size` each."""
    order = sorted(range(len(audios)), key=lambda i: len(audios[i]))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def _transcribe_ctc(bundle: SpeechModel, audios: list[np.ndarray], batches: list[list[int]], bar: Any,
                    pad_to_multiple: int | None = None) -> dict[int, str]:
    fe, tokenizer = bundle.processor.feature_extractor, bundle.processor.tokenizer
    kernels, strides = _conv_stack(bundle)
    with_mask = uses_attention_mask(bundle)
    results: dict[int, str] = {}
    for idx in batches:
        # Normalize each utterance on its own (zero mean / unit variance over its real samples), then pad
        # with zeros: normalizing a padded batch without an attention mask would count the padding.
        feats = [np.asarray(fe(audios[i], sampling_rate=SAMPLE_RATE).input_values[0], dtype=np.float32)
                 for i in idx]
        length = max(len(f) for f in feats)
        if pad_to_multiple:  # bucketed lengths: a statically compiled INT8 model compiles once per bucket
            length = -(-length // pad_to_multiple) * pad_to_multiple
        batch = np.zeros((len(idx), length), dtype=np.float32)
        mask = np.zeros((len(idx), length), dtype=np.int64)
        for row, f in enumerate(feats):
            batch[row, : len(f)] = f
            mask[row, : len(f)] = 1
        # Positional arguments only: the same call must work for a torch.export'ed / quantized GraphModule.
        args = (torch.from_numpy(batch), torch.from_numpy(mask)) if with_mask else (torch.from_numpy(batch),)
        logits = _logits_of(bundle.model(*args))
        frame_ids = logits.argmax(dim=-1).cpu().numpy()
        for row, i in enumerate(idx):
            n_valid = min(ctc_num_frames(len(feats[row]), kernels, strides), frame_ids.shape[1])
            results[i] = ctc_greedy_decode(frame_ids[row, :n_valid].tolist(), tokenizer)
        bar.update(len(idx))
    return results


def _transcribe_whisper(
    bundle: SpeechModel, audios: list[np.ndarray], batches: list[list[int]], bar: Any, max_new_tokens: int
) -> dict[int, str]:
    fe, tokenizer = bundle.processor.feature_extractor, bundle.processor.tokenizer
    model = bundle.model
    if not hasattr(model, "generate"):
        raise TypeError(f"{bundle.name}: Whisper transcription needs a module with .generate()")
    too_long = [i for i, a in enumerate(audios) if len(a) > _WHISPER_MAX_SECONDS * SAMPLE_RATE]
    if too_long:
        warnings.warn(
            f"{len(too_long)} utterances are longer than 30 s; Whisper sees only their first 30 s",
            stacklevel=3,
        )
    # Whisper's generate() adds the prompt length (<|startoftranscript|>...) to `max_length`, so
    # max_length=N allows N new tokens, same as max_new_tokens=N (checked: both give 3 tokens for N=3).
    # Passing max_new_tokens instead logs a "both max_new_tokens and max_length" warning per batch,
    # because the checkpoint's generation_config sets max_length=448.
    gen_kwargs: dict[str, Any] = {"max_length": max_new_tokens, "return_timestamps": False,
                                  "num_beams": 1, "do_sample": False}
    # English-only checkpoints reject language/task; multilingual ones need them to skip detection.
    if getattr(model.generation_config, "is_multilingual", False):
        gen_kwargs.update(language="en", task="transcribe")
    results: dict[int, str] = {}
    for idx in batches:
        # Pads/truncates every clip to 30 s of log-mel frames (3000), as Whisper was trained.
        features = fe([audios[i] for i in idx], sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
        tokens = model.generate(features.to(getattr(model, "dtype", torch.float32)), **gen_kwargs)
        texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
        for i, text in zip(idx, texts, strict=True):
            results[i] = text.strip()
        bar.update(len(idx))
    return results


def transcribe_ctc_batches(bundle: SpeechModel, audios: Sequence[np.ndarray], batches: Sequence[Sequence[int]]
                           ) -> Iterator[dict[int, str]]:
    """Greedy CTC texts of `batches` (lists of indices into `audios`, e.g. `length_batches`), one batch at a time
    and in this process only (no sharding): for a metric that may stop after any batch. Each batch's texts are
    the ones `transcribe` gives for the same batch."""
    audios = [np.asarray(a, dtype=np.float32).reshape(-1) for a in audios]
    if any(len(a) == 0 for a in audios):
        raise ValueError("transcribe_ctc_batches(): got an empty audio clip")
    for idx in batches:
        # Not yielded inside the context: a caller that stops early must not be left in inference mode.
        with torch.inference_mode(), _progress(0, False, "") as bar:
            texts = _transcribe_ctc(bundle, audios, [list(idx)], bar)
        yield texts


def transcribe(
    bundle: SpeechModel,
    audios: list[np.ndarray],
    *,
    batch_size: int = 8,
    progress: bool = True,
    max_new_tokens: int = 128,
    pad_to_multiple: int | None = None,
    desc: str | None = None,
) -> list[str]:
    """Transcribe 16 kHz mono float32 clips; returns texts in the input order.

    CTC bundles: greedy CTC decoding of logits trimmed to each clip's valid frames. Whisper bundles:
    greedy `generate`, English, no timestamps, at most `max_new_tokens` tokens per clip.
    Under `torch.distributed` (several ranks, `sq_plugin.parallel`) each rank runs every world-th batch and the
    texts are gathered: the same batches, so the same texts, as one process.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    audios = [np.asarray(a, dtype=np.float32).reshape(-1) for a in audios]
    if any(len(a) == 0 for a in audios):
        raise ValueError("transcribe(): got an empty audio clip")
    if bundle.kind not in ("ctc", "whisper"):
        raise ValueError(f"unknown model kind {bundle.kind!r}; expected 'ctc' or 'whisper'")
    batches = length_batches(audios, batch_size)
    rank, world = parallel.rank_and_world()
    if world > 1:
        parallel.batch_shard(len(audios), batch_size, what="clips")  # refuses a world larger than the batches
        batches = batches[rank::world]
    mine = sum(len(b) for b in batches)
    with torch.inference_mode(), _progress(mine, progress, desc or f"transcribe {bundle.name}") as bar:
        if bundle.kind == "ctc":
            results = _transcribe_ctc(bundle, audios, batches, bar, pad_to_multiple)
        else:
            results = _transcribe_whisper(bundle, audios, batches, bar, max_new_tokens)
    if world > 1:
        results = {i: text for part in parallel.gather(results) for i, text in part.items()}
    return [results[i] for i in range(len(audios))]


# ---------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------


@dataclass
class UtteranceResult:
    id: str
    reference: str
    hypothesis: str
    wer: float
    cer: float


@dataclass
class EvalResult:
    """Corpus-level WER/CER over `n` scored utterances. Utterances whose reference is empty after
    normalization are not scored; they are listed in `empty_references` (wer/cer NaN there)."""

    wer: float
    cer: float
    n: int
    utterances: list[UtteranceResult]
    seconds: float
    empty_references: list[UtteranceResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (NaN becomes None)."""

        def clean(x: Any) -> Any:
            if isinstance(x, float) and math.isnan(x):
                return None
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            if isinstance(x, list):
                return [clean(v) for v in x]
            return x

        return clean(asdict(self))


def evaluate(bundle: SpeechModel, utterances: Sequence[Any], *, batch_size: int = 8,
             progress: bool = True, pad_to_multiple: int | None = None, desc: str | None = None) -> EvalResult:
    """Transcribe `utterances` (objects with .id, .audio (float32 16 kHz mono), .text) and score them.

    pad_to_multiple (CTC): zero-pad each batch to a multiple of this many samples, as a statically
    compiled INT8 model needs; evaluate the float model the same way to compare like with like.
    """
    if not utterances:
        raise ValueError("evaluate(): no utterances given")
    start = time.perf_counter()
    hyps = transcribe(bundle, [u.audio for u in utterances], batch_size=batch_size, progress=progress,
                      pad_to_multiple=pad_to_multiple, desc=desc)
    seconds = time.perf_counter() - start
    scored: list[UtteranceResult] = []
    empty: list[UtteranceResult] = []
    for u, hyp in zip(utterances, hyps, strict=True):
        ref_n, hyp_n = normalize_text(u.text or ""), normalize_text(hyp)
        if not ref_n:
            empty.append(UtteranceResult(str(u.id), u.text or "", hyp, math.nan, math.nan))
            continue
        scored.append(UtteranceResult(str(u.id), u.text, hyp, float(jiwer.wer(ref_n, hyp_n)),
                                      float(jiwer.cer(ref_n, hyp_n))))
    if empty:
        warnings.warn(
            f"{len(empty)} utterances have an empty reference transcript and are excluded from WER/CER: "
            f"{[e.id for e in empty[:10]]}",
            stacklevel=2,
        )
    if not scored:
        raise ValueError("evaluate(): every reference transcript is empty; WER/CER are undefined")
    refs = [r.reference for r in scored]
    hyp_texts = [r.hypothesis for r in scored]
    return EvalResult(wer=wer(refs, hyp_texts), cer=cer(refs, hyp_texts), n=len(scored), utterances=scored,
                      seconds=seconds, empty_references=empty)
