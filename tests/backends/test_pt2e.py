"""PT2E adapter: observers inside torchao's prepare/convert, Conv1d coverage, real INT8 lowering."""

import pickle

import numpy as np
import pytest
import torch
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

from sq_plugin.backends.pt2e import (
    PercentileObserver,
    StableQuantObserver,
    StableQuantPerChannelObserver,
    StableQuantX86Quantizer,
    calibrate,
    count_quantized_ops,
    cpu_has_amx,
    export_for_quantization,
    grouped_qconv_is_safe,
    lower_x86,
    prepare_stablequant,
    stablequant_x86_config,
    stablequant_x86_quantizer,
)
from sq_plugin.backends.x86_isa import x86_policy
from sq_plugin.core import Histogram, RangeRule, compute_range, qparams_from_range

N_LINEAR = 2 * 6 + 2  # per layer q,k,v,out,fc1,fc2; + feature projection + lm_head
N_CONV1D = 7 + 1  # feature extractor + positional conv


def audio(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, n, generator=g) * 0.1


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("model_fixture", ["tiny_wav2vec2", "tiny_hubert"])
def test_ctc_model_end_to_end_to_int8_kernels(model_fixture, request, conv1d_counts):
    model = request.getfixturevalue(model_fixture)
    x = audio(16000, 0)
    with torch.no_grad():
        ref = model(x).logits
    prepared = prepare_stablequant(model, (x,))
    calibrate(prepared, [audio(12000 + 2000 * i, i + 1) for i in range(4)])
    converted = convert_pt2e(prepared)

    # (a) every Linear and every Conv1d (feature extractor + positional conv) is quantized
    assert count_quantized_ops(converted) == {"linear": N_LINEAR, **conv1d_counts(N_CONV1D)}

    # (b) real oneDNN INT8 kernels, counted by Inductor's pattern matcher
    compiled, report = lower_x86(converted, (x,))
    assert report.qconv == conv1d_counts(N_CONV1D)["conv1d"]
    assert report.qlinear == N_LINEAR

    # (c) logits close to float, INT8 kernels agree with the fake-quant graph
    with torch.no_grad():
        fake_quant = converted(x).logits
        int8 = compiled(x).logits
    assert rel_err(int8, ref) < 0.1
    # The kernels match the simulation up to rounding ties: oneDNN accumulates in another order and
    # a tie that rounds the other way moves one int8 step, which the next quantized layers carry on.
    # A float fallback would instead sit at the full quantization error from the simulation.
    assert rel_err(int8, fake_quant) < 0.02 < rel_err(fake_quant, ref)

    # another audio length: the exported graph is dynamic; the INT8 module compiles that shape once
    # more (static shapes, see Int8Module) and must again lower INT8 kernels, or it raises
    with torch.inference_mode():
        other = compiled(audio(24000, 9)).logits
    assert other.shape == (1, 74, 32)
    assert len(compiled.shapes) == 2


def test_observer_qparams_equal_core_math():
    obs = StableQuantObserver(rule=RangeRule("max"))
    data = torch.randn(1000) * 3 + 1
    obs(data)
    scale, zp = obs.calculate_qparams()
    want_scale, want_zp = qparams_from_range(float(data.min()), float(data.max()), 0, 255, symmetric=False)
    assert float(scale) == pytest.approx(float(want_scale), rel=1e-6)
    assert int(zp) == int(want_zp)


def test_observer_uses_the_core_rule_and_merges_batches():
    data = torch.from_numpy(np.random.default_rng(0).standard_t(3, size=4000)).float()
    obs = StableQuantObserver.with_args(method="percentile_then_mse", percentile=99.8)()
    for chunk in data.split(1000):
        obs(chunk)
    lo, hi = obs.compute_range()
    want = compute_range(Histogram.of(data), RangeRule("percentile_then_mse", 99.8), bits=8, symmetric=False,
                         signed=False)
    assert float(lo) == pytest.approx(float(want[0][0])) and float(hi) == pytest.approx(float(want[1][0]))
    assert float(hi) < float(data.max())


