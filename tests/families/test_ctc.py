"""Real end to end on the shipped HuBERT reference: offline corpus, StableQuant search, real INT8 kernels."""

import copy
import dataclasses

import pytest
import torch

from sq_plugin.families.ctc import (
    EVAL_KWARGS,
    ctc_inputs,
    ctc_labels,
    ctc_loss_per_char,
    ctc_score,
    ctc_wer,
    quantize_ctc_pt2e,
    search_ctc,
)
from sq_plugin.search import SearchConfig
from sq_plugin.speech.corpus import load_split
from sq_plugin.speech.evaluate import evaluate
from sq_plugin.speech.models import load_model


@pytest.fixture(scope="module")
def hubert():
    return load_model("sq/hubert-ref")


@pytest.mark.slow
def test_stablequant_w8a8_on_real_int8_kernels_keeps_wer(hubert, conv1d_counts):
    dev, test = load_split("dev", limit=12), load_split("test", limit=24)
    fp = evaluate(hubert, test, progress=False, **EVAL_KWARGS)

    search = search_ctc(hubert, dev, SearchConfig(), progress=False)
    n_layers = len(search.layers)
    plan = search.to_plan({"model": hubert.name})
    assert n_layers == len(plan.layers)
    # q/k/v read one tensor: one decision each attention block (a quantized graph quantizes that tensor once)
    units = {tuple(sorted([d.name, *d.shares_input_with])) for d in search.layers}
    attention = [u for u in units if len(u) == 3 and all(".attention." in n for n in u)]
    assert len(attention) == hubert.model.config.num_hidden_layers
    # float, screen (one per unit), all MAX, the other four built-in rules, each flagged unit's candidates
    fixed = 1 + len(units) + 1 + 4
    assert fixed <= search.evaluations <= fixed + len(search.flagged) * (len(SearchConfig().percentiles) + 3)
    # never worse on the metric than MAX or any built-in rule applied to every layer
    assert search.final_metric <= min(search.rule_metrics.values()) <= search.max_metric

    quantized = quantize_ctc_pt2e(hubert, dev, plan=plan)
    assert not quantized.simulated and "onednn-int8" in quantized.backend
    # q/k/v are one decision, so the graph, which quantizes their shared input once, runs their searched range
    qkv = {n: why for n, why in quantized.plan_deviations.items() if n.endswith(("q_proj", "k_proj", "v_proj"))}
    assert not qkv, qkv
    # hubert-ref's positional conv (16 groups of 10 channels) computes in float on AMX (oneDNN defect) and
    # without VNNI (no INT8 kernel for groups of 10)
    convs = conv1d_counts(8, groups=16, channels_per_group=hubert.model.config.hidden_size // 16)
    assert quantized.op_counts == {**convs, "linear": n_layers - 8}
    # every Linear and Conv1d with INT8 weights and activations runs as a oneDNN INT8 kernel
    assert quantized.int8_kernels == n_layers - convs.get("conv1d_weight_only", 0)
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


def test_ctc_loss_metric_is_the_per_character_ctc_loss_and_drives_the_search(hubert):
    dev = load_split("dev", limit=4)
    inputs, labels = [ctc_inputs(hubert, u.audio) for u in dev], ctc_labels(hubert, dev)
    blank = hubert.model.config.pad_token_id
    fp = ctc_loss_per_char(hubert.model, inputs, labels, blank=blank)
    with torch.no_grad():  # the same number from torch's mean-reduced loss (it divides by target length)
        want = sum(float(torch.nn.functional.ctc_loss(
            torch.log_softmax(hubert.model(*x).logits.float(), -1).transpose(0, 1), y[None],
            torch.tensor([hubert.model(*x).logits.shape[1]]), torch.tensor([len(y)]), blank=blank))
            for x, y in zip(inputs, labels, strict=True)) / len(dev)
    assert fp == pytest.approx(want, rel=1e-5) and 0 < fp < 1.0  # a trained model: well under 1 nat/char

    search = search_ctc(hubert, dev, SearchConfig(a_bits=4, w_bits=4, threshold=0.05, percentiles=(100.0, 99.0)),
                        metric="ctc_loss", progress=False)
    assert search.fp_metric == pytest.approx(fp, rel=1e-6)
    assert search.max_metric > fp + 0.05 and search.flagged  # 4-bit MAX ranges hurt the loss
    assert search.final_metric < search.max_metric
    # shortlist: the candidates ranked on the quick metric (every 4th utterance), the best one scored in full
    short = search_ctc(hubert, dev, dataclasses.replace(search.config, shortlist=1), metric="ctc_loss", progress=False)
    assert short.flagged == search.flagged and short.quick_evaluations >= len(short.flagged)
    assert short.evaluations - short.quick_evaluations < search.evaluations
    assert short.final_metric <= short.rule_metrics[short.base_rule]


def test_ctc_kl_is_the_per_frame_kl_from_the_float_posteriors_and_drives_the_search(hubert):
    from sq_plugin.backends.simulate import LayerQuant, simulate

    dev = load_split("dev", limit=3)
    kl = ctc_score(hubert, dev, "ctc_kl")
    assert kl() == pytest.approx(0.0, abs=1e-7)  # the float model against itself
    inputs = [ctc_inputs(hubert, u.audio) for u in dev]
    with torch.no_grad():
        float_log_probs = [torch.log_softmax(hubert.model(*x).logits[0], -1) for x in inputs]
    layer = "hubert.encoder.layers.0.feed_forward.intermediate_dense"
    with simulate(hubert.model, {layer: LayerQuant(act_range=(-1.0, 1.0), a_bits=4, w_bits=4)}), torch.no_grad():
        got = kl()
        want = 0.0
        for x, log_p in zip(inputs, float_log_probs, strict=True):
            log_q = torch.log_softmax(hubert.model(*x).logits[0], -1)
            want += float(torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="sum")) / len(log_p)
        # bound: above the value, the exact value; below it, a lower bound above the bound (it stopped early)
        assert kl(bound=got) == got and kl(bound=2 * got) == got
        stopped = kl(bound=got / 100)
    assert got / 100 < stopped < got
    assert got == pytest.approx(want / len(dev), rel=1e-5) and got > 1e-3  # 4 bits and a clipped range: it moved

    search = search_ctc(hubert, dev, SearchConfig(a_bits=4, w_bits=4, threshold=0.05, percentiles=(100.0, 99.0)),
                        metric="ctc_kl", progress=False)
    assert search.fp_metric == 0.0 and search.max_metric > 0.05 and search.flagged
    assert 0.0 < search.final_metric < search.max_metric


