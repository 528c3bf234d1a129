"""Mixed-precision weights against uniform widths: WER against size, lossless by a paired significance test.

    python benchmarks/mixed_precision.py                                  # both CTC references, then Whisper
    python benchmarks/mixed_precision.py --models sq/wav2vec2-ref --test 200 --steps 100   # quicker

Per model: StableQuant's W8A8 search decides the activation ranges (calibration split: dev), which every row
below shares (8-bit activations); then the weights:

- `stablequant-w8`: every layer 8 bits (per-channel MAX, what StableQuant W8A8 runs);
- `uniform-w{6,5,4,3,2}`: every layer at that width, per-channel MSE clipping;
- `mixed-ptq@B`: the widths {4,5,6,8} (the library's default for PTQ; `mixed-ptq[2/3/4/5/6/8]@B` with all of
  them) allocated by integer linear programming under a mean of B bits, from each layer's measured
  sensitivity (the dev metric with only that layer quantized: CTC loss per character for CTC models,
  teacher-forced loss for Whisper); no training;
- `mixed-two-stage@B`, `mixed-one-stage@B`: the seed paper's baseline and method (`sq_plugin.search.mixed_training`),
  trained on the train split, at the smallest budget B where mixed-ptq was lossless (or the lowest budget).

Every quantized row runs on oneDNN INT8 kernels (weights narrower than 8 bits are int8 values on their narrower
grid), so the compression is in storage: `executed` says "int8-kernels" for 8-bit weights and "storage-only" for
narrower ones, whose packed checkpoint (`sq_plugin.backends.packed`) is what `bytes` measures, on disk, against the
float32 state_dict (`fp32_bytes`). "lossless": the 95% paired-bootstrap interval of ΔWER against float does not lie
above 0 (no significant WER increase at p < 0.05).

Writes benchmarks/results/mixed_precision.json (rows merged by model and method), mixed_precision.md, and per
model a Pareto plot and a per-layer width chart under benchmarks/results/mixed_precision/.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch
from common import RESULTS, atomic_write, device_name

from sq_plugin.backends.packed import fp32_nbytes, packed_size
from sq_plugin.core.mixed import PTQ_WIDTHS
from sq_plugin.core.significance import paired_bootstrap
from sq_plugin.families.mixed import family_sensitivity, folded_model, quantize_mixed, train_mixed
from sq_plugin.mixed_report import bits_chart, pareto_chart
from sq_plugin.search import SearchConfig
from sq_plugin.search.mixed_precision import SensitivityResult, mixed_plan, stored_weights
from sq_plugin.search.mixed_training import MixedTrainConfig
from sq_plugin.speech.corpus import load_split
from sq_plugin.speech.evaluate import evaluate, word_errors
from sq_plugin.speech.models import load_model

OUT = RESULTS / "mixed_precision"
JSON = RESULTS / "mixed_precision.json"
MD = RESULTS / "mixed_precision.md"
KEY = ("model", "method")
# Per model: the search's metric and threshold (as the shipped recipes), and the split sizes.
SETTINGS = {
    "sq/wav2vec2-ref": {"metric": "wer", "threshold": 0.0025, "dev": 48, "test": 600, "train": 1000, "batch": 1,
                        "steps": 400},
    "sq/hubert-ref": {"metric": "wer", "threshold": 0.0025, "dev": 48, "test": 600, "train": 1000, "batch": 1,
                      "steps": 400},
    "openai/whisper-tiny.en": {"metric": "tf_loss", "threshold": 0.01, "dev": 16, "test": 200, "train": 400,
                               "batch": 4, "steps": 100},
}


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def eval_kwargs(bundle: Any) -> dict[str, Any]:
    """As the runner evaluates: CTC one utterance at a time in 2-s buckets (what the INT8 graphs take, and the
    float row sees the same inputs); Whisper in generate() batches."""
    from sq_plugin.families.ctc import EVAL_KWARGS
    from sq_plugin.families.whisper import EVAL_BATCH

    return {"batch_size": EVAL_BATCH} if bundle.kind == "whisper" else dict(EVAL_KWARGS)


def score(bundle: Any, test: list, fp: dict[str, Any]) -> dict[str, Any]:
    result = evaluate(bundle, test, progress=False, **eval_kwargs(bundle))
    refs = [u.reference for u in fp["result"].utterances]
    by_id = {u.id: u.hypothesis for u in result.utterances}
    errors, _ = word_errors(refs, [by_id[u.id] for u in fp["result"].utterances])
    delta = paired_bootstrap(fp["errors"], errors, fp["words"])
    return {"wer": result.wer, "wer_delta": delta.delta, "wer_ci95": [delta.low, delta.high],
            "wer_delta_p": delta.p_value, "lossless": not delta.low > 0, "n_eval": result.n,
            "eval_seconds": round(result.seconds, 1)}


def run_model(name: str, args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from sq_plugin.families.ctc import search_ctc
    from sq_plugin.families.whisper import search_whisper

    cfg = SETTINGS[name]
    n_test = args.test or cfg["test"]
    bundle = load_model(name)
    dev = load_split("dev", limit=args.dev or cfg["dev"], progress=False)
    test = load_split("test", limit=n_test, progress=False)
    train = load_split("train", limit=args.train or cfg["train"], progress=False)
    folded = folded_model(bundle)
    fp32 = fp32_nbytes(folded)
    rows: list[dict[str, Any]] = []
    extras: dict[str, Any] = {"allocations": {}}

    say(f"{name}: float on {len(test)} test utterances")
    fp_result = evaluate(bundle, test, progress=False, **eval_kwargs(bundle))
    refs = [u.reference for u in fp_result.utterances]
    fp_errors, words = word_errors(refs, [u.hypothesis for u in fp_result.utterances])
    fp = {"result": fp_result, "errors": fp_errors, "words": words, "test": test, "dev": dev}
    base_row = {"model": name, "fp_wer": fp_result.wer, "fp32_bytes": fp32, "n_eval": fp_result.n}
    rows.append({**base_row, "method": "fp", "avg_bits": 32.0, "bytes": fp32, "compression_ratio": 1.0,
                 "wer": fp_result.wer, "wer_delta": 0.0, "wer_ci95": [0.0, 0.0], "lossless": True,
                 "compress_seconds": 0.0, "executed": "float32", "backend": "float32 eager"})

    say(f"{name}: StableQuant W8A8 search on {len(dev)} dev utterances ({cfg['metric']})")
    start = time.perf_counter()
    config = SearchConfig(threshold=cfg["threshold"])
    search = (search_whisper if bundle.kind == "whisper" else search_ctc)(bundle, dev, config, metric=cfg["metric"],
                                                                          progress=False)
    base = search.to_plan({"model": name})
    search_seconds = time.perf_counter() - start
    layers = base.quantized

    def add(method: str, plan: Any, weights: dict, seconds: float, extra: dict | None = None) -> dict[str, Any]:
        say(f"{name}: {method}: INT8 build and evaluation")
        quantized = quantize_mixed(bundle, dev, plan, weights)
        info = packed_size(folded, plan, weights)
        size, avg = info.bytes, info.avg_bits
        bits = {n: plan.layers[n].weight.bits for n in layers}
        row = {**base_row, "method": method, "avg_bits": round(avg, 3), "bytes": size,
               "compression_ratio": round(fp32 / size, 3), **score(quantized.bundle, test, fp),
               "compress_seconds": round(seconds, 1),
               "executed": "int8-kernels" if min(bits.values()) >= 7 else "storage-only",
               "backend": quantized.backend, "int8_kernels": quantized.int8_kernels, **(extra or {})}
        rows.append(row)
        extras["allocations"][method] = bits
        say(f"{name}: {method}: {avg:.2f} bits, {fp32 / size:.2f}x, WER {row['wer'] * 100:.2f} % "
            f"(ΔWER {row['wer_delta'] * 100:+.2f} pp, 95% [{row['wer_ci95'][0] * 100:+.2f}, "
            f"{row['wer_ci95'][1] * 100:+.2f}], lossless={row['lossless']})")
        return row

    if args.int4_only:
        return int4_rows(name, bundle, base, folded, fp, base_row, search_seconds, args), extras
    steps = cfg["steps"] if args.steps is None else args.steps
    if args.train_budget is not None:  # only training rows, at this budget (e.g. one-stage at the two-stage's steps)
        train_rows(name, bundle, train, base, add, args.train_budget, steps, cfg["batch"], search_seconds,
                   args.train_methods, suffix=f"-{steps}steps")
        return rows, extras
    plan8 = mixed_plan(base, dict.fromkeys(layers, 8), method="stablequant-w8")
    if not args.no_uniform_rows:
        add("stablequant-w8", plan8, stored_weights(folded, plan8, rule="max"), search_seconds)
    for width in [] if args.no_uniform_rows else args.uniform:
        start = time.perf_counter()
        plan = mixed_plan(base, dict.fromkeys(layers, width), method=f"uniform-w{width}")
        weights = stored_weights(folded, plan)
        add(f"uniform-w{width}", plan, weights, search_seconds + time.perf_counter() - start)

    saved = OUT / f"{name.replace('/', '__')}_sensitivity.json"
    if args.reuse_sensitivity and saved.exists():  # allocate again (e.g. other widths) on the saved measurement
        sens = SensitivityResult.from_dict(json.loads(saved.read_text()))
        say(f"{name}: sensitivity from {saved} ({sens.evaluations} evaluations, {sens.seconds:.0f} s when measured)")
    else:
        say(f"{name}: sensitivity of {len(layers)} layers x 6 widths")
        sens = family_sensitivity(bundle, dev, layers=layers, progress=False)
        say(f"{name}: sensitivity took {sens.seconds:.0f} s ({sens.evaluations} evaluations)")
    extras["sensitivity"] = sens.to_dict()
    widths = tuple(args.widths)
    label = "mixed-ptq" if widths == PTQ_WIDTHS else f"mixed-ptq[{'/'.join(map(str, widths))}]"
    lossless_budgets = []
    for budget in args.budgets:
        start = time.perf_counter()
        bits = sens.allocate(budget, widths=widths)
        plan = mixed_plan(base, bits, method="mixed-ptq")
        weights = stored_weights(folded, plan)
        row = add(f"{label}@{budget:g}", plan, weights,
                  search_seconds + sens.seconds + time.perf_counter() - start,
                  {"budget_bits": budget, "predicted_metric": sens.predicted(bits)})
        if row["lossless"]:
            lossless_budgets.append(budget)
    target = min(lossless_budgets) if lossless_budgets else min(args.budgets)
    extras["training_budget"] = target
    if steps:
        train_rows(name, bundle, train, base, add, target, steps, cfg["batch"], search_seconds, args.train_methods)
    extras["search_seconds"] = round(search_seconds, 1)
    extras["flagged"] = search.flagged
    return rows, extras


def train_rows(name: str, bundle: Any, train: list, base: Any, add: Any, budget: float, steps: int, batch: int,
               search_seconds: float, methods: list[str], suffix: str = "") -> None:
    """The seed paper's one-stage method and the two-stage baseline at `budget`, `steps` per stage."""
    config = MixedTrainConfig(budget_bits=budget, steps=steps)
    for method in methods:
        say(f"{name}: mixed-{method} at {budget:g} bits, {steps} steps on {len(train)} train utterances")
        result = train_mixed(bundle, train, base, config, method=method, batch_size=batch, progress=False)
        plan = mixed_plan(base, result.bits, method=f"mixed-{method}")
        add(f"mixed-{method}@{budget:g}{suffix}", plan, result.weights, search_seconds + result.seconds,
            {"budget_bits": budget, "train_seconds": round(result.seconds, 1),
             "stage_seconds": {k: round(v, 1) for k, v in result.stage_seconds.items()},
             "train_steps": steps, "train_utterances": len(train), "final_kl": result.history[-1]["kl"]})