def test_weight_observer_counts_an_unchanged_weight_once_and_a_changed_one_again():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(16, 8))
    observer = StableQuantPerChannelObserver(ch_axis=0, method="percentile_then_mse", percentile=99.0)
    for _ in range(3):  # a decode step observes the same weight once per token
        observer(weight)
    assert int(observer.hist.counts.sum()) == weight.numel()
    once = StableQuantPerChannelObserver(ch_axis=0, method="percentile_then_mse", percentile=99.0)
    once(weight)
    assert all(torch.equal(a, b) for a, b in zip(observer.calculate_qparams(), once.calculate_qparams(), strict=True))
    assert list(dict(observer.named_parameters())) == []  # the tracked weight is not registered as a parameter
    restored = pickle.loads(pickle.dumps(observer))  # torch.save of a prepared model pickles its observers
    assert all(torch.equal(a, b) for a, b in zip(restored.calculate_qparams(), once.calculate_qparams(), strict=True))
    with torch.no_grad():
        weight.mul_(2.0)  # changed in place: observed again
    observer(weight)
    observer(weight.detach().clone())  # another tensor with the same values: observed too
    assert int(observer.hist.counts.sum()) == 3 * weight.numel()
    activations = StableQuantObserver()
    x = torch.randn(4, 8)
    activations(x)
    activations(x)
    assert int(activations.hist.counts.sum()) == 2 * x.numel()  # per-tensor (activation) observers count every call


def test_per_channel_observer_keeps_ch_axis_through_prepare():
    class Lin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(x)

    x = torch.randn(2, 8)
    prepared = prepare_pt2e(torch.export.export(Lin().eval(), (x,)).module(), stablequant_x86_quantizer())
    per_channel = [m for m in prepared.modules() if isinstance(m, StableQuantPerChannelObserver)]
    assert len(per_channel) == 1 and per_channel[0].ch_axis == 0
    calibrate(prepared, [x])
    scale, _ = per_channel[0].calculate_qparams()
    assert scale.shape == (4,)


def test_per_layer_override_keeps_a_layer_float(tiny_hubert, conv1d_counts):
    x = audio(8000, 0)
    quantizer = stablequant_x86_quantizer(per_layer={"hubert.feature_extractor.conv_layers.0.conv": None,
                                                     "lm_head": RangeRule("percentile", percentile=99.9)})
    prepared = prepare_stablequant(tiny_hubert, (x,), quantizer)
    calibrate(prepared, [x])
    counts = count_quantized_ops(convert_pt2e(prepared))
    assert counts == {**conv1d_counts(N_CONV1D, also_float=1), "linear": N_LINEAR}


def test_sub_8_bit_grids_use_int8_storage_with_fewer_levels():
    config = stablequant_x86_config(a_bits=6, w_bits=4)
    assert (config.input_activation.quant_min, config.input_activation.quant_max) == (0, 63)
    assert (config.weight.quant_min, config.weight.quant_max) == (-8, 7)
    spec = config.input_activation
    obs = spec.observer_or_fake_quant_ctr(dtype=spec.dtype, qscheme=spec.qscheme, quant_min=spec.quant_min,
                                          quant_max=spec.quant_max)  # what prepare_pt2e passes
    assert obs.bits == 6


def test_percentile_baseline_observer_defaults_to_99_99():
    obs = PercentileObserver()
    assert obs.rule == RangeRule("percentile", percentile=99.99)


# ---- bad input: clear errors that name the layer and the fix, never a NaN scale ----

def _prepared_tiny(tiny_hubert):
    x = audio(8000, 0)
    return prepare_stablequant(tiny_hubert, (x,)), x


def test_convert_without_calibration_names_the_layer(tiny_hubert):
    prepared, _ = _prepared_tiny(tiny_hubert)
    layer = r"hubert\.feature_extractor\.conv_layers\.0\.conv \((input|weight)\)"
    with pytest.raises(RuntimeError, match=layer + ".*never saw data"):
        convert_pt2e(prepared)


def test_nan_activation_names_the_layer(tiny_hubert):
    prepared, x = _prepared_tiny(tiny_hubert)
    bad = x.clone()
    bad[0, 100] = float("nan")
    with pytest.raises(ValueError, match=r"conv_layers\.0\.conv \(input\).*NaN/Inf"):
        calibrate(prepared, [bad])


def test_all_zero_calibration_is_an_error_not_a_nan_scale():
    obs = StableQuantObserver(layer_name="encoder.layers.0.fc1 (input)")
    obs(torch.zeros(100))
    with pytest.raises(RuntimeError, match=r"encoder\.layers\.0\.fc1 \(input\): every calibration value was 0"):
        obs.calculate_qparams()


