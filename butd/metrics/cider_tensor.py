"""Token-id CIDEr-D for self-critical (SCST) rewards: vectorised torch code on GPU or CPU.

The reference side is precomputed once per dataset: every distinct reference n-gram gets a dense id,
and one sorted table holds ``(reference index, n-gram id) -> term frequency``. Document frequencies
come from the same references (the training split: CIDEr-D "corpus" mode), so ``idf`` is a table
too. A call then only hashes the candidates' n-grams and looks everything up with ``searchsorted``:
no Python loop over captions or n-grams, one host sync (input validation).

N-gram keys: each token ``t`` fills a 16-bit slot with ``t + 1`` (so an empty slot, 0, never equals a
token and n-grams of different orders never collide); 4 slots make an int64. Token ids must be at
most ``MAX_TOKEN_ID`` (vocabularies below 2**15) so keys stay positive.

End token (``count_eos``): with ``count_eos=True`` an ``<eos>`` word is appended to every reference,
and a candidate keeps its ``<eos>`` when it emitted one within its ``T`` steps; a candidate cut at
``T`` without ``<eos>`` gets none. ``<eos>`` alone weighs nothing (all images' references contain
it, so its idf is 0), but the n-grams that end a sentence do: "... on a table <eos>" can match the
references' final bigrams/trigrams only when the caption finished, so the reward prefers complete
sentences (self-critical.pytorch scores the end token the same way). With ``count_eos=False`` only
the words count, and the score equals :class:`~butd.metrics.CiderD` with ``corpus=`` the same
references on the same word sequences.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from butd.core.tokens import EOS, PAD
from butd.errors import DataError

if TYPE_CHECKING:
    from butd.data.captions import CaptionData

_SLOT_BITS = 16
MAX_TOKEN_ID = 2**15 - 2  # token + 1 < 2**15: the top slot cannot reach the int64 sign bit


def ngram_keys(tokens: torch.Tensor, n: int) -> torch.Tensor:
    """``[..., L]`` int64 tokens -> ``[..., n, L]`` keys; ``[..., k, p]`` encodes ``tokens[p : p + k + 1]``.

    Windows running past the end are padded with empty slots: callers mask them out.
    """
    length = tokens.shape[-1]
    padded = F.pad(tokens + 1, (0, n - 1))
    key = torch.zeros_like(tokens)
    keys = []
    for k in range(n):
        key = key | (padded[..., k : k + length] << (_SLOT_BITS * k))
        keys.append(key)
    return torch.stack(keys, dim=-2)


def _key_order(keys: torch.Tensor, n: int) -> torch.Tensor:
    """0-based n-gram order of each key: the number of filled slots minus one."""
    order = torch.zeros_like(keys)
    for k in range(1, n):
        order += (keys >> (_SLOT_BITS * k)) != 0
    return order


class TensorCiderD:
    """CIDEr-D of token-id candidates against precomputed references, df from those references.

    ``references``: ``{image_id: [[word id, ...], ...]}`` word ids of each reference caption (no
    ``<bos>``/``<eos>``/``<pad>``). They are both the references of their image and the corpus of the
    document frequencies (``log(#images) - log(df)``). See the module docstring for ``count_eos``.
    Scores are computed in float64 and returned as ``dtype``.
    """

    def __init__(self, *, references: Mapping[int, Sequence[Sequence[int]]], count_eos: bool = True,
                 n: int = 4, sigma: float = 6.0, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        if not 1 <= n <= 4:
            raise ValueError(f"n-gram order must be 1..4, got n={n}")
        self.n, self.sigma, self.count_eos, self.dtype = n, float(sigma), count_eos, dtype
        self.device = torch.device(device)
        image_ids, refs = _flatten_references(references)
        lengths = torch.tensor([len(r) for r in refs], dtype=torch.int64)
        flat = torch.from_numpy(np.fromiter(itertools.chain.from_iterable(refs), dtype=np.int64,
                                            count=int(lengths.sum())))
        _check_reference_tokens(flat, lengths, image_ids, [len(references[i]) for i in image_ids.tolist()])
        if count_eos:
            flat, lengths = _append_eos(flat, lengths)
        if int(lengths.sum()) == 0:
            raise DataError("the references contain no words")
        counts_per_image = torch.tensor([len(references[i]) for i in image_ids.tolist()], dtype=torch.int64)
        self._build(image_ids, counts_per_image, flat, lengths)

    @classmethod
    def from_caption_data(cls, data: CaptionData, split: str = "train", *, count_eos: bool = True,
                          device: str | torch.device = "cpu") -> TensorCiderD:
        """References = the label rows of every image of ``split`` (zero padding removed)."""
        references: dict[int, list[list[int]]] = {}
        for image_id in data.split_ids(split).tolist():
            rows = np.asarray(data.labels(int(image_id)))
            is_pad = rows == PAD
            lengths = np.where(is_pad.any(1), is_pad.argmax(1), rows.shape[1])
            references[int(image_id)] = [row[:n].tolist() for row, n in zip(rows, lengths)]
        return cls(references=references, count_eos=count_eos, device=device)

    @property
    def num_images(self) -> int:
        """Number of images with references (the corpus size of the document frequencies)."""
        return int(self._image_ids.numel())

    def _build(self, image_ids: torch.Tensor, refs_per_image: torch.Tensor, flat: torch.Tensor,
               lengths: torch.Tensor) -> None:
        # Built on the scorer's device: on a GPU the sorts below take a fraction of the CPU time.
        n, dev = self.n, self.device
        image_ids, refs_per_image, flat, lengths = (t.to(dev) for t in (image_ids, refs_per_image, flat, lengths))
        num_refs = lengths.numel()
        ref_of_pos = torch.repeat_interleave(torch.arange(num_refs, device=dev), lengths)
        starts = torch.cumsum(lengths, 0) - lengths
        pos_in_ref = torch.arange(flat.numel(), device=dev) - starts[ref_of_pos]
        keys = ngram_keys(flat, n)                                      # [n, S]
        valid = pos_in_ref + torch.arange(n, device=dev)[:, None] < lengths[ref_of_pos]
        ngram_table, dense = torch.unique(keys[valid], return_inverse=True)
        num_ngrams = ngram_table.numel()
        ref_ngram, tf = torch.unique(ref_of_pos.expand(n, -1)[valid] * num_ngrams + dense, return_counts=True)
        t_ref, t_ngram = ref_ngram // num_ngrams, ref_ngram % num_ngrams
        # (image, n-gram) pairs, each with the term frequency in each of the image's references.
        ref_start = torch.cumsum(refs_per_image, 0) - refs_per_image
        image_of_ref = torch.repeat_interleave(torch.arange(image_ids.numel(), device=dev), refs_per_image)
        t_image = image_of_ref[t_ref]
        pair_keys, pair_of_triple = torch.unique(t_image * num_ngrams + t_ngram, return_inverse=True)
        max_tf = int(tf.max())
        tf_dtype = torch.uint8 if max_tf <= 255 else torch.int32  # most corpora fit in one byte per cell
        pair_tf = torch.zeros(pair_keys.numel(), int(refs_per_image.max()), dtype=tf_dtype, device=dev)
        pair_tf[pair_of_triple, t_ref - ref_start[t_image]] = tf.to(tf_dtype)
        # Document frequency: the number of images (not references) containing each n-gram.
        df = torch.bincount(pair_keys % num_ngrams, minlength=num_ngrams).double()
        log_images = math.log(float(image_ids.numel()))
        idf = log_images - torch.log(df)                                # every table n-gram has df >= 1
        weight = tf.double() * idf[t_ngram]
        norms = torch.zeros(num_refs, n, dtype=torch.float64, device=dev)
        norms.index_put_((t_ref, _key_order(ngram_table, n)[t_ngram]), weight * weight, accumulate=True)

        self._log_images = log_images
        self._image_ids = image_ids
        self._ref_start = ref_start
        self._ref_count = refs_per_image
        self._ngram_table = ngram_table
        self._idf = idf
        self._pair_keys = pair_keys
        self._pair_tf = pair_tf
        self._ref_norms = norms.sqrt()
        self._ref_bigrams = (lengths - 1).clamp(min=0)  # pycocoevalcap's "length": bigram count

    def __call__(self, image_ids: torch.Tensor, tokens: torch.Tensor, *, validate: bool = True) -> torch.Tensor:
        """CIDEr-D of each candidate ``tokens[b]`` against the references of ``image_ids[b]``.

        ``image_ids``: ``[B]`` int64; ``tokens``: ``[B, T]`` int64 word ids, then ``<eos>`` (2), then
        ``<pad>`` (0); everything from the first ``<eos>``/``<pad>`` on is cut. Returns ``[B]`` scores
        on the scorer's device. ``validate=False`` skips the input check and with it the call's only host sync:
        for callers that guarantee known image ids and token ids within ``0..MAX_TOKEN_ID`` (the sync-free SCST
        step: training images, tokens of a smaller vocabulary); an unknown id then scores as another image.
        """
        n, dev = self.n, self.device
        image_ids = image_ids.to(dev, torch.int64).reshape(-1)
        tokens = tokens.to(dev, torch.int64)
        if tokens.dim() != 2 or tokens.shape[0] != image_ids.numel():
            raise ValueError(f"tokens must be [B, T] with B = {image_ids.numel()}, got {tuple(tokens.shape)}")
        row = torch.searchsorted(self._image_ids, image_ids).clamp(max=self.num_images - 1)
        if validate:
            self._validate(image_ids, row, tokens)

        # Candidate n-grams: a padding column guarantees every row has a stop token.
        seq = F.pad(tokens, (0, 1), value=PAD)
        width = seq.shape[1]
        first_stop = ((seq == EOS) | (seq == PAD)).int().argmax(1)
        length = first_stop
        if self.count_eos:
            length = length + (seq.gather(1, first_stop[:, None]).squeeze(1) == EOS).long()
        keys = ngram_keys(seq, n)                                              # [B, n, W]
        valid = torch.arange(width, device=dev) + torch.arange(n, device=dev)[:, None] < length[:, None, None]
        keys = torch.where(valid, keys, -1)
        same = (keys[..., :, None] == keys[..., None, :]) & valid[..., None, :]  # [B, n, W, W]
        tf = same.sum(-1).double()
        earlier = torch.ones(width, width, dtype=torch.bool, device=dev).tril(-1)
        first = valid & ~(same & earlier).any(-1)       # one representative per distinct n-gram
        ngram = torch.searchsorted(self._ngram_table, keys).clamp(max=self._ngram_table.numel() - 1)
        known = first & (self._ngram_table[ngram] == keys)
        idf = torch.where(known, self._idf[ngram], self._log_images)
        weight = torch.where(first, tf * idf, 0.0)
        norm = weight.square().sum(-1).sqrt()                                  # [B, n]

        # Reference side: term frequencies of these n-grams in each reference of the image.
        num_ngrams = self._ngram_table.numel()
        query = row[:, None, None] * num_ngrams + ngram                        # [B, n, W]
        at = torch.searchsorted(self._pair_keys, query).clamp(max=self._pair_keys.numel() - 1)
        hit = known & (self._pair_keys[at] == query)
        ref_tf = torch.where(hit[..., None], self._pair_tf[at].double(), 0.0)  # [B, n, W, K]
        # min(tf_h * idf, tf_r * idf) * tf_r * idf, with idf >= 0
        overlap = (torch.minimum(tf[..., None], ref_tf) * ref_tf * idf.square()[..., None]).sum(2)
        overlap = overlap.transpose(1, 2)                                      # [B, K, n]
        k = torch.arange(self._pair_tf.shape[1], device=dev)
        count = self._ref_count[row]
        has_ref = k < count[:, None]                                           # [B, K]
        ref = torch.where(has_ref, self._ref_start[row][:, None] + k, 0)
        denom = norm[:, None, :] * self._ref_norms[ref]
        cosine = torch.where(denom > 0, overlap / torch.where(denom > 0, denom, 1.0), 0.0)
        delta = ((length - 1).clamp(min=0)[:, None] - self._ref_bigrams[ref]).double()
        penalty = torch.exp(-delta.square() / (2.0 * self.sigma**2))
        per_ref = torch.where(has_ref, cosine.sum(-1) * penalty, 0.0)
        scores = per_ref.sum(-1) / (n * count) * 10.0
        return scores.to(self.dtype)

    def _validate(self, image_ids: torch.Tensor, row: torch.Tensor, tokens: torch.Tensor) -> None:
        unknown = self._image_ids[row] != image_ids
        bad_token = (tokens < 0) | (tokens > MAX_TOKEN_ID)
        flags = torch.stack([unknown.any(), bad_token.any()]).tolist()  # the one host sync per call
        if flags[0]:
            ids = image_ids[unknown].unique().tolist()
            raise DataError(f"no references for image ids {ids[:10]}"
                            + (f" and {len(ids) - 10} more" if len(ids) > 10 else ""))
        if flags[1]:
            b = int(bad_token.any(1).nonzero()[0])
            raise DataError(f"candidate {b} (image {int(image_ids[b])}) has token ids outside "
                            f"0..{MAX_TOKEN_ID}: {tokens[b].tolist()}")


def _flatten_references(references: Mapping[int, Sequence[Sequence[int]]]
                        ) -> tuple[torch.Tensor, list[Sequence[int]]]:
    """Image ids sorted (int64 tensor) and their references in that order."""
    if not references:
        raise DataError("no references given")
    for image_id, refs in references.items():
        if isinstance(image_id, bool) or not isinstance(image_id, (int, np.integer)):
            raise DataError(f"image id {image_id!r} is not an integer")
        if len(refs) == 0:
            raise DataError(f"image {image_id}: no reference captions")
    ordered = sorted(references)
    return torch.tensor(ordered, dtype=torch.int64), [r for i in ordered for r in references[i]]


def _check_reference_tokens(flat: torch.Tensor, lengths: torch.Tensor, image_ids: torch.Tensor,
                            refs_per_image: list[int]) -> None:
    bad = (flat < 0) | (flat > MAX_TOKEN_ID) | (flat == PAD) | (flat == EOS)
    if bool(bad.any()):
        ref = int(torch.repeat_interleave(torch.arange(lengths.numel()), lengths)[bad][0])
        image = int(torch.repeat_interleave(image_ids, torch.tensor(refs_per_image))[ref])
        raise DataError(f"image {image}: a reference holds a token outside 1..{MAX_TOKEN_ID} or the "
                        f"reserved <pad>/<eos> ids (0, {EOS}); references are word ids only")


def _append_eos(flat: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Insert an EOS token after each reference of the flat token array."""
    new_lengths = lengths + 1
    ends = torch.cumsum(new_lengths, 0) - 1
    out = torch.full((int(new_lengths.sum()),), EOS, dtype=torch.int64)
    keep = torch.ones(out.numel(), dtype=torch.bool)
    keep[ends] = False
    out[keep] = flat
    return out, new_lengths
