"""The search defaults that the search, the recipe schema and the INC config share (torch-free)."""

# Candidate cut-offs of a flagged layer (100 = no clipping; it must be among them).
DEFAULT_PERCENTILES: tuple[float, ...] = (100.0, 99.99, 99.9, 99.8, 99.5, 99.0)
# Flag a layer when quantizing it alone costs more than this: 0.25 % absolute WER, the paper's value.
DEFAULT_THRESHOLD = 0.0025
# The screen threshold of each search metric when none is given, in the metric's units: WER / CER / token error as a
# fraction (the paper's 0.25 %), CTC loss in nats per reference character, the KL of the CTC posteriors from the
# float model's in nats per frame, Whisper's teacher-forced loss and KL in nats per token. The proxies' values are
# the ones BENCHMARKS.md measured with (ctc_kl at W8A8: the waveform conv alone at MAX costs 4.5e-3 nats/frame on
# wav2vec2-ref, the next layers 1e-4 or less).
METRIC_THRESHOLDS: dict[str, float] = {"wer": DEFAULT_THRESHOLD, "cer": DEFAULT_THRESHOLD, "ctc_loss": 0.001,
                                       "ctc_kl": 1e-4, "tf_loss": 0.01, "tf_token_error": DEFAULT_THRESHOLD,
                                       "tf_kl": 0.01}
# shortlist: the quick metric scores every QUICK_EVERY-th of the metric's utterances (`families.quick_subset`), and the
# search gives its prefix cache that share of the budget.
QUICK_EVERY = 4
# Candidate clip factors of the MSE rule.
DEFAULT_MSE_GRID = 100
# The percentile baseline's one cut-off for every layer (recipe method_options.percentile), which the search also
# offers as a built-in rule ("percentile_clip": clip |x| there, no MSE step).
DEFAULT_BASELINE_PERCENTILE: float = 99.99
