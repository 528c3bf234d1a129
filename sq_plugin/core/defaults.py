"""The search defaults that the search, the recipe schema and the INC config share (torch-free)."""

# Candidate cut-offs of a flagged layer (100 = no clipping; it must be among them).
DEFAULT_PERCENTILES: tuple[float, ...] = (100.0, 99.99, 99.9, 99.8, 99.5, 99.0)
# Flag a layer when quantizing it alone costs more than this: 0.25 % absolute WER, the paper's value.
DEFAULT_THRESHOLD = 0.0025
# Candidate clip factors of the MSE rule.
DEFAULT_MSE_GRID = 100
# The percentile baseline's one cut-off for every layer (recipe method_options.percentile), which the search also
# offers as a built-in rule ("percentile_clip": clip |x| there, no MSE step).
DEFAULT_BASELINE_PERCENTILE: float = 99.99
