"""Why a W8A8 model loses WER: per-layer ablations on the test split, and the input histogram.

Fake-quant simulation (the same math the INT8 kernels compute, up to rounding ties) of the whole
model with MSE ranges from the calibration (dev) histograms, then the same with one layer kept
float at a time, and with the first layer's cut-off at each candidate percentile. Also the first
layer alone at MAX on dev and on test (what the screen sees vs what the test split sees), and the
CTC loss per character on dev of every layer alone at MAX (the ctc_loss proxy of the search).

    python benchmarks/layer_diagnosis.py --model sq/wav2vec2-ref

Writes benchmarks/results/layer_diagnosis_<model>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np
import torch
from common import RESULTS, atomic_write

from sq_plugin.backends.simulate import LayerQuant, quantizable_layers, simulate, strip_weight_norm
from sq_plugin.core.ranges import RangeRule, compute_range
from sq_plugin.families.ctc import EVAL_KWARGS, ctc_inputs, ctc_labels, ctc_loss_per_char
from sq_plugin.search import collect_input_histograms
from sq_plugin.speech.corpus import load_split
from sq_plugin.speech.evaluate import evaluate
from sq_plugin.speech.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sq/wav2vec2-ref")
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--calib", type=int, default=200)
    parser.add_argument("--eval", type=int, default=600)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    bundle = load_model(args.model)
    model = strip_weight_norm(bundle.model.eval())
    dev, test = load_split("dev", limit=args.calib), load_split("test", limit=args.eval)
    modules = quantizable_layers(model)
    names = list(modules)
    convs = [n for n in names if isinstance(modules[n], torch.nn.Conv1d)]
    first = names[0]
    dev_inputs = [ctc_inputs(bundle, u.audio) for u in dev]

    def run_calibration() -> None:
        with torch.inference_mode():
            for x in dev_inputs:
                model(*x)

    hists = collect_input_histograms(model, run_calibration, names)

    def act_range(name: str, rule: RangeRule) -> tuple[float, float]:
        lo, hi = compute_range(hists[name], rule, bits=args.bits, symmetric=False, signed=False, name=name)
        return float(lo[0]), float(hi[0])

    mse = {n: act_range(n, RangeRule("percentile_then_mse", 100.0, 100)) for n in names}
    mx = {n: act_range(n, RangeRule("max")) for n in names}

    def plan(ranges: dict[str, tuple[float, float]], skip: str | None = None) -> dict[str, LayerQuant]:
        return {n: LayerQuant(act_range=ranges[n], a_bits=args.bits, w_bits=args.bits) for n in ranges if n != skip}

    def wer_cer(p: dict[str, LayerQuant], utts: list[Any]) -> dict[str, float]:
        with simulate(model, p), torch.inference_mode():
            r = evaluate(bundle, utts, progress=False, **EVAL_KWARGS)
        return {"wer": r.wer, "cer": r.cer}

    rows: list[dict[str, Any]] = []

    def add(what: str, p: dict[str, LayerQuant]) -> None:
        rows.append({"what": what, **wer_cer(p, test)})
        print(f"{what:60s} WER {rows[-1]['wer']:.4f} CER {rows[-1]['cer']:.4f}", flush=True)

    add("float", {})
    add("all layers, MAX ranges", plan(mx))
    add("all layers, MSE ranges", plan(mse))
    add("all Linear layers only (MSE), every Conv1d float", {k: v for k, v in plan(mse).items() if k not in convs})
    for c in convs:
        add(f"all (MSE) but `{c}` float", plan(mse, skip=c))
    for p in (99.99, 99.9, 99.8, 99.5, 99.0):
        add(f"all (MSE), `{first}` cut at p{p:g} then MSE",
            plan({**mse, first: act_range(first, RangeRule("percentile_then_mse", p, 100))}))

    alone = {"layer": first, "dev": {}, "test": {}}
    for split, utts in (("dev", dev), ("test", test)):
        alone[split] = {"float": wer_cer({}, utts), "alone_max": wer_cer(plan({first: mx[first]}), utts)}

    labels, blank = ctc_labels(bundle, dev), int(bundle.model.config.pad_token_id)
    base_loss = ctc_loss_per_char(model, dev_inputs, labels, blank=blank)
    screen = []
    for n in names:
        with simulate(model, plan({n: mx[n]})):
            screen.append({"layer": n, "ctc_loss_delta": ctc_loss_per_char(model, dev_inputs, labels, blank=blank)
                           - base_loss})

    h = hists[first]
    step = (mx[first][1] - mx[first][0]) / (2**args.bits - 1)
    centers, counts = np.asarray(h.bin_centers()).reshape(-1), h.counts.reshape(-1)
    histogram = {"max_range": mx[first], "mse_range": mse[first],
                 "p99.9_range": act_range(first, RangeRule("percentile", 99.9, 100)), "step_at_max": step,
                 "share_within_one_step_of_zero": float(counts[np.abs(centers) < step].sum() / counts.sum())}

    payload = {"command": "python benchmarks/layer_diagnosis.py " + " ".join(sys.argv[1:]),
               "date": time.strftime("%Y-%m-%d"), "model": args.model, "bits": args.bits, "n_calib": len(dev),
               "n_eval": len(test), "test_split": rows, "first_layer_alone": alone, "dev_ctc_loss_screen": screen,
               "first_layer_histogram": histogram, "seconds": time.perf_counter() - start}
    slug = args.model.replace("/", "_")
    atomic_write(RESULTS / f"layer_diagnosis_{slug}.json", json.dumps(payload, indent=2, allow_nan=False) + "\n")
    atomic_write(RESULTS / f"layer_diagnosis_{slug}.md", table(payload))
    print(table(payload))


def table(d: dict[str, Any]) -> str:
    fp = d["test_split"][0]
    lines = [f"W{d['bits']}A{d['bits']} simulation of {d['model']} on {d['n_eval']} test utterances "
             f"(ranges from {d['n_calib']} dev utterances)", "",
             "| configuration | WER % | ΔWER pp | CER % |", "|---|---:|---:|---:|"]
    for r in d["test_split"]:
        lines.append(f"| {r['what']} | {r['wer'] * 100:.2f} | {(r['wer'] - fp['wer']) * 100:+.2f} | "
                     f"{r['cer'] * 100:.2f} |")
    a = d["first_layer_alone"]
    lines += ["", f"`{a['layer']}` alone at MAX ranges (the screen's view):", "",
              "| split | float WER % | alone WER % | ΔWER pp |", "|---|---:|---:|---:|"]
    for split in ("dev", "test"):
        f, q = a[split]["float"]["wer"], a[split]["alone_max"]["wer"]
        lines.append(f"| {split} | {f * 100:.2f} | {q * 100:.2f} | {(q - f) * 100:+.2f} |")
    ranked = sorted(d["dev_ctc_loss_screen"], key=lambda r: -r["ctc_loss_delta"])[:5]
    lines += ["", "Largest CTC-loss increases on dev, one layer at a time at MAX ranges (nats per character):", "",
              "| layer | Δ ctc_loss |", "|---|---:|"]
    lines += [f"| `{r['layer']}` | {r['ctc_loss_delta']:+.5f} |" for r in ranked]
    h = d["first_layer_histogram"]
    lines += ["", f"Input of `{a['layer']}`: MAX range ({h['max_range'][0]:.2f}, {h['max_range'][1]:.2f}), "
              f"8-bit step {h['step_at_max']:.3f}; MSE range ({h['mse_range'][0]:.2f}, {h['mse_range'][1]:.2f}); "
              f"99.9th-percentile range ({h['p99.9_range'][0]:.2f}, {h['p99.9_range'][1]:.2f}); "
              f"{h['share_within_one_step_of_zero'] * 100:.1f} % of samples lie within one MAX step of zero.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