def test_empty_calibration_set(tiny_hubert):
    prepared, _ = _prepared_tiny(tiny_hubert)
    with pytest.raises(ValueError, match="calibration set is empty"):
        calibrate(prepared, [])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"a_bits": 9}, "a_bits must be an integer from 2 to 8"),
    ({"w_bits": 1}, "w_bits must be an integer from 2 to 8"),
])
def test_invalid_bits(kwargs, message):
    with pytest.raises(ValueError, match=message):
        stablequant_x86_config(**kwargs)


def test_invalid_percentile_in_with_args():
    with pytest.raises(ValueError, match=r"percentile must be in \(0, 100\]"):
        StableQuantObserver.with_args(method="percentile", percentile=100.5)()


def test_export_helper_accepts_other_lengths(tiny_wav2vec2):
    exported = export_for_quantization(tiny_wav2vec2, (audio(8000, 0),))
    with torch.no_grad():
        assert exported(audio(12345, 1)).logits.shape[1] == 38


def test_dynamic_batch_export_serves_every_batch_size_with_the_batch_1_numbers(tiny_wav2vec2):
    from sq_plugin.backends.pt2e import prepare_stablequant

    one = audio(8000, 0)
    fixed = export_for_quantization(tiny_wav2vec2, (one,))
    batched = export_for_quantization(tiny_wav2vec2, (one,), dynamic_batch=True)
    three = torch.cat([one, audio(8000, 1), audio(8000, 2)])
    with torch.no_grad():
        assert torch.equal(batched(one).logits, fixed(one).logits)
        logits = batched(three).logits
        assert logits.shape[0] == 3
        torch.testing.assert_close(logits[2:], fixed(three[2:]).logits, atol=1e-5, rtol=1e-5)
        with pytest.raises(Exception):  # noqa: B017  (the batch-1 graph guards its batch size)
            fixed(three)
    # The prepared (observed) graph keeps the dynamic batch: calibrate with batch 1, run batch 3.
    prepared = prepare_stablequant(tiny_wav2vec2, (one,), dynamic_batch=True)
    with torch.no_grad():
        prepared(one)
        assert prepared(three).logits.shape[0] == 3


class GroupedConv(torch.nn.Module):
    """The shape of wav2vec2's positional conv, small: 4 groups of 8 channels, kernel 16."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(32, 32, 16, padding=8, groups=4)

    def forward(self, x):
        return self.conv(x)


def _grouped_conv_converted(quantize_grouped: bool):
    torch.manual_seed(0)
    xs = [torch.randn(1, 32, 400) for _ in range(3)]
    quantizer = StableQuantX86Quantizer(quantize_grouped_conv1d=quantize_grouped).set_global(stablequant_x86_config())
    prepared = prepare_pt2e(export_for_quantization(GroupedConv().eval(), (xs[0],), dynamic_dims={0: 2}), quantizer)
    calibrate(prepared, [(x,) for x in xs])
    return convert_pt2e(prepared), xs[0], quantizer


def test_grouped_conv1d_is_kept_float_and_named_when_asked():
    converted, x, quantizer = _grouped_conv_converted(False)
    # float compute, INT8 weight: the conv reads a dequantized INT8 weight and a float activation
    assert count_quantized_ops(converted) == {"conv1d_weight_only": 1}
    (conv,) = [n for n in converted.graph.nodes if n.target == torch.ops.aten.conv1d.default]
    assert "dequantize_per_channel" in str(conv.args[1].target) and conv.args[0].op == "placeholder"
    assert list(quantizer.skipped_layers) == ["conv"]
    assert "quantize_grouped_conv1d=False" in quantizer.skipped_layers["conv"]
    # the default asks this CPU's policy per conv: quantized unless oneDNN would pick its AMX kernel
    assert StableQuantX86Quantizer().quantize_grouped_conv1d is None
    assert grouped_qconv_is_safe() or cpu_has_amx()


class GroupsOfTen(torch.nn.Module):
    """hubert-ref's positional conv shape: 16 groups of 10 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(160, 160, 64, padding=32, groups=16)

    def forward(self, x):
        return self.conv(x)


