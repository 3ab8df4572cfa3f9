"""Data for the sweep: the bundled stdlib corpus, user files, the synthetic task, batches."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from altgrad_jax.experiments import data


def test_stdlib_corpus_is_bundled_and_split_deterministically():
    text = data.stdlib_text()
    assert len(text) > 400_000
    corpus = data.make_corpus(text, "stdlib")
    assert len(corpus.train) + len(corpus.val) == len(text)
    assert len(corpus.val) == pytest.approx(0.1 * len(text), abs=1)
    # The validation split is the tail of the text, and decoding inverts tokenizing.
    assert corpus.decode(corpus.val[:200]) == text[len(corpus.train) : len(corpus.train) + 200]
    assert corpus.vocab == "".join(sorted(set(text)))
    again = data.make_corpus(data.stdlib_text(), "stdlib")
    np.testing.assert_array_equal(again.train, corpus.train)


def test_load_text_file_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"cannot read text file .*missing\.txt"):
        data.load_text_file(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        data.load_text_file(empty)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(ValueError, match="cannot read text file"):
        data.load_text_file(binary)
    good = tmp_path / "good.txt"
    good.write_text("hello world")
    assert data.load_text_file(good) == "hello world"


def test_corpus_too_short_to_split_is_an_error():
    with pytest.raises(ValueError, match="too short"):
        data.make_corpus("abcdef", "tiny", min_split=10)


def test_synthetic_text_is_a_sparse_markov_chain():
    text = data.synthetic_text(5000, vocab_size=6, seed=3)
    assert text == data.synthetic_text(5000, vocab_size=6, seed=3)
    assert set(text) <= set("abcdef")
    successors = {}
    for a, b in itertools.pairwise(text):
        successors.setdefault(a, set()).add(b)
    assert all(len(nexts) <= 2 for nexts in successors.values())
    with pytest.raises(ValueError, match="vocab_size"):
        data.synthetic_text(vocab_size=1)


def test_sample_batch_targets_are_the_next_characters():
    tokens = jnp.arange(100, dtype=jnp.int32)
    inputs, targets = data.sample_batch(tokens, jax.random.PRNGKey(0), 5, 7)
    assert inputs.shape == targets.shape == (5, 7)
    np.testing.assert_array_equal(targets, inputs + 1)
    np.testing.assert_array_equal(np.diff(np.asarray(inputs), axis=1), 1)
