"""Box head: 14x14 ROI max pooling on res4, res5 (stride 1, dilation 2), average pooling, class and attribute heads."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_pool

from feature_extraction.backbone import make_stage, run_stage
from feature_extraction.config import DetectorConfig


@dataclass
class RegionOutputs:
    """Per-proposal outputs of the box head for a whole batch (rows in proposal order, image after image)."""

    features: torch.Tensor  # [R, D] float32 pooled res5 features
    class_probs: torch.Tensor  # [R, num_classes] float32 softmax, index 0 = background
    attr_probs: torch.Tensor  # [R, num_attributes] float32 softmax, index 0 = no attribute


class BoxPredictor(nn.Module):
    """Class scores, class-specific box deltas and the attribute head of the Caffe network.

    ``bbox_pred`` is part of the published weights but the reference extraction keeps the proposal boxes
    ("Keep the original boxes, don't worry about the regression bbox outputs", ``generate_tsv.py``), so it is
    loaded and saved, never applied.
    """

    def __init__(self, cfg: DetectorConfig) -> None:
        super().__init__()
        dim = cfg.feature_dim
        self.cls_score = nn.Linear(dim, cfg.num_classes)
        self.bbox_pred = nn.Linear(dim, 4 * cfg.num_classes)
        self.cls_embedding = nn.Embedding(cfg.num_classes, cfg.attr_embed_dim)
        self.fc_attr = nn.Linear(dim + cfg.attr_embed_dim, cfg.attr_hidden_dim)
        self.attr_score = nn.Linear(cfg.attr_hidden_dim, cfg.num_attributes)

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits [R, C] and attribute logits [R, A] for pooled features [R, D]."""
        class_logits = self.cls_score(pooled)
        # The embedded class is the argmax over all classes, background included [proto predicted_cls].
        embedded = self.cls_embedding(class_logits.argmax(dim=1))
        hidden = F.relu(self.fc_attr(torch.cat([pooled, embedded.to(pooled.dtype)], dim=1)))
        return class_logits, self.attr_score(hidden)


class Res5ROIHeads(nn.Module):
    """ROI pooling, res5 and the predictors."""

    def __init__(self, cfg: DetectorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        width, out = cfg.width_per_group, cfg.res2_channels
        # Stride 1 with dilation: res5 keeps the 14x14 ROI grid [proto res5a stride 1, branch2b dilation 2].
        self.res5 = make_stage(cfg.blocks[3], 4 * out, 8 * width, 8 * out, stride=1, dilation=cfg.res5_dilation,
                               cfg=cfg)
        self.box_predictor = BoxPredictor(cfg)

    def forward(self, features: torch.Tensor, proposals: list[torch.Tensor]) -> RegionOutputs:
        """``features`` padded res4 [B, C, H, W] (zero outside each image); ``proposals`` per image [r_i, 4]."""
        cfg = self.cfg
        index = torch.cat([torch.full((p.shape[0], 1), float(i), device=p.device) for i, p in enumerate(proposals)])
        rois = torch.cat([index, torch.cat(proposals)], dim=1)
        # float32 pooling (what torchvision's CUDA autocast does too): the ROI corners must not be rounded to bf16.
        size = (cfg.pooler_resolution, cfg.pooler_resolution)
        grid = roi_pool(features.float(), rois, size, 1.0 / cfg.feat_stride)
        grid = run_stage(self.res5, grid.to(features.dtype), None, None)
        pooled = grid.mean(dim=(2, 3), dtype=torch.float32)
        class_logits, attr_logits = self.box_predictor(pooled)
        return RegionOutputs(features=pooled, class_probs=F.softmax(class_logits.float(), dim=1),
                             attr_probs=F.softmax(attr_logits.float(), dim=1))
