"""The recipe runner, with the model, data and quantizer faked (fast): outputs, row schema, atomicity."""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

import sq_plugin.families.ctc as pipeline
import sq_plugin.runner as runner
import sq_plugin.speech.evaluate as evaluate_mod
import sq_plugin.speech.models as models
from sq_plugin.core.plan import QuantPlan
from sq_plugin.recipe import RecipeError, parse_recipe
from sq_plugin.search import LayerDecision, SearchConfig, SearchResult
from sq_plugin.speech.evaluate import EvalResult, UtteranceResult


def make_recipe(tmp_path: Path, **changes):
    data = {"name": "fake", "model": "sq/wav2vec2-ref", "calibration": {"dataset": "corpus-dev", "size": 2},
            "evaluation": {"dataset": "corpus-test", "size": 3}, "methods": ["fp", "stablequant", "max", "histogram"],
            "bits": ["w8a8", "w4a4"], "output_dir": str(tmp_path / "out" / "nested")}
    data.update(changes)
    return parse_recipe(data)


@dataclass
class Utt:
    id: str
    audio: object
    text: str


def tiny_model():
    import torch

    model = torch.nn.Module()
    model.enc = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)])
    return model


@dataclass
class FakeBundle:
    name: str
    kind: str = "ctc"
    quantized: str = ""
    model: object = field(default_factory=tiny_model)


def fake_histograms():
    from sq_plugin.core.stats import Histogram

    values = np.linspace(-1.0, 3.0, 1001)
    return {"enc.0": Histogram.of(values), "enc.1": Histogram.of(values / 2)}


def fake_search_result(config, layers):
    return SearchResult(config or SearchConfig(), 0.1, 0.2, 0.11, layers,
                        {"statistics": 0.1, "screen": 0.2, "clip": 0.3, "total": 0.6}, 9, histograms=fake_histograms())


def install_fakes(monkeypatch, *, wer_of=lambda bundle: 0.1 if not bundle.quantized else 0.12):
    utts = [Utt(f"u{i}", np.zeros(16000 * (i + 1), dtype=np.float32), f"hello world {i}") for i in range(3)]
    monkeypatch.setattr(runner, "_load_data", lambda dataset, size: utts[:size])
    monkeypatch.setattr(models, "load_model", lambda name: FakeBundle(name, "whisper" if "whisper" in name else "ctc"))
    statistics_calls = []

    def fake_evaluate(bundle, utterances, batch_size=8, progress=True, pad_to_multiple=None, desc=None):
        assert batch_size == 1
        wer = wer_of(bundle)
        hyp = "hello world" if not bundle.quantized else "hello word"
        us = [UtteranceResult(u.id, u.text, hyp, wer, wer / 2) for u in utterances]
        return EvalResult(wer=wer, cer=wer / 2, n=len(us), utterances=us, seconds=0.01)

    def fake_quantize(bundle, calibration, *, act_rule=None, per_layer=None, observer=None, a_bits=8, w_bits=8,
                      lower=None, int8_grid="auto", plan=None, int8_attention=False):
        assert act_rule is None and per_layer is None  # every rule method hands over a plan
        assert plan is not None or int8_grid in ("full", "narrow_weights", "narrow_activations")  # "auto" resolved
        assert (plan is None) == (observer is not None)  # a plan, or a framework's observer
        if plan is not None:
            w_bits, a_bits = plan.provenance["w_bits"], plan.provenance["a_bits"]
        real = lower if lower is not None else (a_bits == 8 and w_bits == 8)
        backend = ("x86-onednn-int8" + (" (INT8 attention)" if int8_attention else "")) if real else \
            "pt2e fake-quant simulation"
        return pipeline.QuantizedModel(FakeBundle(bundle.name, quantized="yes"), backend, not real, {"linear": 4},
                                       4 if real else 0, 0.5, 0.1, plan=plan)

    def fake_search(bundle, calibration, config=None, *, metric="wer", batch_size=8, progress=True,
                    cache_budget_mb=1024.0, metric_size=None):
        layers = [LayerDecision("enc.0", "Linear", 0.11, 0.01, True, 99.9, (-1.0, 2.0), (-3.0, 9.0), {100.0: 0.2}),
                  LayerDecision("enc.1", "Linear", 0.10, 0.0, False, 100.0, (-1.0, 1.0), (-1.0, 1.0), {})]
        return fake_search_result(config, layers)

    def fake_statistics(bundle, calibration):
        statistics_calls.append(bundle.name)
        return fake_histograms()

    monkeypatch.setattr(evaluate_mod, "evaluate", fake_evaluate)
    monkeypatch.setattr(pipeline, "quantize_ctc_pt2e", fake_quantize)
    monkeypatch.setattr(pipeline, "search_ctc", fake_search)
    monkeypatch.setattr(pipeline, "ctc_statistics", fake_statistics)
    return statistics_calls


