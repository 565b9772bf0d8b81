"""Token ids and the vocabulary: the one definition every module uses.

Ids 0-3 are the special tokens ``<pad>``, ``<bos>``, ``<eos>``, ``<unk>``; words follow. A *label row* holds the word
ids of one caption (no bos/eos), zero padded. A *decoded row* holds word ids, then ``<eos>`` if the caption ended,
then ``<pad>``.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from itertools import repeat

from butd.errors import DataError

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
VOCAB_FORMAT_VERSION = 1  # of the ``vocab.json`` document


def words_of(row: Iterable[int]) -> list[int]:
    """The word ids of a label or decoded row: everything before the first ``<eos>`` or ``<pad>``."""
    words = []
    for token in row:
        token = int(token)
        if token in (EOS, PAD):
            break
        words.append(token)
    return words


class Vocabulary:
    """Word list with the special tokens ``<pad>``=0, ``<bos>``=1, ``<eos>``=2, ``<unk>``=3 first."""

    PAD, BOS, EOS, UNK = PAD, BOS, EOS, UNK

    def __init__(self, *, words: Sequence[str]) -> None:
        words = list(words)
        if tuple(words[:4]) != SPECIAL_TOKENS:
            raise DataError(f"vocabulary must start with {list(SPECIAL_TOKENS)}, got {words[:4]}")
        index = {w: i for i, w in enumerate(words)}
        if len(index) != len(words):
            dup = next(w for i, w in enumerate(words) if index[w] != i)
            raise DataError(f"vocabulary lists the word {dup!r} twice")
        self.words = words
        self._index = index

    @classmethod
    def from_counts(cls, counts: Mapping[str, int], *, min_count: int) -> Vocabulary:
        """Words seen more than ``min_count`` times, by count descending then alphabetically."""
        kept = [w for w, c in counts.items() if c > min_count and w not in SPECIAL_TOKENS]
        kept.sort(key=lambda w: (-counts[w], w))
        return cls(words=[*SPECIAL_TOKENS, *kept])

    def __len__(self) -> int:
        return len(self.words)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.words == other.words

    __hash__ = None  # equal by content, so not hashable

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} words)"

    def encode(self, tokens: Iterable[str]) -> list[int]:
        """Word ids of ``tokens``; words not in the vocabulary become ``<unk>``."""
        return list(map(self._index.get, tokens, repeat(self.UNK)))

    def decode(self, ids: Iterable[int]) -> str:
        """Join the words of ``ids`` with spaces, stopping at ``<eos>`` and skipping ``<pad>``/``<bos>``."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.EOS:
                break
            if i in (self.PAD, self.BOS):
                continue
            if not 0 <= i < len(self.words):
                raise ValueError(f"token id {i} is outside the vocabulary (size {len(self.words)})")
            out.append(self.words[i])
        return " ".join(out)

    def to_json(self) -> dict:
        """The ``vocab.json`` document."""
        return {"format_version": VOCAB_FORMAT_VERSION, "words": list(self.words)}

    @classmethod
    def from_json(cls, d: Mapping) -> Vocabulary:
        """Inverse of :meth:`to_json`; DataError if the document is malformed."""
        if not isinstance(d, Mapping) or not isinstance(d.get("words"), list):
            raise DataError("vocabulary document must be an object with a 'words' list")
        if d.get("format_version") != VOCAB_FORMAT_VERSION:
            raise DataError(f"vocabulary format_version {d.get('format_version')!r} is not {VOCAB_FORMAT_VERSION}")
        if not all(isinstance(w, str) for w in d["words"]):
            raise DataError("vocabulary 'words' must all be strings")
        return cls(words=d["words"])
