"""Caption any image: the bottom-up detector's regions, decoded by a trained captioner, with per-word attention.

``Captioner`` owns one detector and one decoder on one device. ``caption`` takes image paths, encoded bytes, PIL
images or RGB arrays and returns one ``ImageCaption`` per image: the caption, the beam alternatives, the detected
regions (boxes with Visual Genome object/attribute names) and, for every word, the attention over those regions.
Many images go through the detector and the decoder together.

This module is where butd joins the detector package: it imports ``feature_extraction`` (the Visual Genome Faster
R-CNN, a top-level package that builds on butd's store) to load detector weights, read images and parse box
policies. The captioner itself is typed against the small ``butd.detector.RegionDetector`` interface.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image

from feature_extraction.detector import BottomUpDetector, BoxPolicy
from feature_extraction.images import ImageError, check_resizable, load_image

from butd.core.batch import Example, collate
from butd.core.devices import resolve_device
from butd.data.package_data import attribute_names, object_names
from butd.decoding import CaptionResult, DecodeOptions, decode, to_results
from butd.detector import DetectedRegions, RegionDetector
from butd.errors import ConfigError
from butd.models.loading import LoadedModel, load_model

ImageInput = Union[str, Path, bytes, Image.Image, np.ndarray]


@dataclass(frozen=True)
class Region:
    """One detected region: its box in pixels of the (EXIF-rotated) image and its predicted labels."""

    box: tuple[float, float, float, float]  # x1, y1, x2, y2
    object: str | None  # first synonym of the Visual Genome class (None: the detector gives no classes)
    object_confidence: float | None
    attribute: str | None
    attribute_confidence: float | None

    @property
    def label(self) -> str:
        """``"white sheep"``, ``"sheep"`` or ``"region"`` when the detector names nothing."""
        return " ".join(name for name in (self.attribute, self.object) if name) or "region"


@dataclass(frozen=True)
class Alternative:
    """One final beam: its caption and summed log-probability (``<eos>`` included)."""

    caption: str
    logprob: float


@dataclass(frozen=True, eq=False)
class ImageCaption:
    """The caption of one image and what the decoder looked at while writing each word."""

    name: str  # the path, upload file name, or "image <i>"
    width: int
    height: int
    caption: str
    logprob: float
    words: tuple[str, ...]
    attention: np.ndarray  # [len(words), len(regions)] float32; row w: attention while emitting word w
    regions: tuple[Region, ...]
    alternatives: tuple[Alternative, ...]  # every final beam, best first (the caption itself included)

    def top_regions(self, word_index: int, k: int = 3) -> list[tuple[int, float]]:
        """The ``k`` regions most attended while emitting word ``word_index``: (region index, weight), largest first."""
        row = self.attention[word_index]
        order = np.argsort(-row, kind="stable")[:k]
        return [(int(i), float(row[i])) for i in order]

    def to_json(self) -> dict[str, Any]:
        """The JSON object the web service returns for this image (weights rounded to 4 decimals)."""
        return {
            "name": self.name,
            "width": self.width,
            "height": self.height,
            "caption": self.caption,
            "logprob": round(self.logprob, 4),
            "alternatives": [{"caption": a.caption, "logprob": round(a.logprob, 4)} for a in self.alternatives],
            "regions": [
                {
                    "box": [round(v, 1) for v in r.box],
                    "object": r.object,
                    "object_confidence": _round(r.object_confidence),
                    "attribute": r.attribute,
                    "attribute_confidence": _round(r.attribute_confidence),
                }
                for r in self.regions
            ],
            "words": [
                {"word": word, "attention": [round(float(w), 4) for w in self.attention[i]]}
                for i, word in enumerate(self.words)
            ],
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


class Captioner:
    """Detector + captioner on one device. Not thread-safe: call it from one thread (the service does)."""

    def __init__(
        self,
        *,
        detector: RegionDetector,
        loaded: LoadedModel,
        boxes: str = "10-100",
        batch_size: int = 8,
        detector_name: str = "weights",
    ) -> None:
        """``detector``: a ``feature_extraction.BottomUpDetector`` or any ``butd.detector.RegionDetector``;
        ``loaded``: a trained captioner (``butd.models.load_model``).

        ``boxes`` is the detector's box policy (``"36"`` fixed, ``"10-100"`` adaptive); ``batch_size`` bounds how
        many images go through the networks at once; ``detector_name`` is reported by ``info`` (``"random"`` for an
        untrained detector, whose captions are meaningless).
        """
        if batch_size < 1:
            raise ConfigError(f"Captioner: batch_size must be >= 1, got {batch_size}")
        if int(detector.config.feature_dim) != int(loaded.config.model.feature_dim):
            raise ConfigError(
                f"the detector gives {detector.config.feature_dim}-d region features but the checkpoint "
                f"{loaded.path} was trained on {loaded.config.model.feature_dim}-d ones"
            )
        self.detector = detector
        self.model = loaded.model.eval()
        self.vocab = loaded.vocab
        self.config = loaded.config
        self.checkpoint = loaded.path
        self.device = next(self.model.parameters()).device
        self.boxes = boxes
        self.box_policy = BoxPolicy.parse(boxes) if isinstance(boxes, str) else boxes
        self.batch_size = batch_size
        self.detector_name = detector_name
        self.decoding = DecodeOptions.from_config(self.config.eval)  # beam_size is chosen per call
        self._objects = [names[0] for names in object_names()]
        self._attributes = [names[0] for names in attribute_names()]

    @classmethod
    def from_files(
        cls,
        detector_weights: str | Path,
        checkpoint: str | Path,
        *,
        device: str = "auto",
        boxes: str = "10-100",
        small_detector: bool = False,
        batch_size: int = 8,
    ) -> Captioner:
        """Load the detector (``"random"`` for untrained weights) and a checkpoint written by ``tools/train.py``.

        ``small_detector`` builds the reduced detector variant (only meaningful with ``"random"``: for tests).
        """
        dev = resolve_device(device)
        detector = BottomUpDetector.from_weights(str(detector_weights), device=str(dev), small=small_detector)
        loaded = load_model(checkpoint, device=str(dev))
        name = "random" if str(detector_weights) == "random" else "weights"
        return cls(detector=detector, loaded=loaded, boxes=boxes, batch_size=batch_size, detector_name=name)

    @property
    def is_random_detector(self) -> bool:
        """True when the detector is untrained: its regions, hence the captions, mean nothing."""
        return self.detector_name == "random"

    def info(self) -> dict[str, Any]:
        """What is loaded: device, detector kind, checkpoint and decoder (reported by the service's /healthz)."""
        return {
            "device": str(self.device),
            "detector": self.detector_name,
            "boxes": self.boxes,
            "checkpoint": str(self.checkpoint) if self.checkpoint is not None else None,
            "model": str(getattr(self.model, "name", type(self.model).__name__)),
            "vocab_size": len(self.vocab),
            "max_length": self.decoding.max_length,
        }

    def caption(
        self, images: Sequence[ImageInput], *, beam_size: int = 3, names: Sequence[str] | None = None
    ) -> list[ImageCaption]:
        """Caption ``images`` (paths, encoded bytes, PIL images or HxWx3 uint8 RGB arrays), ``batch_size`` at a time.

        Returns one ``ImageCaption`` per image, in order. ``names`` overrides the names reported for the images.
        Raises ``feature_extraction.images.ImageError`` (a ``butd.errors.DataError``) naming the image when one
        cannot be read or is unusable (e.g. a 1 x 5000 strip).
        """
        options = self.decoding.with_overrides(beam_size=beam_size)  # ConfigError for a beam outside 1..100
        if names is not None and len(names) != len(images):
            raise ValueError(f"caption: {len(names)} names for {len(images)} images")
        labels = list(names) if names is not None else [_default_name(img, i) for i, img in enumerate(images)]
        results: list[ImageCaption] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            arrays = [_to_array(img, labels[start + i]) for i, img in enumerate(chunk)]
            for array, name in zip(arrays, labels[start:]):
                self.check_image(array.shape[1], array.shape[0], name)
            results.extend(self._caption_arrays(arrays, labels[start : start + len(chunk)], options))
        return results

    def check_image(self, width: int, height: int, name: str) -> None:
        """Raise ``ImageError`` naming the image if the detector cannot take a ``width`` x ``height`` picture
        (an extreme aspect ratio would leave too few pixels on the short side after the test-time resize)."""
        config = self.detector.config
        check_resizable(height, width, scale=config.test_scale, max_size=config.test_max_size, source=name)

    @torch.inference_mode()
    def _caption_arrays(self, arrays: list[np.ndarray], names: list[str],
                        options: DecodeOptions) -> list[ImageCaption]:
        detections = self.detector.detect(arrays, boxes=self.box_policy)
        batch = collate([Example.from_record(d, image_id=i) for i, d in enumerate(detections)]).to(self.device)
        regions = self.model.encode(batch.features, batch.region_mask, batch.boxes, batch.image_size)
        output = decode(self.model, regions, options)
        results = to_results(
            output, self.vocab, image_ids=range(len(arrays)), boxes=batch.boxes, region_mask=batch.region_mask
        )
        return [self._image_caption(r, d, n) for r, d, n in zip(results, detections, names)]

    def _image_caption(self, result: CaptionResult, det: DetectedRegions, name: str) -> ImageCaption:
        words = tuple(self.vocab.words[t] for t in result.tokens)
        regions = tuple(self._region(det, i) for i in range(len(det.boxes)))
        return ImageCaption(
            name=name,
            width=int(det.image_w),
            height=int(det.image_h),
            caption=result.caption,
            logprob=float(result.logprob),
            words=words,
            attention=np.asarray(result.attention, dtype=np.float32).reshape(len(words), len(regions)),
            regions=regions,
            # Greedy decoding (beam 1) has no other beams: the caption is the one alternative.
            alternatives=tuple(Alternative(caption=c, logprob=float(lp)) for c, lp in result.alternatives)
            or (Alternative(caption=result.caption, logprob=float(result.logprob)),),
        )

    def _region(self, det: DetectedRegions, i: int) -> Region:
        def pick(ids: np.ndarray | None, conf: np.ndarray | None, names: list[str]) -> tuple[str | None, float | None]:
            if ids is None:
                return None, None
            index = int(ids[i])
            name = names[index] if 0 <= index < len(names) else None
            return name, (float(conf[i]) if conf is not None else None)

        obj, obj_conf = pick(det.object_ids, det.object_conf, self._objects)
        attr, attr_conf = pick(det.attr_ids, det.attr_conf, self._attributes)
        x1, y1, x2, y2 = (float(v) for v in det.boxes[i])
        return Region(
            box=(x1, y1, x2, y2), object=obj, object_confidence=obj_conf, attribute=attr, attribute_confidence=attr_conf
        )


def _default_name(image: ImageInput, index: int) -> str:
    if isinstance(image, (str, Path)):
        return str(image)
    filename = getattr(image, "filename", "")  # PIL images opened from a file remember it
    return str(filename) if filename else f"image {index}"


def _to_array(image: ImageInput, name: str) -> np.ndarray:
    """HxWx3 uint8 RGB; ``ImageError`` (a ``DataError``) naming the image when it cannot be decoded."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ImageError(name, f"expected an HxWx3 uint8 RGB array, got {image.dtype} {tuple(image.shape)}")
        return image
    try:
        return load_image(image)
    except ImageError as err:
        raise ImageError(name, err.reason) from None  # the caller's name for the image, not "<123 bytes>"
