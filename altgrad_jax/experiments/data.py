"""Character-level data for the sweep: the text that ships with CPython, a user's file, or a toy.

The default corpus is ``pydoc_data.topics``, the help texts bundled with CPython's standard library
(~465k characters of English and Python), so a sweep needs nothing downloaded. The split is
deterministic: the first ``1 - val_fraction`` of the characters train, the rest validate.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "CharCorpus",
    "load_text_file",
    "make_corpus",
    "sample_batch",
    "stdlib_text",
    "synthetic_text",
]


@dataclasses.dataclass(frozen=True, eq=False)
class CharCorpus:
    """A text split into integer token arrays over its own character vocabulary.

    Attributes:
      name: where the text came from (shown in reports).
      vocab: the sorted distinct characters; token ``i`` is ``vocab[i]``.
      train: int32 tokens of the training split.
      val: int32 tokens of the validation split.
    """

    name: str
    vocab: str
    train: np.ndarray
    val: np.ndarray

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def decode(self, tokens: np.ndarray) -> str:
        return "".join(self.vocab[int(t)] for t in tokens)


def stdlib_text() -> str:
    """The help topics bundled with CPython (``pydoc_data.topics``), joined in sorted order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def load_text_file(path: str | Path) -> str:
    """Reads a UTF-8 text file; raises ``ValueError`` with a one-line reason when it can't.

    A missing, unreadable, undecodable or empty file is an error, so the CLI can report it.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise ValueError(f"cannot read text file {str(path)!r}: {reason}") from None
    if not text:
        raise ValueError(f"text file {str(path)!r} is empty")
    return text


def synthetic_text(length: int = 20_000, vocab_size: int = 8, seed: int = 0) -> str:
    """A tiny, learnable character task: a random sparse Markov chain over ``vocab_size`` letters.

    Each letter has two likely successors, so a model that learns the transitions drops from
    ``log(vocab_size)`` to about ``log(2)`` nats: the whole sweep machinery on it runs in seconds.
    """
    if not 2 <= vocab_size <= 26:
        raise ValueError(f"vocab_size must be in [2, 26], got {vocab_size}")
    rng = np.random.default_rng(seed)
    successors = np.stack([rng.permutation(vocab_size)[:2] for _ in range(vocab_size)])
    choices = rng.integers(0, 2, size=length)
    tokens = np.empty(length, np.int64)
    tokens[0] = 0
    for i in range(1, length):
        tokens[i] = successors[tokens[i - 1], choices[i]]
    return "".join(chr(ord("a") + t) for t in tokens)


def make_corpus(text: str, name: str, val_fraction: float = 0.1, min_split: int = 2) -> CharCorpus:
    """Tokenizes ``text`` by character and splits it into train / validation (head / tail).

    Args:
      text: the corpus.
      name: shown in reports.
      val_fraction: fraction of characters held out at the end, in (0, 1).
      min_split: each split needs at least this many tokens (the context length + 1 when
        training), else ``ValueError``.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    vocab = "".join(sorted(set(text)))
    lookup = {ch: i for i, ch in enumerate(vocab)}
    tokens = np.fromiter((lookup[ch] for ch in text), dtype=np.int32, count=len(text))
    cut = round(len(tokens) * (1 - val_fraction))
    train, val = tokens[:cut], tokens[cut:]
    if min(len(train), len(val)) < min_split:
        raise ValueError(
            f"text {name!r} has {len(text)} characters: too short to split into train and "
            f"validation sequences of {min_split} characters"
        )
    return CharCorpus(name, vocab, train, val)


def sample_batch(
    tokens: jax.Array, key: jax.Array, batch_size: int, context: int
) -> tuple[jax.Array, jax.Array]:
    """Random windows of ``tokens``: inputs ``[batch, context]`` and next-character targets."""
    starts = jax.random.randint(key, (batch_size,), 0, tokens.shape[0] - context)
    windows = tokens[starts[:, None] + jnp.arange(context + 1)[None, :]]
    return windows[:, :-1], windows[:, 1:]
