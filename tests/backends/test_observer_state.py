"""StableQuant observers in `state_dict()`: save, resume and merge a calibration exactly; layer names in errors
without `prepare_stablequant`."""

import functools

import numpy as np
import pytest
import torch
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

from sq_plugin.backends.pt2e import (
    StableQuantObserver,
    StableQuantPerChannelObserver,
    calibrate,
    export_for_quantization,
    label_observers,
    merge_calibration,
    merge_observer_states,
    prepare_stablequant,
    stablequant_x86_config,
    stablequant_x86_quantizer,
)
from sq_plugin.backends.x86_isa import x86_policy
from sq_plugin.core import Histogram

STATS = ("hist_counts", "hist_exponents", "hist_min", "hist_max", "hist_count")


def audio(n: int, seed: int, gain: float = 0.1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, n, generator=g) * gain


def batches() -> list[torch.Tensor]:
    """Four calibration batches; the second half louder, so that half the data gives other ranges."""
    return [audio(8000 + 1000 * i, i, gain=0.1 if i < 2 else 0.3) for i in range(4)]


def observers(prepared: torch.fx.GraphModule) -> dict[str, StableQuantObserver]:
    return {name: m for name, m in prepared.named_modules() if isinstance(m, StableQuantObserver)}


def statistics(prepared: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in prepared.state_dict().items() if k.rsplit(".", 1)[-1] in (*STATS, "hist_ch_axis")}


