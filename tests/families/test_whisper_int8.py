"""Whisper encoder + decoder step on INT8 kernels (sq_plugin.families.whisper_int8), on a tiny random Whisper with
the real tiny.en processor."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from sq_plugin.backends.artifact import ArtifactError
from sq_plugin.backends.x86_isa import x86_policy
from sq_plugin.families.whisper_int8 import (
    GreedySettings,
    WhisperDecoderStep,
    WhisperEncoderKV,
    beam_decode,
    empty_cache,
    greedy_decode,
    greedy_decode_batch,
    load_whisper_int8,
    quantize_whisper_int8,
    save_whisper_int8,
)

SOT, EOT, NO_TIMESTAMPS = 50257, 50256, 50362


def tiny_whisper_bundle(name: str = "tiny-whisper", d_model: int = 32, seed: int = 0):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from sq_plugin.speech.models import SpeechModel
    from sq_plugin.speech.whisper_ct2 import build_whisper_processor, default_model_dir

    config = WhisperConfig(vocab_size=51864, d_model=d_model, encoder_layers=1, decoder_layers=2,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                           decoder_ffn_dim=64, num_mel_bins=80, max_source_positions=1500, max_target_positions=16,
                           decoder_start_token_id=SOT, pad_token_id=EOT, bos_token_id=SOT, eos_token_id=EOT)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config).eval()
    gen = model.generation_config
    gen.no_timestamps_token_id = NO_TIMESTAMPS
    gen.suppress_tokens = [1, 2, 7, 50357, 50358]
    gen.begin_suppress_tokens = [220, EOT]
    gen.max_length = 12
    return SpeechModel(name, "whisper", model, build_whisper_processor(default_model_dir()))


@pytest.fixture(scope="module")
def bundle():
    return tiny_whisper_bundle()


@pytest.fixture(scope="module")
def features(bundle):
    gen = np.random.default_rng(0)
    fe = bundle.processor.feature_extractor
    return [fe([(0.1 * gen.standard_normal(16000 * s)).astype(np.float32)], sampling_rate=16000,
               return_tensors="pt").input_features for s in (1, 2, 3)]


@pytest.fixture(scope="module")
def int8(bundle, features):
    return quantize_whisper_int8(bundle, features)


def _corpus_utterances(n: int):
    from sq_plugin.speech.corpus import load_split

    return load_split("test", limit=n, progress=False)


def hf_greedy(bundle, feats) -> list[int]:
    with torch.no_grad():
        out = bundle.model.generate(feats, num_beams=1, do_sample=False, return_timestamps=False,
                                    return_dict_in_generate=True).sequences[0].tolist()
    assert out[:2] == [SOT, NO_TIMESTAMPS]
    return [t for t in out[2:] if t != EOT]


def test_float_step_decoder_reproduces_hf_greedy_generate(bundle, features):
    settings = GreedySettings.from_model(bundle.model)
    assert settings.prompt == (SOT, NO_TIMESTAMPS) and settings.max_new_tokens == 12
    encode, step = WhisperEncoderKV(bundle.model).eval(), WhisperDecoderStep(bundle.model).eval()
    cache = empty_cache(bundle.model)
    for feats in features:
        ours = greedy_decode(encode, step, feats, cache, settings)
        assert ours == hf_greedy(bundle, feats)
        assert len(ours) > 0 and not set(ours) & set(settings.suppress)


def test_step_logits_match_hf_forward_at_every_position(bundle, features):
    """The static-cache step equals HF's full forward over the same tokens, position by position."""
    whisper = bundle.model
    tokens = [SOT, NO_TIMESTAMPS, 440, 1263, 50, 9]
    with torch.no_grad():
        want = whisper(input_features=features[1], decoder_input_ids=torch.tensor([tokens])).logits[0]
        encode, step = WhisperEncoderKV(whisper).eval(), WhisperDecoderStep(whisper).eval()
        cross = encode(features[1])
        keys, values = empty_cache(whisper)
        for pos, token in enumerate(tokens):
            logits, k, v = step(torch.tensor([[token]]), torch.tensor([pos]), keys, values, *cross)
            keys[:, :, :, pos], values[:, :, :, pos] = k[:, :, :, 0], v[:, :, :, 0]
            torch.testing.assert_close(logits[0, 0], want[pos], atol=1e-4, rtol=1e-4)


