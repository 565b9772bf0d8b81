"""The encoded image shared by every decoding step, and the region-level helpers that build it."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Regions:
    """An encoded batch of images: computed once by ``encode`` and read by every ``step``.

    Batch is on dim 0 of every tensor, so captions per image, samples and beams are plain row
    repeats / gathers of the same object.
    """

    features: torch.Tensor  # [B, N, E] embedded region features (zero on padding)
    mean: torch.Tensor  # [B, E] mean over real regions only
    keys: torch.Tensor  # [B, N, A] W_va v_i, precomputed for additive attention
    mask: torch.Tensor  # [B, N] bool, True for real regions

    @property
    def batch_size(self) -> int:
        """Number of rows (images, or image copies after ``repeat``)."""
        return self.features.shape[0]

    def repeat(self, k: int) -> Regions:
        """Repeat every image ``k`` times, row ``i * k + j`` being copy ``j`` of image ``i``."""
        if k == 1:
            return self
        return Regions(
            features=self.features.repeat_interleave(k, dim=0),
            mean=self.mean.repeat_interleave(k, dim=0),
            keys=self.keys.repeat_interleave(k, dim=0),
            mask=self.mask.repeat_interleave(k, dim=0),
        )

    def head(self, rows: int) -> Regions:
        """The first ``rows`` images (views, no copy): the still-running rows of a length-sorted batch."""
        if rows == self.batch_size:
            return self
        return Regions(features=self.features[:rows], mean=self.mean[:rows], keys=self.keys[:rows],
                       mask=self.mask[:rows])

    def index_select(self, index: torch.Tensor) -> Regions:
        """Rows ``index`` of every tensor (reorders beams, selects images)."""
        return Regions(
            features=self.features.index_select(0, index),
            mean=self.mean.index_select(0, index),
            keys=self.keys.index_select(0, index),
            mask=self.mask.index_select(0, index),
        )


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` [B, N, E] over the positions where ``mask`` [B, N] is True -> [B, E].

    Padding contributes nothing whatever its values; an image without any real region gets zeros
    (the count is clamped to 1 instead of dividing by zero).
    """
    weights = mask.to(values.dtype).unsqueeze(-1)
    total = (values * weights).sum(dim=1)
    count = weights.sum(dim=1).clamp_min(1.0)
    return total / count


def box_geometry(boxes: torch.Tensor, image_size: torch.Tensor) -> torch.Tensor:
    """Normalised geometry of each box: [x1/w, y1/h, x2/w, y2/h, area/(w*h)] -> [B, N, 5].

    ``boxes`` [B, N, 4] are x1, y1, x2, y2 in pixels of the original image and ``image_size``
    [B, 2] is (w, h). Normalising by the image size makes the values comparable across images
    of different resolution.
    """
    boxes = boxes.float()
    size = image_size.float().clamp_min(1.0)  # a zero size would only come from padding rows
    w = size[:, 0].view(-1, 1)
    h = size[:, 1].view(-1, 1)
    x1, y1, x2, y2 = boxes.unbind(-1)
    area = (x2 - x1).clamp_min(0.0) * (y2 - y1).clamp_min(0.0)
    return torch.stack([x1 / w, y1 / h, x2 / w, y2 / h, area / (w * h)], dim=-1)