def qparams(converted: torch.fx.GraphModule) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(node, scale, zero point) of every dequantize op of a converted graph, in graph order."""
    def value(arg):
        if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
            arg = functools.reduce(getattr, arg.target.split("."), converted)
        return torch.as_tensor(arg).clone()

    return [(n.name, value(n.args[1]), value(n.args[2])) for n in converted.graph.nodes
            if n.op == "call_function" and "dequantize" in str(n.target)]


def assert_same_qparams(got, want) -> None:
    assert [n for n, _, _ in got] == [n for n, _, _ in want]
    different = [n for (n, s, z), (_, s2, z2) in zip(got, want, strict=True) if not (torch.equal(s, s2)
                                                                                    and torch.equal(z, z2))]
    assert different == []


def assert_same_statistics(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    assert [k for k in want if not torch.equal(got[k], want[k])] == []


# ---- the histogram's arrays ----

def test_a_histogram_is_rebuilt_from_its_arrays_and_checked():
    rng = np.random.default_rng(0)
    hist = Histogram.of(rng.standard_normal((4, 300)), channel_axis=0)
    tensors = {k: torch.from_numpy(v.copy()) for k, v in hist.arrays().items()}
    rebuilt = Histogram.from_arrays(**tensors)
    assert rebuilt.equals(hist) and np.shares_memory(rebuilt.counts, tensors["counts"].numpy())
    assert not rebuilt.equals(Histogram.of(rng.standard_normal((4, 300)), channel_axis=0))
    assert Histogram.from_arrays(**Histogram.empty(rows=0).arrays()).rows == 0
    bad = {
        "counts": (dict(counts=tensors["counts"].double()), "counts must be int64"),
        "bins": (dict(counts=tensors["counts"][:, :1000]), "bins must be a power of two"),
        "rows": (dict(count=tensors["count"][:3]), r"count must have shape \(4,\)"),
        "negative": (dict(counts=-tensors["counts"], count=-tensors["count"]), "must not be negative"),
        "range": (dict(max_val=tensors["max_val"] * 2**20), "inside each row's range"),
    }
    for change, message in bad.values():
        with pytest.raises(ValueError, match=message):
            Histogram.from_arrays(**{**tensors, **change})


# ---- one observer ----

def test_the_statistics_are_buffers_that_round_trip_exactly():
    torch.manual_seed(0)
    act = StableQuantObserver()
    for _ in range(3):
        act(torch.randn(4, 100) * 2)
    state = act.state_dict()
    assert sorted(state) == sorted(("eps", *STATS))
    assert state["hist_counts"].shape == (1, 2048) and int(state["hist_count"]) == 1200
    assert int(state["hist_counts"].sum()) == 1200 and float(state["hist_max"]) == float(act.hist.max_val[0])
    restored = StableQuantObserver()
    restored.load_state_dict(state)
    assert restored.hist.equals(act.hist)
    assert all(torch.equal(a, b) for a, b in zip(restored.calculate_qparams(), act.calculate_qparams(), strict=True))
    plain = StableQuantObserver()  # a plain-dict copy has no version metadata: eps is still the saved one
    plain.load_state_dict(dict(state))
    assert plain.hist.equals(act.hist) and torch.equal(plain.eps, act.eps) and float(act.eps) > 1e-6
    more = torch.randn(50) * 5  # calibration goes on from the loaded statistics, and the buffers follow
    restored(more)
    act(more)
    assert restored.hist.equals(act.hist) and int(restored.state_dict()["hist_count"]) == 1250

    weight = StableQuantPerChannelObserver(ch_axis=0)
    weight(torch.randn(16, 8))
    state = weight.state_dict()
    assert state["hist_counts"].shape == (16, 2048) and int(state["hist_ch_axis"]) == 0
    restored = StableQuantPerChannelObserver(ch_axis=0)
    restored.load_state_dict(state)
    scale, _ = restored.calculate_qparams()
    assert scale.shape == (16,) and torch.equal(scale, weight.calculate_qparams()[0])


def test_an_uncalibrated_observer_round_trips_as_empty():
    empty = StableQuantObserver().state_dict()
    assert empty["hist_counts"].shape == (0, 2048) and empty["hist_count"].shape == (0,)
    seen = StableQuantObserver(layer_name="encoder.layers.0.fc1 (input)")
    seen(torch.randn(100))
    seen.load_state_dict(empty)  # loading "nothing seen yet" forgets the data
    assert seen.hist is None and seen.state_dict()["hist_counts"].shape == (0, 2048)
    with pytest.raises(RuntimeError, match=r"encoder\.layers\.0\.fc1 \(input\): the observer never saw data"):
        seen.calculate_qparams()


def test_a_weight_loaded_with_its_statistics_is_not_counted_twice():
    torch.manual_seed(0)
    weight = torch.randn(16, 8)
    saved = StableQuantPerChannelObserver(ch_axis=0)
    saved(weight)
    resumed = StableQuantPerChannelObserver(ch_axis=0)
    resumed.load_state_dict(saved.state_dict())
    resumed(weight)  # the same weight, in the process that resumes the calibration
    resumed(weight)
    assert resumed.hist.equals(saved.hist) and int(resumed.hist.count.sum()) == weight.numel()
    resumed(weight * 2)  # another weight is observed, as without a state_dict
    assert int(resumed.hist.count.sum()) == 2 * weight.numel()


def test_statistics_that_do_not_fit_are_refused_with_the_layer_and_the_fix():
    weight = StableQuantPerChannelObserver(ch_axis=0)
    weight(torch.randn(16, 8))
    per_tensor = StableQuantObserver(layer_name="fc (input)")
    with pytest.raises(RuntimeError, match=r"the observer of fc \(input\): the saved statistics have 16 rows "
                                           r"\(per-channel statistics\), this per-tensor observer keeps 1.*Fix:"):
        per_tensor.load_state_dict({k: v for k, v in weight.state_dict().items() if k != "hist_ch_axis"})
    assert per_tensor.hist is None and per_tensor.hist_counts.shape == (0, 2048)  # left as it was

    coarse = StableQuantObserver(bins=1024)
    coarse(torch.randn(100))
    with pytest.raises(RuntimeError, match=r"1024 histogram bins, this observer 2048.*bins=1024"):
        StableQuantObserver(layer_name="fc (input)").load_state_dict(coarse.state_dict())

    corrupt = StableQuantObserver()
    corrupt(torch.randn(100))
    state = corrupt.state_dict()
    state["hist_count"] = state["hist_count"] + 1
    with pytest.raises(RuntimeError, match=r"not a valid histogram \(count must equal the sum of each row's counts\)"):
        StableQuantObserver().load_state_dict(state)

    # Without a graph to read the weight's shape from, the first calibration batch catches another layer shape.
    other = StableQuantPerChannelObserver(ch_axis=0, layer_name="lm_head (weight)")
    other.load_state_dict(weight.state_dict())
    with pytest.raises(ValueError, match=r"lm_head \(weight\): this weight has 32 channels along axis 0, its "
                                         r"statistics 16.*Fix:"):
        other(torch.randn(32, 8))


# ---- prepared models: save, resume, merge ----

def test_resumed_and_merged_calibrations_give_the_qparams_of_one_calibration(tiny_hubert, tmp_path):
    xs = batches()
    one_go = prepare_stablequant(tiny_hubert, (xs[0],))
    calibrate(one_go, xs)
    for rank, shard in enumerate((xs[:2], xs[2:])):  # what each of two processes does
        prepared = prepare_stablequant(tiny_hubert, (xs[0],))
        calibrate(prepared, shard)
        torch.save(prepared.state_dict(), tmp_path / f"calibration-{rank}.pt")
        if rank == 0:
            first = prepared
    # the test can tell: half the data gives other ranges
    halves = [name for name, m in observers(first).items()
              if not torch.equal(m.calculate_qparams()[0], observers(one_go)[name].calculate_qparams()[0])]
    assert len(halves) >= 10
    states = [torch.load(tmp_path / f"calibration-{rank}.pt", weights_only=True) for rank in range(2)]
    want_statistics = statistics(one_go)
    want = qparams(convert_pt2e(one_go))
    assert len(want) >= 40

    # resume: a freshly prepared model (another process, later) loads the first half and calibrates the second
    resumed = prepare_stablequant(tiny_hubert, (xs[0],))
    resumed.load_state_dict(states[0])
    calibrate(resumed, xs[2:])
    assert_same_statistics(statistics(resumed), want_statistics)  # bit for bit; weights counted once
    assert_same_qparams(qparams(convert_pt2e(resumed)), want)

    # merge: the two processes' state_dicts into one, loaded into a freshly prepared model
    merged = merge_observer_states(states)
    assert merged.keys() == states[0].keys()
    assert merged._metadata == states[0]._metadata  # torchao reads the observers' version from it
    fresh = prepare_stablequant(tiny_hubert, (xs[0],))
    fresh.load_state_dict(merged)
    assert_same_statistics(statistics(fresh), want_statistics)
    assert_same_qparams(qparams(convert_pt2e(fresh)), want)

    # the same, adding the second process's calibration to the first one's prepared model
    assert merge_calibration(first, states[1:]) is first
    assert_same_statistics(statistics(first), want_statistics)
    calibrate(first, xs[:1])  # going on after a merge counts data, not the weights again
    weights = [name for name, m in observers(first).items() if isinstance(m, StableQuantPerChannelObserver)]
    assert len(weights) == 2 * 6 + 2 + 8
    assert all(torch.equal(statistics(first)[f"{name}.hist_count"], want_statistics[f"{name}.hist_count"])
               for name in weights)


def test_an_uncalibrated_prepared_model_round_trips(tiny_hubert, tmp_path):
    x = audio(8000, 0)
    prepared = prepare_stablequant(tiny_hubert, (x,))
    torch.save(prepared.state_dict(), tmp_path / "empty.pt")
    calibrate(prepared, [x])
    calibrated = statistics(prepared)
    prepared.load_state_dict(torch.load(tmp_path / "empty.pt", weights_only=True))
    assert all(m.hist is None for m in observers(prepared).values())
    assert all(v.shape[0] == 0 for k, v in statistics(prepared).items() if not k.endswith("hist_ch_axis"))
    calibrate(prepared, [x])  # from scratch again: the same statistics as the first time
    assert_same_statistics(statistics(prepared), calibrated)


def test_merging_refuses_state_dicts_of_different_models():
    x = torch.randn(2, 8)
    states = []
    for out in (4, 6):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, out)).eval()
        prepared = prepare_pt2e(torch.export.export(model, (x,)).module(), stablequant_x86_quantizer())
        calibrate(prepared, [x])
        states.append(prepared.state_dict())
    with pytest.raises(ValueError, match=r"0\.weight differs between state_dict 0 and state_dict 1.*Fix:"):
        merge_observer_states(states)
    with pytest.raises(ValueError, match="different keys"):
        merge_observer_states([states[0], {k: v for k, v in states[0].items() if "hist_min" not in k}])
    with pytest.raises(ValueError, match="at least one state_dict"):
        merge_observer_states([])
    assert merge_observer_states(states[:1]).keys() == states[0].keys()


# ---- plain torchao prepare_pt2e: the observers find their layer themselves ----

class Linear(torch.nn.Module):
    def __init__(self, out: int) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, out)

    def forward(self, x):
        return self.fc(x)


def test_a_state_of_another_layer_shape_is_refused_at_load_naming_the_layer():
    x = torch.randn(2, 8)
    small, large = (prepare_pt2e(torch.export.export(Linear(n).eval(), (x,)).module(), stablequant_x86_quantizer())
                    for n in (4, 6))
    calibrate(small, [x])
    observed = {k: v for k, v in small.state_dict().items() if k.rsplit(".", 1)[-1] in (*STATS, "hist_ch_axis")}
    message = (r"activation_post_process_\d+, the observer of fc \(weight\): the saved statistics cover 4 channels, "
               r"this layer's weight has 6 \(along axis 0\).*Fix: load a state_dict saved from the same model")
    with pytest.raises(RuntimeError, match=message):  # checked before any data, from the graph
        large.load_state_dict(observed, strict=False)
    with pytest.raises(RuntimeError, match=message):  # the whole state_dict: torch's size mismatch, and this
        large.load_state_dict(small.state_dict())
    (weight,) = [m for m in observers(large).values() if isinstance(m, StableQuantPerChannelObserver)]
    assert weight.hist is None and weight.hist_counts.shape == (0, 2048)  # the refused statistics are not kept


def test_plain_prepare_pt2e_convert_error_names_the_layer():
    x = torch.randn(2, 8)
    prepared = prepare_pt2e(torch.export.export(Linear(4).eval(), (x,)).module(), stablequant_x86_quantizer())
    assert all(m.layer_name is None for m in observers(prepared).values())  # nobody labelled them
    with pytest.raises(RuntimeError, match=r"^fc \((input|weight)\): the observer never saw data"):
        convert_pt2e(prepared)


def test_plain_prepare_pt2e_nan_error_names_the_layer_as_prepare_stablequant_would(tiny_hubert):
    x = audio(8000, 0)
    prepared = prepare_pt2e(export_for_quantization(tiny_hubert, (x,)), stablequant_x86_quantizer())
    bad = x.clone()
    bad[0, 100] = float("nan")
    with pytest.raises(ValueError, match=r"hubert\.feature_extractor\.conv_layers\.0\.conv \(input\): 1 NaN/Inf"):
        calibrate(prepared, [bad])
    found = {name: m.layer_name for name, m in observers(prepared).items()}
    # 40 observers; 39 on AMX, where the grouped positional conv is weight-only (no input observer)
    assert len(found) == (40 if x86_policy().grouped_conv_int8 else 39) and None not in found.values()
    assert found == label_observers(prepared)  # the labels prepare_stablequant gives
    assert sum(label.endswith("(weight)") for label in found.values()) == 2 * 6 + 2 + 8
    first_input = [m for m in observers(prepared).values() if m.layer_name.endswith("conv_layers.0.conv (input)")]
    assert len(first_input) == 1 and first_input[0].hist is None  # the NaN batch left no partial statistics


def test_a_deep_copy_keeps_the_labels_and_the_statistics():
    import copy

    x = torch.randn(2, 8)
    prepared = prepare_pt2e(torch.export.export(Linear(4).eval(), (x,)).module(), stablequant_x86_quantizer())
    calibrate(prepared, [x])
    clone = copy.deepcopy(prepared)
    assert sorted(m.layer_name for m in observers(clone).values()) == ["fc (input)", "fc (weight)"]
    assert_same_statistics(statistics(clone), statistics(prepared))
    assert all(a.hist.equals(b.hist) for a, b in zip(observers(clone).values(), observers(prepared).values(),
                                                        strict=True))
    for observer in observers(clone).values():  # the copy's buffers are its histogram's arrays, not copies
        assert np.shares_memory(observer.hist.counts, observer.hist_counts.numpy())


def test_bins_travel_with_the_config():
    spec = stablequant_x86_config(bins=512).input_activation
    obs = spec.observer_or_fake_quant_ctr(dtype=spec.dtype, qscheme=spec.qscheme, quant_min=spec.quant_min,
                                          quant_max=spec.quant_max)
    assert obs.hist_counts.shape == (0, 512)
    with pytest.raises(ValueError, match="bins must be a power of two"):
        StableQuantObserver(bins=1000)
