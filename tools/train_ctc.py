"""Train the small wav2vec2 / HuBERT CTC reference models shipped in `sq_plugin/checkpoints/`.

Why train at all: real hub checkpoints cannot be downloaded here, and quantization measurements on an
untrained model mean nothing. These models keep the paper's architecture (raw-waveform CNN feature
extractor of 7 Conv1d layers, convolutional positional embedding, Transformer encoder, CTC head) at a
size that trains on 1 CPU thread in about an hour on the synthesized eSpeak NG corpus.

Usage (from the repository root; a repository tool, not part of the installed package):
    python tools/train_ctc.py --arch wav2vec2 --out sq_plugin/checkpoints/wav2vec2-ref \
        --minutes 60 --threads 1 --seed 0

The output directory loads offline with `Wav2Vec2Processor.from_pretrained(DIR)` and
`Wav2Vec2ForCTC.from_pretrained(DIR)` / `HubertForCTC.from_pretrained(DIR)`; `training.json` records the
command, seed, corpus version, steps, minutes, parameter count and the final dev/test WER/CER.
The run is deterministic for a given `--steps` (the step budget `--minutes` estimates is recorded, so
passing it back as `--steps` replays the same schedule).

Decoding and scoring are the package's: `sq_plugin.speech.evaluate.transcribe` (greedy CTC) and, for the
final dev/test figures, `sq_plugin.speech.evaluate.evaluate`; checkpoints are written with
`sq_plugin.core.files.atomic_directory`. torch, transformers and the evaluator are imported only when
needed, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    import torch

    from sq_plugin.speech.models import SpeechModel

SAMPLE_RATE = 16000
PAD_TOKEN = "<pad>"  # also the CTC blank (Wav2Vec2ForCTC uses config.pad_token_id as blank)
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
WORD_DELIMITER = "|"

# Both archs: the real models' 7-layer conv feature encoder geometry (stride 320 -> 50 frames/s, same
# kernels/strides as wav2vec2-base/large and HuBERT), narrowed; pre-LayerNorm ("stable") Transformer,
# because the post-LN / group-norm base variant only emitted blanks in short trainings here.
# The two differ as the real ones do in class (HuBERT: feature-projection LayerNorm switchable, no
# quantizer) and also in size, so that quantization results are not just one model measured twice.
_COMMON: dict[str, Any] = {
    "conv_stride": (5, 2, 2, 2, 2, 2, 2),
    "conv_kernel": (10, 3, 3, 3, 3, 2, 2),
    "conv_bias": True,
    "feat_extract_norm": "layer",
    "do_stable_layer_norm": True,
    "num_conv_pos_embeddings": 64,
    "num_conv_pos_embedding_groups": 16,
    # Dropout kept low: ~1 h of training on many hours of audio under-fits rather than over-fits.
    "hidden_dropout": 0.05,
    "activation_dropout": 0.0,
    "attention_dropout": 0.0,
    "feat_proj_dropout": 0.0,
    "final_dropout": 0.0,
    "layerdrop": 0.0,
    # Light SpecAugment (time masks on the projected features): helps on the held-out test voices.
    "apply_spec_augment": True,
    "mask_time_prob": 0.04,
    "mask_time_length": 5,
    "mask_time_min_masks": 1,
    "ctc_loss_reduction": "mean",
    "ctc_zero_infinity": True,
}
ARCH_CONFIGS: dict[str, dict[str, Any]] = {
    "wav2vec2": {
        **_COMMON,
        # Narrow first layers: at 3200/1600 frames/s they dominate CPU training time (LayerNorm
        # transposes and GELU backward over channels x samples), so they get 32 channels.
        "conv_dim": (32, 32, 48, 64, 64, 64, 64),
        "hidden_size": 192,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 768,
    },
    "hubert": {
        **_COMMON,
        "conv_dim": (32, 32, 48, 64, 64, 64, 96),
        "hidden_size": 160,
        "num_hidden_layers": 5,
        "num_attention_heads": 4,
        "intermediate_size": 640,
        "feat_proj_layer_norm": True,
    },
}


class UtteranceLike(Protocol):
    """What training needs from a corpus utterance (sq_plugin.speech.corpus.Utterance fits)."""

    id: str
    audio: np.ndarray
    text: str


# --------------------------------------------------------------------------------------------------
# Vocabulary, processor, model
# --------------------------------------------------------------------------------------------------


def build_vocab(charset: str) -> dict[str, int]:
    """Token -> id: specials first (pad/blank = 0, like the hub models), then "|" and the characters."""
    vocab = {PAD_TOKEN: 0, BOS_TOKEN: 1, EOS_TOKEN: 2, UNK_TOKEN: 3, WORD_DELIMITER: 4}
    for ch in sorted(set(charset) - {" "}):
        vocab[ch] = len(vocab)
    return vocab


def build_processor(vocab: dict[str, int], workdir: Path) -> Any:
    """A Wav2Vec2Processor (feature extractor + CTC tokenizer) for `vocab`.

    The feature extractor normalizes each utterance to zero mean / unit variance and returns an
    attention mask, as for the hub models with layer-norm feature encoders.
    """
    from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2Processor

    vocab_file = workdir / "vocab.json"
    vocab_file.write_text(json.dumps(vocab, indent=1))
    tokenizer = Wav2Vec2CTCTokenizer(
        str(vocab_file), unk_token=UNK_TOKEN, pad_token=PAD_TOKEN, bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN, word_delimiter_token=WORD_DELIMITER, do_lower_case=False,
    )
    feature_extractor = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0, do_normalize=True,
        return_attention_mask=True,
    )
    return Wav2Vec2Processor(feature_extractor=feature_extractor, tokenizer=tokenizer)


def build_model(arch: str, vocab: dict[str, int]) -> torch.nn.Module:
    """A randomly initialised Wav2Vec2ForCTC / HubertForCTC with the `ARCH_CONFIGS[arch]` sizes."""
    from transformers import HubertConfig, HubertForCTC, Wav2Vec2Config, Wav2Vec2ForCTC

    if arch not in ARCH_CONFIGS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCH_CONFIGS)}")
    kwargs = dict(ARCH_CONFIGS[arch])
    kwargs.update(
        vocab_size=len(vocab), pad_token_id=vocab[PAD_TOKEN], bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
    )
    if arch == "wav2vec2":
        return Wav2Vec2ForCTC(Wav2Vec2Config(**kwargs))
    return HubertForCTC(HubertConfig(**kwargs))


def encode_text(text: str, vocab: dict[str, int]) -> list[int]:
    """Character ids, spaces -> "|" (what Wav2Vec2CTCTokenizer does, without its per-call overhead)."""
    unk = vocab[UNK_TOKEN]
    return [vocab.get(WORD_DELIMITER if ch == " " else ch, unk) for ch in " ".join(text.split())]


def normalize_audio(audio: np.ndarray) -> np.ndarray:
    """Zero mean / unit variance, the same formula as Wav2Vec2FeatureExtractor(do_normalize=True)."""
    audio = np.asarray(audio, dtype=np.float32)
    return ((audio - audio.mean()) / np.sqrt(audio.var() + 1e-7)).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Decoding and error rates
# --------------------------------------------------------------------------------------------------


def error_rates(refs: Sequence[str], hyps: Sequence[str]) -> dict[str, float]:
    """Corpus-level WER and CER (edit operations summed over utterances / reference length) on
    whitespace-collapsed text.

    Deliberately not `sq_plugin.speech.evaluate.wer` / `cer`: those score `normalize_text`-ed text, which
    also drops apostrophes at word edges. The learning curve (`training.json["history"]`) and the
    `test_subset` figures that tests/speech/test_models.py re-checks were recorded with this scoring; on
    the shipped checkpoints the two agree on the 40-utterance subset and on all dev utterances, but not on
    wav2vec2-ref's full test split (one hypothesis, "didn' tuse": CER 0.060547 here vs 0.060585).
    """
    import jiwer

    refs = [" ".join(r.split()) for r in refs]
    hyps = [" ".join(h.split()) for h in hyps]
    return {"wer": float(jiwer.wer(refs, hyps)), "cer": float(jiwer.cer(refs, hyps))}


def evaluate_local(bundle: SpeechModel, utterances: Sequence[UtteranceLike]) -> dict[str, float]:
    """WER/CER of greedy transcripts decoded one utterance at a time (no padding, so the figures do not
    depend on batching), through `sq_plugin.speech.evaluate.transcribe`; `error_rates` scores them.
    The model is put in eval mode for the call and back in its previous mode after it."""
    from sq_plugin.speech.evaluate import transcribe

    model = bundle.model
    was_training = model.training
    model.eval()
    try:
        hyps = transcribe(bundle, [u.audio for u in utterances], batch_size=1, progress=False)
    finally:
        model.train(was_training)
    rates: dict[str, float] = error_rates([u.text for u in utterances], hyps)
    rates["n"] = len(utterances)
    return rates


def speech_model(model: torch.nn.Module, processor: Any, arch: str) -> SpeechModel:
    """The evaluator's bundle for a model being trained (named as `load_model` names the shipped one)."""
    from sq_plugin.speech.models import SpeechModel

    return SpeechModel(name=f"sq/{arch}-ref", kind="ctc", model=model, processor=processor)