def test_ctc_wer_equals_evaluate_bit_for_bit_and_stops_above_a_bound(hubert):
    from sq_plugin.backends.simulate import LayerQuant, simulate

    dev = load_split("dev", limit=12)
    layer = "hubert.encoder.layers.0.feed_forward.intermediate_dense"
    with simulate(hubert.model, {layer: LayerQuant(act_range=(-0.5, 0.5), a_bits=3, w_bits=3)}):
        want = evaluate(hubert, dev, batch_size=2, progress=False).wer
        got = ctc_wer(hubert, dev, batch_size=2)
        assert got == want and got > 0.3  # the same batches, the same sums: the same float
        assert ctc_score(hubert, dev, "wer", batch_size=2)(bound=got) == got  # not above the bound: exact
        stopped = ctc_wer(hubert, dev, batch_size=2, bound=got / 20)
    assert got / 20 < stopped < got  # 6 batches: it stopped before the last
    with pytest.raises(ValueError, match="every reference transcript is empty"):
        ctc_wer(hubert, [dataclasses.replace(u, text="") for u in dev[:2]])


def test_metric_size_scores_the_first_utterances_and_the_statistics_see_all(hubert):
    dev = load_split("dev", limit=3)
    inputs, labels = [ctc_inputs(hubert, u.audio) for u in dev], ctc_labels(hubert, dev)
    blank = hubert.model.config.pad_token_id
    config = SearchConfig(threshold=1e9, builtin_candidates=False)  # flags nothing: the statistics and the score
    full = search_ctc(hubert, dev, config, metric="ctc_loss", progress=False)
    first = search_ctc(hubert, dev, config, metric="ctc_loss", progress=False, metric_size=1)
    assert first.fp_metric == pytest.approx(ctc_loss_per_char(hubert.model, inputs[:1], labels[:1], blank=blank))
    assert full.fp_metric == pytest.approx(ctc_loss_per_char(hubert.model, inputs, labels, blank=blank))
    assert first.fp_metric != pytest.approx(full.fp_metric)
    assert [d.act_range for d in first.layers] == [d.act_range for d in full.layers]  # histograms over all 3
    with pytest.raises(ValueError, match="metric_size must be a whole number >= 1"):
        search_ctc(hubert, dev, config, metric="ctc_loss", progress=False, metric_size=0)


