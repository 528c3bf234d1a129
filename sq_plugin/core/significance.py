"""Is a WER difference real? A paired bootstrap over utterances (numpy only).

    errors_fp, words = word_errors(refs, fp_hyps)         # sq_plugin.speech.evaluate
    errors_q, _ = word_errors(refs, quantized_hyps)
    d = paired_bootstrap(errors_fp, errors_q, words)
    print(f"{100 * d.delta:+.2f} pp [{100 * d.low:+.2f}, {100 * d.high:+.2f}], p = {d.p_value:.3f}")

Corpus WER is total word edits over total reference words, so ΔWER of two systems on the same utterances is
(Σ e_b − Σ e_a) / Σ n. The bootstrap resamples utterances with replacement (the same ones for both systems:
the pairing is what makes small differences measurable) and reads the interval off the resampled ΔWERs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_RESAMPLES = 10_000


@dataclass(frozen=True)
class PairedDelta:
    """ΔWER = WER(b) − WER(a) as a fraction, with its bootstrap interval and two-sided p-value."""

    delta: float
    low: float
    high: float
    p_value: float
    n: int
    confidence: float
    resamples: int

    @property
    def significant(self) -> bool:
        """The interval excludes 0: the difference is not what resampling the utterances alone gives."""
        return self.low > 0 or self.high < 0

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def to_dict(self) -> dict:
        return asdict(self)


def paired_bootstrap(errors_a: Sequence[float], errors_b: Sequence[float], words: Sequence[float], *,
                     resamples: int = DEFAULT_RESAMPLES, confidence: float = 0.95, seed: int = 0) -> PairedDelta:
    """Paired bootstrap of the corpus-level ΔWER between systems a and b on the same utterances.

    errors_a / errors_b: word edits per utterance; words: reference words per utterance (all the same length).
    Deterministic for a given seed. p_value: twice the share of resampled ΔWERs on the far side of 0 (at least
    1/resamples), capped at 1."""
    a, b, n = (np.asarray(x, dtype=np.float64) for x in (errors_a, errors_b, words))
    if not (a.shape == b.shape == n.shape) or a.ndim != 1:
        raise ValueError(f"errors_a, errors_b and words must be 1-D and pair up (got {a.shape}, {b.shape}, "
                         f"{n.shape}): one entry per utterance")
    if a.size == 0:
        raise ValueError("paired_bootstrap: no utterances; evaluate on at least one")
    if (n <= 0).any() or (a < 0).any() or (b < 0).any():
        raise ValueError("paired_bootstrap: every utterance needs > 0 reference words and errors >= 0")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95 (got {confidence!r})")
    if resamples < 100:
        raise ValueError(f"resamples must be >= 100 for a usable interval (got {resamples}); 10000 is typical")
    diff = b - a
    delta = float(diff.sum() / n.sum())
    rng = np.random.default_rng(seed)
    deltas = np.empty(resamples)
    chunk = max(1, 2_000_000 // a.size)  # bound the index matrix to ~16 MB
    for start in range(0, resamples, chunk):
        idx = rng.integers(0, a.size, size=(min(chunk, resamples - start), a.size))
        deltas[start : start + idx.shape[0]] = diff[idx].sum(axis=1) / n[idx].sum(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(deltas, [tail, 1 - tail])
    far_side = min(np.mean(deltas <= 0), np.mean(deltas >= 0)) if delta != 0 else 0.5
    p_value = float(min(1.0, max(2 * far_side, 1 / resamples)))
    return PairedDelta(delta, float(low), float(high), p_value, int(a.size), confidence, resamples)


__all__ = ["DEFAULT_RESAMPLES", "PairedDelta", "paired_bootstrap"]
