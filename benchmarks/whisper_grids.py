"""What each x86 INT8 grid costs Whisper tiny.en: W8A8 fake-quant simulation on the full grids, with 7-bit
weights (the default without VNNI), with 7-bit activations, and with 7-bit weights everywhere but the
logits projection (8-bit weights, 7-bit activations there). Every layer takes StableQuant's default rule
(MSE range on the whole histogram, no search), calibrated teacher-forced on --calib dev utterances; WER on
--eval test utterances. A simulation computes the same grid as the INT8 kernels (exact on every kind).

    python benchmarks/whisper_grids.py                  # ~12 min on one core

Writes benchmarks/results/whisper_grids.json and whisper_grids.md (atomically).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from common import RESULTS, atomic_write, device_name

from sq_plugin.core.ranges import RangeRule
from sq_plugin.families.whisper import EVAL_BATCH, quantize_whisper_simulated
from sq_plugin.speech.corpus import load_split
from sq_plugin.speech.evaluate import evaluate
from sq_plugin.speech.models import load_model

VARIANTS = {  # name -> (grid, layers that take W8A7 instead)
    "full": ("full", ()),
    "narrow_weights": ("narrow_weights", ()),
    "narrow_activations": ("narrow_activations", ()),
    "narrow_weights, proj_out W8A7": ("narrow_weights", ("proj_out",)),
}


def quantize(bundle, dev, grid: str, w8a7: tuple[str, ...]):  # type: ignore[no-untyped-def]
    rule = RangeRule("percentile_then_mse", 100.0)
    quantized = quantize_whisper_simulated(bundle, dev, act_rule=rule, int8_grid=grid)
    if w8a7:  # swap in those layers as simulated on the other narrowing (their hooks and weights come along)
        other = dict(quantize_whisper_simulated(bundle, dev, act_rule=rule, int8_grid="narrow_activations")
                     .bundle.model.named_modules())
        mine = dict(quantized.bundle.model.named_modules())
        for name in w8a7:
            parent, _, leaf = name.rpartition(".")
            setattr(mine[parent] if parent else quantized.bundle.model, leaf, other[name])
    return quantized


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib", type=int, default=16)
    parser.add_argument("--eval", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    bundle = load_model("openai/whisper-tiny.en")
    dev, test = load_split("dev", limit=args.calib), load_split("test", limit=args.eval)
    fp = evaluate(bundle, test, batch_size=EVAL_BATCH, progress=False)
    rows = [{"variant": "fp32", "wer": fp.wer, "cer": fp.cer, "n_eval": fp.n}]
    for name, (grid, w8a7) in VARIANTS.items():
        result = evaluate(quantize(bundle, dev, grid, w8a7).bundle, test, batch_size=EVAL_BATCH, progress=False)
        rows.append({"variant": name, "wer": result.wer, "cer": result.cer, "n_eval": result.n})
        print(f"{name}: WER {result.wer:.4f} ({(result.wer - fp.wer) * 100:+.2f} pp)", file=sys.stderr, flush=True)
    command = "python benchmarks/whisper_grids.py " + " ".join(sys.argv[1:])
    payload = {"rows": rows, "command": command.strip(), "device": device_name(), "date": time.strftime("%Y-%m-%d"),
               "calib": args.calib, "seconds": round(time.perf_counter() - start)}
    lines = [f"Whisper tiny.en W8A8 fake-quant simulation per x86 grid; `{payload['command']}`; {payload['device']}; "
             f"{args.calib} dev utterances, {args.eval} test utterances.", "",
             "| variant | WER % | ΔWER pp | CER % |", "|---|---:|---:|---:|"]
    for r in rows:
        delta = (r["wer"] - fp.wer) * 100
        lines.append(f"| {r['variant']} | {r['wer'] * 100:.2f} | {delta:+.2f} | {r['cer'] * 100:.2f} |")
    atomic_write(RESULTS / "whisper_grids.json", json.dumps(payload, indent=2) + "\n")
    atomic_write(RESULTS / "whisper_grids.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
