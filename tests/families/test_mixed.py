"""Mixed-precision weights on a real model: the shipped wav2vec2 reference, oneDNN INT8 kernels, packed storage."""

import numpy as np
import pytest
import torch

from sq_plugin.backends.artifact import _get_attr, layer_qparams
from sq_plugin.backends.packed import fp32_nbytes, load_packed, save_packed
from sq_plugin.backends.pt2e import StoredScalePerChannelObserver
from sq_plugin.core.grid import PlanError
from sq_plugin.core.ranges import RangeRule
from sq_plugin.families.ctc import ctc_inputs, ctc_statistics, quantize_ctc_pt2e
from sq_plugin.families.mixed import family_sensitivity, folded_model, quantize_mixed, train_mixed
from sq_plugin.search.mixed_precision import mixed_plan, stored_weights
from sq_plugin.search.mixed_training import MixedTrainConfig
from sq_plugin.search.rules import layer_ops, rule_plan
from sq_plugin.speech.corpus import load_split
from sq_plugin.speech.models import load_model

WIDTHS = (2, 3, 4, 5, 6, 8)


@pytest.fixture(scope="module")
def w2v():
    return load_model("sq/wav2vec2-ref")


@pytest.fixture(scope="module")
def dev():
    return load_split("dev", limit=3)


@pytest.fixture(scope="module")
def base(w2v, dev):
    return rule_plan(ctc_statistics(w2v, dev), layer_ops(folded_model(w2v)), RangeRule("percentile", percentile=99.99))


def random_widths(plan, seed=0):
    rng = np.random.default_rng(seed)
    return {n: int(rng.choice(WIDTHS)) for n in plan.quantized}


