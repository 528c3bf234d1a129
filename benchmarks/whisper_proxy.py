"""Does Whisper's search proxy agree with the WER that decoding gives? One layer at a time, a few candidates.

The search scores Whisper by its teacher-forced loss on the calibration set (`tf_loss`: nats per token of the
float model's own transcripts), because decoding every candidate is slow. This measures how well that proxy ranks
candidate ranges the way the test WER does. From a base plan (every layer on the MSE rule at --bits), each layer of
--layers in turn takes each candidate range (cut-offs then MSE, MAX, the L2-histogram rule) while the others stay;
for every configuration: tf_loss on the calibration set (what the search sees), tf_loss on the test set (the same
proxy on unseen audio) and the test WER (free-running greedy decoding, fake-quant simulation).

    python benchmarks/whisper_proxy.py --bits w6a6 --calib 16 --eval 60

Writes benchmarks/results/whisper_proxy.json and .md: every configuration, and per layer and over all of them the
Spearman rank correlation of each proxy with the WER.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch
from common import RESULTS, atomic_write, device_name
from scipy.stats import spearmanr

from sq_plugin.backends.simulate import plan_layer_quants, simulate
from sq_plugin.core.plan import QuantPlan
from sq_plugin.core.quant import grid_bits
from sq_plugin.core.ranges import RangeRule, compute_range, l2_histogram_range
from sq_plugin.families.whisper import EVAL_BATCH, whisper_score, whisper_statistics
from sq_plugin.search.rules import layer_ops, rule_plan
from sq_plugin.speech.corpus import load_split
from sq_plugin.speech.evaluate import evaluate
from sq_plugin.speech.models import load_model

# The layers StableQuant's W6A6 search flagged first on Whisper tiny.en (BENCHMARKS.md, corpus v1).
DEFAULT_LAYERS = ("model.encoder.conv2", "model.encoder.layers.0.fc1", "model.encoder.layers.1.fc2",
                  "model.decoder.layers.0.fc2")
CANDIDATES = ("p100", "p99.99", "p99.9", "p99", "max", "l2_histogram")


def candidate_range(hist, candidate: str, a_bits: int) -> tuple[float, float]:
    args = dict(bits=a_bits, symmetric=False, signed=False)
    if candidate == "l2_histogram":
        lo, hi = l2_histogram_range(hist, **args)
    elif candidate == "max":
        lo, hi = compute_range(hist, RangeRule("max"), **args)
    else:
        lo, hi = compute_range(hist, RangeRule("percentile_then_mse", float(candidate[1:])), **args)
    return float(lo[0]), float(hi[0])


def spearman(x: list[float], y: list[float]) -> float | None:
    if len(set(x)) < 2 or len(set(y)) < 2:
        return None  # a constant column ranks nothing
    return float(spearmanr(x, y).statistic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", default="w6a6")
    parser.add_argument("--calib", type=int, default=16)
    parser.add_argument("--eval", type=int, default=60)
    parser.add_argument("--layers", default=",".join(DEFAULT_LAYERS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="whisper_proxy")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    w_bits, a_bits = (int(v) for v in args.bits.lower().removeprefix("w").split("a"))
    command = "python benchmarks/whisper_proxy.py " + " ".join(sys.argv[1:])
    start = time.perf_counter()

    bundle = load_model("openai/whisper-tiny.en")
    dev, test = load_split("dev", limit=args.calib, progress=False), load_split("test", limit=args.eval, progress=False)
    dev_loss, _ = whisper_score(bundle, dev, "tf_loss")
    test_loss, _ = whisper_score(bundle, test, "tf_loss")
    hists = whisper_statistics(bundle, dev)
    base = rule_plan(hists, layer_ops(bundle.model), RangeRule("percentile_then_mse", 100.0), w_bits=w_bits,
                     a_bits=a_bits, int8_grid="full")
    a_grid = grid_bits(w_bits, a_bits, "full")[1]
    fp_wer = evaluate(bundle, test, batch_size=EVAL_BATCH, progress=False).wer

    def measure(plan: QuantPlan) -> dict[str, float]:
        with simulate(bundle.model, plan_layer_quants(plan)), torch.inference_mode():
            dev_tf, test_tf = dev_loss(), test_loss()
        with simulate(bundle.model, plan_layer_quants(plan)):
            wer = evaluate(bundle, test, batch_size=EVAL_BATCH, progress=False).wer
        return {"dev_tf_loss": dev_tf, "test_tf_loss": test_tf, "test_wer": wer}

    rows = [{"layer": "(base: every layer MSE)", "candidate": "-", **measure(base)}]
    print(rows[-1], flush=True)
    for layer in args.layers.split(","):
        for candidate in CANDIDATES:
            rng = candidate_range(hists[layer], candidate, a_grid)
            layers = dict(base.layers)
            layers[layer] = dataclasses.replace(layers[layer], act_range=rng)
            measured = measure(QuantPlan(layers, base.provenance))
            rows.append({"layer": layer, "candidate": candidate, "range": rng, **measured})
            print(rows[-1], flush=True)

    def agreement(subset: list[dict]) -> dict[str, float | None]:
        wer = [r["test_wer"] for r in subset]
        return {"dev_tf_loss": spearman([r["dev_tf_loss"] for r in subset], wer),
                "test_tf_loss": spearman([r["test_tf_loss"] for r in subset], wer)}

    per_layer = {layer: agreement([r for r in rows if r["layer"] == layer]) for layer in args.layers.split(",")}
    overall = agreement(rows)
    payload = {"command": command, "date": time.strftime("%Y-%m-%d"), "cpu": device_name(), "bits": args.bits,
               "calib": len(dev), "eval": len(test), "fp_wer": fp_wer, "rows": rows, "spearman": per_layer,
               "spearman_overall": overall, "seconds": time.perf_counter() - start}
    atomic_write(RESULTS / f"{args.out}.json", json.dumps(payload, indent=2, allow_nan=False) + "\n")

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:+.2f}"

    lines = [f"Whisper tiny.en {args.bits.upper()} simulation, {len(dev)} dev / {len(test)} test utterances, FP test "
             f"WER {fp_wer * 100:.2f} % (`{command}`, {device_name()})", "",
             "| layer | candidate | dev tf_loss | test tf_loss | test WER % |", "|---|---|---:|---:|---:|"]
    lines += [f"| `{r['layer']}` | {r['candidate']} | {r['dev_tf_loss']:.4f} | {r['test_tf_loss']:.4f} | "
              f"{r['test_wer'] * 100:.2f} |" for r in rows]
    lines += ["", "Spearman rank correlation with the test WER (1 = the proxy ranks candidates as the WER does):", "",
              "| layer | dev tf_loss (the search's view) | test tf_loss |", "|---|---:|---:|"]
    lines += [f"| `{layer}` | {fmt(a['dev_tf_loss'])} | {fmt(a['test_tf_loss'])} |" for layer, a in per_layer.items()]
    lines += [f"| all configurations | {fmt(overall['dev_tf_loss'])} | {fmt(overall['test_tf_loss'])} |", ""]
    atomic_write(RESULTS / f"{args.out}.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
