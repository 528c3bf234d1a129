"""One-stage (and two-stage) mixed-precision training on tiny float teachers with random inputs."""

import copy

import pytest
import torch

from sq_plugin.backends.weights import quantize_weight
from sq_plugin.core.mixed import mean_bits
from sq_plugin.core.quant import quant_bounds
from sq_plugin.search.mixed_training import (
    MixedTrainConfig,
    MixedTrainResult,
    masked_kl,
    train_one_stage,
    train_two_stage,
)

STEPS = 40


def make_sequential():
    """Three Linear layers of different sizes, vocab 16; the head is scaled so the logits are not flat."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 48), torch.nn.GELU(), torch.nn.Linear(48, 24), torch.nn.GELU(),
                                torch.nn.Linear(24, 16)).eval()
    with torch.no_grad():
        model[4].weight.mul_(6.0)
    return model


class Sensitivity(torch.nn.Module):
    """`b` barely matters (its output enters a residual at 1 %); `a` and the sharp head `c` matter."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(12, 32)
        self.b = torch.nn.Linear(32, 32)
        self.c = torch.nn.Linear(32, 16)
        with torch.no_grad():
            self.c.weight.mul_(8.0)

    def forward(self, x):
        h = torch.nn.functional.gelu(self.a(x))
        return self.c(h + 0.01 * self.b(h))


class ConvHead(torch.nn.Module):
    """A weight-normed Conv1d (as wav2vec2's positional conv) and a plain one, then a Linear head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.utils.parametrizations.weight_norm(torch.nn.Conv1d(12, 24, 3, padding=1, groups=4),
                                                                dim=2)
        self.conv2 = torch.nn.Conv1d(24, 24, 1)
        self.head = torch.nn.Linear(24, 16)
        with torch.no_grad():
            self.head.weight.mul_(6.0)

    def forward(self, x):  # x [batch, time, 12]
        h = torch.nn.functional.gelu(self.conv2(torch.nn.functional.gelu(self.conv(x.transpose(1, 2)))))
        return self.head(h.transpose(1, 2))


def forward(model, batch):
    x, mask = batch
    return model(x), mask


def make_batches(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 10, 12, generator=g), torch.rand(8, 10, generator=g) > 0.2) for _ in range(n)]


BATCHES = make_batches()


def params_of(result: MixedTrainResult) -> dict[str, int]:
    return {name: w.codes.numel() for name, w in result.weights.items()}


def kl_with_weights(model, weights: dict[str, torch.Tensor], batches=BATCHES) -> float:
    """Mean KL(teacher || student) of `model` with these layers' weights replaced."""
    student = copy.deepcopy(model)
    modules = dict(student.named_modules())
    total = 0.0
    with torch.no_grad():
        for name, weight in weights.items():
            modules[name].weight.copy_(weight)
        for x, mask in batches:
            total += float(masked_kl(model(x), student(x), mask))
    return total / len(batches)


def config(**kwargs) -> MixedTrainConfig:
    return MixedTrainConfig(**{"steps": STEPS, "lr_weights": 1e-4, **kwargs})


@pytest.fixture(scope="module")
def one_stage_results():
    model = make_sequential()
    # 120 steps: with fewer, the weights trained for the soft mixture near the budget (4.06 expected bits at 40
    # steps) are not yet better at the final 4-bit widths than the untrained MSE quantizers.
    return model, {budget: train_one_stage(model, BATCHES, forward, config(budget_bits=budget, steps=120))
                   for budget in (3.0, 4.0, 5.0)}


@pytest.mark.parametrize("budget", [3.0, 5.0])
def test_one_stage_meets_the_budget_and_stores_codes_on_the_chosen_grid(one_stage_results, budget):
    _model, results = one_stage_results
    result = results[budget]
    assert result.method == "one-stage"
    assert set(result.bits) == {"0", "2", "4"} == set(result.weights) == set(result.arch_probs)
    assert mean_bits(result.bits, params_of(result)) <= budget
    for name, stored in result.weights.items():
        assert stored.bits == result.bits[name] in MixedTrainConfig().widths
        qmin, qmax = quant_bounds(stored.bits, signed=True)
        assert stored.codes.dtype == torch.int8
        assert qmin <= int(stored.codes.min()) and int(stored.codes.max()) <= qmax
        assert stored.scale.shape == (stored.codes.shape[0],) and bool((stored.scale > 0).all())
        expected = stored.codes.float() * stored.scale[:, None]
        assert torch.equal(stored.dequantize(), expected)
        assert sum(result.arch_probs[name].values()) == pytest.approx(1.0, abs=1e-5)
    assert len(result.history) == 120
    assert {"step", "kl", "expected_bits", "tau"} <= set(result.history[0])
    assert result.history[0]["tau"] == pytest.approx(1.0) and result.history[-1]["tau"] == pytest.approx(0.1)
    assert result.stage_seconds["one_stage"] > 0 and result.seconds >= result.stage_seconds["one_stage"]


def test_training_lowers_the_kl_at_the_chosen_widths(one_stage_results):
    model, results = one_stage_results
    layers = dict(model.named_modules())
    for budget in (3.0, 4.0):
        result = results[budget]
        trained = {name: w.dequantize() for name, w in result.weights.items()}
        untrained = {name: quantize_weight(layers[name].weight, bits, rule="mse").dequantize()
                     for name, bits in result.bits.items()}
        assert kl_with_weights(model, trained) < kl_with_weights(model, untrained)


def test_a_sensitive_layer_gets_at_least_the_bits_of_an_insensitive_one():
    model = Sensitivity().eval()
    result = train_one_stage(model, BATCHES, forward, config(budget_bits=4.0))
    assert result.bits["a"] >= result.bits["b"] and result.bits["c"] >= result.bits["b"]

    def expected(name):
        return sum(b * p for b, p in result.arch_probs[name].items())

    assert expected("c") > expected("b") and expected("a") > expected("b")