def int4_rows(name: str, bundle: Any, base: Any, folded: Any, fp: dict, base_row: dict,
              search_seconds: float, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Weight-only rows on torch's x86 int4 kernel (bf16 activations): uniform 4 bits, and the PTQ allocation at
    each budget with its 4-bit Linears on the kernel (other widths and the convs dequantized to float)."""
    from sq_plugin.families.mixed import family_sensitivity, quantize_int4_kernel

    test = fp["test"]
    layers = base.quantized
    rows = []
    allocations = {"uniform-w4-int4": dict.fromkeys(layers, 4)}
    if args.budgets:
        saved = OUT / f"{name.replace('/', '__')}_sensitivity.json"
        sens = (SensitivityResult.from_dict(json.loads(saved.read_text())) if args.reuse_sensitivity and saved.exists()
                else family_sensitivity(bundle, fp["dev"], layers=layers, progress=False))
        for budget in args.budgets:
            allocations[f"mixed-ptq-int4@{budget:g}"] = sens.allocate(budget)
    for method, bits in allocations.items():
        start = time.perf_counter()
        plan = mixed_plan(base, bits, method=method)
        weights = stored_weights(folded, plan)
        quantized = quantize_int4_kernel(bundle, plan, weights)
        info = packed_size(folded, quantized.plan, weights)
        size, avg = info.bytes, info.avg_bits
        rows.append({**base_row, "method": method, "avg_bits": round(avg, 3), "bytes": size,
                     "compression_ratio": round(base_row["fp32_bytes"] / size, 3), **score(quantized.bundle, test, fp),
                     "compress_seconds": round(search_seconds + time.perf_counter() - start, 1),
                     # every Linear on the kernel, or some layers only compressed on disk (dequantized at load)
                     "executed": "int4-kernel" if quantized.op_counts["dequantized"] == 0 else
                     "int4-kernel+storage-only", "backend": quantized.backend, "int8_kernels": 0,
                     "int4_linears": quantized.op_counts["int4_linear"],
                     "dequantized_layers": quantized.op_counts["dequantized"]})
        r = rows[-1]
        say(f"{name}: {method}: {avg:.2f} bits, {r['compression_ratio']:.2f}x, WER {r['wer'] * 100:.2f} % (ΔWER "
            f"{r['wer_delta'] * 100:+.2f} pp, 95% [{r['wer_ci95'][0] * 100:+.2f}, {r['wer_ci95'][1] * 100:+.2f}]); "
            f"{quantized.backend}")
    return rows


def merge(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keyed = {tuple(r[k] for k in KEY): r for r in old}
    keyed.update({tuple(r[k] for k in KEY): r for r in new})  # a re-run replaces its (model, method) rows
    return list(keyed.values())


def _pp(x: float) -> str:
    return f"{x * 100:+.2f}"


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | method | executed | mean bits | size MB | ratio | WER % | ΔWER pp [95% CI] | lossless | "
             "compress s |", "|---|---|---|---:|---:|---:|---:|---|---|---:|"]
    for r in rows:
        ci = f"{_pp(r['wer_delta'])} [{_pp(r['wer_ci95'][0])}, {_pp(r['wer_ci95'][1])}]"
        lines.append(f"| {r['model']} | {r['method']} | {r['executed']} | {r['avg_bits']:.2f} | "
                     f"{r['bytes'] / 1e6:.2f} | {r['compression_ratio']:.2f}x | {r['wer'] * 100:.2f} | {ci} | "
                     f"{'yes' if r['lossless'] else 'no'} | {r['compress_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(SETTINGS), help="comma-separated, from: " + ", ".join(SETTINGS))
    parser.add_argument("--budgets", type=float, nargs="*", default=[3.0, 3.5, 4.0, 4.5, 5.0, 6.0])
    parser.add_argument("--uniform", type=int, nargs="*", default=[6, 5, 4, 3, 2])
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps per stage (default: per model; 0: no training rows)")
    parser.add_argument("--dev", type=int, default=0, help="dev utterances (default: per model)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--train-budget", type=float, default=None,
                        help="only the training rows, at this budget (labelled with their steps)")
    parser.add_argument("--train-methods", nargs="+", default=["two-stage", "one-stage"],
                        choices=["two-stage", "one-stage"])
    parser.add_argument("--widths", type=int, nargs="+", default=list(PTQ_WIDTHS),
                        help="candidate widths of the PTQ allocation (default: the library's, 4 5 6 8; rows are "
                             "labelled with them otherwise)")
    parser.add_argument("--reuse-sensitivity", action="store_true",
                        help="allocate on the sensitivity saved by an earlier run instead of measuring it")
    parser.add_argument("--no-uniform-rows", action="store_true", help="skip stablequant-w8 and the uniform rows")
    parser.add_argument("--int4-only", action="store_true",
                        help="only the weight-only rows on the x86 int4 kernel (merged into the results)")
    parser.add_argument("--test", type=int, default=0, help="test utterances (default: per model)")
    parser.add_argument("--train", type=int, default=0, help="train utterances (default: per model)")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/mixed_precision.py " + " ".join(sys.argv[1:])
    for name in args.models.split(","):
        if name not in SETTINGS:
            raise SystemExit(f"unknown model {name!r}; choose from {', '.join(SETTINGS)}")
        started = time.perf_counter()
        rows, extras = run_model(name, args)
        doc = json.loads(JSON.read_text()) if JSON.exists() else {"rows": [], "models": {}}
        doc["rows"] = merge(doc["rows"], rows)
        entry = {**{k: v for k, v in extras.items() if k != "sensitivity"}, "device": device_name(),
                 "command": command, "torch": torch.__version__, "seconds": round(time.perf_counter() - started, 1)}
        if args.int4_only or args.train_budget is not None or args.no_uniform_rows:  # rows added to a full run
            previous = doc["models"].get(name, {})
            previous.setdefault("added_runs", []).append({"command": command, "seconds": entry["seconds"],
                                                          "device": entry["device"]})
            previous["allocations"] = {**previous.get("allocations", {}), **extras["allocations"]}
            doc["models"][name] = previous
        else:
            doc["models"][name] = entry
        slug = name.replace("/", "__")
        if "sensitivity" in extras:
            atomic_write(OUT / f"{slug}_sensitivity.json", json.dumps(extras["sensitivity"], indent=1))
        atomic_write(JSON, json.dumps(doc, indent=1))
        atomic_write(MD, f"Device: {device_name()}\n\n" + table(doc["rows"]))
        model_rows = [r for r in doc["rows"] if r["model"] == name]
        pareto_chart(OUT / f"{slug}_pareto.png", model_rows, title=f"{name}: WER against size (W·A8)")
        allocations = {m: b for m, b in doc["models"][name].get("allocations", {}).items() if m.startswith("mixed-")}
        sens_file = OUT / f"{slug}_sensitivity.json"
        if allocations and sens_file.exists():
            params = json.loads(sens_file.read_text())["params"]
            bits_chart(OUT / f"{slug}_bits.png", allocations, params, title=f"{name}: weight bits per layer")
        say(f"{name}: done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