def test_run_writes_report_results_and_plots(tmp_path, monkeypatch):
    statistics_calls = install_fakes(monkeypatch)
    result = runner.run_recipe(make_recipe(tmp_path), progress=False)
    assert statistics_calls == []  # the plan baselines reuse the search's statistics
    out = result.output_dir
    assert out.parent == tmp_path / "out" / "nested" and out.name.startswith("fake-")
    assert sorted(p.name for p in out.iterdir()) == [  # a plan per plan method and bits; histogram has observers
        "plan_sq_wav2vec2-ref_max_w4a4.json", "plan_sq_wav2vec2-ref_max_w8a8.json",
        "plan_sq_wav2vec2-ref_stablequant_w4a4.json", "plan_sq_wav2vec2-ref_stablequant_w8a8.json",
        "report.md", "results.json", "stablequant_layers_sq_wav2vec2-ref_w4a4.png",
        "stablequant_layers_sq_wav2vec2-ref_w8a8.png", "wer_by_method_sq_wav2vec2-ref.png"]
    plan = QuantPlan.load(out / "plan_sq_wav2vec2-ref_stablequant_w8a8.json")  # what StableQuant ran on
    assert plan.layers["enc.0"].act_range == (-1.0, 2.0) and plan.provenance["model"] == "sq/wav2vec2-ref"
    assert len(plan.provenance["calibration_sha256"]) == 64 and "x86_isa" in plan.provenance
    # MAX decided on the search's statistics: each layer's range is its histogram's min..max
    max_plan = QuantPlan.load(out / "plan_sq_wav2vec2-ref_max_w8a8.json")
    assert max_plan.provenance["method"] == "max" and max_plan.provenance["calibration_sha256"] == \
        plan.provenance["calibration_sha256"]
    assert max_plan.layers["enc.0"].act_range == pytest.approx((-1.0, 3.0), abs=0.01)
    assert max_plan.layers["enc.1"].act_range == pytest.approx((-0.5, 1.5), abs=0.01)
    assert "The backend ran it as planned." in (out / "report.md").read_text()
    data = json.loads((out / "results.json").read_text())
    assert len(data["rows"]) == 1 + 2 * 3
    for row in data["rows"]:
        assert set(runner.ROW_KEYS) <= set(row)
    by = {(r["method"], r["w_bits"]): r for r in data["rows"]}
    assert by[("max", 8)]["int8_kernels"] == 4 and not by[("max", 8)]["simulated"]
    assert by[("max", 4)]["simulated"] and by[("max", 4)]["int8_kernels"] == 0
    assert by[("stablequant", 8)]["search_seconds"] is not None and by[("max", 8)]["search_seconds"] is None
    # Size: two Linear(2, 2) in float32 (48 bytes); INT8 keeps 1 byte per weight and a float32 scale per channel.
    assert by[("fp", 32)]["model_bytes"] == 48 and by[("max", 8)]["model_bytes"] == 48 - 2 * (3 * 4 - 4 * 2)
    assert by[("max", 4)]["model_bytes"] is None  # simulated: no storage format ran
    # RTF: 0.01 s of fake evaluation over 1 + 2 + 3 s of audio; nothing compiled (no Int8Module in the fakes)
    assert by[("max", 8)]["rtf"] == pytest.approx(0.01 / 6) and by[("max", 8)]["compile_seconds"] is None
    assert data["peak_rss_mb"] > 0 and set(data["searches"]) == {"sq/wav2vec2-ref w8a8", "sq/wav2vec2-ref w4a4"}
    report = (out / "report.md").read_text()
    # every fake utterance loses "zero/one/two" and turns "world" into "word": 1 vs 2 edits in 3 words, so
    # the paired ΔWER is +33.33 pp on every resample, an interval that excludes 0 (*)
    assert "| sq/wav2vec2-ref | max | w8a8 | 12.00 | +2.00 [+33.33, +33.33] * |" in report
    assert by[("max", 8)]["wer_ci95"] == pytest.approx([1 / 3, 1 / 3]) and by[("max", 8)]["wer_delta_p"] < 0.001
    assert "**Warning:** sq/wav2vec2-ref was evaluated on 3 utterances only" in report
    assert oct(out.stat().st_mode & 0o777) == "0o755"  # like every other output, not mkdtemp's 0700
    assert "**simulated**" in report and "`enc.0`" in report and "hello word" in report
    assert "MAX's plan from the same statistics, applied, takes 0.5 s" in report
    assert not list(out.parent.glob(".*partial"))  # no temp directory left next to it


