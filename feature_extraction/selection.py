"""Which regions each image keeps (bottom-up-attention ``generate_tsv.py``'s rule), for a whole batch at once.

For every image, NMS at ``nms_thresh`` runs per class over its proposals; a region's confidence ``max_conf`` is the
best class score for which it survives. The regions with ``max_conf >= conf_thresh`` are kept *in proposal order*
(``np.where``); if fewer than ``min_boxes`` or more than ``max_boxes`` pass, the ``min_boxes`` / ``max_boxes`` most
confident are kept instead, most confident first (``np.argsort(max_conf)[::-1]``; ties here by proposal index).

All images of a batch go through one ``torchvision.ops.batched_nms`` call (group = image x class), and the counts
that decide each image's branch reach the host in one transfer, so the selection costs a few host synchronisations
per batch instead of several per image. Only (region, class) pairs scoring at least the threshold enter NMS: a
lower pair can never suppress a higher one, so ``max_conf`` is exact wherever it reaches the threshold. When an
image has too few confident regions, its pair threshold is lowered until its top ``min_boxes`` are certain.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import batched_nms

from butd.errors import ConfigError

# The fallback starts with this many (region, class) pairs of an image and multiplies them by 4 each round.
_FIRST_FALLBACK_PAIRS = 4096


@dataclass(frozen=True)
class BoxPolicy:
    """How many regions to keep per image, and how (bottom-up-attention ``generate_tsv.py``).

    Regions whose best class confidence (after per-class NMS at ``nms_thresh``) is >= ``conf_thresh`` are kept,
    then clamped to [min_boxes, max_boxes] by confidence: "10-100" (adaptive, the default) or a fixed "36".
    """

    min_boxes: int = 10
    max_boxes: int = 100
    conf_thresh: float = 0.2
    nms_thresh: float = 0.3

    def __post_init__(self) -> None:
        if not 1 <= self.min_boxes <= self.max_boxes:
            raise ConfigError(f"box policy needs 1 <= min_boxes <= max_boxes, got {self.min_boxes}-{self.max_boxes}")
        if not 0.0 <= self.nms_thresh <= 1.0:
            raise ConfigError(f"nms_thresh must be in [0, 1], got {self.nms_thresh}")

    @classmethod
    def parse(cls, text: str) -> BoxPolicy:
        """"10-100" -> between 10 and 100 regions; "36" -> exactly 36 (when the image has that many proposals)."""
        try:
            low, _, high = text.strip().partition("-")
            low_n = int(low)
            high_n = int(high) if high else low_n
        except ValueError:
            raise ConfigError(f"--boxes must be 'MIN-MAX' (e.g. 10-100) or a count (e.g. 36), got {text!r}") from None
        return cls(min_boxes=low_n, max_boxes=high_n)

    def __str__(self) -> str:
        return str(self.min_boxes) if self.min_boxes == self.max_boxes else f"{self.min_boxes}-{self.max_boxes}"


@dataclass(frozen=True, eq=False)
class Detections:
    """The selected regions of one image, in the reference's order (see the module docstring). Boxes are in
    original-image pixels."""

    features: np.ndarray  # [N, D] float32
    boxes: np.ndarray  # [N, 4] float32, x1, y1, x2, y2
    image_w: int
    image_h: int
    object_ids: np.ndarray  # [N] int32, 0-based into objects_vocab.txt (network class - 1)
    object_conf: np.ndarray  # [N] float32
    attr_ids: np.ndarray  # [N] int32, 0-based into attributes_vocab.txt (network attribute - 1)
    attr_conf: np.ndarray  # [N] float32

    @property
    def num_boxes(self) -> int:
        """Number of regions N."""
        return int(self.features.shape[0])


def _region_confidence(boxes: torch.Tensor, scores: torch.Tensor, image_of_row: torch.Tensor,
                       thresholds: torch.Tensor, nms_thresh: float) -> torch.Tensor:
    """``max_conf`` of every row (region) of a batch; pairs of image i enter NMS only if >= ``thresholds[i]``.

    NMS runs in float64 on boxes shifted by one pixel at x2, y2 (the "+1" IoU of py-faster-rcnn becomes
    torchvision's continuous IoU); float64 keeps the per-group coordinate offsets of ``batched_nms`` exact, so the
    result equals per-class NMS image by image.
    """
    num_classes = scores.shape[1]
    rows, cols = torch.nonzero(scores >= thresholds[image_of_row][:, None], as_tuple=True)
    pair_scores = scores[rows, cols]
    shifted = boxes[rows].double()
    shifted[:, 2:] += 1.0
    keep = batched_nms(shifted, pair_scores.double(), image_of_row[rows] * num_classes + cols, nms_thresh)
    best = torch.zeros(scores.shape[0], dtype=scores.dtype, device=scores.device)
    return best.scatter_reduce(0, rows[keep], pair_scores[keep], reduce="amax")


def _per_image_sum(values: torch.Tensor, image_of_row: torch.Tensor, num_images: int) -> torch.Tensor:
    return torch.zeros(num_images, dtype=torch.long, device=values.device).index_add_(0, image_of_row,
                                                                                       values.long())


def _top(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values, ties by lower index (a stable descending sort)."""
    return torch.sort(values, descending=True, stable=True).indices[:k]


def _first(mask: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of the ``k`` True entries of ``mask`` (k known), ascending, without a host synchronisation."""
    return torch.sort((~mask).to(torch.uint8), stable=True).indices[:k]


def select_regions_batch(boxes: list[torch.Tensor], scores: list[torch.Tensor],
                         policy: BoxPolicy) -> list[torch.Tensor]:
    """For each image, the indices of the regions it keeps, in the reference's order.

    ``boxes[i]`` [r_i, 4] are image i's proposals (original pixels, inclusive corners) and ``scores[i]`` [r_i, C]
    their foreground class scores. The result for an image does not depend on the other images of the batch.
    """
    if not boxes:
        return []
    device, num_images = scores[0].device, len(boxes)
    counts = [int(b.shape[0]) for b in boxes]
    starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
    all_boxes, all_scores = torch.cat(boxes), torch.cat(scores)
    image_of_row = torch.arange(num_images, device=device).repeat_interleave(
        torch.tensor(counts, device=device), output_size=starts[-1])

    def rows(values: torch.Tensor, i: int) -> torch.Tensor:
        return values[starts[i]: starts[i + 1]]

    thresholds = torch.full((num_images,), policy.conf_thresh, dtype=all_scores.dtype, device=device)
    conf = _region_confidence(all_boxes, all_scores, image_of_row, thresholds, policy.nms_thresh)
    above = conf >= policy.conf_thresh
    pairs_above = (all_scores >= policy.conf_thresh).sum(dim=1)
    n_above, n_pairs = torch.stack([_per_image_sum(above, image_of_row, num_images),
                                    _per_image_sum(pairs_above, image_of_row, num_images)]).tolist()
    kept: list[torch.Tensor | None] = [None] * num_images
    too_few = {}
    for i in range(num_images):
        if policy.min_boxes <= n_above[i] <= policy.max_boxes:
            kept[i] = _first(rows(above, i), n_above[i])
        elif n_above[i] > policy.max_boxes:
            kept[i] = _top(rows(conf, i), policy.max_boxes)
        else:
            too_few[i] = max(_FIRST_FALLBACK_PAIRS, 4 * n_pairs[i])
    while too_few:
        _lower_thresholds(too_few, kept, all_boxes, all_scores, image_of_row, rows, policy)
    return kept  # type: ignore[return-value]


def _lower_thresholds(too_few: dict[int, int], kept: list[torch.Tensor | None], all_boxes: torch.Tensor,
                      all_scores: torch.Tensor, image_of_row: torch.Tensor, rows, policy: BoxPolicy) -> None:
    """One round for the images with too few confident regions: each image's pair threshold becomes its
    ``too_few[i]``-th best pair score (or -inf once that covers all its pairs); an image is done when at least
    ``min_boxes`` regions reach its threshold (their confidences are then exact), else its pair count grows 4x."""
    num_images = len(kept)
    thresholds = torch.full((num_images,), float("inf"), dtype=all_scores.dtype, device=all_scores.device)
    exhaustive = set()
    for i, pairs in too_few.items():
        flat = rows(all_scores, i).flatten()
        if pairs >= flat.numel():
            thresholds[i] = float("-inf")
            exhaustive.add(i)
        else:
            thresholds[i] = torch.topk(flat, pairs).values[-1]
    conf = _region_confidence(all_boxes, all_scores, image_of_row, thresholds, policy.nms_thresh)
    certain = _per_image_sum(conf >= thresholds[image_of_row], image_of_row, num_images).tolist()
    for i in list(too_few):
        want = min(policy.min_boxes, int(rows(all_scores, i).shape[0]))
        if i in exhaustive or certain[i] >= want:
            kept[i] = _top(rows(conf, i), want)
            del too_few[i]
        else:
            too_few[i] *= 4


def build_detections(pictures_hw: list[tuple[int, int]], boxes: list[torch.Tensor], features: torch.Tensor,
                     class_probs: torch.Tensor, attr_probs: torch.Tensor, policy: BoxPolicy) -> list[Detections]:
    """Select each image's regions and copy them to the host in one transfer per field for the whole batch.

    ``boxes[i]`` are image i's proposals in original pixels; ``features``, ``class_probs`` (background at 0) and
    ``attr_probs`` ("no attribute" at 0) hold the rows of all images, image after image.
    """
    starts = np.concatenate([[0], np.cumsum([b.shape[0] for b in boxes])]).tolist()
    object_probs = class_probs[:, 1:]
    kept = select_regions_batch(boxes, [object_probs[starts[i]: starts[i + 1]] for i in range(len(boxes))], policy)
    index = torch.cat([k + starts[i] for i, k in enumerate(kept)])
    object_conf, object_ids = object_probs[index].max(dim=1)
    attr_conf, attr_ids = attr_probs[index, 1:].max(dim=1)  # best real attribute, "no attribute" excluded
    host = {name: np.ascontiguousarray(t.detach().float().cpu().numpy() if t.is_floating_point() else
                                       t.detach().cpu().numpy(), dtype=dtype)
            for name, t, dtype in (("features", features[index], np.float32),
                                   ("boxes", torch.cat(boxes)[index], np.float32),
                                   ("object_ids", object_ids, np.int32), ("object_conf", object_conf, np.float32),
                                   ("attr_ids", attr_ids, np.int32), ("attr_conf", attr_conf, np.float32))}
    splits = np.cumsum([k.shape[0] for k in kept])[:-1]
    per_field = {name: np.split(array, splits) for name, array in host.items()}
    return [Detections(image_w=w, image_h=h, **{name: parts[i] for name, parts in per_field.items()})
            for i, (h, w) in enumerate(pictures_hw)]
