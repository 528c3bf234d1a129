"""Exact early stopping of the search's candidate evaluations.

The clip step keeps the best of a dozen candidate ranges per flagged layer, and most candidates lose. The metrics the
families give the search are sums of non-negative terms (one per utterance, batch or token) divided by a count that
is known before the first term: ctc_kl and ctc_loss average over utterances, the teacher-forced metrics over target
tokens, CTC WER over reference words (Whisper's decoded WER does not stop early). After k terms, sum / count
is therefore a lower bound of the value (a floating-point sum of non-negative terms never decreases), and once it
exceeds `bound` (the best candidate so far) the candidate cannot win: the metric stops there and returns that lower
bound. The search then decides exactly what full evaluations decide; only the losers are cut short, and their
recorded metric is a lower bound.

A metric opts in by taking a keyword argument `bound` (`takes_bound`); any other callable is evaluated in full.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence

from sq_plugin import parallel


def takes_bound(metric: Callable[..., float]) -> bool:
    """Whether `metric` accepts `bound=` (it may then stop once its value is sure to exceed it)."""
    try:
        return "bound" in inspect.signature(metric).parameters
    except (TypeError, ValueError):  # a builtin or C callable without a signature: evaluate in full
        return False


def sum_until(terms: Iterable[float], count: float, bound: float | None) -> tuple[list[float], float, bool]:
    """(the terms taken, their sum, stopped): the terms (each >= 0), added in order, until their sum / count
    exceeds `bound` (None: all of them). The sum is accumulated left to right, as `ordered_sum` does."""
    if count <= 0:
        raise ValueError(f"sum_until: count must be > 0 (got {count}); is the metric's data empty?")
    taken: list[float] = []
    total = 0.0
    for term in terms:
        taken.append(term)
        total += term
        if bound is not None and total / count > bound:
            return taken, total, True
    return taken, total, False


def ordered_sum(values: Sequence[float]) -> float:
    """Left-to-right sum (not `math.fsum`, nor Python 3.12's compensated `sum`): the order `sum_until` stops in."""
    total = 0.0
    for value in values:
        total += value
    return total


def gathered_mean(values: Sequence[float], indices: Sequence[int], n: int, count: float, stopped: bool) -> float:
    """The metric over every rank's terms: `values` are this rank's, for its items `indices` (in increasing order)
    of `n`; `stopped` says whether `sum_until` stopped early here. When no rank stopped: the ordered sum of all `n`
    terms / count, bit for bit what one process computes. When one did: the largest rank's partial sum / count, a
    lower bound of the value (each rank's terms come in the global order, so its partial sum cannot exceed the
    global one) that exceeds the bound, as one process's would."""
    parts = parallel.gather((list(values), list(indices[: len(values)]), stopped))  # one collective, either way
    if any(part_stopped for _, _, part_stopped in parts):
        return max(ordered_sum(part_values) for part_values, _, _ in parts) / count
    return ordered_sum(parallel.in_order([(v, i) for v, i, _ in parts], n)) / count


__all__ = ["gathered_mean", "ordered_sum", "sum_until", "takes_bound"]
