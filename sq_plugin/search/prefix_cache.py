"""Replay unchanged network prefixes during the search (exact, within a memory budget).

The search evaluates the model dozens of times with plans that differ in one layer. Everything
that runs *before* that layer computes the same thing every time, on the same calibration batches.
`PrefixCache` records the outputs of "blocks" (e.g. every Transformer layer, every feature-extractor
conv) during one evaluation, tagged with the quantization plan of every layer that runs up to the
end of the block (its signature). In a later evaluation, a block whose signature is unchanged does
not run: it returns (a copy of) the recorded output of the same call. The result is bit-for-bit what
a full run gives, because a block's output depends only on its input and the layers before it.

When it is safe: the metric pushes the same batches in the same order every time (or stops after a prefix of
them, marking the evaluation `stopped`, whose records are then dropped), and a block is a pure function of its
arguments (no state updated in place: no KV cache; Whisper runs teacher-forced
with use_cache=False). A block called more often than recorded raises instead of guessing.

Several signatures per block are kept (the float one serves every screening step after it, the
current one serves the clip step's candidates). Memory: recorded outputs stay under `budget_bytes`;
to record more, the least recently used records go first, and a block that still does not fit is
not recorded (it is recomputed next time). Memory therefore does not grow with the calibration set
past the budget; only the speed-up shrinks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import tree_map

DEFAULT_BUDGET_MB = 1024.0


def _nbytes(output: Any) -> int:
    total = 0

    def visit(x: Any) -> Any:
        nonlocal total
        if isinstance(x, torch.Tensor):
            total += x.numel() * x.element_size()
        return x

    tree_map(visit, output)
    return total


def _clone(output: Any) -> Any:
    # Callers may modify a block's output in place; the recorded copy must stay intact.
    return tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, output)


def ordered_blocks(model: torch.nn.Module) -> list[str]:
    """Default blocks, by name in registration order: every module held in an `nn.ModuleList` (HF
    models keep their repeated layers there: wav2vec2/HuBERT's feature-extractor convs and
    Transformer layers, Whisper's encoder and decoder layers), plus every Linear/Conv1d outside those
    (Whisper's two input convs, the positional conv, projections, heads)."""
    from sq_plugin.backends.simulate import QUANTIZABLE

    blocks: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList):
            blocks += [f"{name}.{child}" if name else child for child, _ in module.named_children()]
    for name, module in model.named_modules():
        if isinstance(module, QUANTIZABLE) and not any(name.startswith(b + ".") for b in blocks):
            blocks.append(name)
    return blocks


@dataclass
class Evaluation:
    """One evaluation under `PrefixCache.active`; `stopped`: its metric stopped before the last batch."""

    stopped: bool = False


@dataclass
class _Record:
    outputs: list[Any] | None = field(default_factory=list)  # None: gave up (over budget)
    nbytes: int = 0
    last_used: int = 0


class PrefixCache:
    """Block output replay for repeated evaluations under different quantization plans.

    upto: block name -> the quantizable layers that run before the block's output is complete,
    blocks in execution order (`PrefixCache.for_model` traces it).
    """

    def __init__(self, model: torch.nn.Module, upto: dict[str, Sequence[str]], *, budget_bytes: int):
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0 (got {budget_bytes})")
        modules = dict(model.named_modules())
        missing = [b for b in upto if b not in modules]
        if missing:
            raise KeyError(f"no such blocks in the model: {missing[:5]}")
        self._model = model
        self.blocks = list(upto)
        self.modules = {b: modules[b] for b in self.blocks}
        self.budget_bytes = int(budget_bytes)
        self._upto = {b: list(layers) for b, layers in upto.items()}
        self._records: dict[tuple[str, tuple], _Record] = {}
        self._evaluation = 0
        self.replayed_calls = 0
        self.computed_calls = 0
        self.peak_bytes = 0

    @classmethod
    def for_model(cls, model: torch.nn.Module, layers: Sequence[str], run: Any, *, blocks: Sequence[str] | None = None,
                  budget_mb: float = DEFAULT_BUDGET_MB) -> PrefixCache:
        """Trace, with one call of `run()` (a forward pass over a little data), the execution order of
        `blocks` (default: `ordered_blocks`) and which quantizable `layers` run before each block ends."""
        modules = dict(model.named_modules())
        blocks = list(blocks) if blocks is not None else ordered_blocks(model)
        layer_order: list[str] = []
        upto: dict[str, list[str]] = {}  # filled at each block's first exit, so in execution order
        handles = []

        def leave(name: str) -> Any:
            def hook(_m: torch.nn.Module, _args: tuple, _out: Any) -> None:
                if name not in upto:
                    upto[name] = list(layer_order)
            return hook

        def called(name: str) -> Any:
            def hook(_m: torch.nn.Module, _args: tuple) -> None:
                if name not in layer_order:
                    layer_order.append(name)
            return hook

        try:
            for b in blocks:
                handles.append(modules[b].register_forward_hook(leave(b)))
            for n in layers:
                handles.append(modules[n].register_forward_pre_hook(called(n)))
            with torch.inference_mode():
                run()
        finally:
            for h in handles:
                h.remove()
        # A block nested in another is skipped with it; keep the outermost ones only.
        outer = {b: upto[b] for b in upto if not any(b.startswith(o + ".") for o in upto if o != b)}
        return cls(model, outer, budget_bytes=int(budget_mb * 2**20))

    def split(self, share: float) -> PrefixCache:
        """A second, empty cache over the same blocks for another metric's batches (records are tied to the batches
        pushed), with `share` of this one's budget, which keeps the rest: together they stay within the budget."""
        if not 0.0 < share < 1.0:
            raise ValueError(f"share must be between 0 and 1 (got {share})")
        other = PrefixCache(self._model, self._upto, budget_bytes=int(self.budget_bytes * share))
        self.budget_bytes -= other.budget_bytes
        return other

    def signature(self, block: str, plan: dict[str, Hashable]) -> tuple:
        return tuple((name, plan.get(name)) for name in self._upto[block])

    @property
    def cached_bytes(self) -> int:
        return sum(r.nbytes for r in self._records.values())

    @contextlib.contextmanager
    def active(self, plan: dict[str, Hashable]) -> Iterator[Evaluation]:
        """Within the block, every block replays its recorded output for `plan`'s signature, or runs
        and records it (several signatures per block are kept, least recently used evicted first).
        It yields an `Evaluation`: mark it `stopped` when the metric stopped before its last batch (a candidate
        that could not win): what it recorded is then incomplete, and dropped."""
        self._evaluation += 1
        evaluation = Evaluation()
        originals: dict[str, Any] = {}
        pending: dict[tuple[str, tuple], _Record] = {}
        replayed: dict[str, list[int]] = {}  # block -> [calls replayed, calls recorded]
        for b in self.blocks:
            key = (b, self.signature(b, plan))
            module = self.modules[b]
            originals[b] = module.__dict__.get("forward")
            record = self._records.get(key)
            if record is not None:
                record.last_used = self._evaluation
                replayed[b] = [0, len(record.outputs or [])]
                module.forward = self._replayer(b, record, replayed[b])
            else:
                pending[key] = _Record(last_used=self._evaluation)
                module.forward = self._recorder(module, pending[key], pending)
        try:
            yield evaluation
        finally:
            for b, original in originals.items():
                if original is None:
                    self.modules[b].__dict__.pop("forward", None)
                else:
                    self.modules[b].forward = original
        if evaluation.stopped:  # the metric stopped early: fewer calls than recorded, and partial records
            return
        # Reached only when the evaluation completed (an exception skips this): keep what it recorded.
        short = [b for b, (used, recorded) in replayed.items() if used != recorded]
        if short:
            self._records.clear()
            raise RuntimeError(f"prefix cache: blocks {short[:3]} were called fewer times than when recorded; the "
                               "metric must push the same batches in the same order every time")
        self._records.update({k: r for k, r in pending.items() if r.outputs is not None})
        self.peak_bytes = max(self.peak_bytes, self.cached_bytes)

    def _make_room(self, size: int, pending: dict[tuple[str, tuple], _Record]) -> bool:
        """Evict records not used by this evaluation, least recently used first, until `size` more
        bytes fit in the budget; False if they cannot."""
        used = self.cached_bytes + sum(r.nbytes for r in pending.values())
        if used + size <= self.budget_bytes:
            return True
        for key in sorted((k for k, r in self._records.items() if r.last_used < self._evaluation),
                          key=lambda k: self._records[k].last_used):
            used -= self._records.pop(key).nbytes
            if used + size <= self.budget_bytes:
                return True
        return False

    def _replayer(self, block: str, record: _Record, count: list[int]) -> Any:
        outputs = record.outputs or []

        def forward(*_args: Any, **_kwargs: Any) -> Any:
            i = count[0]
            if i >= len(outputs):
                raise RuntimeError(f"prefix cache: block {block!r} was called more often than when it was recorded; "
                                   "the metric must push the same batches in the same order every time")
            count[0] += 1
            self.replayed_calls += 1
            return _clone(outputs[i])

        return forward

    def _recorder(self, module: torch.nn.Module, record: _Record, pending: dict[tuple[str, tuple], _Record]) -> Any:
        compute = type(module).forward.__get__(module)

        def forward(*args: Any, **kwargs: Any) -> Any:
            out = compute(*args, **kwargs)
            self.computed_calls += 1
            if record.outputs is not None:
                size = _nbytes(out)
                if self._make_room(size, pending):
                    record.outputs.append(_clone(out))
                    record.nbytes += size
                else:  # over budget: this block is recomputed next time; free what it held
                    record.outputs, record.nbytes = None, 0
            return out

        return forward


__all__ = ["DEFAULT_BUDGET_MB", "Evaluation", "PrefixCache", "ordered_blocks"]
