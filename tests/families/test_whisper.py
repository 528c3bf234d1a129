"""Whisper through the search and the fake-quant simulation, on a tiny random Whisper with the real
tiny.en processor (tokenizer + log-mel features, offline)."""

import dataclasses

import numpy as np
import pytest
import torch

from sq_plugin.backends.simulate import quantizable_layers
from sq_plugin.backends.x86_isa import x86_policy
from sq_plugin.core import RangeRule
from sq_plugin.families.whisper import (
    SIMULATED_BACKEND,
    quantize_whisper_simulated,
    search_whisper,
    teacher_forced_batches,
    teacher_forced_scores,
    whisper_score,
)
from sq_plugin.search import SearchConfig


@dataclasses.dataclass
class Utt:
    id: str
    audio: np.ndarray
    text: str


@pytest.fixture(scope="module")
def tiny_whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from sq_plugin.speech.models import SpeechModel
    from sq_plugin.speech.whisper_ct2 import build_whisper_processor, default_model_dir

    processor = build_whisper_processor(default_model_dir())
    config = WhisperConfig(vocab_size=51864, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80,
                           max_source_positions=1500, max_target_positions=64, decoder_start_token_id=50257,
                           pad_token_id=50256, bos_token_id=50257, eos_token_id=50256)
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config.max_length = 8
    return SpeechModel("tiny-whisper", "whisper", model, processor)


@pytest.fixture(scope="module")
def utterances():
    gen = np.random.default_rng(0)
    texts = ["she returned past the small city", "a bird", "the big bird came back across the big village"]
    return [Utt(f"u{i}", (0.1 * gen.standard_normal(16000 * (i + 1))).astype(np.float32), t)
            for i, t in enumerate(texts)]


def test_teacher_forced_batches_shift_the_transcript_by_one(tiny_whisper, utterances):
    tok = tiny_whisper.processor.tokenizer
    (batch,) = teacher_forced_batches(tiny_whisper, utterances, batch_size=3)
    assert batch.input_features.shape == (3, 80, 3000)
    ids = tok(" a bird").input_ids  # <|startoftranscript|> <|notimestamps|> ... <|endoftext|>
    assert ids[:2] == [50257, 50362] and ids[-1] == 50256
    n = len(ids) - 1
    assert batch.decoder_input_ids[1, :n].tolist() == ids[:-1] and batch.labels[1, :n].tolist() == ids[1:]
    assert (batch.labels[1, n:] == -100).all()  # padding is not scored
    with pytest.raises(ValueError, match="calibration set is empty"):
        teacher_forced_batches(tiny_whisper, [])


def test_teacher_forced_scores_match_a_direct_cross_entropy(tiny_whisper, utterances):
    batches = teacher_forced_batches(tiny_whisper, utterances, batch_size=2)
    scores = teacher_forced_scores(tiny_whisper.model, batches)
    losses, tokens = 0.0, 0
    for u in utterances:  # one at a time, no padding at all
        (b,) = teacher_forced_batches(tiny_whisper, [u], batch_size=1)
        with torch.no_grad():
            logits = tiny_whisper.model(input_features=b.input_features, decoder_input_ids=b.decoder_input_ids).logits
        losses += float(torch.nn.functional.cross_entropy(logits[0], b.labels[0], reduction="sum"))
        tokens += b.labels.shape[1]
    assert scores["tf_loss"] == pytest.approx(losses / tokens, rel=1e-4)
    assert 0.0 <= scores["tf_token_error"] <= 1.0
    # stop_above: the values summed so far, once the named one is sure to exceed the bound (lower bounds)
    assert teacher_forced_scores(tiny_whisper.model, batches, stop_above=("tf_loss", scores["tf_loss"])) == scores
    stopped = teacher_forced_scores(tiny_whisper.model, batches, stop_above=("tf_loss", scores["tf_loss"] / 100))
    assert scores["tf_loss"] / 100 < stopped["tf_loss"] < scores["tf_loss"]
    assert stopped["tf_token_error"] <= scores["tf_token_error"]


