"""INC 3.x adapter: StableQuant registered as an INC algorithm, and INC's own static quant as a baseline."""

import importlib
import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("neural_compressor.torch.quantization")

from neural_compressor.common.base_config import config_registry  # noqa: E402
from neural_compressor.torch.quantization import convert, prepare, quantize  # noqa: E402
from neural_compressor.torch.utils.utility import algos_mapping  # noqa: E402
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e  # noqa: E402

from sq_plugin.backends.inc import (  # noqa: E402
    StableQuantConfig,
    quantize_inc_static,
    stablequant_entry,
)
from sq_plugin.backends.pt2e import (  # noqa: E402
    StableQuantObserver,
    calibrate,
    count_quantized_ops,
    lower_x86,
    prepare_stablequant,
    stablequant_x86_config,
    stablequant_x86_quantizer,
)
from sq_plugin.backends.x86_isa import IsaError, x86_policy  # noqa: E402
from sq_plugin.core.ranges import RangeRule  # noqa: E402
from sq_plugin.families.ctc import quantize_ctc_inc  # noqa: E402
from sq_plugin.speech.models import SpeechModel  # noqa: E402

N_LINEAR = 2 * 6 + 2  # per layer q,k,v,out,fc1,fc2; + feature projection + lm_head
N_CONV1D = 7 + 1  # feature extractor + positional conv


def audio(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, n, generator=g) * 0.1


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


X = audio(16000, 0)
BATCHES = [audio(12000 + 2000 * i, i + 1) for i in range(3)]


def logits(model, x=X) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def direct_pt2e(model, act_rule: RangeRule, per_layer: dict | None = None) -> torch.fx.GraphModule:
    """Our PT2E path without INC, as quantize_ctc_pt2e runs it."""
    quantizer = stablequant_x86_quantizer(stablequant_x86_config(act_rule), per_layer)
    prepared = prepare_stablequant(model, (X,), quantizer)
    calibrate(prepared, BATCHES)
    return convert_pt2e(prepared)


def input_observers(prepared: torch.fx.GraphModule) -> dict[str, StableQuantObserver]:
    return {m.layer_name: m for m in prepared.modules()
            if isinstance(m, StableQuantObserver) and m.layer_name.endswith("(input)")}


def ctc_bundle(model) -> SpeechModel:
    from transformers import Wav2Vec2FeatureExtractor

    fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                                  return_attention_mask=False)
    return SpeechModel("tiny-w2v2", "ctc", model, SimpleNamespace(feature_extractor=fe),
                       info={"model_config": model.config})


def utterances(n: int) -> list:
    rng = np.random.default_rng(0)
    return [SimpleNamespace(audio=(rng.standard_normal(12000 + 2000 * i) * 0.1).astype(np.float32)) for i in range(n)]


def test_importing_the_adapter_registers_stablequant_with_inc():
    assert config_registry.get_cls_configs()["torch"]["stablequant"] is StableQuantConfig
    assert algos_mapping["stablequant"] is stablequant_entry


def test_config_round_trips_and_validates():
    config = StableQuantConfig(a_bits=6, percentile=99.9, per_layer={
        "lm_head": RangeRule("percentile", 99.0), "wav2vec2.feature_projection.projection": {"percentile": 99.5},
        "wav2vec2.encoder.layers.0.attention.q_proj": None})
    # stored as dicts; a partial entry takes the missing keys from the global rule
    assert config.per_layer == {
        "lm_head": {"method": "percentile", "percentile": 99.0, "mse_grid": 100},
        "wav2vec2.feature_projection.projection": {"method": "percentile_then_mse", "percentile": 99.5,
                                                   "mse_grid": 100},
        "wav2vec2.encoder.layers.0.attention.q_proj": None}
    assert config.act_rule == RangeRule("percentile_then_mse", 99.9, 100)
    # INC's _post_init built a leaf global config (white_list=None) with the same params, without recursing
    leaf = config.global_config
    assert leaf.white_list is None and leaf.global_config is None
    assert (leaf.a_bits, leaf.act_rule, leaf.per_layer) == (config.a_bits, config.act_rule, config.per_layer)
    assert StableQuantConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config

    with pytest.raises(ValueError, match="unknown range rule 'kl'"):
        StableQuantConfig(method="kl")
    with pytest.raises(ValueError, match="a_bits must be an integer from 2 to 8"):
        StableQuantConfig(a_bits=9)
    with pytest.raises(ValueError, match="percentile must be in"):
        StableQuantConfig(per_layer={"lm_head": {"percentile": 120}})
    with pytest.raises(TypeError, match=r"unknown parameter\(s\) \['n_grid'\]"):
        StableQuantConfig(n_grid=10)
    with pytest.raises(ValueError, match="per_layer="):
        StableQuantConfig().set_local("lm_head", StableQuantConfig()).to_config_mapping()


