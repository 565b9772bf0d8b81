"""Region proposal network on res4, with the test-time proposal selection of py-faster-rcnn's ``proposal_layer``.

Objectness is one logit per anchor, sigmoid(logit) = P(object). The Caffe network has two softmax logits
(background, object); softmax over them equals sigmoid(object - background), which is what the checkpoint readers
store here. Anchors are in Caffe order (ratio-major) and geometry.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from feature_extraction.boxes import clip_boxes, decode_deltas, generate_anchors, grid_anchors, nms_legacy
from feature_extraction.config import DetectorConfig


class RPNHead(nn.Module):
    """3x3 conv + ReLU, then 1x1 convs for objectness logits [B, A, H, W] and box deltas [B, 4A, H, W]."""

    def __init__(self, cfg: DetectorConfig) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cfg.res4_channels, cfg.rpn_channels, kernel_size=3, padding=1)
        self.objectness_logits = nn.Conv2d(cfg.rpn_channels, cfg.num_anchors, kernel_size=1)
        self.anchor_deltas = nn.Conv2d(cfg.rpn_channels, 4 * cfg.num_anchors, kernel_size=1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = F.relu(self.conv(features))
        return self.objectness_logits(hidden), self.anchor_deltas(hidden)


class ProposalGenerator(nn.Module):
    """Scores every anchor and returns, per image, up to ``rpn_post_nms_topk`` proposals in input pixels."""

    def __init__(self, cfg: DetectorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.rpn_head = RPNHead(cfg)
        cell = generate_anchors(cfg.anchor_base_size, cfg.anchor_ratios, cfg.anchor_scales)
        self.register_buffer("cell_anchors", torch.from_numpy(cell), persistent=False)

    def forward(self, features: torch.Tensor, feature_sizes: list[tuple[int, int]],
                image_sizes: list[tuple[int, int]], scales: list[float]) -> list[torch.Tensor]:
        """Proposals [r_i, 4] (x1, y1, x2, y2 in resized-image pixels) for each image, best first.

        ``features`` is the padded res4 batch; ``feature_sizes`` each image's valid res4 (h, w); ``image_sizes``
        its resized (h, w); ``scales`` its resize factor (for the minimum proposal size).
        """
        cfg = self.cfg
        logits, deltas = self.rpn_head(features)
        batch, anchors_per_cell, height, width = logits.shape
        # Caffe order of the flattened anchors: (y, x, anchor).
        logits = logits.float().permute(0, 2, 3, 1).reshape(batch, -1)
        deltas = deltas.float().reshape(batch, anchors_per_cell, 4, height, width)
        deltas = deltas.permute(0, 3, 4, 1, 2).reshape(batch, -1, 4)
        anchors = grid_anchors(self.cell_anchors, height, width, cfg.feat_stride)
        proposals = decode_deltas(deltas, anchors.unsqueeze(0), cfg.bbox_reg_weights, cfg.bbox_scale_clamp)
        cell_y = torch.arange(height, device=logits.device).repeat_interleave(width * anchors_per_cell)
        cell_x = torch.arange(width, device=logits.device).repeat_interleave(anchors_per_cell).repeat(height)
        chosen_boxes, chosen_scores = [], []
        for i in range(batch):
            (img_h, img_w), (feat_h, feat_w) = image_sizes[i], feature_sizes[i]
            boxes = clip_boxes(proposals[i], img_h, img_w)
            min_size = cfg.rpn_min_size * scales[i]
            valid = ((cell_y < feat_h) & (cell_x < feat_w)
                     & (boxes[:, 2] - boxes[:, 0] + 1 >= min_size) & (boxes[:, 3] - boxes[:, 1] + 1 >= min_size))
            # Invalid anchors score -inf instead of being dropped (dropping needs their count on the host): NMS
            # visits them after every valid one, so they never suppress a valid proposal, and they are cut below.
            scores = logits[i].masked_fill(~valid, float("-inf"))
            top = torch.topk(scores, min(cfg.rpn_pre_nms_topk, scores.numel())).indices
            keep = nms_legacy(boxes[top], scores[top], cfg.rpn_nms_thresh)[: cfg.rpn_post_nms_topk]
            chosen_boxes.append(boxes[top[keep]])
            chosen_scores.append(scores[top[keep]])
        # NMS returns by decreasing score, so each image's valid proposals come first: one transfer for all counts.
        counts = torch.stack([torch.isfinite(s).sum() for s in chosen_scores]).tolist()
        return [b[:n] for b, n in zip(chosen_boxes, counts)]