def test_every_width_runs_on_int8_kernels_with_exactly_the_stored_codes(w2v, dev, base, conv1d_counts):
    plan = mixed_plan(base, random_widths(base))
    model = folded_model(w2v)
    weights = stored_weights(model, plan)
    quantized = quantize_mixed(w2v, dev, plan, weights)
    convs = conv1d_counts(8, groups=16, channels_per_group=w2v.model.config.hidden_size // 16)
    n_layers = len(plan.quantized)
    assert not quantized.simulated
    assert quantized.int8_kernels == n_layers - convs.get("conv1d_weight_only", 0)
    assert "mixed 2/3/4/5/6/8-bit weights" in quantized.backend or "mixed 2/3/4/5/6/7-bit weights" in quantized.backend
    graph = layer_qparams(quantized.converted)
    compared = 0
    for name, entry in graph.items():
        if entry["weight"] is None:
            continue
        codes = _get_attr(quantized.converted, entry["weight"]["int8"])
        scale = _get_attr(quantized.converted, entry["weight"]["scale"])
        assert torch.equal(codes, weights[name].codes), name
        assert torch.equal(scale.float(), weights[name].scale), name
        bits = plan.layers[name].weight.bits
        assert (entry["weight"]["quant_min"], entry["weight"]["quant_max"]) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        compared += 1
    assert compared == n_layers
    # and the INT8 model computes what the stored weights say (a float copy holding them, same input grids)
    x = ctc_inputs(w2v, dev[0].audio)
    simulated = quantize_mixed(w2v, dev, plan, weights, simulate=True)
    with torch.no_grad():
        int8 = quantized.bundle.model(*x)
        fq = simulated.bundle.model(*x)
    int8, fq = (o.logits if hasattr(o, "logits") else o for o in (int8, fq))
    assert float((int8 - fq).abs().max()) < 0.05 * float(fq.abs().max())


def test_a_stored_plan_without_its_weights_is_refused(w2v, dev, base):
    plan = mixed_plan(base, dict.fromkeys(base.quantized, 4))
    with pytest.raises(PlanError, match="pass weights="):
        quantize_ctc_pt2e(w2v, dev, plan=plan)
    with pytest.raises(ValueError, match="pass plan= too"):
        quantize_ctc_pt2e(w2v, dev, weights=stored_weights(folded_model(w2v), plan))
    observer = StoredScalePerChannelObserver(stored_scale=torch.full((4,), 0.1), quant_min=-8, quant_max=7)
    with pytest.raises(PlanError, match="not on its stored grid"):
        observer(torch.full((4, 3), 0.123))
    assert torch.equal(observer(torch.full((4, 3), 0.3)), torch.full((4, 3), 0.3))


def test_packed_checkpoint_is_a_quarter_of_int8_at_two_bits_and_loads_back(w2v, base, tmp_path):
    model = folded_model(w2v)
    fp32 = fp32_nbytes(model)
    sizes = {}
    for width in (8, 4, 2):
        plan = mixed_plan(base, dict.fromkeys(base.quantized, width))
        sizes[width] = save_packed(tmp_path / f"w{width}", model, plan, stored_weights(model, plan)).bytes
    top = base.layers[base.quantized[0]].weight.bits  # what "8 bits" stores here: 7 on x86 without VNNI
    assert fp32 / sizes[8] > 3.5  # int8 codes + per-channel scales + the float rest
    # the codes dominate: the size follows the width (scales and the float rest are the same in every row)
    assert sizes[8] / sizes[4] > 0.85 * top / 4 and sizes[4] / sizes[2] > 1.6
    plan = mixed_plan(base, random_widths(base, seed=1))
    weights = stored_weights(model, plan)
    save_packed(tmp_path / "mixed", model, plan, weights)
    fresh = folded_model(w2v)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    loaded_plan, loaded = load_packed(tmp_path / "mixed", fresh)
    assert loaded_plan.layers == plan.layers
    modules = dict(fresh.named_modules())
    for name, stored in weights.items():
        assert torch.equal(loaded[name].codes, stored.codes)
        assert torch.equal(modules[name].weight, stored.dequantize())


def test_sensitivity_and_training_on_the_real_model(w2v, dev, base):
    # the first two waveform convs: the layers the reference is most sensitive to at 2 bits (CTC loss +0.9 and
    # +0.55 per character on 32 dev utterances)
    layers = ["wav2vec2.feature_extractor.conv_layers.0.conv", "wav2vec2.feature_extractor.conv_layers.1.conv"]
    sens = family_sensitivity(w2v, dev, widths=(2, 8), layers=layers, progress=False)
    assert sens.evaluations == 1 + 2 * 2
    for name in layers:
        assert sens.sensitivity[name][2] > 0.1 > 0.01 > abs(sens.sensitivity[name][8])
    result = train_mixed(w2v, load_split("train", limit=2), base, MixedTrainConfig(budget_bits=4.0, steps=2),
                         progress=False)
    assert set(result.weights) == set(base.quantized)
    total = sum(w.codes.numel() for w in result.weights.values())
    assert sum(result.bits[n] * result.weights[n].codes.numel() for n in result.bits) / total <= 4.0


def test_four_bit_linears_run_on_the_int4_kernel_with_the_stored_codes(w2v, dev, base):
    from sq_plugin.backends.weights import install_stored_weights
    from sq_plugin.families.mixed import quantize_int4_kernel

    plan = mixed_plan(base, dict.fromkeys(base.quantized, 4))
    weights = stored_weights(folded_model(w2v), plan)
    quantized = quantize_int4_kernel(w2v, plan, weights)
    linears = [n for n in plan.quantized if plan.layers[n].op == "linear"]
    assert quantized.op_counts == {"int4_linear": len(linears), "dequantized": len(plan.quantized) - len(linears)}
    assert "int4 kernel" in quantized.backend and "bf16 activations" in quantized.backend
    assert all(quantized.plan.layers[n].activation is None for n in plan.quantized)  # weight-only, said so
    reference = install_stored_weights(folded_model(w2v), weights)
    x = ctc_inputs(w2v, dev[0].audio)
    with torch.no_grad():
        got, want = quantized.bundle.model(*x).logits, reference(*x).logits
    assert float((got - want).abs().max()) < 0.05 * float(want.abs().max())  # bf16 activations only
