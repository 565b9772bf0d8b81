"""Checking an uploaded image and preparing what the gallery stores: the file, a thumbnail and the pixels.

The checks are those of the model service, with its limits: the content type, the pixel count read from the header
before anything is decoded (decompression bombs), decodability. Browser-displayable formats (JPEG, PNG, GIF, WebP,
BMP) are stored as uploaded; anything else PIL can read is stored as PNG of the decoded pixels. Decoding (EXIF
rotation, colour modes) is the detector package's (``feature_extraction.images``), as in the model service.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from feature_extraction.images import ImageError, load_image

from butd.serve.admission import read_image_header
from butd.serve.app import ACCEPTED_TYPES
from butd.serve.limits import ApiError

KEPT_FORMATS = {"JPEG": ("jpg", "image/jpeg"), "PNG": ("png", "image/png"), "GIF": ("gif", "image/gif"),
                "WEBP": ("webp", "image/webp"), "BMP": ("bmp", "image/bmp")}


@dataclass(frozen=True, kw_only=True)
class PreparedImage:
    """An accepted upload: what is stored, what the model sees, and the thumbnail."""

    name: str  # the client's file name, for messages and display only
    data: bytes  # the file to store (and to send to a remote model service)
    extension: str
    content_type: str
    pixels: np.ndarray  # H x W x 3 uint8 RGB, EXIF-rotated: what an in-process model captions
    thumbnail: bytes  # JPEG, longest side at most the thumbnail size

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])


def check_content_type(name: str, content_type: str | None) -> None:
    kind = (content_type or "").lower()
    if not kind.startswith(ACCEPTED_TYPES):
        raise ApiError(415, "unsupported_media_type", f"{name}: content type {kind or '(none)'} is not an image")


def prepare_image(name: str, data: bytes, *, max_pixels: int, thumbnail_size: int) -> PreparedImage:
    """Check and decode one upload (call it off the event loop); 413/422 ``ApiError`` naming the file if refused."""
    if not data:
        raise ApiError(422, "empty_file", f"{name}: the file is empty")
    image_format = read_image_header(io.BytesIO(data), name, max_pixels=max_pixels).format
    try:
        pixels = load_image(data, max_pixels=max_pixels)
    except ImageError as err:
        raise ApiError(422, "undecodable_image", f"{name}: {err.reason}") from err
    if image_format in KEPT_FORMATS:
        extension, content_type = KEPT_FORMATS[image_format]
        stored = data
    else:
        extension, content_type = KEPT_FORMATS["PNG"]
        stored = _encode(Image.fromarray(pixels), "PNG")
    thumb = Image.fromarray(pixels)
    thumb.thumbnail((thumbnail_size, thumbnail_size), Image.Resampling.LANCZOS)
    return PreparedImage(name=name, data=stored, extension=extension, content_type=content_type, pixels=pixels,
                         thumbnail=_encode(thumb, "JPEG", quality=85))


def _encode(image: Image.Image, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()