def test_ctc_labels_refuse_references_the_tokenizer_cannot_spell(hubert):
    (u,) = load_split("dev", limit=1)
    with pytest.raises(ValueError, match="<unk>"):
        ctc_labels(hubert, [type(u)(**{**u.__dict__, "text": "naïve ☃"})])


def _input_qparams(converted) -> dict:
    from sq_plugin.backends.artifact import layer_qparams

    return {name: (q["input"]["scale"], q["input"]["zero_point"]) for name, q in layer_qparams(converted).items()
            if q["input"] is not None}


def test_a_baseline_rule_as_a_plan_gives_the_graph_its_observers_give(hubert):
    """max as a plan (one statistics pass, then `rule_plan`) builds the graph that the MAX observers build."""
    from sq_plugin.backends.x86_isa import x86_policy
    from sq_plugin.core.ranges import RangeRule
    from sq_plugin.families.ctc import ctc_statistics
    from sq_plugin.search import layer_ops, rule_plan

    dev = load_split("dev", limit=3)
    plan = rule_plan(ctc_statistics(hubert, dev), layer_ops(hubert.model), RangeRule("max"), w_bits=6, a_bits=6,
                     int8_grid="full")
    from_plan = quantize_ctc_pt2e(hubert, dev, plan=plan)
    observed = quantize_ctc_pt2e(hubert, dev, act_rule=RangeRule("max"), a_bits=6, w_bits=6, int8_grid="full")
    # the grouped positional conv (16 groups of 10 channels) is weight-only where this CPU's policy says so
    per_group = hubert.model.config.hidden_size // 16
    weight_only = x86_policy().grouped_conv_problem(16, per_group, per_group) is not None
    assert from_plan.simulated and from_plan.plan is plan
    assert set(from_plan.plan_deviations) == ({"hubert.encoder.pos_conv_embed.conv"} if weight_only else set())
    want, got = _input_qparams(observed.converted), _input_qparams(from_plan.converted)
    assert set(got) == set(want) and len(got) == len(plan.layers) - weight_only  # weight-only: a float input
    for name, (scale, zero_point) in want.items():
        assert got[name][0] == pytest.approx(scale, rel=1e-6), name
        assert got[name][1] == zero_point, name


def test_save_and_load_round_trip_the_int8_model_and_its_plan(hubert, tmp_path):
    from sq_plugin.backends.artifact import ArtifactError
    from sq_plugin.core.ranges import RangeRule
    from sq_plugin.families.ctc import ctc_statistics, load_ctc_int8, save_ctc_int8
    from sq_plugin.search import layer_ops, rule_plan

    dev = load_split("dev", limit=2)
    plan = rule_plan(ctc_statistics(hubert, dev), layer_ops(hubert.model), RangeRule("percentile", percentile=99.9),
                     provenance={"model": hubert.name, "method": "percentile"})
    quantized = quantize_ctc_pt2e(hubert, dev, plan=plan)
    assert not quantized.simulated and quantized.int8_kernels > 0
    path = save_ctc_int8(quantized, tmp_path / "hubert-int8", metadata={"note": "test"})
    loaded = load_ctc_int8(path, hubert)
    assert loaded.plan.to_dict() == plan.to_dict() and not loaded.simulated
    assert loaded.int8_kernels == quantized.int8_kernels and loaded.op_counts == quantized.op_counts
    x = ctc_inputs(hubert, dev[1].audio)
    with torch.no_grad():
        assert torch.equal(loaded.bundle.model(*x).logits, quantized.bundle.model(*x).logits)  # bit for bit
    with pytest.raises(ArtifactError, match="made for"):
        load_ctc_int8(path, load_model("sq/wav2vec2-ref"))
    simulated = quantize_ctc_pt2e(hubert, dev, plan=plan, lower=False)
    with pytest.raises(ValueError, match="save_ctc_int8 saves what quantize_ctc_pt2e returns"):
        quantized.converted = None
        save_ctc_int8(quantized, tmp_path / "nothing")
    assert save_ctc_int8(simulated, tmp_path / "simulated").is_dir()  # the q/dq graph saves the same way


