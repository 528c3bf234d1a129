"""Static or per-token activations for a plan's Linears: the choice, scored on the calibration metric.

StableQuant decides one static range per layer. Where a model's activations vary from token to token more than any
one range serves (Whisper base's searched W8A8 plan: +5.74 pp WER on static ranges, +1.81 with the Linears per token,
BENCHMARKS.md), the Linears can take their input per token at run time instead (`core.grid.X86_ACTIVATION_PER_TOKEN`,
executed by `backends.per_token`). It does not pay everywhere (on Whisper tiny.en the searched static plan scored
better on the calibration set), so "auto" scores both plans on the search's own metric over the calibration set, in
the simulation, which computes exactly what the per-token kernel does, and keeps the better.

    plan, choice = choose_activations(model, plan, score, "auto", exclude=("proj_out",))
    plan, choice = choose_activations(model, plan, score, "auto", float_margin=0.01)  # and: the convs float?
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sq_plugin.core.plan import LayerPlan, QuantPlan

ACTIVATION_CHOICES = ("static", "per_token", "auto")


def per_token_candidates(plan: Any, exclude: Sequence[str] = ()) -> list[str]:
    """The plan's quantized Linears, less `exclude` (e.g. Whisper's proj_out, whose INT8 table the token embedding
    reads through oneDNN's qlinear, and which runs 1.6-1.9x slower per token)."""
    excluded = set(exclude)
    return [n for n in plan.quantized if plan.layers[n].op == "linear" and n not in excluded]


def without_static_rest(plan: Any, exclude: Sequence[str] = ()) -> QuantPlan:
    """A per-token plan's remaining static-range layers (the convs; not `exclude`) made float."""
    excluded = set(exclude)
    return QuantPlan({n: LayerPlan(layer.op, why_float="float_fallback: beat its static range once the Linears "
                                   "were per token")
                      if not layer.is_float and not layer.per_token and n not in excluded else layer
                      for n, layer in plan.layers.items()}, dict(plan.provenance))


def choose_activations(model: Any, plan: Any, score: Callable[[], float], mode: str, *,
                       exclude: Sequence[str] = (), per_token_runs: str | None = None,
                       float_margin: float | None = None, macs: Mapping[str, int] | None = None
                       ) -> tuple[Any, dict[str, Any]]:
    """(the plan to run, what was chosen and why). mode: "static" (the plan as it is), "per_token" (every
    candidate Linear per token) or "auto" (whichever scores lower on `score`, the calibration metric of `model`
    as it stands at each call, lower is better). per_token_runs: why per-token INT8 cannot run here (e.g. a CPU
    whose `_int_mm` saturates), or None; "auto" then keeps the static plan and says so, "per_token" refuses.
    float_margin (auto; the search's float_fallback threshold): also score the per-token plan with its remaining
    static layers float (`without_static_rest`: on Whisper base the two convs, +2.4 pp WER on static ranges), kept
    only when it beats both others by more than the margin. macs: per layer (`SearchResult.layers[i].macs`), to
    report the share of multiply-accumulates left float."""
    from sq_plugin.backends.simulate import plan_layer_quants, simulate

    if mode not in ACTIVATION_CHOICES:
        raise ValueError(f"unknown activations {mode!r}; choose one of {', '.join(ACTIVATION_CHOICES)}")
    if mode == "static":
        return plan, {"activations": "static"}  # as it is: no choice made
    names = per_token_candidates(plan, exclude)
    if not names:
        return _recorded(plan, {"activations": "static", "why": "no quantized Linear to put on a per-token grid"})
    if per_token_runs is not None:
        if mode == "per_token":
            raise ValueError(f"activations: per_token cannot run here: {per_token_runs}. Fix: activations: static "
                             "(or auto), or run on a CPU with VNNI or AMX")
        return _recorded(plan, {"activations": "static", "why": f"per-token INT8 cannot run here: {per_token_runs}"})
    per_token = plan.with_per_token_activations(names)
    if mode == "per_token":
        chosen, choice = per_token, {"activations": "per_token", "per_token_layers": len(names)}
    else:
        candidates = {"static": plan, "per_token": per_token}
        if float_margin is not None:
            candidates["per_token_float_rest"] = without_static_rest(per_token, exclude)
        metrics = {}
        for what, candidate in candidates.items():
            with simulate(model, plan_layer_quants(candidate)):
                metrics[what] = float(score())
        best = "per_token" if metrics["per_token"] < metrics["static"] else "static"
        if float_margin is not None and metrics["per_token_float_rest"] < metrics[best] - float_margin:
            best = "per_token_float_rest"
        chosen = candidates[best]
        choice = {"activations": "static" if best == "static" else "per_token",
                  "per_token_layers": len(chosen.per_token_layers),
                  **{f"{what}_metric": value for what, value in metrics.items()}}
        if best == "per_token_float_rest":
            choice["float_layers"] = [n for n in chosen.float_layers if not plan.layers[n].is_float]
    if macs:
        total = sum(macs.get(n, 0) for n in chosen.layers)
        choice["float_mac_share"] = sum(macs.get(n, 0) for n in chosen.float_layers) / total if total else 0.0
    return _recorded(chosen, choice)


def _recorded(plan: Any, choice: dict[str, Any]) -> tuple[QuantPlan, dict[str, Any]]:
    """A copy of `plan` whose provenance records the choice (the caller's plan is left as it is)."""
    return QuantPlan(dict(plan.layers), {**plan.provenance, "activation_choice": choice}), choice
