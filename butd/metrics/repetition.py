"""How often captions loop: a word said twice in a row ("a a"), a bigram said twice ("a bathroom with a bathroom"),
and the unknown-word token a reader cannot use.

A caption is counted once per kind of fault, whatever the number of repeats in it. Captions are strings (split on
whitespace) or lists of words; ``tools/demo.py``, ``benchmarks/decoding_rules.py`` and the tests use the same
counts.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from butd.core.tokens import SPECIAL_TOKENS

UNK_WORD = SPECIAL_TOKENS[3]  # "<unk>" as the vocabulary writes it


def repeats_word_at_once(words: Sequence[str]) -> bool:
    """Whether some word directly follows itself ("on on")."""
    return any(a == b for a, b in zip(words, words[1:]))


def repeats_bigram(words: Sequence[str]) -> bool:
    """Whether some pair of consecutive words occurs twice (overlapping occurrences count: "a a a")."""
    bigrams = list(zip(words, words[1:]))
    return len(set(bigrams)) < len(bigrams)


@dataclass(frozen=True)
class RepetitionReport:
    """Counts of captions with each fault (``captions`` in all)."""

    captions: int
    word_at_once: int  # captions with a word repeated at once
    bigram: int  # captions with a repeated bigram
    unk: int  # captions containing <unk>

    def fraction(self, count: int) -> float:
        return count / self.captions if self.captions else 0.0

    def to_json(self) -> dict[str, float]:
        return {**asdict(self), "word_at_once_fraction": self.fraction(self.word_at_once),
                "bigram_fraction": self.fraction(self.bigram), "unk_fraction": self.fraction(self.unk)}

    def summary(self) -> str:
        """One line for a console: the three counts out of the total."""
        n = self.captions
        return (f"{self.unk} of {n} with <unk>, {self.word_at_once} repeat a word at once, "
                f"{self.bigram} repeat a bigram")


def repetition_report(captions: Iterable[str | Sequence[str]]) -> RepetitionReport:
    """Count the captions that repeat a word at once, repeat a bigram, or contain ``<unk>``."""
    total = at_once = bigram = unk = 0
    for caption in captions:
        words = caption.split() if isinstance(caption, str) else list(caption)
        total += 1
        at_once += repeats_word_at_once(words)
        bigram += repeats_bigram(words)
        unk += UNK_WORD in words
    return RepetitionReport(captions=total, word_at_once=at_once, bigram=bigram, unk=unk)