def test_tf_kl_is_the_per_token_kl_from_the_float_model_and_drives_the_search(tiny_whisper, utterances):
    from sq_plugin.backends.simulate import LayerQuant, simulate

    kl, replay = whisper_score(tiny_whisper, utterances, "tf_kl")
    one_per_batch = whisper_score(tiny_whisper, utterances, "tf_kl", batch_size=1)[0]  # it can stop after each
    assert replay == "auto" and kl() == pytest.approx(0.0, abs=1e-7)  # the float model against itself
    from sq_plugin.families.whisper import EVAL_BATCH
    from sq_plugin.speech.evaluate import transcribe

    # the float model's own transcripts, one utterance per batch (no padding): what the metric teacher-forces
    texts = transcribe(tiny_whisper, [u.audio for u in utterances], batch_size=EVAL_BATCH, progress=False)
    batches = teacher_forced_batches(tiny_whisper, utterances, batch_size=1, texts=texts)
    layer = "model.decoder.layers.0.fc1"
    with torch.no_grad():
        float_logits = [tiny_whisper.model(input_features=b.input_features, decoder_input_ids=b.decoder_input_ids
                                           ).logits[0] for b in batches]
    with simulate(tiny_whisper.model, {layer: LayerQuant(act_range=(-0.5, 0.5), a_bits=3, w_bits=3)}), torch.no_grad():
        got = kl()
        total, tokens = 0.0, 0
        for b, logits in zip(batches, float_logits, strict=True):
            q = tiny_whisper.model(input_features=b.input_features, decoder_input_ids=b.decoder_input_ids).logits[0]
            total += float(torch.nn.functional.kl_div(torch.log_softmax(q, -1), torch.log_softmax(logits, -1),
                                                      log_target=True, reduction="sum"))
            tokens += len(logits)
        assert kl(bound=got) == got  # not above the bound: the exact value
        exact, stopped = one_per_batch(), one_per_batch(bound=got / 100)
    assert got / 100 < stopped < exact  # stopped after the first batch that crossed the bound: a lower bound
    assert got == pytest.approx(total / tokens, rel=1e-3) and got > 1e-4  # the 3-bit layer moved the outputs
    config = SearchConfig(w_bits=4, a_bits=4, threshold=0.001, percentiles=(100.0, 99.0))
    search = search_whisper(tiny_whisper, utterances, config, metric="tf_kl", progress=False)
    assert search.fp_metric == pytest.approx(0.0, abs=1e-7) and search.max_metric > search.fp_metric
    assert search.final_metric <= min(search.rule_metrics.values())


def test_search_on_whisper_with_prefix_replay_equals_without(tiny_whisper, utterances):
    config = SearchConfig(w_bits=4, a_bits=4, threshold=0.001, percentiles=(100.0, 99.0))
    cached = search_whisper(tiny_whisper, utterances, config, progress=False, referee="auto")
    plain = search_whisper(tiny_whisper, utterances, config, progress=False, prefix_cache=False, referee="auto")
    layers = quantizable_layers(tiny_whisper.model)
    assert [d.name for d in cached.layers] == list(layers)
    assert {"model.encoder.conv1", "model.encoder.conv2", "proj_out"} <= set(layers)
    assert cached.flagged == plain.flagged and cached.to_plan().layers == plain.to_plan().layers
    assert cached.final_metric == plain.final_metric and cached.cache["replayed_calls"] > 0
    assert cached.fp_metric < cached.max_metric  # W4A4 with MAX ranges hurts even this random model
    # with referee "auto" the teacher-forced search is refereed by decoding WER: the search against each built-in rule
    assert set(cached.referee_metrics) == {"search", "mse", "max", "percentile_clip", "moving_average", "l2_histogram"}
    assert cached.referee_choice in cached.referee_metrics
    with pytest.raises(ValueError, match="unknown Whisper search metric 'bleu'"):
        search_whisper(tiny_whisper, utterances, config, metric="bleu")
    with pytest.raises(ValueError, match="unknown Whisper search referee 'bleu'"):
        search_whisper(tiny_whisper, utterances, config, referee="bleu")


def test_simulated_whisper_quantizes_every_layer_and_leaves_the_original_alone(tiny_whisper, utterances):
    model = tiny_whisper.model
    embedding = model.model.decoder.embed_tokens.weight.detach().clone()
    before = teacher_forced_scores(model, teacher_forced_batches(tiny_whisper, utterances))
    q8 = quantize_whisper_simulated(tiny_whisper, utterances, a_bits=8, w_bits=8)
    q4 = quantize_whisper_simulated(tiny_whisper, utterances, a_bits=4, w_bits=4)
    # the grids this CPU's x86 kernels run: 7-bit weights without VNNI (sq_plugin.backends.x86_isa)
    grid = "" if x86_policy().int32_accumulation else ", 7-bit weights"
    assert q8.simulated and q8.backend == SIMULATED_BACKEND + grid and q8.int8_kernels == 0
    n = len(quantizable_layers(model))
    assert q8.op_counts["fake_quant_linear"] + q8.op_counts["fake_quant_conv1d"] == n
    assert teacher_forced_scores(model, teacher_forced_batches(tiny_whisper, utterances)) == before
    # proj_out is tied to the token embedding: its fake-quantized copy must not leak into the embedding
    assert torch.equal(q4.bundle.model.model.decoder.embed_tokens.weight, embedding)
    assert not torch.equal(q4.bundle.model.proj_out.weight, embedding)
    batches = teacher_forced_batches(tiny_whisper, utterances)
    logits = {k: torch.cat([tiny_whisper.model(input_features=b.input_features,
                                               decoder_input_ids=b.decoder_input_ids).logits.flatten()
                            for b in batches]).detach() if k == "fp" else
              torch.cat([q.bundle.model(input_features=b.input_features,
                                        decoder_input_ids=b.decoder_input_ids).logits.flatten()
                         for b in batches]).detach() for k, q in (("fp", None), ("w8", q8), ("w4", q4))}
    err8 = float((logits["w8"] - logits["fp"]).norm() / logits["fp"].norm())
    err4 = float((logits["w4"] - logits["fp"]).norm() / logits["fp"].norm())
    assert 0 < err8 < 0.05 and err4 > 3 * err8


