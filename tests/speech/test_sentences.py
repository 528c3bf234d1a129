"""Sentence grammar: determinism, character set, lengths, split disjointness, shared vocabulary."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from collections import Counter

import pytest

from sq_plugin.speech.sentences import (
    CHARSET,
    MAX_WORDS,
    MIN_WORDS,
    SPLITS,
    VOCABULARY,
    generate_sentences,
    make_sentence,
    sentence_split,
)


@pytest.fixture(scope="module")
def pools() -> dict[str, list[str]]:
    # Sizes of the default corpus (train 6000, dev 300, test 600): sentence generation is ~0.1 s.
    return {
        "train": generate_sentences(6000, seed=0, split="train"),
        "dev": generate_sentences(300, seed=0, split="dev"),
        "test": generate_sentences(600, seed=0, split="test"),
    }


def test_charset_is_lowercase_apostrophe_space() -> None:
    assert CHARSET == "abcdefghijklmnopqrstuvwxyz' "
    assert len(set(CHARSET)) == 28


def test_deterministic_and_seed_dependent() -> None:
    a = generate_sentences(200, seed=3, split="train")
    b = generate_sentences(200, seed=3, split="train")
    c = generate_sentences(200, seed=4, split="train")
    assert a == b
    assert len(set(a) & set(c)) < 20  # different seeds give (almost) different sentences


def test_independent_of_global_random_and_hash_seed() -> None:
    random.seed(123)
    a = generate_sentences(50, seed=0, split="dev")
    random.seed(999)
    assert generate_sentences(50, seed=0, split="dev") == a
    code = (
        "from sq_plugin.speech.sentences import generate_sentences;"
        "print('|'.join(generate_sentences(50, seed=0, split='dev')))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip().split("|") == a


def test_prefix_stable() -> None:
    assert generate_sentences(40, seed=0, split="test") == generate_sentences(400, seed=0, split="test")[:40]


def test_text_format(pools: dict[str, list[str]]) -> None:
    for split, sentences in pools.items():
        assert len(sentences) == len(set(sentences)), split  # no duplicates within a split
        for s in sentences:
            assert set(s) <= set(CHARSET), s
            assert s == " ".join(s.split()), s  # single spaces, no leading/trailing space
            assert MIN_WORDS <= len(s.split()) <= MAX_WORDS, s
            assert not re.search(r"(^|\s)'|'(\s|$)", s), s  # apostrophes only inside words
    lengths = [len(s.split()) for s in pools["train"]]
    assert 7.0 <= sum(lengths) / len(lengths) <= 10.0


def test_articles_agree(pools: dict[str, list[str]]) -> None:
    for s in pools["train"]:
        words = s.split()
        for det, nxt in zip(words, words[1:], strict=False):
            if det == "a":
                assert nxt[0] not in "aeiou", s
            if det == "an":
                assert nxt[0] in "aeiou" or nxt == "hour", s


def test_splits_disjoint(pools: dict[str, list[str]]) -> None:
    sets = {k: set(v) for k, v in pools.items()}
    assert not sets["train"] & sets["dev"]
    assert not sets["train"] & sets["test"]
    assert not sets["dev"] & sets["test"]
    for split, sentences in pools.items():
        assert all(sentence_split(s) == split for s in sentences)


def test_split_assignment_shares() -> None:
    rng = random.Random(0)
    counts = Counter(sentence_split(make_sentence(rng)) for _ in range(5000))
    assert set(counts) == set(SPLITS)
    assert 0.07 < counts["test"] / 5000 < 0.13
    assert 0.07 < counts["dev"] / 5000 < 0.13


def test_vocabulary_fixed_and_shared(pools: dict[str, list[str]]) -> None:
    assert 300 <= len(VOCABULARY) <= 600
    used = {split: {w for s in sentences for w in s.split()} for split, sentences in pools.items()}
    for words in used.values():
        assert words <= VOCABULARY
    # Train covers the vocabulary, so every word of dev/test was seen in training.
    assert used["train"] == VOCABULARY
    assert used["test"] <= used["train"] and used["dev"] <= used["train"]
    for w in VOCABULARY:
        assert set(w) <= set(CHARSET) and " " not in w


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"unknown split.*'train', 'dev', 'test'"):
        generate_sentences(3, seed=0, split="validation")
    with pytest.raises(ValueError, match="n must be >= 0"):
        generate_sentences(-1, seed=0, split="train")
