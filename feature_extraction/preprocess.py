"""From decoded pictures to the detector's input batch: BGR, mean subtraction, the reference resize, padding.

The reference (py-faster-rcnn ``_get_image_blob``, used by ``generate_tsv.py``) converts the image to float32,
subtracts the BGR pixel means, then calls ``cv2.resize(im, None, None, fx=s, fy=s, interpolation=INTER_LINEAR)``.
OpenCV then samples the source at ``(x + 0.5) / s - 0.5`` -- the step is ``1 / s`` -- and rounds the output size to
the nearest integer. ``F.interpolate(size=...)`` would step by ``in / out`` instead, which differs whenever the
rounded size is not exactly ``in * s`` (by up to 40 grey levels on COCO images); ATen's bilinear kernel given the
scale factor samples like OpenCV, so :func:`resize_like_opencv` calls it with both the rounded size and ``s``.
"""
from __future__ import annotations

import numpy as np
import torch

from butd.errors import ConfigError
from feature_extraction.images import check_resizable, resize_scale, resized_shape

Picture = np.ndarray | torch.Tensor  # H x W x 3 RGB uint8


def resize_like_opencv(image: torch.Tensor, factor: float, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a float [C, H, W] tensor to ``size`` sampled as OpenCV's ``resize`` with fx = fy =
    ``factor`` (source step ``1 / factor``, half-pixel centres, edge pixels replicated)."""
    batch = image.unsqueeze(0)
    return torch.ops.aten.upsample_bilinear2d(batch, list(size), False, factor, factor)[0]


def as_tensor(picture: Picture, index: int, device: torch.device) -> torch.Tensor:
    """An H x W x 3 uint8 RGB array or tensor as a tensor on ``device``; ConfigError for anything else."""
    shape, dtype = tuple(picture.shape), picture.dtype
    if len(shape) != 3 or shape[2] != 3 or dtype not in (np.uint8, torch.uint8):
        raise ConfigError(f"image {index}: expected an H x W x 3 uint8 RGB array, got {dtype} {list(shape)} "
                          "(use feature_extraction.images.load_image)")
    if isinstance(picture, np.ndarray):
        picture = torch.from_numpy(picture if picture.flags.writeable else picture.copy())
    return picture.to(device, non_blocking=True)


def network_input(picture: torch.Tensor, pixel_mean: torch.Tensor, factor: float,
                  size: tuple[int, int]) -> torch.Tensor:
    """One RGB uint8 H x W x 3 tensor -> the [3, h, w] float32 BGR, mean-subtracted, resized network input.

    Same order as the reference: mean subtraction first, then the resize.
    """
    bgr = picture.permute(2, 0, 1).flip(0).float() - pixel_mean
    return resize_like_opencv(bgr, factor, size)


def prepare_batch(pictures: list[Picture], *, pixel_mean: torch.Tensor, scale: int,
                  max_size: int) -> tuple[torch.Tensor, list[tuple[int, int]], list[float]]:
    """Pictures -> zero-padded batch [B, 3, H, W] on ``pixel_mean``'s device, each image's resized (h, w), and its
    resize factor."""
    device = pixel_mean.device
    tensors, sizes, factors = [], [], []
    for i, picture in enumerate(pictures):
        tensor = as_tensor(picture, i, device)
        height, width = int(tensor.shape[0]), int(tensor.shape[1])
        check_resizable(height, width, scale=scale, max_size=max_size, source=f"image {i}")
        factor = resize_scale(height, width, scale=scale, max_size=max_size)
        size = resized_shape(height, width, factor)
        tensors.append(network_input(tensor, pixel_mean, factor, size))
        sizes.append(size)
        factors.append(factor)
    height = max(h for h, _ in sizes)
    width = max(w for _, w in sizes)
    batch = torch.zeros(len(pictures), 3, height, width, device=device)
    for i, t in enumerate(tensors):
        batch[i, :, : t.shape[1], : t.shape[2]] = t
    return batch, sizes, factors