def test_inc_quantize_and_prepare_convert_equal_the_direct_pt2e_path(tiny_wav2vec2, conv1d_counts):
    model = tiny_wav2vec2
    per_layer = {"lm_head": RangeRule("percentile", 99.0)}
    expected = direct_pt2e(model, RangeRule("percentile_then_mse", 99.9), per_layer)
    config = StableQuantConfig(percentile=99.9, per_layer=per_layer)

    via_quantize = quantize(model, config, run_fn=calibrate, run_args=(BATCHES,), example_inputs=(X,))
    prepared = prepare(model, config, example_inputs=(X,))
    calibrate(prepared, BATCHES)
    via_prepare_convert = convert(prepared)

    # same graph, same observers, same data -> same qparams -> the same logits
    want = logits(expected)
    assert (logits(via_quantize) - want).abs().max() <= 1e-6
    assert (logits(via_prepare_convert) - want).abs().max() <= 1e-6
    assert count_quantized_ops(via_quantize) == {"linear": N_LINEAR, **conv1d_counts(N_CONV1D)}

    # and it lowers to oneDNN INT8 kernels like the direct path: every Linear and every Conv1d
    compiled, report = lower_x86(via_quantize, (X,))
    assert (report.qlinear, report.qconv) == (N_LINEAR, conv1d_counts(N_CONV1D)["conv1d"])
    assert rel_err(logits(compiled), want) < 0.02 < rel_err(want, logits(model))


def test_inc_quantize_not_inplace_leaves_the_users_model_working(tiny_wav2vec2):
    """quantize(..., inplace=False) must not break the float model (it deep-copies, and folding weight
    norm on the copy used to delete the shared class's `weight`); a second quantize, as autotune runs
    one per trial, then works too."""
    model = tiny_wav2vec2
    want = logits(model)
    for _ in range(2):
        quantize(model, StableQuantConfig(), run_fn=calibrate, run_args=(BATCHES,), example_inputs=(X,),
                 inplace=False)
        assert torch.equal(logits(model), want)
    assert hasattr(model.wav2vec2.encoder.pos_conv_embed.conv, "parametrizations")


def test_int8_grid_reaches_the_inc_config(tiny_wav2vec2, monkeypatch):
    config = StableQuantConfig(int8_grid="narrow_activations")
    assert StableQuantConfig.from_dict(config.to_dict()).int8_grid == "narrow_activations"
    prepared = prepare(tiny_wav2vec2, config, example_inputs=(X,))
    assert {m.quant_max for m in input_observers(prepared).values()} == {127}
    with pytest.raises(ValueError, match="int8_grid must be one of auto, full, narrow_weights, narrow_activations"):
        StableQuantConfig(int8_grid="7bit")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # the policy, not the kernels: see test_x86_isa
    with pytest.raises(RuntimeError, match="int8_grid='full' needs"):
        prepare(tiny_wav2vec2, StableQuantConfig(int8_grid="full"), example_inputs=(X,))


def test_dict_config_and_per_layer_rules_reach_the_observers(tiny_wav2vec2):
    model = tiny_wav2vec2
    per_layer = {"lm_head": {"method": "percentile", "percentile": 99.0}}
    everywhere_max = prepare(model, StableQuantConfig(method="max"), example_inputs=(X,))
    lm_head_clipped = prepare(model, {"stablequant": {"method": "max", "per_layer": per_layer}}, example_inputs=(X,))
    calibrate(everywhere_max, BATCHES)
    calibrate(lm_head_clipped, BATCHES)

    plain, clipped = input_observers(everywhere_max), input_observers(lm_head_clipped)
    assert plain.keys() == clipped.keys() and "lm_head (input)" in clipped
    assert clipped["lm_head (input)"].rule == RangeRule("percentile", 99.0, 100)
    lo_max, hi_max = plain["lm_head (input)"].compute_range()
    lo_p99, hi_p99 = clipped["lm_head (input)"].compute_range()
    assert lo_max <= lo_p99 < hi_p99 <= hi_max
    assert float(hi_p99 - lo_p99) < 0.9 * float(hi_max - lo_max)
    for name, observer in clipped.items():  # every other layer kept the global rule
        if name != "lm_head (input)":
            assert observer.rule == RangeRule("max", 100.0, 100)
            assert all(torch.equal(a, b) for a, b in zip(observer.compute_range(), plain[name].compute_range(),
                                                          strict=True))

    # the dict config converts to the same model as the direct path with those rules
    want = logits(direct_pt2e(model, RangeRule("max"), {"lm_head": RangeRule("percentile", 99.0)}))
    assert (logits(convert(lm_head_clipped)) - want).abs().max() <= 1e-6


