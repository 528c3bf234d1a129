import numpy as np
import pytest

from sq_plugin.core.significance import paired_bootstrap


def test_identical_systems_have_a_zero_interval_and_p_one():
    errors, words = [1, 0, 2, 3], [5, 4, 6, 7]
    d = paired_bootstrap(errors, errors, words)
    assert (d.delta, d.low, d.high, d.p_value) == (0.0, 0.0, 0.0, 1.0) and not d.significant


def test_a_consistent_regression_is_significant_and_the_interval_holds_the_delta():
    rng = np.random.default_rng(1)
    words = rng.integers(5, 15, size=300)
    a = rng.binomial(words, 0.10)
    b = a + rng.binomial(words, 0.03)  # b makes 3 % more errors, utterance by utterance
    d = paired_bootstrap(a, b, words)
    assert d.delta == pytest.approx((b.sum() - a.sum()) / words.sum())
    assert 0 < d.low < d.delta < d.high and d.significant and d.p_value <= 1e-3
    # the normal approximation of the ratio estimator's spread agrees with the bootstrap's (within 15 %)
    diff = (b - a) - d.delta * words
    se = np.sqrt(np.sum(diff**2)) / words.sum()
    assert d.half_width == pytest.approx(1.96 * se, rel=0.15)


def test_a_difference_inside_the_noise_is_not_significant_and_the_seed_fixes_the_interval():
    rng = np.random.default_rng(2)
    words = rng.integers(5, 15, size=20)
    a, b = rng.binomial(words, 0.2), rng.binomial(words, 0.2)
    d = paired_bootstrap(a, b, words, seed=7)
    assert d.low < 0 < d.high and not d.significant and d.p_value > 0.05
    assert paired_bootstrap(a, b, words, seed=7) == d  # deterministic


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"errors_a": [1, 2], "errors_b": [1], "words": [3, 3]}, "pair up"),
    ({"errors_a": [], "errors_b": [], "words": []}, "no utterances"),
    ({"errors_a": [1], "errors_b": [1], "words": [0]}, "> 0 reference words"),
    ({"errors_a": [1], "errors_b": [1], "words": [2], "confidence": 95}, "confidence must be in"),
    ({"errors_a": [1], "errors_b": [1], "words": [2], "resamples": 10}, "resamples must be >= 100"),
])
def test_bad_input_is_refused_with_the_reason(kwargs, message):
    with pytest.raises(ValueError, match=message):
        paired_bootstrap(**kwargs)
