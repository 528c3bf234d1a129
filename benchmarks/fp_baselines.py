"""Float baselines of the offline testbed on the corpus test split (the figures in BENCHMARKS.md).

Rows: Whisper tiny.en converted to transformers (FP32), the same file run by ctranslate2 in float32
and int8 (the peer a Whisper user picks today), and each shipped CTC reference (FP32). Also the WER
between the converted model's transcripts and ctranslate2 float32's (conversion parity, ~0).

    python benchmarks/fp_baselines.py [--models whisper,sq/wav2vec2-ref,sq/hubert-ref] [--limit N]

Writes benchmarks/results/fp_baselines.json and benchmarks/results/fp_baselines.md (atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, atomic_write  # noqa: E402
from whisper_parity import ct2_transcribe, pair_wer  # noqa: E402

from sq_plugin.speech.corpus import load_split  # noqa: E402
from sq_plugin.speech.evaluate import cer, evaluate, wer  # noqa: E402
from sq_plugin.speech.models import load_model  # noqa: E402
from sq_plugin.speech.whisper_ct2 import default_model_dir  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="whisper,sq/wav2vec2-ref,sq/hubert-ref")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="fp_baselines")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    utterances = load_split(args.split, limit=args.limit)
    refs = [u.text for u in utterances]
    rows: list[dict] = []
    common = {"split": args.split, "n_eval": len(utterances), "threads": args.threads}
    for name in args.models.split(","):
        if name == "whisper":
            bundle = load_model("openai/whisper-tiny.en")
            result = evaluate(bundle, utterances, batch_size=8)
            rows.append({"model": "whisper-tiny.en", "runtime": "transformers (converted)", "precision": "fp32",
                         "wer": result.wer, "cer": result.cer, "seconds": result.seconds, **common})
            hf = {r.id: r.hypothesis for r in result.utterances}
            hf_texts = [hf[u.id] for u in utterances]
            fe, tok = bundle.processor.feature_extractor, bundle.processor.tokenizer
            features = fe([u.audio for u in utterances], sampling_rate=16000, return_tensors="np").input_features
            ct2_texts = {}
            for compute_type in ("float32", "int8"):
                texts, secs = ct2_transcribe(str(default_model_dir()), features, tok, compute_type, 8)
                ct2_texts[compute_type] = texts
                rows.append({"model": "whisper-tiny.en", "runtime": "ctranslate2", "precision": compute_type,
                             "wer": wer(refs, texts), "cer": cer(refs, texts), "seconds": secs, **common})
            rows[-3]["wer_vs_ctranslate2_fp32"] = pair_wer(ct2_texts["float32"], hf_texts)
            rows[-3]["identical_to_ctranslate2_fp32"] = sum(a == b for a, b in zip(hf_texts, ct2_texts["float32"],
                                                                                     strict=True))
        else:
            bundle = load_model(name)
            start = time.perf_counter()
            result = evaluate(bundle, utterances, batch_size=8)
            rows.append({"model": name, "runtime": "transformers", "precision": "fp32", "wer": result.wer,
                         "cer": result.cer, "seconds": time.perf_counter() - start,
                         "params": bundle.info.get("params"), **common})

    meta = {"command": "python benchmarks/" + " ".join([Path(__file__).name, *sys.argv[1:]]),
            "machine": f"{platform.machine()} {os.cpu_count()} cores", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d")}
    atomic_write(RESULTS / f"{args.out}.json", json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"Command: `{meta['command']}` ({meta['machine']}, torch {meta['torch']}, {meta['date']})", "",
             "| model | runtime | precision | WER | CER | utterances | seconds |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['runtime']} | {r['precision']} | {r['wer']:.4f} | {r['cer']:.4f} | "
                     f"{r['n_eval']} | {r['seconds']:.0f} |")
    for r in rows:
        if "wer_vs_ctranslate2_fp32" in r:
            lines.append("")
            lines.append(f"Conversion parity: WER of the converted model's transcripts against ctranslate2 "
                         f"float32's = {r['wer_vs_ctranslate2_fp32']:.4f}; identical transcripts "
                         f"{r['identical_to_ctranslate2_fp32']}/{r['n_eval']}.")
    atomic_write(RESULTS / f"{args.out}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