# --------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------


@dataclass
class Example:
    audio: np.ndarray  # raw float32 16 kHz (normalized per batch item after augmentation)
    labels: list[int]


def make_batches(
    lengths: Sequence[int], max_batch_samples: int, max_batch_size: int, rng: np.random.Generator
) -> list[list[int]]:
    """Length-bucketed batches: shuffle, sort within large chunks, cut by padded size, shuffle batches.

    Sorting only within chunks keeps batch composition random from epoch to epoch while padding stays
    small (padding is wasted compute on a CPU).
    """
    order = rng.permutation(len(lengths))
    chunk = 100 * max_batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk].tolist(), key=lambda i: lengths[i])
        cur: list[int] = []
        for i in part:
            padded = max(lengths[i], *(lengths[j] for j in cur)) * (len(cur) + 1) if cur else lengths[i]
            if cur and (padded > max_batch_samples or len(cur) >= max_batch_size):
                batches.append(cur)
                cur = []
            cur.append(i)
        if cur:
            batches.append(cur)
    rng.shuffle(batches)  # type: ignore[arg-type]
    return batches


def speed_perturb(audio: np.ndarray, factor: float) -> np.ndarray:
    """Resample by linear interpolation ("tape speed"): changes tempo and pitch, a cheap voice change."""
    n_out = max(1, int(round(len(audio) / factor)))
    pos = np.arange(n_out, dtype=np.float64) * factor
    return np.interp(pos, np.arange(len(audio)), audio).astype(np.float32)


