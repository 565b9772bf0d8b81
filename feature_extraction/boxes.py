"""Box arithmetic in the legacy Caffe/py-faster-rcnn convention, and the reference region selection.

Boxes are (x1, y1, x2, y2) with *inclusive* pixel corners: a box's width is ``x2 - x1 + 1``. That "+1" is part of the
anchors, the delta decoding, the size filter and the IoU of the original network, so it is kept everywhere here.
"""
from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import nms as _tv_nms

# NMS over more (box, class) pairs than this runs class by class: the single-kernel coordinate trick builds an
# N x N overlap mask.
_MAX_PAIRS_PER_NMS = 20_000


def generate_anchors(base_size: int, ratios: tuple[float, ...], scales: tuple[float, ...]) -> np.ndarray:
    """The cell anchors of py-faster-rcnn's ``generate_anchors``: ratio-major, widths/heights rounded half-to-even.

    Returns a float32 array [len(ratios) * len(scales), 4] centred on the first ``base_size`` cell.
    """
    ctr = 0.5 * (base_size - 1)
    size = float(base_size * base_size)
    anchors = []
    for ratio in ratios:
        w = np.round(np.sqrt(size / ratio))
        h = np.round(w * ratio)
        for scale in scales:
            ws, hs = w * scale, h * scale
            anchors.append([ctr - 0.5 * (ws - 1), ctr - 0.5 * (hs - 1), ctr + 0.5 * (ws - 1), ctr + 0.5 * (hs - 1)])
    return np.asarray(anchors, dtype=np.float32)


def grid_anchors(cell_anchors: torch.Tensor, height: int, width: int, stride: int) -> torch.Tensor:
    """All anchors of a height x width feature map, ordered (y, x, anchor) like the Caffe proposal layer: [H*W*A, 4]."""
    device = cell_anchors.device
    ys = torch.arange(height, device=device, dtype=torch.float32) * stride
    xs = torch.arange(width, device=device, dtype=torch.float32) * stride
    sy, sx = torch.meshgrid(ys, xs, indexing="ij")
    shifts = torch.stack([sx, sy, sx, sy], dim=-1).reshape(-1, 1, 4)
    return (shifts + cell_anchors.reshape(1, -1, 4)).reshape(-1, 4)