def test_a_grouped_conv_oneDNN_has_no_avx2_kernel_for_stays_weight_only_there(monkeypatch):
    """Without VNNI, groups of channels that are not multiples of 4 run oneDNN's reference INT8 kernel
    (43.5 ms against 0.45 ms for groups of 8, measured): the policy keeps such a conv weight-only."""
    from sq_plugin.backends import x86_isa

    x = torch.randn(1, 160, 120)
    for kind, expected in (("avx2", {"conv1d_weight_only": 1}), ("vnni", {"conv1d": 1})):
        monkeypatch.setattr(x86_isa, "detect_kind", lambda flags=None, cap=None, kind=kind: kind)
        quantizer = StableQuantX86Quantizer().set_global(stablequant_x86_config())
        prepared = prepare_pt2e(export_for_quantization(GroupsOfTen().eval(), (x,), dynamic_dims={}), quantizer)
        calibrate(prepared, [x])
        assert count_quantized_ops(convert_pt2e(prepared)) == expected, kind
        if kind == "avx2":
            assert "reference kernel" in quantizer.skipped_layers["conv"]
    assert x86_isa.X86IsaPolicy("avx2", "narrow_weights", True).grouped_conv_problem(16, 12, 12) is None


def test_int8_module_raises_when_the_kernels_disagree_with_fake_quant(tiny_hubert):
    x = audio(8000, 0)
    prepared = prepare_stablequant(tiny_hubert, (x,))
    calibrate(prepared, [x])
    compiled, _ = lower_x86(convert_pt2e(prepared), (x,))
    assert 0 <= compiled.errors[next(iter(compiled.errors))] < 0.02
    # a kernel that computes something else (here: simulated by scaling the compiled output)
    real = compiled.compiled
    compiled.compiled = lambda *args: type(out := real(*args))(logits=out.logits * 1.5)
    with pytest.raises(RuntimeError, match="disagree with the fake-quant graph"):
        compiled(audio(12000, 1))
    with pytest.raises(RuntimeError, match="disagree with the fake-quant graph"):  # and again: no cached pass
        compiled(audio(12000, 2))


def test_a_checked_shape_runs_its_cached_graph_and_a_new_layout_compiles_int8_again(tiny_hubert, monkeypatch):
    """The fast path of a shape seen before never compiles: an input that the cached graph's guards refuse (the same
    shape, strided) is compiled by the compiling path, with freezing, so it still lowers INT8 kernels."""
    from torch._dynamo.utils import counters

    from sq_plugin.backends import pt2e
    from sq_plugin.backends.pt2e import _int8_lowered

    checked_calls = []  # the compiling path reads the INT8 lowering counter first; the fast path does not
    monkeypatch.setattr(pt2e, "_int8_lowered", lambda: (checked_calls.append(1), _int8_lowered())[1])
    x = audio(8000, 0)
    prepared = prepare_stablequant(tiny_hubert, (x,))
    calibrate(prepared, [x])
    compiled, _ = lower_x86(convert_pt2e(prepared), (x,))
    with torch.no_grad():
        first = compiled(x).logits
        graphs, lowered, checked = counters["stats"]["unique_graphs"], _int8_lowered(), len(checked_calls)
        again = compiled(x.clone()).logits  # the fast path: the same graph, nothing compiled
        assert torch.equal(again, first) and len(checked_calls) == checked
        assert (counters["stats"]["unique_graphs"], _int8_lowered()) == (graphs, lowered)
        strided = audio(16000, 0)[:, ::2]  # shape (1, 8000), stride 2: the cached graph's guards refuse it
        assert strided.shape == x.shape and not strided.is_contiguous()
        out = compiled(strided).logits
    assert counters["stats"]["unique_graphs"] > graphs  # it compiled again ...
    assert _int8_lowered() > lowered  # ... with freezing: INT8 kernels, not the q/dq graph in float
    with torch.no_grad():
        assert rel_err(out, compiled(strided.contiguous()).logits) < 1e-5


