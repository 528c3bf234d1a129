"""Evaluation across processes with `torch.distributed`: split the utterances over ranks, gather in order.

    torchrun --nproc-per-node 2 -m sq_plugin.cli run recipe.yaml     # gloo on CPU, nccl on CUDA

Launched that way, `init_from_env()` (the CLI calls it) joins the process group that torchrun describes in the
environment. Then every evaluation (`sq_plugin.speech.evaluate.evaluate`) transcribes its rank's share of the
utterances and gathers the transcripts in their original order, and the CTC search pushes its rank's share of the
calibration set, merges the statistics exactly and reduces its metric over all utterances in their original order.
So a run gives the same numbers as one process, only sooner; every rank holds the whole model and quantizes it the
same way, and rank 0 alone writes the report.

Exactness: each utterance is computed as in one process (the same batches: a rank takes whole batches), and every
reduction is a gather followed by the same computation in the original order (never a float all-reduce, whose
summation order depends on the ranks). Histograms merge exactly (`core.stats.Histogram`); the moving-average
statistic, which depends on order, is replayed in the original order.

A rank that dies makes the others fail at their next gather: the error names the rank that did not arrive
(`monitored_barrier`, gloo) and no report is written, since outputs are only written after the last gather.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from typing import Any, TypeVar

import torch

T = TypeVar("T")

# How long a gather waits for a rank before calling it dead. Evaluations between two gathers take seconds to
# minutes on a CPU, so the wait is generous; SQ_PLUGIN_DIST_TIMEOUT_S overrides it.
DEFAULT_TIMEOUT_S = 1800.0


class RankFailedError(RuntimeError):
    """A rank did not reach a gather: it died or hung. Nothing was written."""


def active() -> bool:
    """Whether this process is one of several in an initialized process group."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    if not active():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def is_main() -> bool:
    """Rank 0, or the only process: the one that writes outputs."""
    return rank_and_world()[0] == 0


def _timeout_s() -> float:
    return float(os.environ.get("SQ_PLUGIN_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S))


def init_from_env() -> bool:
    """Join the process group described by torchrun's environment (WORLD_SIZE > 1); False when launched alone.
    Backend: nccl when CUDA is available, else gloo."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or active():
        return active()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=_timeout_s()))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def batch_shard(n: int, batch_size: int, *, what: str = "utterances") -> list[int]:
    """This rank's indices of `n` items taken in whole batches of `batch_size` (batch b goes to rank b % world):
    each batch is then exactly the one a single process would run."""
    rank, world = rank_and_world()
    batches = -(-n // batch_size) if n else 0
    if world > 1 and batches < world:
        raise ValueError(f"{n} {what} in {batches} batch(es) of {batch_size} cannot be split over {world} ranks: "
                         f"every rank needs at least one batch; evaluate at least {world * batch_size} {what} or run "
                         f"fewer processes (torchrun --nproc-per-node {max(batches, 1)})")
    return [i for b in range(rank, batches, world) for i in range(b * batch_size, min((b + 1) * batch_size, n))]


def _gather_objects(local: Any) -> list[Any]:
    """Every rank's `local`, in rank order. If a rank does not arrive (it died: the collective fails; it hangs:
    the process group's timeout), the error names it, found by a short `monitored_barrier` (gloo) afterwards:
    only then, because a barrier before every gather would cost a round trip each time for nothing."""
    rank, world = rank_and_world()
    gathered: list[Any] = [None] * world
    try:
        torch.distributed.all_gather_object(gathered, local)
    except RuntimeError as exc:
        raise RankFailedError(f"rank {rank}: gathering results from {world} ranks failed ({exc}); "
                              f"{_missing_ranks()}. The run stops here; nothing was written. That rank's log "
                              "(torchrun prints it) says why.") from exc
    return gathered


def _missing_ranks() -> str:
    if torch.distributed.get_backend() != "gloo":
        return "another rank died or hung"
    try:
        torch.distributed.monitored_barrier(timeout=datetime.timedelta(seconds=10), wait_all_ranks=True)
    except RuntimeError as exc:  # "Ranks 1 failed to pass monitoredBarrier ..."
        return f"{exc}".strip()
    return "every rank is still there, so the collective itself failed"


def gather_in_order(local: Sequence[T], indices: Sequence[int], n: int) -> list[T]:
    """The `n` items of all ranks in their original order, given each rank's items and their original indices."""
    if not active():
        if len(local) != n:
            raise ValueError(f"gather_in_order: {len(local)} items for {n} (one process holds them all)")
        return list(local)
    return in_order(_gather_objects((list(local), list(indices))), n)


def in_order(parts: Sequence[tuple[Sequence[T], Sequence[int]]], n: int) -> list[T]:
    """The `n` items of every rank's (items, their original indices), in their original order."""
    out: list[Any] = [None] * n
    seen = 0
    for values, idx in parts:
        for i, v in zip(idx, values, strict=True):
            out[i] = v
            seen += 1
    if seen != n:
        raise RuntimeError(f"the ranks returned {seen} items for {n}; their shards overlap or miss "
                           "some (every rank must shard the same list the same way)")
    return out


def gather(local: Any) -> list[Any]:
    """Every rank's `local`, in rank order ([local] in one process)."""
    return _gather_objects(local) if active() else [local]


__all__ = ["RankFailedError", "active", "batch_shard", "gather", "gather_in_order", "in_order", "init_from_env",
           "is_main", "rank_and_world"]