def decode_deltas(deltas: torch.Tensor, boxes: torch.Tensor, weights: tuple[float, float, float, float],
                  scale_clamp: float) -> torch.Tensor:
    """Apply (dx, dy, dw, dh) deltas [..., 4] to boxes [..., 4] (py-faster-rcnn ``bbox_transform_inv``)."""
    deltas, boxes = deltas.float(), boxes.float()
    widths = boxes[..., 2] - boxes[..., 0] + 1.0
    heights = boxes[..., 3] - boxes[..., 1] + 1.0
    ctr_x = boxes[..., 0] + 0.5 * widths
    ctr_y = boxes[..., 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    # The clamp only guards exp() against overflow; it never binds for a trained network.
    dw = (deltas[..., 2] / ww).clamp(max=scale_clamp)
    dh = (deltas[..., 3] / wh).clamp(max=scale_clamp)
    pred_ctr_x = deltas[..., 0] / wx * widths + ctr_x
    pred_ctr_y = deltas[..., 1] / wy * heights + ctr_y
    pred_w = torch.exp(dw) * widths
    pred_h = torch.exp(dh) * heights
    return torch.stack([pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h,
                        pred_ctr_x + 0.5 * pred_w, pred_ctr_y + 0.5 * pred_h], dim=-1)


def clip_boxes(boxes: torch.Tensor, height: float, width: float) -> torch.Tensor:
    """Clip boxes to [0, width - 1] x [0, height - 1] (inclusive pixel corners)."""
    x = boxes[..., 0::2].clamp(0.0, width - 1.0)
    y = boxes[..., 1::2].clamp(0.0, height - 1.0)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def nms_legacy(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS with the "+1" IoU of py-faster-rcnn; indices of kept boxes, by decreasing score.

    Shifting x2, y2 by one pixel turns the inclusive-corner IoU into torchvision's continuous IoU exactly.
    """
    shifted = boxes.clone()
    shifted[:, 2:] += 1.0
    return _tv_nms(shifted, scores, iou_threshold)


def _batched_nms_legacy(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor,
                        iou_threshold: float) -> torch.Tensor:
    """NMS within each group id: the kept indices (any order)."""
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    if boxes.shape[0] > _MAX_PAIRS_PER_NMS:
        kept = [torch.nonzero(groups == g).flatten() for g in torch.unique(groups)]
        return torch.cat([idx[nms_legacy(boxes[idx], scores[idx], iou_threshold)] for idx in kept])
    # Offset each group far apart so that one NMS call never compares boxes of different groups; float64 keeps
    # the offset coordinates exact.
    shifted = boxes.double()
    shifted[:, 2:] += 1.0
    offset = groups.double() * (shifted.max() + 2.0)
    return _tv_nms(shifted + offset[:, None], scores.double(), iou_threshold)


def per_class_max_score(boxes: torch.Tensor, scores: torch.Tensor, nms_thresh: float,
                        min_score: float) -> torch.Tensor:
    """For each box, the best score of a class in which it survives that class's NMS; 0 if none.

    ``scores`` is [R, C] (foreground classes only). This is the ``max_conf`` of bottom-up-attention's
    ``generate_tsv.py`` (NMS per class over the same boxes), but it is exact only where the result is >= ``min_score``:
    only (box, class) pairs scoring >= ``min_score`` enter NMS, and a lower pair can never suppress a higher one.
    Boxes below ``min_score`` get 0.
    """
    rows, cols = torch.nonzero(scores >= min_score, as_tuple=True)
    best = torch.zeros(scores.shape[0], dtype=scores.dtype, device=scores.device)
    if rows.numel() == 0:
        return best
    pair_scores = scores[rows, cols]
    keep = _batched_nms_legacy(boxes[rows], pair_scores, cols, nms_thresh)
    return best.scatter_reduce(0, rows[keep], pair_scores[keep], reduce="amax")


def select_regions(boxes: torch.Tensor, scores: torch.Tensor, *, nms_thresh: float, conf_thresh: float,
                   min_boxes: int, max_boxes: int) -> torch.Tensor:
    """Indices of the regions bottom-up-attention keeps for one image (``generate_tsv.py``'s rule).

    A region's confidence is its best per-class-NMS-surviving class score (see :func:`per_class_max_score`).
    Regions with confidence >= ``conf_thresh`` are kept; if fewer than ``min_boxes``, the ``min_boxes`` most
    confident are taken regardless of the threshold; if more than ``max_boxes``, the ``max_boxes`` most
    confident. Ties are broken by region index. ``boxes`` [R, 4] and ``scores`` [R, C] (foreground classes).
    """
    num = boxes.shape[0]
    conf = per_class_max_score(boxes, scores, nms_thresh, conf_thresh)
    above = torch.nonzero(conf >= conf_thresh).flatten()
    if min_boxes <= above.numel() <= max_boxes:
        return above
    if above.numel() > max_boxes:
        return _top(conf, max_boxes)
    # Too few confident regions: lower the pair threshold until the top ``min_boxes`` confidences are certain
    # (every confidence >= the current threshold is exact), ending with all pairs if needed.
    want = min(min_boxes, num)
    flat = scores.flatten()
    pairs = max(4096, 4 * int((flat >= conf_thresh).sum()))
    while True:
        if pairs >= flat.numel():
            return _top(per_class_max_score(boxes, scores, nms_thresh, float("-inf")), want)
        threshold = float(torch.topk(flat, pairs).values[-1])
        conf = per_class_max_score(boxes, scores, nms_thresh, threshold)
        if int((conf >= threshold).sum()) >= want:
            return _top(conf, want)
        pairs *= 4


def _top(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values, ties by lower index (a stable descending sort)."""
    order = torch.sort(values, descending=True, stable=True).indices
    return order[:k]
