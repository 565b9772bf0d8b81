"""Hyper-parameters of the bottom-up Faster R-CNN (ResNet-101 C4, Visual Genome, with attributes).

The values reproduce the network that produced the public bottom-up-attention features. Sources, abbreviated below:

* [proto]  peteanderson80/bottom-up-attention, ``models/vg/ResNet-101/faster_rcnn_end2end_final/test.prototxt``
  (the original Caffe network).
* [caffe-cfg]  the py-faster-rcnn config of that repository (``lib/fast_rcnn/config.py``, TEST section) and its
  ``tools/generate_tsv.py`` (the script that wrote the published TSV features).
* [bua]  MILVLG/bottom-up-attention.pytorch ``configs/bua-caffe/extract-bua-caffe-r101.yaml``, ``models/bua/*`` and
  ``utils/extract_utils.py`` (the Caffe weights converted to a ``.pth``).
* [pba]  airsplay/py-bottom-up-attention ``configs/VG-Detection/faster_rcnn_R_101_C4_attr_caffemaxpool.yaml`` and its
  detectron2 changes (the same weights converted to a detectron2 ``.pkl``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class DetectorConfig:
    """Architecture and test-time settings of :class:`feature_extraction.detector.BottomUpDetector`."""

    # --- input -------------------------------------------------------------------------------------------------
    # BGR mean subtracted from 0-255 pixels, no std division [proto data layer / caffe-cfg PIXEL_MEANS; bua PIXEL_MEAN].
    pixel_mean_bgr: tuple[float, float, float] = (102.9801, 115.9465, 122.7717)
    # Shortest side resized to 600 unless the longest would exceed 1000 [caffe-cfg TEST.SCALES=(600,),
    # TEST.MAX_SIZE=1000; bua INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST].
    test_scale: int = 600
    test_max_size: int = 1000

    # --- backbone: ResNet-101 up to res4 (stride 16) ----------------------------------------------------------
    stem_channels: int = 64  # [proto conv1 num_output 64]
    width_per_group: int = 64  # res2 bottleneck width; res2 outputs 4x this [proto res2a_branch2a / 2c]
    # Blocks of res2, res3, res4 (backbone) and res5 (box head): ResNet-101 [proto res2a-c, res3a-b3, res4a-b22,
    # res5a-c].
    blocks: tuple[int, int, int, int] = (3, 4, 23, 3)
    # Stride-2 blocks put the stride on the first 1x1 conv, not the 3x3 (MSRA/Caffe ResNet) [proto res3a_branch2a
    # stride 2, res3a_branch2b stride 1; detectron2 RESNETS.STRIDE_IN_1X1 default True, kept by bua and pba].
    stride_in_1x1: bool = True
    # Stem max-pool 3x3/2 without padding, output size rounded up (Caffe pooling) [proto pool1; bua BUABasicStem
    # ceil_mode=True; pba CAFFE_MAXPOOL: True].
    stem_pool_ceil: bool = True
    # Frozen batch norm (use_global_stats) as a per-channel affine; Caffe's BatchNorm eps default is 1e-5, as is
    # detectron2's FrozenBatchNorm2d [proto bn* layers].
    bn_eps: float = 1e-5

    # --- region proposal network on res4 -----------------------------------------------------------------------
    rpn_channels: int = 512  # 3x3 conv width [proto rpn_conv/3x3 num_output 512; bua RPN.CONV_OUT_CHANNELS 512;
    # pba PROPOSAL_GENERATOR.HID_CHANNELS 512]
    feat_stride: int = 16  # [proto proposal layer 'feat_stride': 16]
    anchor_base_size: int = 16  # py-faster-rcnn generate_anchors(base_size=16)
    # 12 anchors, ratio-major (Caffe order): for each ratio, each scale; scale s means a 16*s pixel side
    # [proto 'scales': (4, 8, 16, 32); generate_anchors ratios (0.5, 1, 2); pba ANCHOR_GENERATOR.SIZES
    # [[64, 128, 256, 512]] in pixels].
    anchor_scales: tuple[float, ...] = (4.0, 8.0, 16.0, 32.0)
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    # Test-time proposal selection [caffe-cfg TEST.RPN_PRE_NMS_TOP_N 6000, RPN_POST_NMS_TOP_N 300,
    # RPN_NMS_THRESH 0.7, RPN_MIN_SIZE 16; bua RPN.PRE_NMS_TOPK_TEST 6000, POST_NMS_TOPK_TEST 300,
    # PROPOSAL_GENERATOR.MIN_SIZE 16]. The minimum size is in original-image pixels (scaled by the resize factor).
    rpn_pre_nms_topk: int = 6000
    rpn_post_nms_topk: int = 300
    rpn_nms_thresh: float = 0.7
    rpn_min_size: float = 16.0
    # Box deltas are unnormalised (1, 1, 1, 1) and exp(dw), exp(dh) are clamped at log(1000/16)
    # [bua BBOX_REG_WEIGHTS (1.0, 1.0, 1.0, 1.0), BUABox2BoxTransform scale_clamp].
    bbox_reg_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    bbox_scale_clamp: float = math.log(1000.0 / 16)

    # --- box head: ROI pooling on res4, res5, average pooling ---------------------------------------------------
    # Max ROI pooling (not ROIAlign), 14x14 bins, spatial scale 1/16, Caffe rounding of the ROI corners
    # [proto roi_pool5 pooled_w/h 14, spatial_scale 0.0625; bua/pba ROI_BOX_HEAD.POOLER_TYPE "ROIPool"].
    pooler_resolution: int = 14
    # res5 runs at stride 1 with dilation 2 on the 14x14 ROI grid [proto res5a_branch1/2a stride 1, res5*_branch2b
    # dilation 2 pad 2; bua RESNETS.RES5_DILATION 2; pba RES5HALVE False], then global average pooling to
    # 8 * width_per_group * 4 = 2048 channels [proto pool5 global AVE].
    res5_dilation: int = 2

    # --- predictors ----------------------------------------------------------------------------------------------
    num_classes: int = 1601  # 1600 Visual Genome objects + background at index 0 [proto cls_score 1601]
    num_attributes: int = 401  # 400 attributes + "no attribute" at index 0 [proto attr_score 401]
    # Attribute head: embedding of the argmax class (incl. background) concatenated with pool5 -> fc -> ReLU ->
    # logits [proto cls_embedding 256 (no bias), fc_attr 512, relu_attr, attr_score]. pba derives the same sizes
    # as feature_dim // 8 and // 4, which the small variant follows.
    attr_embed_dim: int = 256
    attr_hidden_dim: int = 512

    @property
    def res2_channels(self) -> int:
        """Output channels of res2 (4x the bottleneck width)."""
        return 4 * self.width_per_group

    @property
    def res4_channels(self) -> int:
        """Channels of the res4 feature map the RPN and ROI pooling read."""
        return 4 * self.res2_channels

    @property
    def feature_dim(self) -> int:
        """Dimension of the pooled region feature (res5 output channels)."""
        return 8 * self.res2_channels

    @property
    def num_anchors(self) -> int:
        """Anchors per feature-map position."""
        return len(self.anchor_scales) * len(self.anchor_ratios)

    @classmethod
    def small(cls) -> DetectorConfig:
        """The same architecture with fewer blocks and channels, for fast CPU tests (features are 128-d)."""
        return replace(cls(), stem_channels=16, width_per_group=4, blocks=(1, 1, 1, 1), rpn_channels=32,
                       attr_embed_dim=16, attr_hidden_dim=32)
