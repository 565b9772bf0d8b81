"""The bottom-up detector: images in, selected regions (features, boxes, objects, attributes) out."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from butd.errors import ConfigError
from feature_extraction.backbone import ResNetC4
from feature_extraction.boxes import select_regions
from feature_extraction.config import DetectorConfig
from feature_extraction.images import check_resizable, resize_scale, resized_shape
from feature_extraction.roi_heads import Res5ROIHeads
from feature_extraction.rpn import ProposalGenerator

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


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
    """The selected regions of one image, most confident object first. Boxes are in original-image pixels."""

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


class BottomUpDetector(nn.Module):
    """Faster R-CNN ResNet-101 C4 with attributes (Anderson et al. 2018), inference only.

    ``detect`` batches the images (padded to the largest), runs under autocast in ``precision`` on CUDA, and returns
    one :class:`Detections` per image. Results do not depend on which images share a batch (see backbone.py).
    """

    def __init__(self, *, config: DetectorConfig | None = None) -> None:
        super().__init__()
        self.config = config or DetectorConfig()
        self.backbone = ResNetC4(self.config)
        self.proposal_generator = ProposalGenerator(self.config)
        self.roi_heads = Res5ROIHeads(self.config)
        self.precision = "fp32"
        self.register_buffer("pixel_mean", torch.tensor(self.config.pixel_mean_bgr).reshape(3, 1, 1),
                             persistent=False)
        self.eval()

    @classmethod
    def from_weights(cls, weights: str, *, device: str | torch.device = "cpu", small: bool = False,
                     precision: str = "fp32", seed: int = 0) -> BottomUpDetector:
        """Build the detector and load ``weights``: a ``.pkl`` (py-bottom-up-attention) or ``.pth``
        (bottom-up-attention.pytorch) checkpoint, or ``"random"`` for a seeded random network (tests/benchmarks).

        ``small`` selects the reduced test architecture; ``precision`` is fp32, fp16 or bf16 (autocast, CUDA only).
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
        if device.type == "cuda":  # NHWC convolutions use the tensor cores best
            return model.to(device, memory_format=torch.channels_last)
        return model.to(device)

    def set_precision(self, precision: str) -> None:
        """fp32, fp16 or bf16; the half precisions apply on CUDA only (autocast), CPU always runs fp32."""
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        self.precision = precision

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = PRECISIONS[self.precision]
        if dtype is None or self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=dtype)

    def _preprocess(self, images: list[np.ndarray]) -> tuple[torch.Tensor, list[tuple[int, int]], list[float]]:
        """RGB uint8 images -> padded BGR mean-subtracted batch, resized sizes, resize factors."""
        cfg, tensors, sizes, factors = self.config, [], [], []
        for i, image in enumerate(images):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ConfigError(f"image {i}: expected an H x W x 3 uint8 RGB array, got {image.dtype} "
                                  f"{list(image.shape)} (use feature_extraction.images.load_image)")
            height, width = image.shape[:2]
            check_resizable(height, width, scale=cfg.test_scale, max_size=cfg.test_max_size, source=f"image {i}")
            factor = resize_scale(height, width, scale=cfg.test_scale, max_size=cfg.test_max_size)
            size = resized_shape(height, width, factor)
            pixels = torch.from_numpy(image if image.flags.writeable else image.copy()).to(self.device)
            bgr = pixels.permute(2, 0, 1).flip(0).float().unsqueeze(0)
            # Caffe subtracts the mean, then resizes bilinearly (the two commute).
            resized = F.interpolate(bgr, size=size, mode="bilinear", align_corners=False)[0] - self.pixel_mean
            tensors.append(resized)
            sizes.append(size)
            factors.append(factor)
        height = max(h for h, _ in sizes)
        width = max(w for _, w in sizes)
        batch = torch.zeros(len(images), 3, height, width, device=self.device)
        for i, t in enumerate(tensors):
            batch[i, :, : t.shape[1], : t.shape[2]] = t
        return batch, sizes, factors

    @torch.inference_mode()
    def detect(self, images: list[np.ndarray], *, boxes: BoxPolicy | None = None) -> list[Detections]:
        """Detect and describe the salient regions of each image (H x W x 3 RGB uint8, see ``load_image``)."""
        policy = boxes or BoxPolicy()
        if not images:
            return []
        batch, sizes, factors = self._preprocess(images)
        with self._autocast():
            if self.device.type == "cuda":
                batch = batch.contiguous(memory_format=torch.channels_last)
            features, feature_sizes = self.backbone(batch, sizes)
            proposals = self.proposal_generator(features, feature_sizes, sizes, factors)
            outputs = self.roi_heads(features, proposals)
        results, start = [], 0
        for image, props, factor in zip(images, proposals, factors):
            end = start + props.shape[0]
            results.append(self._select(image, props / factor, outputs.features[start:end],
                                        outputs.class_probs[start:end], outputs.attr_probs[start:end], policy))
            start = end
        return results

    def _select(self, image: np.ndarray, boxes: torch.Tensor, features: torch.Tensor, class_probs: torch.Tensor,
                attr_probs: torch.Tensor, policy: BoxPolicy) -> Detections:
        """Apply the box policy to one image's proposals; boxes are already in original pixels."""
        object_probs = class_probs[:, 1:]  # drop background
        keep = select_regions(boxes, object_probs, nms_thresh=policy.nms_thresh, conf_thresh=policy.conf_thresh,
                              min_boxes=policy.min_boxes, max_boxes=policy.max_boxes)
        object_conf, object_ids = object_probs[keep].max(dim=1)
        attr_conf, attr_ids = attr_probs[keep, 1:].max(dim=1)  # best real attribute, "no attribute" excluded
        order = torch.sort(object_conf, descending=True, stable=True).indices
        keep, object_conf, object_ids = keep[order], object_conf[order], object_ids[order]
        attr_conf, attr_ids = attr_conf[order], attr_ids[order]

        def cpu(t: torch.Tensor, dtype: np.dtype) -> np.ndarray:
            return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=dtype)

        return Detections(features=cpu(features[keep], np.float32), boxes=cpu(boxes[keep], np.float32),
                          image_w=int(image.shape[1]), image_h=int(image.shape[0]),
                          object_ids=cpu(object_ids, np.int32), object_conf=cpu(object_conf, np.float32),
                          attr_ids=cpu(attr_ids, np.int32), attr_conf=cpu(attr_conf, np.float32))