def test_every_linear_runs_on_onednn_int8_kernels(int8):
    # encoder: 1 layer x (q, k, v, out, fc1, fc2) + 2 decoder layers x cross (k, v); two convs.
    # decoder step: 2 layers x (self q, k, v, out; cross q, out; fc1, fc2) + the logits projection.
    assert int8.report["lowering"] == {"encoder": {"qlinear": 10, "qconv": 2, "per_token_linear": 0},
                                       "decoder_step": {"qlinear": 17, "qconv": 0, "per_token_linear": 0}}
    assert int8.report["calibration_utterances"] == 3 and int8.report["calibration_decoder_steps"] >= 3
    # Each lowered graph was checked against its fake-quant graph when it compiled.
    assert all(e < 0.1 for m in (int8.encode, int8.step) for e in m.errors.values())


def test_embedding_reads_the_int8_logits_table_instead_of_a_float_copy(int8):
    from sq_plugin.backends.artifact import _get_attr, _prune_unused_state

    graph = int8.converted["decoder_step"]
    lookups = [n for n in graph.graph.nodes if n.target == torch.ops.aten.embedding.default]
    tables = [_get_attr(graph, n.args[0].target) for n in lookups if n.args[0].op == "get_attr"]
    assert [(t.dtype, tuple(t.shape)) for t in tables] == [(torch.int8, (51864, 32))]  # rows, then their scales
    # Exactly one vocabulary-sized tensor is left once unused FP parameters are dropped: the INT8 one.
    vocab = [t for t in _prune_unused_state(graph).state_dict().values() if t.shape[0] == 51864 and t.dim() == 2]
    assert [t.dtype for t in vocab] == [torch.int8]


def test_int8_decoding_follows_the_fake_quant_graphs(bundle, int8, features):
    cache = empty_cache(bundle.model)
    agree = 0
    for feats in features:
        simulated = greedy_decode(int8.converted["encoder"], int8.converted["decoder_step"], feats, cache,
                                  int8.settings)
        agree += int8.transcribe(feats) == simulated
    assert agree >= 2  # INT8 rounding may flip one argmax of a random model's flat logits, not most