def test_the_kernel_check_can_run_row_by_row_and_still_catches_one_wrong_row(tiny_wav2vec2):
    """batch_dims: the check runs the fake-quant graph one batch row at a time (a row's memory, not the batch's);
    it measures what a batched run gives, and an output wrong on one row only is refused all the same. (The check
    alone, on a batch-3 output: the Whisper tests compile batches and run it on real INT8 kernels.)"""
    import sq_plugin.backends.pt2e as pt2e

    x = audio(16000, 0)
    prepared = prepare_stablequant(tiny_wav2vec2, (x,), dynamic_batch=True)
    calibrate(prepared, [x])
    converted = convert_pt2e(prepared)
    batch = torch.cat([audio(16000, 1), audio(16000, 2), audio(16000, 3)])
    with torch.no_grad():
        batched = converted(batch)
    by_rows = pt2e.Int8Module(converted, 1, batch_dims={0: 0})
    rows_seen = []
    by_rows.converted = lambda *a: (rows_seen.append(a[0].shape[0]), converted(*a))[1]
    key = (((3, 16000),), False)
    by_rows._check_against_fake_quant(key, (batch,), batched)
    assert rows_seen == [1, 1, 1] and by_rows.errors[key] < 1e-4  # the rows give the batch's numbers
    wrong = batched.logits.clone()
    wrong[1] *= 1.5
    with pytest.raises(RuntimeError, match="disagree with the fake-quant graph"):
        by_rows._check_against_fake_quant(key, (batch,), type(batched)(logits=wrong))


def test_past_the_limit_the_float_model_tells_amplified_rounding_from_a_wrong_kernel(tiny_hubert):
    """A deep model can amplify rounding ties past MAX_KERNEL_ERROR (Whisper base's encoder: 0.109); then INT8
    passes only if it is as close to the float model as the fake-quant graph is."""
    import sq_plugin.backends.pt2e as pt2e

    x = audio(8000, 0)
    prepared = prepare_stablequant(tiny_hubert, (x,))
    calibrate(prepared, [x])
    converted = convert_pt2e(prepared)
    compiled = pt2e.Int8Module(converted, 1, max_error=0.0, reference=tiny_hubert)  # any difference: float decides
    compiled(x)
    key = next(iter(compiled.errors))
    assert compiled.errors[key] > 0  # INT8 rounds a few ties otherwise than the q/dq graph ...
    measured = compiled.float_errors[key]
    assert 0 < measured["int8"] <= measured["fake_quant"] * (1 + pt2e.MAX_KERNEL_FLOAT_EXCESS)  # ... no worse
    # a kernel that computes something else is further from float than the q/dq graph: refused, with both figures
    real = compiled.compiled
    compiled.compiled = lambda *args: type(out := real(*args))(logits=out.logits * 1.5)
    with pytest.raises(RuntimeError, match=r"disagree with the fake-quant graph.*against the float model the INT8 "
                                           r"output is [\d.]+ off, the fake-quant graph [\d.]+ \(allowed: 1.25x\)"):
        compiled(audio(12000, 1))
    assert compiled.float_errors[next(k for k in compiled.errors if k != key)]["int8"] > 0.3


