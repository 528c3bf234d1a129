"""Model families, with the same verbs: calibration inputs, the layer list, quantize (from a plan, on a backend),
evaluate, save and load.

- `ctc`: wav2vec2 / HuBERT CTC models;
- `whisper`: Whisper's search and simulation; `whisper_int8`: its INT8 encoder and static-cache decoder step,
  which take a plan made on the HF module names through `graph_layer_names`.
"""

from collections.abc import Sequence
from typing import Any

from sq_plugin.core.defaults import QUICK_EVERY


def metric_subset(calibration: Sequence[Any], metric_size: int | None) -> Sequence[Any]:
    """The calibration utterances a search scores its metric on: the first `metric_size` (None: all). The
    statistics always see every one."""
    if metric_size is None:
        return calibration
    if isinstance(metric_size, bool) or not isinstance(metric_size, int) or metric_size < 1:
        raise ValueError(f"metric_size must be a whole number >= 1 (got {metric_size!r}), or None for every "
                         "calibration utterance")
    return calibration[:metric_size]


def quick_subset(scored: Sequence[Any]) -> Sequence[Any]:
    """The utterances of a search's quick metric (`SearchConfig.shortlist`): every `QUICK_EVERY`-th of those the
    metric scores, spread over the set (a split may be ordered by speaker), at least one."""
    return scored[::QUICK_EVERY]
