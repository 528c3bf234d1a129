"""The range decision: StableQuant's layer-adaptive search (`stablequant`) and the exact replay of unchanged
layer outputs between its evaluations (`prefix_cache`). It drives a plain `nn.Module` through the fake-quant
simulation (`sq_plugin.backends.simulate`) and writes a `QuantPlan` (`SearchResult.to_plan`)."""

from sq_plugin.search.rules import layer_ops, rule_plan
from sq_plugin.search.stablequant import (
    DEFAULT_PERCENTILES,
    LayerDecision,
    SearchConfig,
    SearchResult,
    collect_input_histograms,
    stablequant_search,
)

__all__ = ["DEFAULT_PERCENTILES", "LayerDecision", "SearchConfig", "SearchResult", "collect_input_histograms",
           "layer_ops", "rule_plan", "stablequant_search"]
