"""Exact CIDEr-D on caption strings, identical to pycocoevalcap's ``Cider``.

Definition (Vedantam et al. 2015, as implemented by the COCO caption evaluation):

* every caption is split on whitespace; its 1..4-grams are counted (term frequency ``tf``);
* ``idf(g) = log(N) - log(max(1, df(g)))`` where ``N`` is the number of images of the corpus and
  ``df(g)`` the number of images whose references contain ``g``;
* a caption becomes one tf-idf vector per order n, ``v_n[g] = tf(g) * idf(g)``;
* for a candidate ``h`` and a reference ``r`` and each order n::

      s_n(h, r) = sum_g min(v_n^h[g], v_n^r[g]) * v_n^r[g] / (|v_n^h| * |v_n^r|)
                  * exp(-(len(h) - len(r))**2 / (2 * sigma**2))

  where "len" is pycocoevalcap's: the number of *bigrams* of the caption (``max(0, words - 1)``);
  the division is skipped when a norm is 0 (the sum is then 0 too);
* ``CIDEr-D(h) = 10 * mean_n( sum_r s_n(h, r) / num_refs )``, and the corpus score is the mean over images.

The document frequencies come from the references being scored (default, what pycocoevalcap does
and what leaderboard numbers use) or from a fixed corpus (``CiderD(corpus=...)``, what SCST rewards use).
"""
from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from butd.errors import DataError
from butd.metrics.ngrams import DocumentFrequency, NGram, caption_ngrams


@dataclass(frozen=True)
class _Vector:
    """tf-idf vectors of one caption: one dict per order, their norms, and its CIDEr "length"."""

    weights: list[dict[NGram, float]]
    norms: list[float]
    length: int


class CiderD:
    """CIDEr-D with pycocoevalcap's interface: ``compute_score(gts, res) -> (mean, per_image)``.

    ``corpus``: ``None`` to take document frequencies from the ``gts`` of each ``compute_score``
    call (pycocoevalcap's behaviour), or ``{image_id: [caption, ...]}`` / a :class:`DocumentFrequency`
    built once from a fixed corpus (e.g. the training references, as SCST does).
    """

    def __init__(self, *, n: int = 4, sigma: float = 6.0,
                 corpus: Mapping[Hashable, Sequence[str]] | DocumentFrequency | None = None) -> None:
        if not 1 <= n <= 4:
            raise ValueError(f"CIDEr-D is defined for n-grams up to 1..4, got n={n}")
        self.n = n
        self.sigma = float(sigma)
        if corpus is None or isinstance(corpus, DocumentFrequency):
            self.document_frequency = corpus
        else:
            self.document_frequency = DocumentFrequency.from_references(corpus, n=n)
        if self.document_frequency is not None and self.document_frequency.n < n:
            raise ValueError(f"document frequencies were counted up to {self.document_frequency.n}-grams, need {n}")

    def method(self) -> str:
        """Name used by pycocoevalcap's scorers."""
        return "CIDEr-D"

    def compute_score(self, gts: Mapping[Hashable, Sequence[str]],
                      res: Mapping[Hashable, Sequence[str]]) -> tuple[float, np.ndarray]:
        """Score one candidate per image against its references.

        ``gts``: ``{image_id: [reference, ...]}``; ``res``: ``{image_id: [candidate]}`` with exactly
        one candidate; both tokenised (words separated by spaces) and with the same keys. Returns the
        mean and the per-image scores in the order of ``gts.keys()``.
        """
        _check_inputs(gts, res)
        image_ids = list(gts.keys())
        cooked_refs = [[caption_ngrams(r, self.n) for r in gts[i]] for i in image_ids]
        cooked_hyps = [caption_ngrams(res[i][0], self.n) for i in image_ids]
        df = self.document_frequency
        if df is None:
            df = DocumentFrequency.from_cooked(cooked_refs, n=self.n)
        scores = np.array([self._score_image(h, refs, df) for h, refs in zip(cooked_hyps, cooked_refs)],
                          dtype=np.float64)
        return float(np.mean(scores)), scores

    def _vector(self, counts: Mapping[NGram, int], df: DocumentFrequency) -> _Vector:
        weights: list[dict[NGram, float]] = [{} for _ in range(self.n)]
        squares = [0.0] * self.n
        length = 0
        ref_len = df.log_num_images
        for ngram, tf in counts.items():
            order = len(ngram) - 1
            w = float(tf) * (ref_len - math.log(max(1.0, float(df.counts.get(ngram, 0)))))
            weights[order][ngram] = w
            squares[order] += w * w
            if order == 1:  # pycocoevalcap's "length" counts bigrams, not words
                length += tf
        return _Vector(weights, [math.sqrt(s) for s in squares], length)

    def _similarity(self, hyp: _Vector, ref: _Vector) -> float:
        """Sum over orders of the clipped, length-penalised cosine similarity."""
        delta = float(hyp.length - ref.length)
        penalty = math.exp(-(delta * delta) / (2.0 * self.sigma * self.sigma))
        total = 0.0
        for n in range(self.n):
            ref_w = ref.weights[n]
            val = 0.0
            for ngram, w in hyp.weights[n].items():
                r = ref_w.get(ngram, 0.0)
                val += min(w, r) * r  # clipping: repeating a word cannot earn more than the reference has
            if hyp.norms[n] != 0.0 and ref.norms[n] != 0.0:
                val /= hyp.norms[n] * ref.norms[n]
            total += val * penalty
        return total

    def _score_image(self, hyp_counts: Mapping[NGram, int], refs_counts: Sequence[Mapping[NGram, int]],
                     df: DocumentFrequency) -> float:
        hyp = self._vector(hyp_counts, df)
        total = sum(self._similarity(hyp, self._vector(r, df)) for r in refs_counts)
        return total / self.n / len(refs_counts) * 10.0


def _check_inputs(gts: Mapping[Hashable, Sequence[str]], res: Mapping[Hashable, Sequence[str]]) -> None:
    if gts.keys() != res.keys():
        missing = sorted(map(str, gts.keys() - res.keys()))[:10]
        extra = sorted(map(str, res.keys() - gts.keys()))[:10]
        raise DataError(f"gts and res must have the same image ids; without a candidate: {missing}, "
                        f"without references: {extra}")
    if not gts:
        raise DataError("no images to score")
    for image_id in gts:
        hyp, refs = res[image_id], gts[image_id]
        if isinstance(hyp, str) or len(hyp) != 1:
            raise DataError(f"image {image_id!r}: res must hold a list with exactly one caption, got {hyp!r}")
        if isinstance(refs, str) or len(refs) == 0:
            raise DataError(f"image {image_id!r}: gts must hold a non-empty list of reference captions")