@pytest.mark.skipif(not cpu_has_amx(), reason="the oneDNN grouped-conv defect needs an AMX CPU")
def test_the_amx_grouped_conv_defect_is_caught_not_run_silently():
    converted, x, _ = _grouped_conv_converted(True)
    if grouped_qconv_is_safe():  # ONEDNN_MAX_CPU_ISA caps below AMX in this process
        compiled, _ = lower_x86(converted, (x,))
        assert compiled.errors[next(iter(compiled.errors))] < 0.02
    else:
        with pytest.raises(RuntimeError, match="grouped INT8 conv"):  # refused before compiling (isa_problems)
            lower_x86(converted, (x,))


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_the_callers_model_is_never_changed(tiny_wav2vec2):
    """Export folds weight norm on a copy: torch's parametrize shares the Parametrized<Conv1d> class
    between a model and its deep copies, so folding the copy with remove_parametrizations used to take
    `weight` away from the caller's positional conv. Train/eval flags are restored too."""
    model = tiny_wav2vec2.train()
    conv = model.wav2vec2.encoder.pos_conv_embed.conv
    cls, before = type(conv), _state(model)
    x = audio(16000, 0)
    with torch.no_grad():
        ref = model.eval()(x).logits
    model.train()
    for _ in range(2):  # a second quantization of the same model (what INC autotune does per trial)
        prepared = prepare_stablequant(model, (x,))
        calibrate(prepared, [x])
        convert_pt2e(prepared)
    assert type(conv) is cls and hasattr(conv, "weight") and hasattr(conv, "parametrizations")
    assert all(m.training for m in model.modules())
    after = _state(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(model.eval()(x).logits, ref)


class _SharedReluBlock(torch.nn.Module):
    """torchvision's BasicBlock shape: one ReLU module called twice and an in-place residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)
        self.bn1, self.bn2 = torch.nn.BatchNorm2d(8), torch.nn.BatchNorm2d(8)
        self.relu = torch.nn.ReLU(inplace=True)

    def forward(self, x):
        identity = x
        out = self.bn2(self.c2(self.relu(self.bn1(self.c1(x)))))
        out += identity
        return self.relu(out)


def test_strict_export_is_an_option_and_the_non_strict_error_names_it():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), _SharedReluBlock(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 8 * 8, 4)).eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="more than one output node.*Fix: pass strict=True"):
        prepare_stablequant(model, (x,), dynamic_dims={})
    prepared = prepare_stablequant(model, (x,), dynamic_dims={}, strict=True)
    calibrate(prepared, [x])
    _, report = lower_x86(convert_pt2e(prepared), (x,))
    assert report.qconv == 3 and report.qlinear == 1


def test_a_searched_plan_reaches_the_int8_graph_as_each_layers_scale(tiny_hubert):
    """search -> QuantPlan -> x86 quantizer: the cut-off the search chose for a layer is that layer's input
    scale in the converted (and lowered) graph; layers sharing an input are reported, not hidden."""
    import copy

    from sq_plugin.backends.artifact import layer_qparams
    from sq_plugin.backends.pt2e import plan_deviations, stablequant_x86_quantizer_from_plan
    from sq_plugin.backends.simulate import strip_weight_norm
    from sq_plugin.core.quant import qparams_from_range
    from sq_plugin.search import SearchConfig, stablequant_search

    model = strip_weight_norm(copy.deepcopy(tiny_hubert))
    xs = [audio(8000 + 1000 * i, i) for i in range(3)]
    with torch.no_grad():
        refs = [model(x).logits for x in xs]

    @torch.no_grad()
    def metric():
        return float(sum(rel_err(model(x).logits, r) for x, r in zip(xs, refs, strict=True)))

    result = stablequant_search(model, lambda: [model(x) for x in xs], metric,
                                SearchConfig(threshold=0.0, builtin_candidates=False), progress=False)
    clipped = [d.name for d in result.layers if d.percentile < 100]
    assert clipped, "threshold 0 flags every layer; some cut-off below 100 must win"
    plan = result.to_plan()
    prepared = prepare_stablequant(tiny_hubert, (xs[0],), stablequant_x86_quantizer_from_plan(plan))
    calibrate(prepared, xs[:1])  # weights only: the input ranges are the plan's
    converted = convert_pt2e(prepared)
    graph = layer_qparams(converted)
    deviations = plan_deviations(converted, plan)
    for name in plan.quantized:
        layer = plan.layers[name]
        scale, zero = qparams_from_range(*layer.act_range, layer.activation.qmin, layer.activation.qmax,
                                         symmetric=False)
        got = graph[name]["input"]
        if got is None:  # AMX: the grouped positional conv runs weight-only, and the deviation says so
            assert not x86_policy().grouped_conv_int8 and "ISA policy" in deviations[name], name
            continue
        matches = got["scale"] == pytest.approx(float(scale), rel=1e-6) and got["zero_point"] == int(zero)
        assert matches == (name not in deviations), name
    # only q/k/v projections share their input with another layer. The search gives them one range now; what can
    # still differ is the zero point of an exactly symmetric range (127.5: a rounding tie between our qparams and
    # the observer's float32 ones), seen under ONEDNN_MAX_CPU_ISA=AVX2
    weight_only = [n for n, why in deviations.items() if "ISA policy" in why]
    assert weight_only == ([] if x86_policy().grouped_conv_int8 else ["hubert.encoder.pos_conv_embed.conv"])
    assert all(n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj") for n in deviations if n not in weight_only), \
        deviations
    assert any(n in clipped and n not in deviations for n in plan.quantized)
    compiled, report = lower_x86(converted, (xs[0],))
    assert report.int8_kernels == len(plan.quantized) - len(weight_only)
    with torch.no_grad():
        assert rel_err(compiled(xs[0]).logits, converted(xs[0]).logits) < 0.02