def test_simulated_whisper_with_a_torchao_observer_and_per_layer_rules(tiny_whisper, utterances):
    from torchao.quantization.pt2e import HistogramObserver

    hist = quantize_whisper_simulated(tiny_whisper, utterances, observer=HistogramObserver.with_args(eps=2**-12))
    assert hist.simulated
    (batch,) = teacher_forced_batches(tiny_whisper, utterances[:1])

    # fc1's input (after a LayerNorm) has a spread-out histogram; conv1's (log-mel of padded noise) is
    # mostly the clamp floor, where a 90th-percentile cut-off of |x| changes nothing.
    def fc1_input_grid(quantized):  # the distinct values fc1 sees after its input fake-quant hook
        seen = []
        fc1 = quantized.bundle.model.model.encoder.layers[0].fc1
        handle = fc1.register_forward_pre_hook(lambda _m, args: seen.append(args[0]), prepend=False)
        with torch.no_grad():
            quantized.bundle.model(input_features=batch.input_features, decoder_input_ids=batch.decoder_input_ids)
        handle.remove()
        return seen[0].unique()

    full = quantize_whisper_simulated(tiny_whisper, utterances[:1], a_bits=4, w_bits=4)
    fc1_at_p90 = {"model.encoder.layers.0.fc1": RangeRule("percentile", percentile=90.0)}
    clipped = quantize_whisper_simulated(tiny_whisper, utterances[:1], a_bits=4, w_bits=4, per_layer=fc1_at_p90)
    grid_full, grid_clipped = fc1_input_grid(full), fc1_input_grid(clipped)
    assert len(grid_full) <= 16 and len(grid_clipped) <= 16  # 4-bit activations
    assert float(grid_clipped.max() - grid_clipped.min()) < 0.9 * float(grid_full.max() - grid_full.min())
    with pytest.raises(ValueError, match="takes Whisper models"):
        quantize_whisper_simulated(dataclasses.replace(tiny_whisper, kind="ctc"), utterances)


def test_a_rule_plan_on_whisper_statistics_simulates_as_the_rule_does(tiny_whisper, utterances):
    """One statistics pass, `rule_plan`, then the plan simulated: the same model as calibrating with the rule."""
    from sq_plugin.families.whisper import whisper_statistics
    from sq_plugin.search import layer_ops, rule_plan

    rule = RangeRule("percentile", percentile=99.9)
    plan = rule_plan(whisper_statistics(tiny_whisper, utterances), layer_ops(tiny_whisper.model), rule, w_bits=6,
                     a_bits=6, provenance={"method": "percentile"})
    from_plan = quantize_whisper_simulated(tiny_whisper, utterances[:1], plan=plan)
    by_rule = quantize_whisper_simulated(tiny_whisper, utterances, act_rule=rule, a_bits=6, w_bits=6)
    assert from_plan.simulated and from_plan.plan is plan and "of the plan (6-bit weights, 6-bit activations)" in \
        from_plan.backend
    assert from_plan.op_counts == by_rule.op_counts
    [batch] = teacher_forced_batches(tiny_whisper, utterances)  # all three, padded
    with torch.no_grad():
        want = by_rule.bundle.model(input_features=batch.input_features, decoder_input_ids=batch.decoder_input_ids)
        got = from_plan.bundle.model(input_features=batch.input_features, decoder_input_ids=batch.decoder_input_ids)
    assert torch.equal(got.logits, want.logits)
    wrong = rule_plan({f"other.{n}": h for n, h in whisper_statistics(tiny_whisper, utterances[:1]).items()},
                      {f"other.{n}": op for n, op in layer_ops(tiny_whisper.model).items()}, rule)
    with pytest.raises(ValueError, match="other"):  # a plan for another model is refused by layer name
        quantize_whisper_simulated(tiny_whisper, utterances, plan=wrong)
