"""The two charts of a mixed-precision report: each layer's weight width, and WER against size (the Pareto front).

Used by `stablequant run` (a recipe with `bits: {mixed: ...}`) and `benchmarks/mixed_precision.py`. Files only
(matplotlib's Agg backend), written atomically.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sq_plugin.core.files import atomic_write
from sq_plugin.core.mixed import pareto_front


def _save(fig: Any, path: str | os.PathLike) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    data = buffer.getvalue()
    return atomic_write(path, lambda f: f.write(data))


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt


def bits_chart(path: str | os.PathLike, allocations: Mapping[str, Mapping[str, int]],
               params: Mapping[str, int], *, title: str) -> Path:
    """One bar per layer (network order, labelled by name) per allocation: its weight width; the bar's label
    in the legend carries the allocation's parameter-weighted mean."""
    plt = _pyplot()
    layers = list(next(iter(allocations.values())))
    fig, ax = plt.subplots(figsize=(max(8.0, 0.16 * len(layers) * max(1, len(allocations))), 4.8))
    width = 0.8 / max(1, len(allocations))
    for i, (label, bits) in enumerate(allocations.items()):
        total = sum(params[n] for n in layers)
        mean = sum(bits[n] * params[n] for n in layers) / total
        ax.bar([x + i * width for x in range(len(layers))], [bits[n] for n in layers], width=width,
               label=f"{label} (mean {mean:.2f} bits)")
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(layers))])
    ax.set_xticklabels(layers, rotation=90, fontsize=5)
    ax.set_ylabel("weight bits")
    ax.set_yticks([2, 3, 4, 5, 6, 8])
    ax.set_ylim(0, 8.5)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def pareto_chart(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], *, title: str) -> Path:
    """WER (%) against size (MB) for every row with `bytes`, `wer` and `wer_ci95` (ΔWER interval, as fractions);
    error bars: the 95% interval of ΔWER, placed at the row's WER; the float model as a line; the Pareto
    front of the quantized rows joined."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    quantized = [r for r in rows if r["method"] != "fp"]
    fp = [r for r in rows if r["method"] == "fp"]
    kinds = sorted({r["method"].split("@")[0] for r in quantized})
    for kind in kinds:
        sel = [r for r in quantized if r["method"].split("@")[0] == kind]
        xs = [r["bytes"] / 1e6 for r in sel]
        ys = [r["wer"] * 100 for r in sel]
        lows = [max(0.0, -(r["wer_ci95"][0] - (r["wer"] - r["fp_wer"])) * 100) for r in sel]
        highs = [max(0.0, (r["wer_ci95"][1] - (r["wer"] - r["fp_wer"])) * 100) for r in sel]
        ax.errorbar(xs, ys, yerr=[lows, highs], fmt="o", capsize=3, label=kind)
    if quantized:
        front = pareto_front([(r["bytes"], r["wer"]) for r in quantized])
        ax.plot([quantized[i]["bytes"] / 1e6 for i in front], [quantized[i]["wer"] * 100 for i in front],
                "k--", linewidth=0.8, label="Pareto front")
    if fp:
        ax.axhline(fp[0]["wer"] * 100, color="grey", linewidth=0.8, label=f"float32 ({fp[0]['bytes'] / 1e6:.1f} MB)")
    ax.set_xscale("log")
    ax.set_xlabel("size on disk (MB, log scale)")
    ax.set_ylabel("WER % (bars: 95% interval of ΔWER vs float)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


__all__ = ["bits_chart", "pareto_chart"]
