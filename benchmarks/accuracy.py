"""Accuracy of StableQuant against the built-in PTQ baselines: methods x {W8A8, W6A6, W4A4}.

Calibrate on the corpus dev split, evaluate on the test split, through the recipe runner (so every
row is what `stablequant run` would report). CTC references: W8A8 runs on real oneDNN INT8 kernels,
W6A6/W4A4 as a fake-quant simulation. Whisper tiny.en: every row is a simulation (labelled).

    python benchmarks/accuracy.py --models sq/wav2vec2-ref,sq/hubert-ref
    python benchmarks/accuracy.py --models openai/whisper-tiny.en --calib 32 --eval 120 \\
        --metric tf_loss --threshold 0.01

Rows are merged into benchmarks/results/accuracy.json by (model, method, w_bits, a_bits), so models
can be run in separate processes; accuracy.md is regenerated from all rows. Each run's full report
(per-layer cut-offs, transcripts, plots) stays in runs/accuracy/.

Row keys: model, method ("fp" for the float row), w_bits, a_bits, simulated, wer, cer, fp_wer, fp_cer
(fractions: 0.0235 = 2.35 %), calib_seconds (for stablequant: search + calibration), n_eval; plus
backend, int8_kernels, search_seconds, eval_seconds and the run it came from.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any

import torch
from common import RESULTS, atomic_write, device_name

from sq_plugin.backends.x86_isa import GRID_CHOICES, resolve_int8_grid, x86_policy
from sq_plugin.recipe import parse_recipe
from sq_plugin.runner import run_recipe

ALL_METHODS = ("fp", "stablequant", "max", "moving_average", "histogram", "percentile", "mse",
               "inc_minmax", "inc_kl", "quanto_absmax")
WHISPER_METHODS = ("fp", "stablequant", "max", "moving_average", "histogram", "percentile", "mse")
KEY = ("model", "method", "w_bits", "a_bits")


def to_row(run_row: dict[str, Any], run_dir: str, command: str) -> dict[str, Any]:
    search = run_row.get("search_seconds")
    calib = run_row.get("calib_seconds")
    return {
        "model": run_row["model"], "method": run_row["method"], "w_bits": run_row["w_bits"],
        "a_bits": run_row["a_bits"], "simulated": run_row["simulated"], "wer": run_row["wer"], "cer": run_row["cer"],
        "fp_wer": run_row["fp_wer"], "fp_cer": run_row["fp_cer"],
        "calib_seconds": None if calib is None else calib + (search or 0.0), "n_eval": run_row["n_eval"],
        "backend": run_row["backend"], "int8_kernels": run_row["int8_kernels"], "search_seconds": search,
        "eval_seconds": run_row.get("eval_seconds"), "run": run_dir, "command": command,
        # ΔWER against FP on the same utterances with its 95 % paired-bootstrap interval (fractions).
        "wer_delta": run_row.get("wer_delta"), "wer_ci95": run_row.get("wer_ci95"),
        "wer_delta_p": run_row.get("wer_delta_p"),
    }


def merge(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keyed = {tuple(r[k] for k in KEY): r for r in old}
    keyed.update({tuple(r[k] for k in KEY): r for r in new})
    return list(keyed.values())


def _bits(row: dict[str, Any]) -> str:
    return "fp32" if row["method"] == "fp" else f"W{row['w_bits']}A{row['a_bits']}"


def table(rows: list[dict[str, Any]], searches: dict[str, dict[str, Any]]) -> str:
    """The markdown table of BENCHMARKS.md: one block per model, rows by bits then method."""
    order = {m: i for i, m in enumerate(ALL_METHODS)}
    models = list(dict.fromkeys(r["model"] for r in rows))
    lines = ["| model | bits | method | runs on | WER % | ΔWER pp [95 % CI] | CER % | ΔCER pp | calib s | n |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for model in models:
        mrows = sorted((r for r in rows if r["model"] == model),
                       key=lambda r: (-r["w_bits"], -r["a_bits"], order.get(r["method"], 99)))
        for r in mrows:
            if r["method"] == "fp":
                runs_on = "float32"
            elif r["simulated"]:
                runs_on = "simulated"
            else:
                runs_on = f"INT8 ({r['int8_kernels']} kernels)"
            name = f"**{r['method']}**" if r["method"] == "stablequant" else r["method"]
            calib = "-" if r["calib_seconds"] is None else f"{r['calib_seconds']:.1f}"
            ci = r.get("wer_ci95")
            interval = "" if r["method"] == "fp" or not ci else f" [{ci[0] * 100:+.2f}, {ci[1] * 100:+.2f}]"
            lines.append(f"| {model} | {_bits(r)} | {name} | {runs_on} | {r['wer'] * 100:.2f} | "
                         f"{(r['wer'] - r['fp_wer']) * 100:+.2f}{interval} | {r['cer'] * 100:.2f} | "
                         f"{(r['cer'] - r['fp_cer']) * 100:+.2f} | {calib} | {r['n_eval']} |")
    lines.append("")
    lines += verdicts(rows)
    if searches:
        lines += ["StableQuant search, per model and bits (calibration metric; flagged layers and their choice):", "",
                  "| model | bits | metric (threshold) | FP | all MAX | best built-in rule | StableQuant | flagged "
                  "| changed from the base (choice) | MACs float | evaluations | search s "
                  "| search / (MinMax pass + calib + 1 eval) |",
                  "|---|---|---|---:|---:|---|---:|---:|---|---:|---:|---:|---:|"]
        for s in searches.values():
            flagged = [d for d in s["layers"] if d["flagged"]]
            base = s.get("base_rule", "mse")
            base_choice = "percentile" if base == "mse" else base

            def label(d: dict[str, Any]) -> str:
                if d.get("keep_float"):
                    return "float"
                choice = d.get("choice", "percentile")
                return f"p{d['percentile']:g}" if choice == "percentile" else choice

            changed = [f"`{d['name']}` ({label(d)})" for d in s["layers"] if d.get("keep_float") or (
                d["flagged"] and (d.get("choice", "percentile") != base_choice or d["percentile"] < 100))]
            shown = ", ".join(changed[:6]) + (f", … {len(changed) - 6} more" if len(changed) > 6 else "")
            ratio = "-" if s.get("cost_ratio") is None else f"{s['cost_ratio']:.2f}x"
            if s.get("cost_ratio") is not None and "minmax_seconds" not in s:  # measured before 2026-12-03
                ratio += " (without MinMax's pass)"
            rules = s.get("rule_metrics") or {}
            best = f"{base} {rules[base]:.4f}" if base in rules else "-"
            choice = s.get("activation_choice") or {}
            # the plan that ran: the activation choice's share when it made one (it may keep more layers float)
            share = choice.get("float_mac_share", s.get("float_mac_share", 0))
            scored = f"; first {s['metric_size']} utt." if s.get("metric_size") else ""
            scored += f"; shortlist {s['shortlist']}" if s.get("shortlist") else ""
            scored += f"; referee chose {s['referee_choice']}" if s.get("referee_metrics") else ""
            lines.append(f"| {s['model']} | {s['bits']} | {s['metric']} ({s['threshold']:g}{scored}) | "
                         f"{s['fp_metric']:.4f} | "
                         f"{s['max_metric']:.4f} | {best} | {s['final_metric']:.4f} | {len(flagged)} | "
                         f"{shown or 'none'} | {100 * share:.2f} % | {s['evaluations']}"
                         + (f" ({s['stopped_early']} stopped early)" if s.get("stopped_early") else "")
                         + (f" ({s['quick_evaluations']} quick)" if s.get("quick_evaluations") else "") + " | "
                         f"{s['wall_seconds']:.0f} | {ratio} |")
        lines.append("")
        chose = [s for s in searches.values() if s.get("activation_choice")]
        for s in chose:
            choice = s["activation_choice"]
            scored = ", ".join(f"{k.removesuffix('_metric').replace('_', ' ')} {v:.4f}" for k, v in choice.items()
                               if k.endswith("_metric"))
            floats = ", ".join(f"`{n}`" for n in choice.get("float_layers", []))
            lines.append(f"- {s['model']} {s['bits']}: activations {s.get('activations')} -> {choice['activations']}"
                         + (f" ({choice['per_token_layers']} Linears per token)" if choice.get("per_token_layers")
                            else "") + (f", float: {floats}" if floats else "")
                         + (f"; {s['metric']}: {scored}" if scored else ""))
        if chose:
            lines.append("")
    return "\n".join(lines)


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """Per model and bits: StableQuant's ΔWER against the best built-in's, and whether a built-in is better by more
    than its interval (its whole 95 % interval below StableQuant's ΔWER)."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for bits in dict.fromkeys(_bits(r) for r in rows if r["model"] == model and r["method"] != "fp"):
            cell = [r for r in rows if r["model"] == model and _bits(r) == bits and r.get("wer_ci95")]
            ours = next((r for r in cell if r["method"] == "stablequant"), None)
            others = [r for r in cell if r["method"] != "stablequant"]
            if ours is None or not others:
                continue
            best = min(others, key=lambda r: r["wer"])
            delta = (ours["wer"] - ours["fp_wer"]) * 100
            beaten = [r["method"] for r in others if r["wer_ci95"][1] * 100 < delta]
            out.append(f"- {model} {bits}: StableQuant {delta:+.2f} pp; best built-in {best['method']} "
                       f"{(best['wer'] - best['fp_wer']) * 100:+.2f} pp "
                       f"[{best['wer_ci95'][0] * 100:+.2f}, {best['wer_ci95'][1] * 100:+.2f}]; "
                       + (f"better than StableQuant by more than their interval: {', '.join(beaten)}" if beaten
                          else "no built-in better by more than its interval"))
    return out + [""] if out else []


def compare(names: list[str]) -> str:
    """One table of the W8A8 rows of several result files (ablations of StableQuant's options)."""
    rows = []
    for i, name in enumerate(names):
        payload = json.loads((RESULTS / f"{name}.json").read_text())
        rows += [((r["model"], i, ALL_METHODS.index(r["method"])), name, payload["searches"], r)
                 for r in payload["rows"] if r["method"] != "fp" and (r["w_bits"], r["a_bits"]) == (8, 8)]
    lines = ["| model | results | StableQuant options | method | runs on | WER % | ΔWER pp | CER % |",
             "|---|---|---|---|---|---:|---:|---:|"]
    for _, name, searches, r in sorted(rows, key=lambda t: t[0]):
        options = "-"
        if r["method"] == "stablequant":
            search = searches[f"{r['model']} w8a8"]
            options = f"{search['metric']} {search['threshold']:g}"
            if search.get("float_fallback"):
                options += ", float_fallback"
            if search.get("activations", "static") != "static":
                chosen = (search.get("activation_choice") or {}).get("activations", "?")
                options += f", activations {search['activations']} ({chosen})"
            if search.get("keep_float"):
                options += ", keep_float " + ", ".join(f"`{g}`" for g in search["keep_float"])
        runs_on = "simulated" if r["simulated"] else f"INT8 ({r['int8_kernels']} kernels)"
        lines.append(f"| {r['model']} | {name} | {options} | {r['method']} | {runs_on} | {r['wer'] * 100:.2f} | "
                     f"{(r['wer'] - r['fp_wer']) * 100:+.2f} | {r['cer'] * 100:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="sq/wav2vec2-ref,sq/hubert-ref")
    parser.add_argument("--methods", default=None, help="comma list (default: all that run on the model kind)")
    parser.add_argument("--bits", default="w8a8,w6a6,w4a4")
    parser.add_argument("--calib", type=int, default=200, help="calibration utterances (dev split)")
    parser.add_argument("--eval", type=int, default=600, help="evaluation utterances (test split)")
    parser.add_argument("--metric", default="wer",
                        help="StableQuant search metric (wer, cer, ctc_loss, ctc_kl, tf_loss, tf_token_error)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="screen threshold, in the metric's units (default: the metric's, METRIC_THRESHOLDS)")
    parser.add_argument("--metric-size", type=int, default=None,
                        help="StableQuant option: score the metric on the first N calibration utterances (default all)")
    parser.add_argument("--float-fallback", action="store_true",
                        help="StableQuant option (not in the paper): flagged layers may stay float")
    parser.add_argument("--keep-float", default="", help="StableQuant option: comma list of layer globs kept float")
    parser.add_argument("--int8-grid", default="auto", choices=GRID_CHOICES,
                        help="the recipe's int8_grid: auto = 7-bit weights on x86 without VNNI, else full")
    parser.add_argument("--calib-dataset", default="corpus-dev", choices=("corpus-dev", "corpus-dev-v1"),
                        help="corpus-dev: dev voices held out (release v2); corpus-dev-v1: dev on the training voices")
    parser.add_argument("--paper-only", action="store_true",
                        help="StableQuant without the built-in rules as candidates (builtin_candidates: false)")
    parser.add_argument("--refine-passes", type=int, default=0, help="StableQuant option: extra sweeps")
    parser.add_argument("--referee", default="none", choices=("none", "auto", "wer", "cer"),
                        help="StableQuant option (Whisper): decode the calibration set to pick between the search and "
                             "each built-in rule everywhere")
    parser.add_argument("--shortlist", type=int, default=0,
                        help="StableQuant option: score only the best N candidates on the full metric (0: all)")
    parser.add_argument("--activations", default="static", choices=("static", "per_token", "auto"),
                        help="StableQuant option: the Linears' inputs per token at run time (auto: by the metric)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="accuracy", help="results name; use another for ablations (e.g. "
                        "accuracy_ablation) so that accuracy.json keeps the default method's rows")
    parser.add_argument("--table-only", action="store_true", help="only rewrite OUT.md from OUT.json")
    parser.add_argument("--merge-from", default=None, help="comma list of result names whose rows, searches and runs "
                        "are merged into OUT (later ones win per row key); no run")
    parser.add_argument("--compare", default=None, help="comma list of result names: print their W8A8 rows as one "
                        "table (and write it to OUT.md)")
    args = parser.parse_args()
    if args.compare:
        text = compare(args.compare.split(","))
        atomic_write(RESULTS / f"{args.out}.md", text)
        print(text)
        return
    if args.merge_from:
        path = RESULTS / f"{args.out}.json"
        payload = json.loads(path.read_text()) if path.exists() else {"rows": [], "searches": {}, "runs": []}
        for name in args.merge_from.split(","):
            other = json.loads((RESULTS / f"{name}.json").read_text())
            payload = {"rows": merge(payload["rows"], other["rows"]),
                       "searches": {**payload["searches"], **other.get("searches", {})},
                       "runs": [*payload["runs"], *other.get("runs", [])]}
        atomic_write(path, json.dumps(payload, indent=2, allow_nan=False) + "\n")
        atomic_write(RESULTS / f"{args.out}.md", table(payload["rows"], payload["searches"]))
        return
    if args.table_only:
        payload = json.loads((RESULTS / f"{args.out}.json").read_text())
        atomic_write(RESULTS / f"{args.out}.md", table(payload["rows"], payload["searches"]))
        return
    torch.set_num_threads(args.threads)
    command = "python benchmarks/accuracy.py " + " ".join(sys.argv[1:])

    models = args.models.split(",")
    whisper = any("whisper" in m for m in models)
    methods = args.methods.split(",") if args.methods else list(WHISPER_METHODS if whisper else ALL_METHODS)
    recipe = parse_recipe({
        "name": f"{args.out}-{'whisper' if whisper else 'ctc'}", "model": models,
        "calibration": {"dataset": args.calib_dataset, "size": args.calib},
        "evaluation": {"dataset": "corpus-test", "size": args.eval},
        "methods": methods, "bits": args.bits.split(","), "backend": "x86", "threads": args.threads,
        "int8_grid": args.int8_grid,
        "method_options": {"stablequant": {"metric": args.metric, "threshold": args.threshold,
                                            "metric_size": args.metric_size,
                                            "float_fallback": args.float_fallback,
                                            "builtin_candidates": not args.paper_only,
                                            "refine_passes": args.refine_passes,
                                            "shortlist": args.shortlist,
                                            "referee": args.referee,
                                            "activations": args.activations,
                                            "keep_float": [g for g in args.keep_float.split(",") if g]}},
        "output_dir": "runs/accuracy",
    }, source="benchmarks/accuracy.py")
    run = run_recipe(recipe)
    rows = [to_row(r, str(run.output_dir), command) for r in run.rows]

    # Search cost: the search's wall time against MinMax (method "max") calibration + one evaluation, same model,
    # bits and run. The runner's MinMax takes its ranges from the one statistics pass it shares with the search (its
    # calib_seconds are then little more than building the graph), so the pass is counted on MinMax's side too: a
    # MinMax run of its own pushes the calibration set through the model once. That pass also fills histograms, so
    # it is somewhat slower than min/max observers alone; `cost_ratio_shared_pass` leaves it out.
    searches = {}
    for key, s in run.searches.items():
        mx = next((r for r in run.rows if r["model"] == s["model"] and r["method"] == "max"
                   and f"w{r['w_bits']}a{r['a_bits']}" == s["bits"]), None)
        minmax_pass = run.statistics_seconds.get(s["model"], 0.0)
        cost = None if mx is None else s["wall_seconds"] / (minmax_pass + mx["calib_seconds"] + mx["eval_seconds"])
        cost_shared = None if mx is None else s["wall_seconds"] / (mx["calib_seconds"] + mx["eval_seconds"])
        minmax = None if mx is None else {"statistics_pass": minmax_pass, "calib": mx["calib_seconds"],
                                          "eval": mx["eval_seconds"]}
        searches[key] = {"model": s["model"], "bits": s["bits"], "metric": args.metric, "fp_metric": s["fp_metric"],
                         "max_metric": s["max_metric"], "final_metric": s["final_metric"],
                         "evaluations": s["evaluations"], "stopped_early": s.get("stopped_early", 0),
                         "wall_seconds": s["wall_seconds"], "seconds": s["seconds"],
                         "cache": s.get("cache", {}), "cost_ratio": cost, "cost_ratio_shared_pass": cost_shared,
                         "minmax_seconds": minmax,
                         "threshold": run.recipe.method_options.stablequant.threshold_for(),
                         "metric_size": run.recipe.method_options.stablequant.metric_size,
                         "float_fallback": run.recipe.method_options.stablequant.float_fallback,
                         "keep_float": run.recipe.method_options.stablequant.keep_float,
                         "builtin_candidates": run.recipe.method_options.stablequant.builtin_candidates,
                         "refine_passes": run.recipe.method_options.stablequant.refine_passes,
                         "shortlist": run.recipe.method_options.stablequant.shortlist,
                         "quick_evaluations": s.get("quick_evaluations", 0),
                         "activations": run.recipe.method_options.stablequant.activations,
                         "activation_choice": getattr(run.plans.get(f"{s['model']} stablequant {s['bits']}"),
                                                      "provenance", {}).get("activation_choice"),
                         "calibration": args.calib_dataset, "base_rule": s.get("base_rule"),
                         "rule_metrics": s.get("rule_metrics", {}), "float_mac_share": s.get("float_mac_share", 0.0),
                         "referee_metrics": s.get("referee_metrics", {}), "referee_choice": s.get("referee_choice"),
                         "layers": [{"name": d["name"], "flagged": d["flagged"], "percentile": d["percentile"],
                                     "choice": d.get("choice", "percentile"), "keep_float": d["keep_float"],
                                     "screen_delta": d["screen_delta"]} for d in s["layers"]]}

    path = RESULTS / f"{args.out}.json"
    old = json.loads(path.read_text()) if path.exists() else {"rows": [], "searches": {}, "runs": []}
    payload = {
        "rows": merge(old["rows"], rows),
        "searches": {**old.get("searches", {}), **searches},
        "runs": [*old.get("runs", []), {
            "command": command, "output_dir": str(run.output_dir), "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()} {os.cpu_count()} cores", "torch": torch.__version__,
            # The CPU kind, and the INT8 grid the run used (sq_plugin.backends.x86_isa): AMX keeps the grouped
            # positional conv weight-only, x86 without VNNI narrows one side to 7 bits.
            "x86_isa": x86_policy().to_dict(), "int8_grid": resolve_int8_grid(args.int8_grid),
            "cpu": device_name(), "threads": args.threads,
            "peak_rss_mb": run.peak_rss_mb, "seconds": run.seconds, "skipped": run.skipped}],
    }
    atomic_write(path, json.dumps(payload, indent=2, allow_nan=False) + "\n")
    atomic_write(RESULTS / f"{args.out}.md", table(payload["rows"], payload["searches"]))
    print(table(payload["rows"], payload["searches"]))


if __name__ == "__main__":
    main()
