"""Box arithmetic in the legacy Caffe/py-faster-rcnn convention: anchors, delta decoding, clipping, NMS.

Boxes are (x1, y1, x2, y2) with *inclusive* pixel corners: a box's width is ``x2 - x1 + 1``. That "+1" is part of the
anchors, the delta decoding, the size filter and the IoU of the original network, so it is kept everywhere here.
"""
from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import nms as _tv_nms


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
