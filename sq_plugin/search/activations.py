"""Static or per-token activations for a plan's Linears: the choice, scored on the calibration metric.

StableQuant decides one static range per layer. Where a model's activations vary from token to token more than any
one range serves (Whisper base: W8A8 +5.74 pp WER on static ranges, -0.60 pp per token, BENCHMARKS.md), the Linears
can take their input per token at run time instead (`core.grid.X86_ACTIVATION_PER_TOKEN`, executed by
`backends.per_token`). It does not pay everywhere (Whisper tiny.en: -0.49 pp static, +1.95 per token), so "auto"
scores both plans on the search's own metric over the calibration set, in the simulation, which computes exactly
what the per-token kernel does, and keeps the better.

    plan, choice = choose_activations(model, plan, score, "auto", exclude=("proj_out",))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sq_plugin.core.plan import QuantPlan

ACTIVATION_CHOICES = ("static", "per_token", "auto")


def per_token_candidates(plan: Any, exclude: Sequence[str] = ()) -> list[str]:
    """The plan's quantized Linears, less `exclude` (e.g. Whisper's proj_out, whose INT8 table the token embedding
    reads through oneDNN's qlinear, and which runs 1.6-1.9x slower per token)."""
    return [n for n in plan.quantized if plan.layers[n].op == "linear" and n not in set(exclude)]


def choose_activations(model: Any, plan: Any, score: Callable[[], float], mode: str, *,
                       exclude: Sequence[str] = (), per_token_runs: str | None = None) -> tuple[Any, dict[str, Any]]:
    """(the plan to run, what was chosen and why). mode: "static" (the plan as it is), "per_token" (every
    candidate Linear per token) or "auto" (whichever scores lower on `score`, the calibration metric of `model`
    as it stands at each call, lower is better). per_token_runs: why per-token INT8 cannot run here (e.g. a CPU
    whose `_int_mm` saturates), or None; "auto" then keeps the static plan and says so, "per_token" refuses."""
    from sq_plugin.backends.simulate import plan_layer_quants, simulate

    if mode not in ACTIVATION_CHOICES:
        raise ValueError(f"unknown activations {mode!r}; choose one of {', '.join(ACTIVATION_CHOICES)}")
    if mode == "static":
        return plan, {"activations": "static"}  # as it is: no choice made
    names = per_token_candidates(plan, exclude)
    if not names:
        return plan, {"activations": "static", "why": "no quantized Linear to put on a per-token grid"}
    if per_token_runs is not None:
        if mode == "per_token":
            raise ValueError(f"activations: per_token cannot run here: {per_token_runs}. Fix: activations: static "
                             "(or auto), or run on a CPU with VNNI or AMX")
        return plan, {"activations": "static", "why": f"per-token INT8 cannot run here: {per_token_runs}"}
    per_token = plan.with_per_token_activations(names)
    if mode == "per_token":
        chosen, choice = per_token, {"activations": "per_token", "per_token_layers": len(names)}
    else:
        metrics = {}
        for what, candidate in (("static", plan), ("per_token", per_token)):
            with simulate(model, plan_layer_quants(candidate)):
                metrics[what] = float(score())
        better = metrics["per_token"] < metrics["static"]
        chosen = per_token if better else plan
        choice = {"activations": "per_token" if better else "static", "per_token_layers": len(names) if better else 0,
                  "static_metric": metrics["static"], "per_token_metric": metrics["per_token"]}
    return QuantPlan(dict(chosen.layers), {**chosen.provenance, "activation_choice": choice}), choice
