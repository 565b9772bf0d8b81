"""The bottom-up detector: images in, selected regions (features, boxes, objects, attributes) out."""
from __future__ import annotations

import logging

import torch
from torch import nn

from feature_extraction.backbone import ResNetC4
from feature_extraction.config import DetectorConfig
from feature_extraction.precision import check_precision, compute_context
from feature_extraction.preprocess import Picture, prepare_batch
from feature_extraction.roi_heads import Res5ROIHeads
from feature_extraction.rpn import ProposalGenerator
from feature_extraction.selection import BoxPolicy, Detections, build_detections

log = logging.getLogger(__name__)

__all__ = ["BottomUpDetector", "BoxPolicy", "Detections"]


class BottomUpDetector(nn.Module):
    """Faster R-CNN ResNet-101 C4 with attributes (Anderson et al. 2018), inference only.

    ``detect`` batches the images (padded to the largest), runs in ``precision`` (see precision.py), and returns
    one :class:`Detections` per image. Results do not depend on which images share a batch (see backbone.py).
    """

    def __init__(self, *, config: DetectorConfig | None = None) -> None:
        super().__init__()
        self.config = config or DetectorConfig()
        self.backbone = ResNetC4(self.config)
        self.proposal_generator = ProposalGenerator(self.config)
        self.roi_heads = Res5ROIHeads(self.config)
        self.precision = "fp32"
        self.channels_last = False
        self.register_buffer("pixel_mean", torch.tensor(self.config.pixel_mean_bgr).reshape(3, 1, 1),
                             persistent=False)
        self.eval()

    @classmethod
    def from_weights(cls, weights: str, *, device: str | torch.device = "cpu", small: bool = False,
                     precision: str = "fp32", channels_last: bool | None = None, seed: int = 0) -> BottomUpDetector:
        """Build the detector and load ``weights``: a ``.pkl`` (py-bottom-up-attention) or ``.pth``
        (bottom-up-attention.pytorch) file, or ``"random"`` for a seeded random network (tests/benchmarks).

        ``small`` selects the reduced test architecture; ``precision`` is fp32 (strict, TF32 off: the reference),
        bf16 or fp16 (autocast); ``channels_last`` stores weights and activations NHWC (default: on CUDA only).
        """
        from feature_extraction.weights import initialize_random, load_weights

        config = DetectorConfig.small() if small else DetectorConfig()
        model = cls(config=config)
        if weights == "random":
            log.warning("RANDOM DETECTOR WEIGHTS: the extracted features are meaningless; use them for tests and "
                        "benchmarks only, never for training a captioner.")
            initialize_random(model, seed=seed)
        else:
            load_weights(model, weights)
        model.set_precision(precision)
        device = torch.device(device)
        model.set_channels_last(device.type == "cuda" if channels_last is None else channels_last)
        return model.to(device)

    def set_precision(self, precision: str) -> None:
        """fp32 (float32 with TF32 off: the reference arithmetic), bf16 or fp16 (autocast on the model's device)."""
        self.precision = check_precision(precision)

    def set_channels_last(self, enabled: bool) -> None:
        """NHWC weights and activations (the layout tensor cores prefer) or the default NCHW."""
        self.channels_last = bool(enabled)
        self.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @torch.inference_mode()
    def detect(self, images: list[Picture], *, boxes: BoxPolicy | None = None) -> list[Detections]:
        """Detect and describe the salient regions of each image (H x W x 3 RGB uint8 arrays, see ``load_image``,
        or tensors on any device)."""
        policy = boxes or BoxPolicy()
        if not images:
            return []
        cfg = self.config
        batch, sizes, factors = prepare_batch(images, pixel_mean=self.pixel_mean, scale=cfg.test_scale,
                                              max_size=cfg.test_max_size)
        with compute_context(self.device, self.precision):
            if self.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            features, feature_sizes = self.backbone(batch, sizes)
            proposals = self.proposal_generator(features, feature_sizes, sizes, factors)
            outputs = self.roi_heads(features, proposals)
        original = [props / factor for props, factor in zip(proposals, factors)]
        return build_detections([(int(image.shape[0]), int(image.shape[1])) for image in images], original,
                                outputs.features, outputs.class_probs, outputs.attr_probs, policy)
