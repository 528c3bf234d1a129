"""Real end to end on the shipped HuBERT reference: offline corpus, StableQuant search, real INT8 kernels."""

import pytest

from sq_plugin.pipeline import EVAL_KWARGS, quantize_ctc_pt2e, search_ctc
from sq_plugin.search import SearchConfig
from sq_plugin.speech.corpus import load_split
from sq_plugin.speech.evaluate import evaluate
from sq_plugin.speech.models import load_model


@pytest.fixture(scope="module")
def hubert():
    return load_model("sq/hubert-ref")


@pytest.mark.slow
def test_stablequant_w8a8_on_real_int8_kernels_keeps_wer(hubert):
    dev, test = load_split("dev", limit=12), load_split("test", limit=24)
    fp = evaluate(hubert, test, progress=False, **EVAL_KWARGS)

    search = search_ctc(hubert, dev, SearchConfig(), progress=False)
    n_layers = len(search.layers)
    assert n_layers == sum(1 for _ in search.per_layer_rules())
    assert search.evaluations == 1 + n_layers + 1 + len(search.flagged) * len(SearchConfig().percentiles) + 1
    assert search.final_metric <= search.max_metric + 1e-9 or search.flagged == []

    quantized = quantize_ctc_pt2e(hubert, dev, per_layer=search.per_layer_rules())
    assert not quantized.simulated and "onednn-int8" in quantized.backend
    assert quantized.op_counts == {"conv1d": 8, "linear": n_layers - 8}
    assert quantized.int8_kernels == n_layers  # every Linear and Conv1d runs as a oneDNN INT8 kernel
    int8 = evaluate(quantized.bundle, test, progress=False, **EVAL_KWARGS)
    assert abs(int8.wer - fp.wer) <= 0.05
    assert abs(int8.cer - fp.cer) <= 0.02


def test_sub_8_bit_runs_are_simulated(hubert):
    dev = load_split("dev", limit=2)
    quantized = quantize_ctc_pt2e(hubert, dev, a_bits=6, w_bits=6)
    assert quantized.simulated and quantized.int8_kernels == 0 and "simulation" in quantized.backend


def test_empty_calibration_and_wrong_kind(hubert):
    with pytest.raises(ValueError, match="calibration set is empty"):
        search_ctc(hubert, [])
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        search_ctc(hubert, load_split("dev", limit=1), metric="bleu")
