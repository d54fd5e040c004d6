"""k-shot prompt construction: templates, verbalizers and demonstration sampling (trust.md §3.2).

A prompt is k demonstrations followed by the query::

    q_prefix + x_1 + qa_sep + a_prefix + word(y_1) + demo_sep + ... + q_prefix + x + qa_sep + a_prefix

e.g. ``"Review: great film\\nSentiment: Positive\\n\\nReview: dull\\nSentiment:"``. The prompt ends with the answer
prefix *without* a trailing space; the label word is the continuation, so with ``leading_space=True`` the scored
continuation is ``" Positive"`` (how BPE vocabularies such as GPT-2's attach the space to the following word).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["PromptTemplate", "Verbalizer", "build_prompt", "sample_demonstrations"]


@dataclass(frozen=True)
class PromptTemplate:
    """Text around inputs and answers (defaults: the SST-2 template of the ICL-calibration code).

    Attributes:
        q_prefix: before each input ("Review: ").
        a_prefix: answer prefix ("Sentiment:"); the prompt ends with it.
        qa_sep: between an input and its answer prefix (newline).
        demo_sep: after each demonstration's label word (blank line).
    """

    q_prefix: str = "Review: "
    a_prefix: str = "Sentiment:"
    qa_sep: str = "\n"
    demo_sep: str = "\n\n"

    def query(self, text: str) -> str:
        """The query part: ``q_prefix + text + qa_sep + a_prefix``."""
        return f"{self.q_prefix}{text}{self.qa_sep}{self.a_prefix}"


@dataclass(frozen=True)
class Verbalizer:
    """Label index -> label word.

    Attributes:
        words: one word (or multi-word / multi-token string) per class, in label-index order.
        leading_space: prepend a space to each word when used as a continuation of the answer prefix.
    """

    words: tuple[str, ...]
    leading_space: bool = True

    def __post_init__(self) -> None:
        words = tuple(self.words)
        if len(words) < 2:
            raise ValueError(f"Verbalizer.words: need at least 2 label words, got {words!r}")
        for i, w in enumerate(words):
            if not isinstance(w, str) or not w.strip():
                raise ValueError(f"Verbalizer.words[{i}]: expected a non-empty string, got {w!r}")
        if len(set(words)) != len(words):
            raise ValueError(f"Verbalizer.words: label words must be distinct, got {words!r}")
        object.__setattr__(self, "words", words)

    @property
    def num_classes(self) -> int:
        return len(self.words)

    def continuation(self, label: int) -> str:
        """The text scored for class ``label`` (the word, with a leading space if configured)."""
        if not 0 <= label < len(self.words):
            raise ValueError(f"label {label} out of range for a verbalizer with {len(self.words)} words")
        return (" " if self.leading_space else "") + self.words[label]


def build_prompt(template: PromptTemplate, verbalizer: Verbalizer, demos: Sequence[tuple[str, int]],
                 query: str) -> str:
    """The k-shot prompt for ``query`` with demonstrations ``demos`` = [(text, label index), ...] in order."""
    parts = [template.query(x) + verbalizer.continuation(y) + template.demo_sep for x, y in demos]
    return "".join(parts) + template.query(query)


def sample_demonstrations(pool_size: int, k: int, rng: np.random.Generator,
                          exclude: Sequence[int] = ()) -> list[int]:
    """``k`` distinct indices into a training pool of ``pool_size`` items, none in ``exclude``, in random order."""
    allowed = np.setdiff1d(np.arange(pool_size), np.asarray(list(exclude), dtype=np.int64))
    if k > allowed.size:
        raise ValueError(f"shots: cannot draw {k} demonstrations from a pool of {allowed.size} eligible training "
                         f"examples ({pool_size} minus {pool_size - allowed.size} excluded)")
    return rng.choice(allowed, size=k, replace=False).tolist()
