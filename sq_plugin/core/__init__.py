"""Framework-free core: statistics, range rules, N-bit quantization math, grids and the plan.

Names load on first use, so that `sq_plugin.core.grid` and `sq_plugin.core.plan` (torch-free) can be
imported without numpy or torch (`stablequant validate`, `stablequant plan show`).
"""

from importlib import import_module
from typing import Any

_WHERE = {
    "fake_quantize": "quant", "qparams_from_range": "quant", "quant_bounds": "grid",
    "RULES": "ranges", "RangeRule": "ranges", "compute_range": "ranges", "max_range": "ranges",
    "mse_range": "ranges", "percentile_range": "ranges", "percentile_then_mse_range": "ranges",
    "Histogram": "stats", "Grid": "grid", "QuantPlan": "plan", "LayerPlan": "plan",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'sq_plugin.core' has no attribute {name!r}")
    return getattr(import_module(f"sq_plugin.core.{_WHERE[name]}"), name)