def collate(
    examples: Sequence[Example], rng: np.random.Generator, augment: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad to the longest item; labels padded with -100 (what Wav2Vec2ForCTC ignores)."""
    import torch

    audios = []
    for ex in examples:
        a = ex.audio
        if augment and rng.random() < 0.5:
            a = speed_perturb(a, float(rng.uniform(0.9, 1.1)))
        audios.append(normalize_audio(a))
    max_len = max(len(a) for a in audios)
    max_lab = max(len(ex.labels) for ex in examples)
    x = torch.zeros(len(examples), max_len)
    mask = torch.zeros(len(examples), max_len, dtype=torch.long)
    labels = torch.full((len(examples), max_lab), -100, dtype=torch.long)
    for i, (a, ex) in enumerate(zip(audios, examples, strict=True)):
        x[i, : len(a)] = torch.from_numpy(a)
        mask[i, : len(a)] = 1
        labels[i, : len(ex.labels)] = torch.tensor(ex.labels)
    return x, mask, labels


# --------------------------------------------------------------------------------------------------
# Schedule, saving
# --------------------------------------------------------------------------------------------------


def lr_at(step: int, total_steps: int, peak: float) -> float:
    """Tri-stage schedule (as in wav2vec2 fine-tuning): linear warmup 8%, hold to 35%, cosine to 2%."""
    warm = max(1, int(0.08 * total_steps))
    hold = int(0.35 * total_steps)
    if step < warm:
        return peak * (step + 1) / warm
    if step < hold:
        return peak
    frac = min(1.0, (step - hold) / max(1, total_steps - hold))
    return peak * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * frac)))


def save_checkpoint(model: torch.nn.Module, processor: Any, out: Path, info: dict[str, Any]) -> None:
    """Write model + processor + training.json to a temporary directory beside `out`, then swap it in
    (`sq_plugin.core.files.atomic_directory`): a reader, or a run killed mid-save, never sees a
    half-written checkpoint."""
    from sq_plugin.core.files import atomic_directory

    with atomic_directory(out.resolve()) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        # Also the stand-alone preprocessor_config.json that older loaders (and AutoFeatureExtractor) read.
        processor.feature_extractor.save_pretrained(tmp)
        (tmp / "training.json").write_text(json.dumps(info, indent=2) + "\n")
        # A shipped checkpoint must be world-readable whatever the umask (atomic_directory makes the
        # directory itself 0755).
        for f in tmp.iterdir():
            f.chmod(0o644)


def corpus_version() -> str | None:
    """The corpus module's version tag, whatever name it uses (recorded for reproducibility)."""
    from sq_plugin.speech import corpus

    for name in ("CORPUS_VERSION", "VERSION", "__version__"):
        if hasattr(corpus, name):
            return str(getattr(corpus, name))
    return None


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainArgs:
    arch: str
    out: Path
    minutes: float
    threads: int = 1
    seed: int = 0
    steps: int | None = None  # fixes the schedule length (replay); else estimated from --minutes
    lr: float = 1.5e-3
    batch_seconds: float = 32.0  # padded audio per batch
    max_batch_size: int = 24
    eval_every_minutes: float = 10.0
    dev_subset: int = 150
    train_limit: int | None = None
    command: str = ""


def train(
    args: TrainArgs,
    train_utts: Sequence[UtteranceLike],
    dev_utts: Sequence[UtteranceLike],
    charset: str,
    extra_info: dict[str, Any] | None = None,
) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """Train; save a checkpoint to args.out at each dev evaluation. Returns (model, processor, info)."""
    import torch

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)  # HF SpecAugment draws its masks from the global numpy RNG
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)

    vocab = build_vocab(charset)
    with tempfile.TemporaryDirectory() as td:
        processor = build_processor(vocab, Path(td))
    model = build_model(args.arch, vocab)
    bundle = speech_model(model, processor, args.arch)  # what the evaluator takes; shares `model`
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[train] arch={args.arch} params={n_params:,} train={len(train_utts)} dev={len(dev_utts)}",
          flush=True)

    examples = [Example(np.asarray(u.audio, dtype=np.float32), encode_text(u.text, vocab))
                for u in train_utts]
    lengths = [len(e.audio) for e in examples]
    train_hours = sum(lengths) / SAMPLE_RATE / 3600
    max_batch_samples = int(args.batch_seconds * SAMPLE_RATE)
    dev_eval = list(dev_utts[: args.dev_subset])

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name.lower() or "bias" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.98), eps=1e-8,
    )

    total_steps = args.steps or 10**9
    estimating = args.steps is None
    budget_s = args.minutes * 60.0
    hard_stop_s = budget_s * 1.15  # CPU contention can make the estimate optimistic: stop anyway
    info: dict[str, Any] = {
        "arch": args.arch, "model_class": type(model).__name__, "command": args.command, "seed": args.seed,
        "threads": args.threads, "params": n_params, "config": ARCH_CONFIGS[args.arch],
        "train_utterances": len(examples), "train_hours": round(train_hours, 3), "peak_lr": args.lr,
        "train_voices": sorted({str(getattr(u, "voice", "")) for u in train_utts} - {""}),
        "batch_seconds": args.batch_seconds, "max_batch_size": args.max_batch_size, "history": [],
        **(extra_info or {}),
    }

    model.train()
    step, epoch, audio_seen = 0, 0, 0.0
    t0 = time.monotonic()
    last_eval = t0
    loss_ema: float | None = None
    done = False
    while not done:
        for batch in make_batches(lengths, max_batch_samples, args.max_batch_size, rng):
            x, mask, labels = collate([examples[i] for i in batch], rng, augment=True)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total_steps, args.lr)
            loss = model(x, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
            opt.step()
            step += 1
            audio_seen += float(mask.sum()) / SAMPLE_RATE
            lv = float(loss.detach())
            loss_ema = lv if loss_ema is None else 0.95 * loss_ema + 0.05 * lv
            elapsed = time.monotonic() - t0

            # Fix the step budget from measured speed: re-estimated over the first 30% of the budget
            # (the schedule needs a length; steps/s on a shared CPU drifts early on), then frozen.
            if estimating and step >= 20 and step % 20 == 0:
                total_steps = max(step + 1, int(step * budget_s / elapsed))
                if elapsed > 0.3 * budget_s:
                    estimating = False
                    print(f"[train] step budget fixed at {total_steps}", flush=True)
            if step % 25 == 0:
                print(
                    f"[train] step {step}/{total_steps} ep {epoch} loss {lv:.3f} ema {loss_ema:.3f} "
                    f"gnorm {gnorm:.2f} lr {opt.param_groups[0]['lr']:.2e} {elapsed / 60:.1f} min "
                    f"{audio_seen / max(elapsed, 1e-9):.1f} audio-s/s",
                    flush=True,
                )
            stop = step >= total_steps or elapsed > hard_stop_s
            if time.monotonic() - last_eval > args.eval_every_minutes * 60 and not stop:
                rates = evaluate_local(bundle, dev_eval)
                info["history"].append(
                    {"step": step, "minutes": round(elapsed / 60, 2), "loss_ema": round(loss_ema, 4), **rates}
                )
                print(f"[dev] step {step} subset({len(dev_eval)}) wer {rates['wer']:.3f} "
                      f"cer {rates['cer']:.3f}", flush=True)
                info.update(steps=step, train_minutes=round(elapsed / 60, 2), epochs=round(epoch, 2),
                            status="partial")
                save_checkpoint(model, processor, args.out, info)
                last_eval = time.monotonic()
            if stop:
                done = True
                break
        epoch += 1
    elapsed = time.monotonic() - t0
    info.update(
        steps=step, planned_steps=total_steps, train_minutes=round(elapsed / 60, 2),
        epochs=round(audio_seen / 3600 / max(train_hours, 1e-9), 2), final_loss_ema=round(loss_ema or 0.0, 4),
    )
    model.eval()
    return model, processor, info


def _load_corpus(split: str, limit: int | None) -> list[Any]:
    from sq_plugin.speech.corpus import load_split

    return load_split(split, limit=limit, progress=False)


def _final_eval(bundle: SpeechModel, utts: Sequence[Any]) -> dict[str, Any]:
    """Full-split figures through `sq_plugin.speech.evaluate.evaluate` (batched, its text normalization).
    Should that fail, the one-at-a-time `evaluate_local` is recorded instead (named in "evaluator"):
    a scoring error must not lose an hour of training."""
    from sq_plugin.speech.evaluate import evaluate

    try:
        res = evaluate(bundle, utts, progress=False)
        return {"wer": float(res.wer), "cer": float(res.cer), "n": int(res.n),
                "evaluator": "sq_plugin.speech.evaluate"}
    except Exception as exc:
        print(f"[eval] sq_plugin.speech.evaluate failed ({exc!r}); using evaluate_local", flush=True)
    rates: dict[str, Any] = dict(evaluate_local(bundle, utts))
    rates["evaluator"] = "tools/train_ctc.py:evaluate_local"
    return rates


# Fixed subset for the fast unit test (tests/speech/test_models.py): first N test utterances.
TEST_SUBSET = 40


def final_figures(model: torch.nn.Module, processor: Any, arch: str, dev_utts: Sequence[Any],
                  test_utts: Sequence[Any]) -> dict[str, Any]:
    """Full dev/test WER/CER plus the fixed test subset that the unit test re-checks."""
    bundle = speech_model(model, processor, arch)
    return {
        "dev": _final_eval(bundle, dev_utts),
        "test": _final_eval(bundle, test_utts),
        "test_subset": {"first_n": TEST_SUBSET, **evaluate_local(bundle, test_utts[:TEST_SUBSET])},
    }


def _training_voices(info: dict[str, Any]) -> list[str] | None:
    """Voices the model was trained on: recorded by the run, else from its corpus version's manifest."""
    if info.get("train_voices"):
        return list(info["train_voices"])
    from sq_plugin.speech.corpus import default_cache_dir

    manifest = default_cache_dir() / "corpus" / str(info.get("corpus_version")) / "train.manifest.json"
    return json.loads(manifest.read_text()).get("voices") if manifest.exists() else None


def record_eval_provenance(info: dict[str, Any], test_utts: Sequence[Any]) -> None:
    """Which corpus the figures come from, and proof that the test voices were held out of training.

    The corpus version can change after training (the generator's voice lists were still being
    tuned); the figures must then come from the current test split, which is fine as long as its
    voices (and sentences, disjoint by construction in `sentences.sentence_split`) were never trained on.
    """
    info["eval_corpus_version"] = corpus_version()
    test_voices = sorted({str(getattr(u, "voice", "")) for u in test_utts} - {""})
    train_voices = _training_voices(info)
    info["test_voices"] = test_voices
    if train_voices is not None:
        info["train_voices"] = sorted(train_voices)
        overlap = sorted(set(test_voices) & set(train_voices))
        info["test_voices_held_out"] = not overlap
        if overlap:
            print(f"[eval] WARNING: test voices {overlap} were in the training data", flush=True)


def reevaluate(out: Path) -> dict[str, Any]:
    """Re-score a saved checkpoint on the current corpus (e.g. after a corpus version change)."""
    from transformers import AutoModelForCTC, Wav2Vec2Processor

    info = json.loads((out / "training.json").read_text())
    model = AutoModelForCTC.from_pretrained(str(out)).eval()
    processor = Wav2Vec2Processor.from_pretrained(str(out))
    dev_utts, test_utts = _load_corpus("dev", None), _load_corpus("test", None)
    info.update(final_figures(model, processor, info["arch"], dev_utts, test_utts))
    record_eval_provenance(info, test_utts)
    save_checkpoint(model, processor, out, info)
    return info


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=sorted(ARCH_CONFIGS), required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--minutes", type=float, default=60.0, help="training wall-clock budget")
    p.add_argument("--steps", type=int, default=None, help="fix the step count (replays a recorded run)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--batch-seconds", type=float, default=32.0)
    p.add_argument("--eval-every-minutes", type=float, default=10.0)
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N train utterances")
    p.add_argument("--eval-only", action="store_true", help="re-score the checkpoint in --out; no training")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    if a.eval_only:
        info = reevaluate(a.out)
        print(f"[final] dev {info['dev']} test {info['test']} subset {info['test_subset']}", flush=True)
        return 0
    command = "python tools/train_ctc.py " + " ".join(sys.argv[1:] if argv is None else argv)
    args = TrainArgs(
        arch=a.arch, out=a.out, minutes=a.minutes, threads=a.threads, seed=a.seed, steps=a.steps, lr=a.lr,
        batch_seconds=a.batch_seconds, eval_every_minutes=a.eval_every_minutes, train_limit=a.train_limit,
        command=command,
    )
    from sq_plugin.speech.sentences import CHARSET

    t_load = time.monotonic()
    train_utts = _load_corpus("train", args.train_limit)
    dev_utts = _load_corpus("dev", None)
    print(f"[data] loaded train/dev in {time.monotonic() - t_load:.0f} s", flush=True)
    extra = {"corpus_version": corpus_version(), "charset": CHARSET}
    model, processor, info = train(args, train_utts, dev_utts, CHARSET, extra)
    del train_utts
    test_utts = _load_corpus("test", None)
    info.update(final_figures(model, processor, args.arch, dev_utts, test_utts))
    record_eval_provenance(info, test_utts)
    info["status"] = "final"
    save_checkpoint(model, processor, args.out, info)
    print(f"[final] dev {info['dev']} test {info['test']} subset {info['test_subset']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
