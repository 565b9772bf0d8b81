"""N-gram counting and document frequencies for the exact (string) CIDEr-D scorer.

Captions are whitespace-tokenised strings (already PTB-tokenised and lowercased for leaderboard
numbers). An n-gram is a tuple of words; the order of an n-gram is its length.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from butd.errors import DataError

NGram = tuple[str, ...]


def ngram_counts(words: Sequence[str], n: int = 4) -> Counter[NGram]:
    """Term frequencies of every 1..n-gram of ``words`` (pycocoevalcap's ``precook``)."""
    counts: Counter[NGram] = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


def caption_ngrams(caption: str, n: int = 4) -> Counter[NGram]:
    """N-gram counts of a caption string split on whitespace."""
    return ngram_counts(caption.split(), n)


@dataclass(frozen=True)
class DocumentFrequency:
    """For each n-gram, the number of *images* whose references contain it.

    CIDEr-D's idf of an n-gram g is ``log(num_images) - log(max(1, df[g]))``; n-grams absent
    from the corpus get the largest idf, ``log(num_images)``.
    """

    counts: Mapping[NGram, int]
    num_images: int
    n: int = 4

    def __post_init__(self) -> None:
        if self.num_images < 1:
            raise DataError("document frequency needs at least one image with references")

    @classmethod
    def from_cooked(cls, cooked_refs: Iterable[Sequence[Mapping[NGram, int]]], *, n: int = 4) -> DocumentFrequency:
        """Build from per-image lists of reference n-gram counts (see :func:`ngram_counts`)."""
        df: Counter[NGram] = Counter()
        num_images = 0
        for refs in cooked_refs:
            num_images += 1
            # An image counts once per n-gram, however many of its references contain it.
            df.update({g for ref in refs for g in ref})
        return cls(counts=dict(df), num_images=num_images, n=n)

    @classmethod
    def from_references(cls, references: Mapping[object, Sequence[str]], *, n: int = 4) -> DocumentFrequency:
        """Build from ``{image_id: [reference caption, ...]}`` (whitespace-tokenised strings)."""
        for image_id, refs in references.items():
            if isinstance(refs, str) or len(refs) == 0:
                raise DataError(f"image {image_id!r}: references must be a non-empty list of strings")
        return cls.from_cooked(
            ([caption_ngrams(r, n) for r in refs] for refs in references.values()), n=n
        )

    @property
    def log_num_images(self) -> float:
        """``log(num_images)``: pycocoevalcap's ``ref_len``."""
        return math.log(float(self.num_images))

    def idf(self, ngram: NGram) -> float:
        """Inverse document frequency of one n-gram."""
        return self.log_num_images - math.log(max(1.0, float(self.counts.get(ngram, 0))))