def test_a_per_token_plan_runs_the_linears_on_int_mm_as_simulated_and_round_trips(hubert, tmp_path):
    """Every Linear of hubert-ref on the per-token grid, the convs on their static ranges: the Linears run as
    PerTokenInt8Linears (torch._int_mm) beside oneDNN's qconv, the logits are the simulation's, and the artifact
    loads bit for bit; refused, naming the fix, where `_int_mm` saturates."""
    from sq_plugin.backends.simulate import apply_fake_quant, plan_layer_quants, strip_weight_norm
    from sq_plugin.backends.x86_isa import IsaError, x86_policy
    from sq_plugin.core.ranges import RangeRule
    from sq_plugin.families.ctc import ctc_statistics, load_ctc_int8, save_ctc_int8
    from sq_plugin.search import layer_ops, rule_plan

    dev = load_split("dev", limit=2)
    static = rule_plan(ctc_statistics(hubert, dev), layer_ops(hubert.model), RangeRule("max"),
                       provenance={"model": hubert.name, "method": "max"})
    linears = [n for n in static.quantized if static.layers[n].op == "linear"]
    plan = static.with_per_token_activations(linears)
    if not x86_policy().int32_accumulation:
        with pytest.raises(IsaError, match=r"ask for per-token activations.*Fix: make the plan with static"):
            quantize_ctc_pt2e(hubert, dev, plan=plan)
        return
    quantized = quantize_ctc_pt2e(hubert, dev, plan=plan)
    assert not quantized.simulated and f"{len(linears)} per-token Linears on torch._int_mm" in quantized.backend
    assert quantized.op_counts.get("linear", 0) == 0 and quantized.plan_deviations.keys() <= {
        "hubert.encoder.pos_conv_embed.conv"}  # weight-only on AMX
    assert all(isinstance(m, torch.nn.Linear) for n, m in hubert.model.named_modules() if n in linears)
    simulated = apply_fake_quant(strip_weight_norm(copy.deepcopy(hubert.model)), plan_layer_quants(plan))
    x = ctc_inputs(hubert, dev[1].audio)
    with torch.no_grad():
        got, want = quantized.bundle.model(*x).logits, simulated(*x).logits
    assert float((got - want).norm() / want.norm()) < 0.02
    path = save_ctc_int8(quantized, tmp_path / "per-token")
    loaded = load_ctc_int8(path, hubert)
    assert loaded.plan.per_token_layers == linears and loaded.int8_kernels == quantized.int8_kernels
    with torch.no_grad():
        assert torch.equal(loaded.bundle.model(*x).logits, got)


def test_the_runner_scores_the_activation_choice_on_a_weight_norm_model_without_touching_it(hubert):
    """`activations: auto` on a CTC reference (weight-normed positional conv): both plans scored on the folded copy
    the search uses, the caller's model left parametrized."""
    from sq_plugin.backends.simulate import is_parametrized
    from sq_plugin.core.ranges import RangeRule
    from sq_plugin.families.ctc import ctc_statistics
    from sq_plugin.recipe import parse_recipe
    from sq_plugin.runner import _choose_activations
    from sq_plugin.search import layer_ops, rule_plan

    dev = load_split("dev", limit=2)
    plan = rule_plan(ctc_statistics(hubert, dev), layer_ops(hubert.model), RangeRule("max"))
    recipe = parse_recipe({"model": hubert.name, "calibration": {"dataset": "corpus-dev", "size": 2},
                           "evaluation": {"dataset": "corpus-test", "size": 2}, "methods": ["stablequant"],
                           "method_options": {"stablequant": {"activations": "auto", "metric": "ctc_loss"}}})
    chosen, seconds = _choose_activations(hubert, dev, recipe, plan, {})
    choice = chosen.provenance["activation_choice"]
    assert seconds > 0 and is_parametrized(hubert.model)
    if "why" in choice:  # no VNNI: per-token INT8 cannot run here, and auto says so
        assert choice["activations"] == "static" and "saturates" in choice["why"]
    else:
        assert {"static_metric", "per_token_metric"} <= set(choice)
        assert (chosen.per_token_layers != []) == (choice["per_token_metric"] < choice["static_metric"])