def test_save_load_gives_the_same_graphs_bit_for_bit(bundle, int8, features, tmp_path):
    path = save_whisper_int8(int8, tmp_path / "w.sqa", metadata={"recipe": {"quantizer": "default"}})
    assert sorted(p.name for p in path.iterdir()) == ["decoder_step", "encoder", "greedy.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    loaded = load_whisper_int8(path, bundle, lower=False)
    assert loaded.settings == int8.settings
    assert loaded.report["calibration_utterances"] == 3
    cache = empty_cache(bundle.model)
    for feats in features:
        with torch.no_grad():
            a, b = loaded.encode(feats), int8.converted["encoder"](feats)
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
        assert loaded.transcribe(feats) == greedy_decode(int8.converted["encoder"], int8.converted["decoder_step"],
                                                         feats, cache, int8.settings)


def test_load_refuses_another_model_and_a_broken_directory(int8, tmp_path):
    path = save_whisper_int8(int8, tmp_path / "w.sqa", metadata={})
    wider = tiny_whisper_bundle(d_model=48)
    with pytest.raises(ArtifactError, match="not for"):
        load_whisper_int8(path, wider, lower=False)
    renamed = tiny_whisper_bundle(name="other-whisper")
    with pytest.raises(ArtifactError, match="made for 'tiny-whisper:encoder', not other-whisper"):
        load_whisper_int8(path, renamed, lower=False)
    (path / "greedy.json").write_text(json.dumps({"prompt": [1]}))
    with pytest.raises(ArtifactError, match="greedy.json cannot be read"):
        load_whisper_int8(path, int8_bundle(int8), lower=False)
    (path / "greedy.json").unlink()
    with pytest.raises(ArtifactError, match="not a save_whisper_int8 directory"):
        load_whisper_int8(path, int8_bundle(int8), lower=False)


def int8_bundle(int8):
    from sq_plugin.speech.models import SpeechModel

    return SpeechModel(int8.model_name, "whisper", int8.whisper, None)


def test_bad_input_is_refused_with_the_fix(bundle, features, int8):
    with pytest.raises(ValueError, match=r"one utterance.*got batch 2: call transcribe_batch"):
        int8.transcribe(torch.cat([features[0]] * 2))
    with pytest.raises(ValueError, match=r"\[batch, 80, 3000\].*feature extractor"):
        int8.transcribe(features[0][:, :, :1500])
    with pytest.raises(ValueError, match="batch >= 1"):
        int8.transcribe_batch(features[0][:0])
    with pytest.raises(ValueError, match="at least one calibration utterance"):
        quantize_whisper_int8(bundle, [])
    encode, step = WhisperEncoderKV(bundle.model).eval(), WhisperDecoderStep(bundle.model).eval()
    settings = GreedySettings.from_model(bundle.model)
    with pytest.raises(ValueError, match="one utterance.*greedy_decode_batch"):
        greedy_decode(encode, step, torch.cat([features[0]] * 2), empty_cache(bundle.model), settings)
    with pytest.raises(ValueError, match=r"cache is for batch 1.*empty_cache\(whisper, batch=2\)"):
        greedy_decode_batch(encode, step, torch.cat([features[0]] * 2), empty_cache(bundle.model), settings)


def test_a_batch_decodes_each_row_as_it_would_alone(bundle, int8, features, tmp_path):
    """Float step graphs and the INT8 graphs (exported with a dynamic batch): decoding a batch together gives
    every row the tokens it gets alone, rows that end early included; the saved artifact keeps the batch dynamic."""
    batch = torch.cat(features)
    settings = GreedySettings.from_model(bundle.model)
    encode, step = WhisperEncoderKV(bundle.model).eval(), WhisperDecoderStep(bundle.model).eval()
    alone = [greedy_decode(encode, step, f, empty_cache(bundle.model), settings) for f in features]
    assert greedy_decode_batch(encode, step, batch, empty_cache(bundle.model, batch=3), settings) == alone
    short = dataclasses.replace(settings, max_new_tokens=3)
    assert greedy_decode_batch(encode, step, batch, empty_cache(bundle.model, batch=3), short) == [
        r[:3] for r in alone]
    # rows that end early: row i is made to emit <|endoftext|> after i + 1 tokens (not as the first token, which
    # begin_suppress forbids); the others go on unchanged
    prompt = len(settings.prompt)

    def ending_step(token, position, *rest):
        logits, keys, values = step(token, position, *rest)
        logits = logits.clone()
        for i in range(logits.shape[0]):
            if int(position) == prompt + i:
                logits[i, -1, settings.eos] = float("inf")
        return logits, keys, values

    rows = greedy_decode_batch(encode, ending_step, batch, empty_cache(bundle.model, batch=3), settings)
    assert rows == [r[:i + 1] for i, r in enumerate(alone)] and all(len(r) >= 3 for r in alone)

    int8_alone = [int8.transcribe(f) for f in features]
    assert int8.transcribe_batch(batch) == int8_alone
    assert {k[0][0] for k in int8.step.shapes} == {(1, 1), (3, 1)}  # one compilation per batch size, on INT8
    assert all(e < 0.1 for e in int8.step.errors.values())
    loaded = load_whisper_int8(save_whisper_int8(int8, tmp_path / "w.sqa", metadata={}), bundle)
    assert loaded.transcribe_batch(batch[:2]) == int8_alone[:2]


def test_gathering_int8_rows_equals_looking_up_the_dequantized_table():
    import torchao.quantization.pt2e  # noqa: F401  (registers the quantized_decomposed ops)

    from sq_plugin.families.whisper_int8 import gather_int8_embedding_rows

    class Lookup(torch.nn.Module):
        def __init__(self):
            super().__init__()
            gen = torch.Generator().manual_seed(0)
            self.register_buffer("table", torch.randint(-128, 128, (50, 8), dtype=torch.int8, generator=gen))
            self.register_buffer("scales", torch.rand(50, generator=gen) + 0.01)
            self.register_buffer("zero_points", torch.randint(-3, 4, (50,), generator=gen))

        def forward(self, token):
            table = torch.ops.quantized_decomposed.dequantize_per_channel.default(
                self.table, self.scales, self.zero_points, 0, -128, 127, torch.int8)
            return torch.ops.aten.embedding.default(table, token) * 2.0

    graph = torch.fx.symbolic_trace(Lookup())
    token = torch.tensor([[0, 7, 49]])
    want = graph(token)
    gather_int8_embedding_rows(graph)
    assert not [n for n in graph.graph.nodes if "dequantize" in str(n.target)]
    assert torch.equal(graph(token), want)


def test_a_plan_on_the_hf_names_drives_both_int8_graphs(bundle, features):
    """Whisper INT8 built from a QuantPlan made on the HF module names: a layer's planned range (here a
    cut-off on two layers) is its input scale in the encoder and in the decoder-step graph."""
    from sq_plugin.backends.artifact import layer_qparams
    from sq_plugin.backends.simulate import quantizable_layers
    from sq_plugin.core.plan import LayerPlan, PlanError, QuantPlan, x86_grids
    from sq_plugin.core.quant import qparams_from_range
    from sq_plugin.families.whisper_int8 import graph_layer_names
    from sq_plugin.search import collect_input_histograms

    whisper = bundle.model
    names = list(quantizable_layers(whisper))
    prompt = torch.tensor([[SOT, NO_TIMESTAMPS, 220, 400]])
    hists = collect_input_histograms(whisper, lambda: whisper(input_features=features[0], decoder_input_ids=prompt),
                                     names)
    weight, act = x86_grids(8, 8) if x86_policy().int32_accumulation else x86_grids(7, 8)
    clipped = {"model.encoder.layers.0.fc2": 0.5, "model.decoder.layers.1.fc1": 0.25}
    plan = QuantPlan({n: LayerPlan("conv1d" if "conv" in n else "linear", act,
                                   (float(hists[n].min_val[0]) * clipped.get(n, 1.0),
                                    float(hists[n].max_val[0]) * clipped.get(n, 1.0)), weight)
                      for n in names}, {"model": bundle.name})
    graph_names = graph_layer_names(whisper)
    assert graph_names["encoder"]["model.encoder.layers.0.fc2"] == "encoder.layers.0.fc2"
    cross_k = "decoder_layers.1.encoder_attn.k_proj"
    assert graph_names["encoder"]["model.decoder.layers.1.encoder_attn.k_proj"] == cross_k
    assert graph_names["decoder_step"]["proj_out"] == "proj_out"

    int8 = quantize_whisper_int8(bundle, features, plan=plan, lower=False)
    assert int8.report["calibration_utterances"] == 1  # weights only
    for graph, hf_name in (("encoder", "model.encoder.layers.0.fc2"), ("decoder_step", "model.decoder.layers.1.fc1")):
        layer = plan.layers[hf_name]
        scale, _ = qparams_from_range(*layer.act_range, act.qmin, act.qmax, symmetric=False)
        got = layer_qparams(int8.converted[graph])[graph_names[graph][hf_name]]["input"]["scale"]
        assert got == pytest.approx(float(scale), rel=1e-6)
    # what shares an input (q/k/v; every decoder layer's cross-attention k/v read the encoder output) is reported
    assert all(n.rsplit(".", 1)[-1] in ("k_proj", "v_proj") for n in int8.report["plan_deviations"])
    assert "model.encoder.layers.0.fc2" not in int8.report["plan_deviations"]

    other = QuantPlan({"model.encoder.conv1": plan.layers["model.encoder.conv1"]}, {"model": "another"})
    with pytest.raises(PlanError, match=r"made for 'another'.*layer\(s\) of tiny-whisper are not in the plan"):
        quantize_whisper_int8(bundle, features, plan=other, lower=False)


def test_generate_is_transcribe_per_row_so_evaluate_runs_the_int8_graphs(bundle, int8, features):
    import dataclasses

    from sq_plugin.speech.evaluate import evaluate

    batch = torch.cat(features)
    rows = int8.generate(batch, max_length=12, num_beams=1, do_sample=False, return_timestamps=False)
    for row, feats in zip(rows.tolist(), features, strict=True):
        tokens = int8.transcribe(feats)
        assert row[:2] == [SOT, NO_TIMESTAMPS] and row[2:2 + len(tokens)] == tokens
        assert set(row[2 + len(tokens):]) <= {EOT}
    assert len(int8.generate(batch[:1], max_length=2)[0]) <= 2 + 2 + 1  # max_length counts new tokens
    with pytest.raises(ValueError, match="without sampling or timestamps"):
        int8.generate(batch, do_sample=True)
    beams = int8.generate(batch, num_beams=3)  # a beam search per row, the 3 beams one batch of the INT8 graphs
    for row, feats in zip(beams.tolist(), features, strict=True):
        tokens = int8.beam_search(feats, 3)
        assert row[:2 + len(tokens)] == [SOT, NO_TIMESTAMPS, *tokens]
    with pytest.raises(ValueError, match="num_beams must be 1 to 16"):
        int8.generate(batch, num_beams=17)

    @dataclasses.dataclass
    class Utt:
        id: str
        audio: np.ndarray
        text: str

    gen = np.random.default_rng(1)
    utts = [Utt(f"u{i}", (0.1 * gen.standard_normal(16000)).astype(np.float32), "hello") for i in range(2)]
    result = evaluate(dataclasses.replace(bundle, model=int8), utts, batch_size=2, progress=False)
    assert result.n == 2 and np.isfinite(result.wer)


def test_mixed_widths_reach_both_graphs_and_the_tied_embedding_with_the_stored_codes(bundle, features):
    """A mixed-precision plan ("stored" weights at 2-8 bits) on Whisper's INT8 graphs: every layer's INT8 weight
    is its stored codes, and the token embedding reads proj_out's stored table (stored once, at proj_out's width)."""
    from sq_plugin.backends.artifact import _get_attr, layer_qparams
    from sq_plugin.backends.simulate import quantizable_layers
    from sq_plugin.core.plan import LayerPlan, QuantPlan, x86_grids
    from sq_plugin.families.whisper import quantize_whisper_x86
    from sq_plugin.families.whisper_int8 import graph_layer_names
    from sq_plugin.search.mixed_precision import mixed_plan, stored_weights

    whisper = bundle.model
    names = list(quantizable_layers(whisper))
    weight, act = x86_grids(8, 8) if x86_policy().int32_accumulation else x86_grids(7, 8)
    base = QuantPlan({n: LayerPlan("conv1d" if "conv" in n else "linear", act, (-4.0, 4.0), weight) for n in names},
                     {"model": bundle.name})
    widths = (2, 3, 4, 5, 6, 8)
    plan = mixed_plan(base, {n: widths[i % len(widths)] for i, n in enumerate(names)})
    weights = stored_weights(whisper, plan)

    class Utt:
        audio = (0.1 * np.random.default_rng(1).standard_normal(16000)).astype(np.float32)

    quantized = quantize_whisper_x86(bundle, [Utt()], plan, weights=weights)
    assert "mixed 2/3/4/5/6/" in quantized.backend and quantized.int8_kernels == 29
    converted = quantized.bundle.model.converted
    graph_names = graph_layer_names(whisper)
    seen = set()
    for graph, module_names in graph_names.items():
        entries = layer_qparams(converted[graph])
        for hf_name, graph_name in module_names.items():
            if graph_name not in entries:  # a module the graph holds but does not run (e.g. the encoder graph's
                continue                   # copy of a decoder self-attention; only cross k/v run there)
            entry = entries[graph_name]["weight"]
            assert torch.equal(_get_attr(converted[graph], entry["int8"]), weights[hf_name].codes), hf_name
            seen.add(hf_name)
    assert seen == set(names)
    step = converted["decoder_step"]
    lookup = next(n for n in step.graph.nodes if n.target == torch.ops.aten.embedding.default)
    assert torch.equal(_get_attr(step, lookup.args[0].target), weights["proj_out"].codes)
    assert torch.equal(bundle.model.proj_out.weight, whisper.model.decoder.embed_tokens.weight)  # caller untouched
    assert not torch.equal(bundle.model.proj_out.weight, weights["proj_out"].dequantize())


@pytest.mark.parametrize("num_beams", [1, 2, 5])
def test_beam_search_is_hf_generate_with_num_beams(bundle, features, num_beams):
    encode, step = WhisperEncoderKV(bundle.model).eval(), WhisperDecoderStep(bundle.model).eval()
    settings = GreedySettings.from_model(bundle.model)
    for feats in features:
        with torch.no_grad():
            hf = bundle.model.generate(feats, num_beams=num_beams, do_sample=False, return_timestamps=False,
                                       return_dict_in_generate=True).sequences[0].tolist()
        want = [t for t in hf[2:] if t != EOT]
        assert beam_decode(encode, step, feats, empty_cache(bundle.model, batch=num_beams), settings,
                           num_beams) == want
    if num_beams == 1:
        assert beam_decode(encode, step, features[0], empty_cache(bundle.model), settings, 1) == greedy_decode(
            encode, step, features[0], empty_cache(bundle.model), settings)


def test_a_multilingual_models_graphs_take_their_own_language_and_task_and_refuse_others(features):
    """evaluate() passes language="en", task="transcribe" to a multilingual model's generate (Whisper base)."""
    bundle = tiny_whisper_bundle("tiny-multilingual")
    gen = bundle.model.generation_config
    gen.is_multilingual, gen.language, gen.task = True, "en", "transcribe"
    gen.lang_to_id, gen.task_to_id = {"<|en|>": 50259, "<|de|>": 50261}, {"transcribe": 50359, "translate": 50358}
    quantized = quantize_whisper_int8(bundle, features[:1], lower=False)
    assert quantized.settings.prompt == (SOT, 50259, 50359, NO_TIMESTAMPS)
    x = torch.cat(features[:2])
    want = quantized.generate(x)
    assert torch.equal(quantized.generate(x, language="en", task="transcribe"), want)
    assert torch.equal(quantized.generate(x, language="<|en|>"), want)
    with pytest.raises(ValueError, match=r"language='de'.*calibrated with the prompt.*quantize again"):
        quantized.generate(x, language="de")
    with pytest.raises(ValueError, match=r"task='translate'"):
        quantized.generate(x, task="translate")
    from sq_plugin.speech.evaluate import evaluate
    from sq_plugin.speech.models import SpeechModel

    utterances = _corpus_utterances(1)
    result = evaluate(SpeechModel("tiny-multilingual", "whisper", quantized, bundle.processor), utterances,
                      progress=False)
    assert len(result.utterances) == 1


def test_an_english_only_models_graphs_refuse_a_language(int8, features):
    with pytest.raises(ValueError, match=r"English-only checkpoint.*drop language and task"):
        int8.generate(features[0], language="en")


def test_repeated_ngram_tokens_are_hf_no_repeat_ngram_bans():
    from sq_plugin.families.whisper_int8 import repeated_ngram_tokens

    assert repeated_ngram_tokens([5, 6, 7, 5, 6], 3) == [7]  # "5 6" was followed by 7
    assert repeated_ngram_tokens([5, 6, 7, 5, 6, 8, 5, 6], 3) == [7, 8]
    assert repeated_ngram_tokens([5, 6, 5], 2) == [6]
    assert repeated_ngram_tokens([5, 6, 7], 1) == [5, 6, 7]  # size 1: no token twice
    assert repeated_ngram_tokens([5, 6], 4) == [] and repeated_ngram_tokens([5, 5, 5], 0) == []


@pytest.mark.parametrize("num_beams", [1, 3])
def test_no_repeat_ngram_size_decodes_as_hf_generate(bundle, features, num_beams):
    """The random model repeats itself; with no_repeat_ngram_size=2 both decoders give HF's tokens, which differ
    from the unguarded ones (so the guard fired)."""
    encode, step = WhisperEncoderKV(bundle.model).eval(), WhisperDecoderStep(bundle.model).eval()
    plain = GreedySettings.from_model(bundle.model)
    guarded = dataclasses.replace(plain, no_repeat_ngram_size=2)
    changed = 0
    batched = greedy_decode_batch(encode, step, torch.cat(features), empty_cache(bundle.model, batch=3), guarded)
    for row, feats in enumerate(features):
        with torch.no_grad():
            hf = bundle.model.generate(feats, num_beams=num_beams, do_sample=False, return_timestamps=False,
                                       no_repeat_ngram_size=2, return_dict_in_generate=True).sequences[0].tolist()
        want = [t for t in hf[2:] if t != EOT]
        cache = empty_cache(bundle.model, batch=num_beams)
        ours = beam_decode(encode, step, feats, cache, guarded, num_beams)
        assert ours == want
        if num_beams == 1:
            assert batched[row] == want
        changed += ours != beam_decode(encode, step, feats, cache, plain, num_beams)
    assert changed


def test_beam_search_matches_hf_on_the_real_tiny_en_where_beams_end_and_change_the_transcript():
    """The tiny random model never ends a beam; the real one does, and at width 4 picks another transcript for
    this utterance than greedy decoding (so ending, ranking by length-normalized score and reordering the cache
    are all exercised)."""
    from sq_plugin.speech.corpus import load_split
    from sq_plugin.speech.models import load_model

    whisper = load_model("openai/whisper-tiny.en")
    utterance = load_split("test", limit=3, progress=False)[2]
    feats = whisper.processor.feature_extractor([utterance.audio], sampling_rate=16000,
                                                return_tensors="pt").input_features
    encode, step = WhisperEncoderKV(whisper.model).eval(), WhisperDecoderStep(whisper.model).eval()
    settings = GreedySettings.from_model(whisper.model)
    with torch.no_grad():
        hf = whisper.model.generate(feats, num_beams=4, do_sample=False, return_timestamps=False,
                                    return_dict_in_generate=True).sequences[0].tolist()
    ours = beam_decode(encode, step, feats, empty_cache(whisper.model, batch=4), settings, 4)
    assert ours == [t for t in hf[len(settings.prompt):] if t != settings.eos]
    assert ours != greedy_decode(encode, step, feats, empty_cache(whisper.model), settings)
    # a length penalty ranks the finished hypotheses as HF does (generate(length_penalty=...) passes it through)
    for length_penalty in (0.0, 3.0):
        with torch.no_grad():
            hf = whisper.model.generate(feats, num_beams=4, do_sample=False, return_timestamps=False,
                                        length_penalty=length_penalty, return_dict_in_generate=True)
        want = [t for t in hf.sequences[0].tolist()[len(settings.prompt):] if t != settings.eos]
        assert beam_decode(encode, step, feats, empty_cache(whisper.model, batch=4), settings, 4,
                           length_penalty=length_penalty) == want


def test_a_per_token_plan_runs_its_linears_on_int_mm_as_simulated_and_saves(bundle, features, tmp_path):
    """A plan with every Linear but proj_out on the per-token grid: both graphs hold PerTokenInt8Linears (10 in the
    encoder with the cross K/V, 16 in the step), proj_out stays on oneDNN's qlinear (the embedding reads its INT8
    table), the convs on qconv; the INT8 encoder is the simulation of that plan, and the artifact round-trips."""
    from sq_plugin.backends.simulate import plan_layer_quants, quantizable_layers, simulate
    from sq_plugin.backends.x86_isa import IsaError
    from sq_plugin.core.plan import LayerPlan, QuantPlan, x86_grids
    from sq_plugin.search import collect_input_histograms

    whisper = bundle.model
    names = list(quantizable_layers(whisper))
    prompt = torch.tensor([[SOT, NO_TIMESTAMPS, 220, 400]])
    hists = collect_input_histograms(whisper, lambda: whisper(input_features=features[0], decoder_input_ids=prompt),
                                     names)
    weight, act = x86_grids(8, 8)
    static = QuantPlan({n: LayerPlan("conv1d" if "conv" in n else "linear", act,
                                     (float(hists[n].min_val[0]), float(hists[n].max_val[0])), weight)
                        for n in names}, {"model": bundle.name})
    linears = [n for n in names if "conv" not in n and n != "proj_out"]
    plan = static.with_per_token_activations(linears)
    assert len(plan.per_token_layers) == 26 and plan.to_dict()["version"] == 2 and static.to_dict()["version"] == 1
    if not x86_policy().int32_accumulation:
        with pytest.raises(IsaError, match=r"26 plan layer\(s\) ask for per-token activations"):
            quantize_whisper_int8(bundle, features, plan=plan)
        return
    int8 = quantize_whisper_int8(bundle, features, plan=plan)
    assert int8.report["per_token_linears"] == 26 and int8.report["plan_deviations"] == {}
    assert int8.report["lowering"] == {"encoder": {"qlinear": 0, "qconv": 2, "per_token_linear": 10},
                                       "decoder_step": {"qlinear": 1, "qconv": 0, "per_token_linear": 16}}
    assert "26 per-token Linears on torch._int_mm" in int8.report["backend"]
    assert all(isinstance(m, torch.nn.Linear) for n, m in whisper.named_modules() if n in linears)  # caller's: float
    with torch.no_grad():  # the cross-attention keys of the last layer: after every encoder layer
        got = int8.encode(features[1])[0][-1]
        want = WhisperEncoderKV(whisper)(features[1])[0][-1]
        with simulate(whisper, plan_layer_quants(plan)):
            simulated = WhisperEncoderKV(whisper)(features[1])[0][-1]
    assert float((got - simulated).norm() / simulated.norm()) < 0.02  # the plan, as simulated
    assert float((got - want).norm() / want.norm()) < 0.1
    path = save_whisper_int8(int8, tmp_path / "pt.sqa", metadata={})
    loaded = load_whisper_int8(path, bundle)
    assert loaded.report["lowering"]["encoder"]["per_token_linear"] == 10
    for feats in features:
        assert loaded.transcribe(feats) == int8.transcribe(feats)



def test_the_beams_read_one_copy_of_the_cross_keys_and_values(bundle, int8, features):
    """beam_decode hands the step a stride-0 view of the utterance's cross keys/values for all beams: the INT8
    step gives bit for bit what it gives on a copy per beam, and its beam search agrees with the one on the
    fake-quant graphs."""
    with torch.no_grad():
        cross = int8.encode(features[0])
        keys, values = empty_cache(bundle.model, batch=3)
        token, position = torch.tensor([[SOT], [NO_TIMESTAMPS], [EOT]]), torch.zeros(1, dtype=torch.long)
        views = [x.expand(-1, 3, *x.shape[2:]) for x in cross]
        assert views[0].stride(1) == 0
        shared = int8.step(token, position, keys, values, *views)
        copied = int8.step(token, position, keys, values, *(v.contiguous() for v in views))
    assert all(torch.equal(a, b) for a, b in zip(shared, copied, strict=True))
    agree = sum(int8.beam_search(f, 3) == beam_decode(int8.converted["encoder"], int8.converted["decoder_step"], f,
                                                      empty_cache(bundle.model, batch=3), int8.settings, 3)
                for f in features)
    assert agree >= 2  # INT8 rounding may flip one choice of a random model's flat logits, not most
