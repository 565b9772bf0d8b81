"""SCST rewards on token ids and the two baselines.

reward = CIDEr-D (``TensorCiderD``, document frequencies of the training references) + ``bleu_weight`` * BLEU-4.
BLEU-4 here is a simple per-caption score on word ids (see :func:`bleu4`), computed only when its weight is > 0.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence

import torch

from butd.core.tokens import UNK, words_of
from butd.data.captions import CaptionData
from butd.metrics.cider_tensor import TensorCiderD

def _ngrams(words: Sequence[int], n: int) -> Counter[tuple[int, ...]]:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def bleu4(candidate: Sequence[int], references: Sequence[Sequence[int]]) -> float:
    """Sentence BLEU-4 of one caption: clipped n-gram precisions for n = 1..4 (add-one smoothing for n >= 2, so a
    short caption with no matching 4-gram still gets a graded score), geometric mean, brevity penalty against the
    reference length closest to the candidate's. 0 for an empty caption."""
    if not candidate or not references:
        return 0.0
    log_precision = 0.0
    for n in range(1, 5):
        counts = _ngrams(candidate, n)
        max_ref: Counter[tuple[int, ...]] = Counter()
        for ref in references:
            for gram, c in _ngrams(ref, n).items():
                max_ref[gram] = max(max_ref[gram], c)
        matched = sum(min(c, max_ref[gram]) for gram, c in counts.items())
        total = max(len(candidate) - n + 1, 0)
        smooth = 0 if n == 1 else 1
        if matched + smooth == 0 or total + smooth == 0:
            return 0.0
        log_precision += math.log((matched + smooth) / (total + smooth)) / 4
    ref_len = min((len(r) for r in references), key=lambda r: (abs(r - len(candidate)), r))
    brevity = 1.0 if len(candidate) >= ref_len else math.exp(1 - ref_len / len(candidate))
    return brevity * math.exp(log_precision)


class CaptionReward:
    """``reward(image_ids [R], tokens [R, T]) -> [R]``: CIDEr-D (+ weighted BLEU-4) of each caption."""

    def __init__(self, *, cider: TensorCiderD, bleu_weight: float = 0.0,
                 references: Mapping[int, list[list[int]]] | None = None) -> None:
        if bleu_weight > 0 and references is None:
            raise ValueError("bleu_weight > 0 needs the word-id references of every image")
        self.cider = cider
        self.bleu_weight = bleu_weight
        self.references = references

    @classmethod
    def from_caption_data(cls, data: CaptionData, *, split: str = "train", count_eos: bool = True,
                          bleu_weight: float = 0.0, device: torch.device | str = "cpu") -> CaptionReward:
        """Rewards against the references of ``split`` (document frequencies from the same split).

        A reference's ``<unk>`` stands for some rare word, which the model's ``<unk>`` does not reproduce (the
        evaluation compares with the raw references): the references get an id no caption can contain instead,
        so emitting ``<unk>`` never earns reward. Otherwise SCST learns to say ``<unk>`` wherever a rare word was.
        """
        unmatched = len(data.vocab)  # one past the last word id: the model never emits it
        references = {int(i): [[unmatched if w == UNK else w for w in words_of(row)]
                               for row in data.labels(int(i)).tolist()]
                      for i in data.split_ids(split)}
        cider = TensorCiderD(references=references, count_eos=count_eos, device=device)
        return cls(cider=cider, bleu_weight=bleu_weight, references=references if bleu_weight > 0 else None)

    @torch.no_grad()
    def __call__(self, image_ids: torch.Tensor, tokens: torch.Tensor, *, validate: bool = True) -> torch.Tensor:
        """``validate=False``: no input check, no host sync (see ``TensorCiderD``); CIDEr-D only, no BLEU."""
        if not validate and self.bleu_weight > 0:
            raise ValueError("the BLEU part of the reward is computed on the host: it needs validate=True")
        reward = self.cider(image_ids, tokens, validate=validate).float()
        if self.bleu_weight > 0:
            assert self.references is not None
            bleu = [bleu4(words_of(row), self.references[int(i)])
                    for i, row in zip(image_ids.tolist(), tokens.tolist())]
            reward = reward + self.bleu_weight * torch.tensor(bleu, dtype=reward.dtype, device=reward.device)
        return reward


def mean_baseline(rewards: torch.Tensor) -> torch.Tensor:
    """[B, K] rewards -> [B, K] baselines: sample j's baseline is the mean reward of the other K - 1 samples of
    the same image (Luo 2020), so it does not depend on sample j itself and the gradient stays unbiased."""
    k = rewards.shape[1]
    if k < 2:
        raise ValueError("the mean baseline needs scst.num_samples >= 2 (it averages the other samples)")
    return (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)


def greedy_baseline(greedy_rewards: torch.Tensor, num_samples: int) -> torch.Tensor:
    """[B] rewards of the greedy captions -> [B, K]: the same baseline for each of an image's K samples
    (Rennie et al. 2017)."""
    return greedy_rewards.unsqueeze(1).expand(-1, num_samples)
