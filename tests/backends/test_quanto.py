"""optimum-quanto baseline: W8A8 with absmax + EMA calibration, and what it really executes on CPU."""

import importlib
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("optimum.quanto")

from sq_plugin.backends.quanto import count_int8_matmuls  # noqa: E402
from sq_plugin.backends.x86_isa import INT_MM_SATURATES, IsaError, x86_policy  # noqa: E402
from sq_plugin.families.ctc import quantize_ctc_quanto  # noqa: E402
from sq_plugin.speech.models import SpeechModel  # noqa: E402

N_LINEAR = 2 * 6 + 2  # per layer q,k,v,out,fc1,fc2; + feature projection + lm_head
N_CONV1D = 7 + 1  # feature extractor + positional conv


def ctc_bundle(model) -> SpeechModel:
    from transformers import Wav2Vec2FeatureExtractor

    fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                                  return_attention_mask=False)
    return SpeechModel("tiny", "ctc", model, SimpleNamespace(feature_extractor=fe), info={"model_config": model.config})


def utterances(n: int) -> list:
    rng = np.random.default_rng(0)
    return [SimpleNamespace(audio=(rng.standard_normal(12000 + 2000 * i) * 0.1).astype(np.float32)) for i in range(n)]


def logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


INT_MM_EXACT = x86_policy().int32_accumulation


@pytest.mark.skipif(not INT_MM_EXACT, reason=f"this CPU has no VNNI: {INT_MM_SATURATES} (the refusal is tested)")
@pytest.mark.parametrize("model_fixture", ["tiny_wav2vec2", "tiny_hubert"])
def test_quanto_w8a8_runs_int8_matmuls_on_cpu(model_fixture, request):
    model = request.getfixturevalue(model_fixture)
    bundle = ctc_bundle(model)
    calibration = utterances(3)
    x = torch.from_numpy(bundle.processor.feature_extractor(calibration[0].audio, sampling_rate=16000)
                         .input_values[0])[None, :]
    ref = logits(model, x)
    quantized = quantize_ctc_quanto(bundle, calibration)

    # quanto's CPU qbytes_mm takes torch._int_mm for int8 x int8: one INT8 GEMM per Linear, measured
    assert quantized.int8_kernels == N_LINEAR
    assert not quantized.simulated and "torch._int_mm" in quantized.backend
    assert quantized.op_counts == {"linear": N_LINEAR, "conv1d_float": N_CONV1D}  # no QConv1d in quanto
    err = float((logits(quantized.bundle.model, x) - ref).norm() / ref.norm())
    assert 0 < err < 0.1
    assert quantized.calib_seconds > 0 and quantized.lower_seconds == 0.0
    # quanto swaps modules in place: the adapter works on a copy, the float model is untouched
    assert torch.equal(logits(model, x), ref)
    assert count_int8_matmuls(model, (x,)) == 0


def test_quanto_is_refused_where_cpu_int_mm_saturates(tiny_wav2vec2, monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # the policy only (see tests/backends/test_x86_isa.py)
    with pytest.raises(IsaError, match=r"optimum-quanto W8A8 .* wrong results on this CPU \(avx2\).*saturates.*Fix"):
        quantize_ctc_quanto(ctc_bundle(tiny_wav2vec2), utterances(1))


def test_quanto_baseline_is_w8a8_only(tiny_wav2vec2):
    bundle = ctc_bundle(tiny_wav2vec2)
    with pytest.raises(ValueError, match="W8A8 only.*a_bits=4, w_bits=8"):
        quantize_ctc_quanto(bundle, utterances(1), a_bits=4)
    with pytest.raises(ValueError, match="W8A8 only.*a_bits=8, w_bits=6"):
        quantize_ctc_quanto(bundle, utterances(1), w_bits=6)
    with pytest.raises(ValueError, match="calibration set is empty"):
        quantize_ctc_quanto(bundle, [])


def test_missing_quanto_names_the_extra(monkeypatch):
    for name in [n for n in sys.modules if n == "optimum.quanto" or n.startswith("optimum.quanto.")]:
        monkeypatch.setitem(sys.modules, name, None)  # None: what an uninstalled package looks like to import
    monkeypatch.delitem(sys.modules, "sq_plugin.backends.quanto")
    with pytest.raises(ImportError, match=r'pip install "sq-plugin\[quanto\]"'):
        importlib.import_module("sq_plugin.backends.quanto")