def test_two_stage_times_both_stages_and_meets_the_budget():
    model = make_sequential()
    result = train_two_stage(model, BATCHES, forward, config(budget_bits=3.0))
    assert result.method == "two-stage"
    assert set(result.stage_seconds) == {"precision_search", "finetune"}
    assert all(s > 0 for s in result.stage_seconds.values())
    assert result.seconds == pytest.approx(sum(result.stage_seconds.values()), rel=1e-6)
    assert mean_bits(result.bits, params_of(result)) <= 3.0
    assert len(result.history) == 2 * STEPS
    finetune = [h["kl"] for h in result.history[STEPS:]]
    assert sum(finetune[-5:]) < sum(finetune[:5])  # the QAT stage improves the fixed-width student
    assert all(h["tau"] == 0.0 for h in result.history[STEPS:])
    for name, stored in result.weights.items():
        assert stored.bits == result.bits[name]


def test_the_callers_model_is_not_changed():
    for model in (make_sequential(), ConvHead()):
        model.train()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        grads = {k: p.requires_grad for k, p in model.named_parameters()}
        classes = [type(m) for m in model.modules()]
        train_one_stage(model, BATCHES, forward, config(budget_bits=4.0, steps=5, lr_weights=1e-2))
        train_two_stage(model, BATCHES, forward, config(budget_bits=4.0, steps=5, lr_weights=1e-2))
        after = model.state_dict()
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert grads == {k: p.requires_grad for k, p in model.named_parameters()}
        assert classes == [type(m) for m in model.modules()]
        assert model.training


def test_conv1d_layers_and_a_weight_normed_conv_train():
    model = ConvHead().eval()
    result = train_one_stage(model, BATCHES, forward, config(budget_bits=4.0, steps=10))
    assert set(result.bits) == {"conv", "conv2", "head"}
    assert result.weights["conv"].codes.shape == (24, 3, 3)
    assert mean_bits(result.bits, params_of(result)) <= 4.0


def test_layers_restricts_the_training_and_act_ranges_quantize_inputs():
    model = make_sequential()
    result = train_one_stage(model, BATCHES, forward, config(budget_bits=3.0, steps=5), layers=["2", "4"])
    assert set(result.bits) == {"2", "4"}
    tight = train_one_stage(model, BATCHES, forward, config(budget_bits=3.0, steps=5), layers=["2", "4"],
                            act_ranges={"2": (-0.05, 0.05)})
    # the clipped, coarse input of layer "2" makes the very first step's KL larger
    assert tight.history[0]["kl"] > result.history[0]["kl"]


def test_the_same_seed_gives_the_same_result():
    model = make_sequential()
    first = train_one_stage(model, BATCHES, forward, config(budget_bits=4.0, steps=15, seed=3))
    second = train_one_stage(model, BATCHES, forward, config(budget_bits=4.0, steps=15, seed=3))
    other = train_one_stage(model, BATCHES, forward, config(budget_bits=4.0, steps=15, seed=4))
    assert first.bits == second.bits
    assert first.arch_probs == second.arch_probs
    assert [h["kl"] for h in first.history] == [h["kl"] for h in second.history]
    assert all(torch.equal(first.weights[n].codes, second.weights[n].codes) for n in first.weights)
    assert [h["kl"] for h in first.history] != [h["kl"] for h in other.history]


def bad_forward(model, batch):
    x, mask = batch
    return model(x), mask[:, :-1]


@pytest.mark.parametrize("kwargs, match", [
    ({"batches": []}, "batches is empty"),
    ({"layers": ["1"]}, r"not Linear/Conv1d layers of the model"),
    ({"layers": ["nope"]}, r"not Linear/Conv1d layers of the model"),
    ({"layers": ["0"], "act_ranges": {"2": (0.0, 1.0)}}, r"act_ranges names layer '2'.*add it to `layers`"),
    ({"act_ranges": {"0": (1.0, -1.0)}}, r"act_ranges\['0'\]"),
    ({"forward": bad_forward}, r"mask of shape \(8, 9\).*without the last"),
    ({"forward": lambda m, b: m(b[0])}, r"forward must return \(logits, mask\)"),
])
def test_bad_inputs_raise_a_value_error_naming_the_problem(kwargs, match):
    model = make_sequential()
    args = {"batches": BATCHES, "forward": forward, **kwargs}
    batches, fwd = args.pop("batches"), args.pop("forward")
    for train in (train_one_stage, train_two_stage):
        with pytest.raises(ValueError, match=match):
            train(model, batches, fwd, config(steps=2), **args)


@pytest.mark.parametrize("kwargs, match", [
    ({"budget_bits": 1.5}, r"budget_bits.*below the smallest candidate width"),
    ({"widths": (4, 7)}, r"widths.*unknown weight width"),
    ({"steps": 0}, r"steps must be an integer >= 1"),
    ({"lr_weights": -1.0}, "lr_weights"),
    ({"lr_arch": 0.0}, "lr_arch"),
    ({"tau_end": 0.0}, "tau_end"),
    ({"size_weight": -1.0}, "size_weight"),
    ({"a_bits": 9}, "a_bits"),
])
def test_bad_config_raises_a_value_error_naming_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MixedTrainConfig(**kwargs)


def test_config_normalises_widths_and_budget():
    cfg = MixedTrainConfig(widths=(8, 2, 4, 4), budget_bits=3)
    assert cfg.widths == (2, 4, 8) and cfg.budget_bits == 3.0
