"""Framework-free core: statistics, range rules and N-bit quantization math (numpy/torch only)."""

from sq_plugin.core.quant import fake_quantize, qparams_from_range, quant_bounds
from sq_plugin.core.ranges import (
    RULES,
    RangeRule,
    compute_range,
    max_range,
    mse_range,
    percentile_range,
    percentile_then_mse_range,
)
from sq_plugin.core.stats import Histogram

__all__ = [
    "RULES",
    "Histogram",
    "RangeRule",
    "compute_range",
    "fake_quantize",
    "max_range",
    "mse_range",
    "percentile_range",
    "percentile_then_mse_range",
    "qparams_from_range",
    "quant_bounds",
]