def test_simulate_backend_never_lowers(tmp_path, monkeypatch):
    install_fakes(monkeypatch)
    result = runner.run_recipe(make_recipe(tmp_path, backend="simulate", bits=["w8a8"], methods=["max"]),
                               progress=False)
    assert [r["simulated"] for r in result.rows] == [True]


def test_a_failure_midway_leaves_no_output_directory(tmp_path, monkeypatch):
    install_fakes(monkeypatch)
    calls = {"n": 0}

    def failing_quantize(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure")
        return original(*args, **kwargs)

    original = pipeline.quantize_ctc_pt2e
    monkeypatch.setattr(pipeline, "quantize_ctc_pt2e", failing_quantize)
    with pytest.raises(RuntimeError, match="injected failure"):
        runner.run_recipe(make_recipe(tmp_path), progress=False)
    assert not (tmp_path / "out").exists()


def test_a_nan_metric_leaves_no_output_directory(tmp_path, monkeypatch):
    install_fakes(monkeypatch, wer_of=lambda bundle: math.nan if bundle.quantized else 0.1)
    with pytest.raises(RuntimeError, match="max w8a8 WER is nan"):
        runner.run_recipe(make_recipe(tmp_path, methods=["fp", "max"]), progress=False)
    assert not (tmp_path / "out").exists()


def test_a_failure_while_writing_removes_the_temp_directory(tmp_path, monkeypatch):
    install_fakes(monkeypatch)
    (tmp_path / "out").mkdir()  # exists before: must stay; "nested" is created by the run: must go

    def broken_plot(run, out):
        (out / "half.png").write_bytes(b"x")
        raise OSError("disk full")

    monkeypatch.setattr(runner, "_plot", broken_plot)
    with pytest.raises(OSError, match="disk full"):
        runner.run_recipe(make_recipe(tmp_path), progress=False)
    assert list((tmp_path / "out").iterdir()) == []


def test_unrunnable_combinations_are_refused_before_any_work(tmp_path, monkeypatch):
    install_fakes(monkeypatch)
    monkeypatch.setattr(runner, "_find_spec", lambda module: True)
    with pytest.raises(RecipeError, match=r"is a Whisper model; methods \['inc_kl'\] run on CTC models only"):
        runner.run_recipe(make_recipe(tmp_path, model="openai/whisper-tiny.en", methods=["fp", "inc_kl"]),
                          progress=False)
    # A local directory does not say "whisper" in its name: the kind is checked after loading.
    monkeypatch.setattr(models, "load_model", lambda name: FakeBundle(name, "whisper"))
    with pytest.raises(RecipeError, match=r"is a Whisper model; methods \['quanto_absmax'\] run on CTC models only"):
        runner.run_recipe(make_recipe(tmp_path, model="./local-model", methods=["quanto_absmax"]), progress=False)
    recipe = make_recipe(tmp_path, methods=["stablequant"])
    recipe = recipe.model_copy(update={"method_options": recipe.method_options.model_copy(update={
        "stablequant": recipe.method_options.stablequant.model_copy(update={"metric": "tf_loss"})})})
    with pytest.raises(RecipeError, match="'tf_loss' is a Whisper proxy; model 'sq/wav2vec2-ref' is a CTC model"):
        runner.check_runnable(recipe)
    whisper = make_recipe(tmp_path, model="openai/whisper-tiny.en", methods=["stablequant"])
    whisper = whisper.model_copy(update={"method_options": whisper.method_options.model_copy(update={
        "stablequant": whisper.method_options.stablequant.model_copy(update={"metric": "ctc_loss"})})})
    with pytest.raises(RecipeError, match="'ctc_loss' needs a CTC model; 'openai/whisper-tiny.en' is Whisper"):
        runner.check_runnable(whisper)

    monkeypatch.setattr(runner, "_find_spec", lambda module: False)
    with pytest.raises(RecipeError) as info:
        runner.check_runnable(make_recipe(tmp_path, methods=["fp", "inc_kl", "quanto_absmax"]))
    message = str(info.value)
    assert ("""methods[1]: 'inc_kl' needs neural_compressor, which is not installed; """
            """run `pip install "sq-plugin[inc]"`""") in message
    assert "methods[2]: 'quanto_absmax' needs optimum.quanto" in message and "sq-plugin[quanto]" in message
    assert not (tmp_path / "out").exists()


def fake_cpu(monkeypatch, kind: str) -> None:
    """The policy of another CPU kind (the runner's decisions only; these tests run no kernel)."""
    from sq_plugin.backends import x86_isa

    monkeypatch.setattr(x86_isa, "detect_kind", lambda flags=None, cap=None: kind)


def test_full_grid_baselines_are_skipped_with_the_reason_where_they_would_saturate(tmp_path, monkeypatch):
    install_fakes(monkeypatch)
    fake_cpu(monkeypatch, "avx2")
    monkeypatch.setattr(runner, "_find_spec", lambda module: True)
    result = runner.run_recipe(make_recipe(tmp_path, methods=["fp", "inc_minmax", "quanto_absmax"]), progress=False)
    assert [r["method"] for r in result.rows] == ["fp"]
    reasons = {(s["method"], s["bits"]): s["reason"] for s in result.skipped}
    assert "always uses the full W8A8 grids" in reasons[("inc_minmax", "w8a8")]
    assert "torch._int_mm" in reasons[("quanto_absmax", "w8a8")]
    payload = json.loads((result.output_dir / "results.json").read_text())
    assert payload["x86_isa"]["kind"] == "avx2" and payload["x86_isa"]["int8_grid"] == "narrow_weights"
    assert "INT8 grid `narrow_weights`" in (result.output_dir / "report.md").read_text()


def test_full_grid_recipe_is_refused_before_loading_anything_without_vnni(tmp_path, monkeypatch):
    fake_cpu(monkeypatch, "avx2")
    recipe = make_recipe(tmp_path, methods=["fp", "max"]).model_copy(update={"int8_grid": "full"})
    with pytest.raises(RecipeError, match="int8_grid: 'full': int8_grid='full' needs"):
        runner.check_runnable(recipe)
    runner.check_runnable(recipe.model_copy(update={"backend": "simulate"}))  # a simulation may use it


def test_int8_attention_is_refused_before_loading_anything_without_vnni(tmp_path, monkeypatch):
    fake_cpu(monkeypatch, "avx2")
    recipe = make_recipe(tmp_path, methods=["fp", "max"]).model_copy(update={"int8_attention": True})
    with pytest.raises(RecipeError, match="int8_attention: true: CPU torch._int_mm .* saturates.*this CPU is avx2. "
                                          "Fix: int8_attention: false"):
        runner.check_runnable(recipe)
    fake_cpu(monkeypatch, "vnni")
    runner.check_runnable(recipe)
    install_fakes(monkeypatch)
    result = runner.run_recipe(recipe, progress=False)
    backends = {(r["method"], r["w_bits"]): r["backend"] for r in result.rows}
    assert backends[("max", 8)] == "x86-onednn-int8 (INT8 attention)"  # the option reaches every INT8 build
    assert backends[("max", 4)] == "pt2e fake-quant simulation"
    assert "Attention's matmuls: INT8 GEMMs" in (result.output_dir / "report.md").read_text()


def test_framework_baselines_run_at_w8a8_and_are_listed_as_skipped_below(tmp_path, monkeypatch):
    install_fakes(monkeypatch)
    fake_cpu(monkeypatch, "vnni")
    monkeypatch.setattr(runner, "_find_spec", lambda module: True)
    calls = []

    def fake_inc(bundle, calibration, *, act_algo, a_bits=8, w_bits=8, lower=None):
        calls.append(("inc", act_algo, w_bits, a_bits))
        return pipeline.QuantizedModel(FakeBundle(bundle.name, quantized="yes"), "inc: x86-onednn-int8", False,
                                       {"linear": 4}, 4, 0.5, 0.1)

    monkeypatch.setattr(pipeline, "quantize_ctc_inc", fake_inc)
    result = runner.run_recipe(make_recipe(tmp_path, methods=["fp", "inc_minmax", "inc_kl"]), progress=False)
    assert calls == [("inc", "minmax", 8, 8), ("inc", "kl", 8, 8)]
    assert [(r["method"], r["w_bits"]) for r in result.rows] == [("fp", 32), ("inc_minmax", 8), ("inc_kl", 8)]
    assert [(s["method"], s["bits"]) for s in result.skipped] == [("inc_minmax", "w4a4"), ("inc_kl", "w4a4")]
    report = (result.output_dir / "report.md").read_text()
    assert "- sq/wav2vec2-ref inc_kl w4a4: INC 3.10 static quant is int8-only" in report
    assert json.loads((result.output_dir / "results.json").read_text())["skipped"] == result.skipped


def test_plan_baselines_share_one_statistics_pass_per_model(tmp_path, monkeypatch):
    statistics_calls = install_fakes(monkeypatch)
    result = runner.run_recipe(make_recipe(tmp_path, methods=["fp", "max", "percentile", "mse", "histogram"]),
                               progress=False)
    assert statistics_calls == ["sq/wav2vec2-ref"]  # 3 plan methods x 2 bit widths, one pass
    plans = {key: plan for key, plan in result.plans.items()}
    assert sorted(plans) == sorted(f"sq/wav2vec2-ref {m} {b}" for m in ("max", "percentile", "mse")
                                   for b in ("w8a8", "w4a4"))
    mse, maxed = plans["sq/wav2vec2-ref mse w4a4"].layers["enc.0"], plans["sq/wav2vec2-ref max w4a4"].layers["enc.0"]
    assert mse.activation.bits == 4 and mse.decision == {"method": "mse"}
    assert mse.act_range[1] - mse.act_range[0] < maxed.act_range[1] - maxed.act_range[0]  # MSE clips at 4 bits
    assert plans["sq/wav2vec2-ref percentile w8a8"].layers["enc.0"].decision == {"method": "percentile",
                                                                                  "percentile": 99.99}
    assert "one statistics pass per model (sq/wav2vec2-ref:" in (result.output_dir / "report.md").read_text()


def test_whisper_runs_every_method_on_int8_kernels_at_w8a8_and_simulates_on_backend_simulate(tmp_path, monkeypatch):
    install_fakes(monkeypatch)
    import sq_plugin.families.whisper as whisper

    seen = []

    def fake_x86(bundle, calibration, plan=None, *, quantizer=None, int8_attention=False):
        assert int8_attention is False  # the recipe leaves it off
        seen.append(("x86", plan.provenance["method"] if plan is not None else type(quantizer).__name__))
        return pipeline.QuantizedModel(FakeBundle(bundle.name, quantized="yes"), "x86-onednn-int8 (vnni: ...)", False,
                                       {"encoder_qlinear": 3, "decoder_step_qlinear": 2}, 5, 0.5, 0.2, plan=plan)

    def fake_evaluate(bundle, utterances, batch_size=8, progress=True, pad_to_multiple=None, desc=None):
        assert batch_size == whisper.EVAL_BATCH and pad_to_multiple is None
        us = [UtteranceResult(u.id, u.text, "hello world", 0.3, 0.1) for u in utterances]
        return EvalResult(wer=0.3, cer=0.1, n=len(us), utterances=us, seconds=0.01)

    def fake_simulated(bundle, calibration, *, act_rule=None, per_layer=None, observer=None, a_bits=8, w_bits=8,
                       int8_grid="auto", plan=None):
        assert act_rule is None and per_layer is None
        seen.append(("simulated", plan.provenance["method"] if plan is not None else "observer"))
        return pipeline.QuantizedModel(FakeBundle(bundle.name, quantized="yes"), whisper.SIMULATED_BACKEND, True,
                                       {"fake_quant_linear": 4}, 0, 0.5, 0.0, plan=plan)

    def fake_search(bundle, calibration, config=None, *, metric="tf_loss", progress=True, cache_budget_mb=1024.0,
                    referee=None, metric_size=None):
        assert metric == "wer"  # the recipe's metric is passed through
        layers = [LayerDecision("enc.0", "Linear", 0.11, 0.01, True, 99.9, (-1.0, 2.0), (-3.0, 9.0), {100.0: 0.2}),
                  LayerDecision("enc.1", "Linear", 0.10, 0.0, False, 100.0, (-1.0, 1.0), (-1.0, 1.0), {})]
        return fake_search_result(config, layers)

    monkeypatch.setattr(evaluate_mod, "evaluate", fake_evaluate)
    monkeypatch.setattr(whisper, "quantize_whisper_simulated", fake_simulated)
    monkeypatch.setattr(whisper, "search_whisper", fake_search)
    monkeypatch.setattr(whisper, "quantize_whisper_x86", fake_x86)
    monkeypatch.setattr(whisper, "whisper_statistics", lambda bundle, calibration: pytest.fail("the search's"))
    result = runner.run_recipe(make_recipe(tmp_path, model="openai/whisper-tiny.en", bits=["w8a8"],
                                           methods=["fp", "max", "stablequant", "histogram"]), progress=False)
    # stablequant runs first (its statistics serve max); the rows keep the recipe's order
    assert seen == [("x86", "stablequant"), ("x86", "max"), ("x86", "StableQuantX86Quantizer")]
    assert [(r["method"], r["simulated"], r["int8_kernels"]) for r in result.rows] == [
        ("fp", False, 0), ("max", False, 5), ("stablequant", False, 5), ("histogram", False, 5)]
    # backend simulate: the same plans, simulated
    seen.clear()
    runner.run_recipe(make_recipe(tmp_path, model="openai/whisper-tiny.en", bits=["w8a8"], backend="simulate",
                                  methods=["fp", "stablequant", "max", "histogram"]), progress=False)
    assert seen == [("simulated", "stablequant"), ("simulated", "max"), ("simulated", "observer")]


def test_corpus_datasets_load_their_release():
    from sq_plugin.runner import _load_data
    from sq_plugin.speech.corpus import DEV_VOICES, TRAIN_VOICES

    (v2,) = _load_data("corpus-dev", 1)
    (v1,) = _load_data("corpus-dev-v1", 1)
    assert v2.voice in DEV_VOICES and v1.voice in TRAIN_VOICES and v1.text == v2.text  # same sentences


def test_per_token_activations_reach_the_stablequant_plan_and_are_refused_early_without_vnni(tmp_path, monkeypatch):
    recipe = make_recipe(tmp_path, methods=["fp", "stablequant", "max"], bits=["w8a8"],
                         method_options={"stablequant": {"activations": "per_token"}})
    fake_cpu(monkeypatch, "avx2")
    with pytest.raises(RecipeError, match=r"activations: per_token runs the Linears on torch._int_mm: .*saturates.*"
                                          r"Fix: activations: auto \(stays static here\) or static"):
        runner.check_runnable(recipe)
    fake_cpu(monkeypatch, "vnni")
    install_fakes(monkeypatch)
    result = runner.run_recipe(recipe, progress=False)
    plans = {r["method"]: QuantPlan.load(result.output_dir / r["plan"]) for r in result.rows if r.get("plan")}
    assert plans["stablequant"].per_token_layers == ["enc.0", "enc.1"]
    assert plans["stablequant"].provenance["activation_choice"] == {"activations": "per_token", "per_token_layers": 2,
                                                                    "float_mac_share": 0.0}
    assert plans["max"].per_token_layers == []  # the built-ins keep their static ranges