def test_a_model_exported_with_inc_goes_through_the_same_path(tiny_wav2vec2, conv1d_counts):
    from neural_compressor.torch.export import export
    from torch.export import Dim

    # INC's documented flow: export first (this keeps weight norm as graph ops), then prepare/convert
    exported = export(tiny_wav2vec2, (X,), dynamic_shapes=({1: Dim.AUTO},))
    prepared = prepare(exported, StableQuantConfig(), example_inputs=(X,))
    calibrate(prepared, BATCHES)
    converted = convert(prepared)
    assert count_quantized_ops(converted) == {"linear": N_LINEAR, **conv1d_counts(N_CONV1D)}
    want = logits(direct_pt2e(tiny_wav2vec2, RangeRule()))
    assert (logits(converted) - want).abs().max() <= 1e-6


@pytest.mark.parametrize("act_algo", ["minmax", "kl"])
def test_inc_builtin_static_quant_baseline(tiny_wav2vec2, act_algo):
    model = tiny_wav2vec2
    ref = logits(model)
    converted = quantize_inc_static(model, (X,), BATCHES, act_algo=act_algo)
    # INC's X86InductorQuantizer quantizes every Linear; standalone Conv1d stays float (INC as shipped)
    assert count_quantized_ops(converted) == {"linear": N_LINEAR, "conv1d_float": N_CONV1D}
    assert 0 < rel_err(logits(converted), ref) < 0.1


def test_quantize_ctc_inc_lowers_to_int8_kernels(tiny_wav2vec2):
    bundle = ctc_bundle(tiny_wav2vec2)
    calibration = utterances(3)
    x = torch.from_numpy(bundle.processor.feature_extractor(calibration[0].audio, sampling_rate=16000)
                         .input_values[0])[None, :]
    ref = logits(bundle.model, x)
    if not x86_policy().int32_accumulation:
        # INC always quantizes activations on 0..255, which oneDNN saturates without VNNI: refused, layer by layer
        with pytest.raises(IsaError, match=r"INT8 op\(s\) of this graph would be computed wrong .*0\.\.255"):
            quantize_ctc_inc(bundle, calibration, act_algo="minmax")
        return
    quantized = quantize_ctc_inc(bundle, calibration, act_algo="minmax")
    assert not quantized.simulated and "onednn-int8" in quantized.backend and "minmax" in quantized.backend
    assert quantized.op_counts == {"linear": N_LINEAR, "conv1d_float": N_CONV1D}
    # INC converts with fold_quantize=False; Inductor's freezing still lowers every quantized Linear
    assert quantized.int8_kernels == N_LINEAR
    assert quantized.calib_seconds > 0 and quantized.lower_seconds > 0
    assert rel_err(logits(quantized.bundle.model, x), ref) < 0.1
    assert quantized.bundle.info["model_config"] is tiny_wav2vec2.config
    assert torch.equal(logits(bundle.model, x), ref)  # the float model is untouched


def test_inc_baseline_refuses_what_inc_cannot_express(tiny_wav2vec2):
    bundle = ctc_bundle(tiny_wav2vec2)
    with pytest.raises(ValueError, match="INC 3.10 static quant is int8-only.*a_bits=6, w_bits=6"):
        quantize_ctc_inc(bundle, utterances(1), act_algo="minmax", a_bits=6, w_bits=6)
    with pytest.raises(ValueError, match="int8-only.*a_bits=8, w_bits=4"):
        quantize_inc_static(tiny_wav2vec2, (X,), BATCHES, act_algo="kl", w_bits=4)
    with pytest.raises(ValueError, match="unknown INC act_algo 'percentile'"):
        quantize_ctc_inc(bundle, utterances(1), act_algo="percentile")
    with pytest.raises(ValueError, match="calibration set is empty"):
        quantize_ctc_inc(bundle, [], act_algo="minmax")


def test_missing_inc_names_the_extra(monkeypatch):
    for name in [n for n in sys.modules if n.split(".")[0] == "neural_compressor"]:
        monkeypatch.setitem(sys.modules, name, None)  # None: what an uninstalled package looks like to import
    monkeypatch.delitem(sys.modules, "sq_plugin.backends.inc")
    with pytest.raises(ImportError, match=r'pip install "sq-plugin\[inc\]"'):
        importlib.import_module("sq_plugin.backends.inc")
