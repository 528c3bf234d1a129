"""Where does a Whisper plan lose? Its teacher-forced loss with groups of layers kept float, with weights or
activations alone quantized, and with dynamic activation grids in place of the plan's static ranges.

From a saved `QuantPlan` (e.g. the one `benchmarks/accuracy.py` wrote for StableQuant), every configuration is
scored by the search's proxy, `tf_loss` (nats per token of the float model's own greedy transcripts), on test
utterances the plan was not calibrated on, in the fake-quant simulation. The gap to float that each change closes
says where the loss is: a group whose float copy closes most of it is where to look; a dynamic grid that closes it
says the static per-tensor ranges, not the weights, are what costs.

    python benchmarks/whisper_loss_groups.py --model openai/whisper-base \
        --plan benchmarks/results/plan_whisper-base_stablequant_w8a8.json --utts 40 --wer

Writes benchmarks/results/whisper_loss_groups_<model>.json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from common import RESULTS, atomic_write, device_name, paired_wer

from sq_plugin.backends.simulate import LayerQuant, plan_layer_quants, quantizable_layers, simulate
from sq_plugin.core.plan import QuantPlan
from sq_plugin.core.quant import quant_bounds
from sq_plugin.families.whisper import EVAL_BATCH, whisper_score
from sq_plugin.speech.corpus import load_split
from sq_plugin.speech.evaluate import evaluate
from sq_plugin.speech.models import load_model

# Groups of layers by module-name pattern: each is kept float in turn while the rest follow the plan.
GROUPS = {
    "encoder convs": r"^model\.encoder\.conv",
    "encoder q/k/v": r"^model\.encoder\.layers\.\d+\.self_attn\.[qkv]_proj$",
    "encoder out_proj": r"^model\.encoder\.layers\.\d+\.self_attn\.out_proj$",
    "encoder fc1": r"^model\.encoder\.layers\.\d+\.fc1$",
    "encoder fc2": r"^model\.encoder\.layers\.\d+\.fc2$",
    "decoder self-attn": r"^model\.decoder\.layers\.\d+\.self_attn\.",
    "decoder cross-attn q/out": r"^model\.decoder\.layers\.\d+\.encoder_attn\.(q|out)_proj$",
    "decoder cross-attn k/v": r"^model\.decoder\.layers\.\d+\.encoder_attn\.[kv]_proj$",
    "decoder fc1": r"^model\.decoder\.layers\.\d+\.fc1$",
    "decoder fc2": r"^model\.decoder\.layers\.\d+\.fc2$",
    "proj_out": r"^proj_out$",
    "whole encoder": r"^model\.encoder\.",
    "whole decoder + proj_out": r"^(model\.decoder\.|proj_out$)",
}


def _dynamic_hook(bits: int, per_token: bool) -> Callable:
    """Fake-quantize a layer's input on an asymmetric unsigned grid whose range is the input's own min/max at run
    time: per tensor, or per token (one range per row of the last dimension; a Conv1d input is per tensor)."""
    qmin, qmax = quant_bounds(bits, signed=False)

    def hook(module: torch.nn.Module, args: tuple) -> tuple:
        x = args[0]
        if per_token and isinstance(module, torch.nn.Linear):
            lo = x.amin(dim=-1, keepdim=True).clamp(max=0.0)
            hi = x.amax(dim=-1, keepdim=True).clamp(min=0.0)
        else:
            lo, hi = x.min().clamp(max=0.0), x.max().clamp(min=0.0)
        scale = ((hi - lo) / (qmax - qmin)).clamp(min=1e-8)
        zp = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
        q = torch.clamp(torch.round(x / scale) + zp, qmin, qmax)
        return ((q - zp) * scale, *args[1:])

    return hook


@contextlib.contextmanager
def dynamic_inputs(model: torch.nn.Module, names: list[str], bits: int, per_token: bool) -> Iterator[None]:
    modules = quantizable_layers(model)
    handles = [modules[n].register_forward_pre_hook(_dynamic_hook(bits, per_token)) for n in names]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def decode_rows(bundle: object, utterances: list, quants: dict[str, LayerQuant]) -> list[dict]:
    """Greedy WER of float, the plan, weights only and dynamic per-token activations, paired against float."""
    model = bundle.model
    weights_only = {n: dataclasses.replace(q, act_range=None) for n, q in quants.items()}
    configurations = {"float": ({}, None), "the plan": (quants, None),
                      "weights only (activations float)": (weights_only, None),
                      "dynamic per-token activations, plan's weights": (weights_only, "per token")}
    hypotheses, references = {}, []
    for what, (layers, dynamic) in configurations.items():
        with simulate(model, layers), (dynamic_inputs(model, list(layers), bits=8, per_token=True) if dynamic
                                       else contextlib.nullcontext()):
            result = evaluate(bundle, utterances, batch_size=EVAL_BATCH, progress=False)
        hypotheses[what] = [r.hypothesis for r in result.utterances]
        references = [r.reference for r in result.utterances]  # the scored ones, the same in every run
        print(f"{what:55s} WER {result.wer:.4f}", flush=True)
    return [{"configuration": what, **paired_wer(references, hypotheses["float"], texts)}
            for what, texts in hypotheses.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="openai/whisper-base")
    parser.add_argument("--plan", required=True, type=Path, help="a QuantPlan JSON (plan_<model>_<method>_<bits>)")
    parser.add_argument("--utts", type=int, default=40, help="test utterances scored")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--wer", action="store_true", help="also decode the test utterances (greedy) for the plan, "
                        "weights only and dynamic per-token activations, with ΔWER and its 95 %% interval")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    bundle = load_model(args.model)
    plan = QuantPlan.load(args.plan)
    quants = plan_layer_quants(plan)
    model = bundle.model.eval()
    plan.check_layers(quantizable_layers(model), model=args.model)
    utterances = load_split("test", limit=args.utts, progress=False)
    score, _ = whisper_score(bundle, utterances, "tf_loss")
    fp = score()
    rows: list[dict] = []

    def add(what: str, layers: dict[str, LayerQuant], dynamic: str | None = None) -> None:
        t0 = time.perf_counter()
        with simulate(model, layers):
            if dynamic is None:
                loss = score()
            else:
                with dynamic_inputs(model, list(layers), bits=8, per_token=dynamic == "per token"):
                    loss = score()
        rows.append({"configuration": what, "layers_quantized": len(layers), "tf_loss": loss,
                     "gap": loss - fp, "seconds": time.perf_counter() - t0})
        print(f"{what:55s} {loss:.4f} ({loss - fp:+.4f})", flush=True)

    add("the plan", quants)
    full_gap = rows[-1]["gap"]
    add("weights only (activations float)", {n: dataclasses.replace(q, act_range=None) for n, q in quants.items()})
    add("activations only (weights float)", {n: dataclasses.replace(q, quantize_weight=False)
                                             for n, q in quants.items()})
    for group, pattern in GROUPS.items():
        kept = {n for n in quants if re.search(pattern, n)}
        add(f"{group} float ({len(kept)} layers)", {n: q for n, q in quants.items() if n not in kept})
    weights_only = {n: dataclasses.replace(q, act_range=None) for n, q in quants.items()}
    add("dynamic per-tensor activations, plan's weights", weights_only, dynamic="per tensor")
    add("dynamic per-token activations, plan's weights", weights_only, dynamic="per token")
    decoder = re.compile(GROUPS["whole decoder + proj_out"])
    mixed = {n: (dataclasses.replace(q, act_range=None) if decoder.search(n) else q) for n, q in quants.items()}
    with dynamic_inputs(model, [n for n in quants if decoder.search(n)], bits=8, per_token=True):
        add("plan's encoder, decoder step on dynamic per-token activations", mixed)
    wer_rows = decode_rows(bundle, utterances, quants) if args.wer else []
    for row in rows:
        row["share_of_gap_closed"] = (1 - row["gap"] / full_gap) if full_gap else None
    slug = args.model.split("/")[-1]
    result = {"model": args.model, "plan": str(args.plan), "utterances": len(utterances), "fp_tf_loss": fp,
              "rows": rows, "wer_rows": wer_rows, "cpu": device_name(), "threads": args.threads,
              "seconds": time.perf_counter() - start,
              "command": f"python benchmarks/whisper_loss_groups.py --model {args.model} --plan {args.plan} "
                         f"--utts {args.utts}" + (" --wer" if args.wer else "")}
    lines = [f"# {args.model}: where the plan's teacher-forced loss goes", "",
             f"{device_name()}, {args.threads} thread(s); tf_loss (nats per token of float's greedy transcripts) on "
             f"the first {len(utterances)} test utterances, fake-quant simulation of `{args.plan.name}`; float "
             f"{fp:.4f}. Gap closed: the share of the plan's gap to float that the change removes.", "",
             "| configuration | layers quantized | tf_loss | gap to float | gap closed |",
             "|---|---:|---:|---:|---:|"]
    for row in rows:
        closed = row["share_of_gap_closed"]
        lines.append(f"| {row['configuration']} | {row['layers_quantized']} | {row['tf_loss']:.4f} | "
                     f"{row['gap']:+.4f} | {'' if closed is None else f'{closed:.0%}'} |")
    lines += ["", "Dynamic per tensor: one range per call over the whole teacher-forced batch of 8 utterances, "
              "padding included (a batch-1 decoder step's per-tensor range is per token).", ""]
    if wer_rows:
        lines += [f"Free-running greedy decoding (HF generate on the simulation) of the same {len(utterances)} "
                  "utterances; ΔWER against float, 95 % paired bootstrap:", "",
                  "| configuration | WER | ΔWER pp [95 % CI] |", "|---|---:|---:|"]
        lines += [f"| {r['configuration']} | {r['wer']:.4f} | {r['delta_pp']:+.2f} [{r['ci95_pp'][0]:+.2f}, "
                  f"{r['ci95_pp'][1]:+.2f}] |" for r in wer_rows]
        lines.append("")
    lines += [f"`{result['command']}`", ""]
    atomic_write(RESULTS / f"whisper_loss_groups_{slug}.json", json.dumps(result, indent=2))
    atomic_write(RESULTS / f"whisper_loss_groups_{slug}.md", "\n".join(lines))


if __name__ == "__main__":
    main()
