"""What the published weights files are: which Caffe network each holds, which ``--boxes`` it was made for, and the
anchor order its RPN channels follow.

The bottom-up-attention repository (peteanderson80) released two Caffe networks: ``resnet101_faster_rcnn_final``,
which wrote the adaptive 10-100 regions per image features, and ``iter_320000`` (the "alternative pretrained
model"), which wrote the fixed 36 regions per image features. Both were converted twice:

==========================================================  ========================================  ==========
file                                                        converted by                              features
==========================================================  ========================================  ==========
``bua-caffe-frcn-r101_with_attributes.pth``                 MILVLG/bottom-up-attention.pytorch        10-100
``faster_rcnn_from_caffe_attr_original.pkl``                airsplay/py-bottom-up-attention           10-100
``bua-caffe-frcn-r101_with_attributes_fix36.pth``           MILVLG/bottom-up-attention.pytorch        36
``faster_rcnn_from_caffe_attr.pkl``                         airsplay/py-bottom-up-attention           36
==========================================================  ========================================  ==========
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from feature_extraction.boxes import generate_anchors
from feature_extraction.config import DetectorConfig
from feature_extraction.weights import CheckpointError

ANCHORS_KEY = "proposal_generator.anchor_generator.cell_anchors.0"
# A file's anchor must be within this factor of one of ours in size and in aspect ratio to be recognised (the
# Caffe anchors are rounded to whole pixels, detectron2's are not).
_ANCHOR_TOLERANCE = 1.25


@dataclass(frozen=True)
class PublishedWeights:
    """One published weights file."""

    file_name: str
    converted_by: str
    caffe_model: str
    boxes: str  # the --boxes of the published features this network wrote


PUBLISHED = (
    PublishedWeights(file_name="bua-caffe-frcn-r101_with_attributes.pth",
                     converted_by="MILVLG/bottom-up-attention.pytorch", caffe_model="resnet101_faster_rcnn_final",
                     boxes="10-100"),
    PublishedWeights(file_name="faster_rcnn_from_caffe_attr_original.pkl",
                     converted_by="airsplay/py-bottom-up-attention", caffe_model="resnet101_faster_rcnn_final",
                     boxes="10-100"),
    PublishedWeights(file_name="bua-caffe-frcn-r101_with_attributes_fix36.pth",
                     converted_by="MILVLG/bottom-up-attention.pytorch", caffe_model="iter_320000", boxes="36"),
    PublishedWeights(file_name="faster_rcnn_from_caffe_attr.pkl", converted_by="airsplay/py-bottom-up-attention",
                     caffe_model="iter_320000", boxes="36"),
)


def identify(path: str | Path) -> PublishedWeights | None:
    """The published file ``path`` is, going by its name; None if the name does not say."""
    name = Path(path).name.lower()
    return next((w for w in PUBLISHED if w.file_name == name), None)


def boxes_warning(path: str | Path, boxes: str) -> str | None:
    """A warning if ``boxes`` (e.g. "36") is not what the published features of these weights used."""
    published = identify(path)
    if published is None or published.boxes == boxes:
        return None
    other = next(w for w in PUBLISHED if w.boxes != published.boxes and w.converted_by == published.converted_by)
    return (f"--boxes {boxes} with {published.file_name}: that is the Caffe {published.caffe_model} network, which "
            f"wrote the published --boxes {published.boxes} features; for --boxes {other.boxes} features like the "
            f"published ones use {other.file_name} ({other.caffe_model}), see docs/extraction.md")


# --- the anchors buffer ------------------------------------------------------------------------------------------

def caffe_cell_anchors(cfg: DetectorConfig) -> np.ndarray:
    """The 12 anchors as py-faster-rcnn makes them: ratio-major, rounded, centred at 7.5 (the ``.pth`` order)."""
    return generate_anchors(cfg.anchor_base_size, cfg.anchor_ratios, cfg.anchor_scales)


def detectron2_cell_anchors(cfg: DetectorConfig) -> np.ndarray:
    """The 12 anchors as detectron2's default generator makes them: size-major, centred at 0 (the ``.pkl`` order)."""
    anchors = []
    for scale in cfg.anchor_scales:
        size = cfg.anchor_base_size * scale
        for ratio in cfg.anchor_ratios:
            width = np.sqrt(size * size / ratio)
            height = ratio * width
            anchors.append([-width / 2, -height / 2, width / 2, height / 2])
    return np.asarray(anchors, dtype=np.float32)


def _anchor_kinds(anchors: np.ndarray, cfg: DetectorConfig, source: str) -> list[tuple[int, int]]:
    """(scale index, ratio index) of each row, recognised by size and aspect ratio."""
    sizes = np.log(cfg.anchor_base_size * np.asarray(cfg.anchor_scales))
    ratios = np.log(np.asarray(cfg.anchor_ratios))
    kinds = []
    for row, (x1, y1, x2, y2) in enumerate(anchors.astype(np.float64)):
        width, height = x2 - x1, y2 - y1
        if not (width > 0 and height > 0):
            raise CheckpointError(f"detector weights {source}: {ANCHORS_KEY} row {row} is not a box: "
                                  f"{[float(v) for v in (x1, y1, x2, y2)]}")
        size_gap = np.abs(sizes - 0.5 * np.log(width * height))
        ratio_gap = np.abs(ratios - np.log(height / width))
        if size_gap.min() > np.log(_ANCHOR_TOLERANCE) or ratio_gap.min() > np.log(_ANCHOR_TOLERANCE):
            raise CheckpointError(f"detector weights {source}: {ANCHORS_KEY} row {row} is a {width:.1f} x "
                                  f"{height:.1f} anchor, not one of this network's (sides of 64 to 512 pixels, "
                                  "aspect ratios 0.5, 1, 2); these are not the bottom-up weights (docs/extraction.md)")
        kinds.append((int(size_gap.argmin()), int(ratio_gap.argmin())))
    return kinds


def check_cell_anchors(anchors: np.ndarray, cfg: DetectorConfig, *, size_major: bool, source: str) -> None:
    """Raise CheckpointError unless ``anchors`` [12, 4] are this network's anchors in the order the file's RPN
    channels are read in: ratio-major (Caffe, ``.pth``) or size-major (detectron2, ``.pkl``)."""
    if anchors.shape != (cfg.num_anchors, 4):
        raise CheckpointError(f"detector weights {source}: {ANCHORS_KEY} has shape {list(anchors.shape)}, expected "
                              f"[{cfg.num_anchors}, 4]")
    kinds = _anchor_kinds(anchors, cfg, source)
    n_scales, n_ratios = len(cfg.anchor_scales), len(cfg.anchor_ratios)
    orders = {"ratio-major (Caffe)": [(s, r) for r in range(n_ratios) for s in range(n_scales)],
              "size-major (detectron2)": [(s, r) for s in range(n_scales) for r in range(n_ratios)]}
    expected = "size-major (detectron2)" if size_major else "ratio-major (Caffe)"
    if kinds == orders[expected]:
        return
    found = next((name for name, order in orders.items() if order == kinds), "an unknown")
    raise CheckpointError(
        f"detector weights {source}: the file's anchors ({ANCHORS_KEY}) are in {found} order, but a "
        f"{Path(source).suffix} file is read with its RPN channels in {expected} order; the objectness "
        "and box-delta channels would be paired with the wrong anchors. This is not one of the published files "
        "(docs/extraction.md)")
