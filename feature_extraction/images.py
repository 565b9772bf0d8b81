"""Image decoding for the detector: EXIF orientation, colour modes, size limits, and the test-time resize rule."""
from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from butd.errors import DataError

# Larger images are refused before decoding: 64 megapixels is already 100x a COCO image.
DEFAULT_MAX_PIXELS = 64_000_000
# After the test-time resize the network needs a few stride-16 cells on the shorter side.
MIN_RESIZED_SIDE = 32


class ImageError(DataError):
    """An image that cannot be used: unreadable, truncated, corrupt, too large or degenerate. ``reason`` says why."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


def _describe(src: object) -> str:
    if isinstance(src, (str, Path)):
        return str(src)
    if isinstance(src, (bytes, bytearray)):
        return f"<{len(src)} bytes>"
    return f"<{type(src).__name__}>"


def load_image(src: str | Path | bytes | Image.Image, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an image to an H x W x 3 RGB uint8 array, upright (EXIF orientation applied).

    Grayscale, CMYK, palette and 16-bit images are converted; transparency is composited on white. Raises
    :class:`ImageError` for unreadable, truncated or corrupt files and for images over ``max_pixels`` (checked from
    the header, before decoding, so a decompression bomb is never expanded).
    """
    name = _describe(src)
    with warnings.catch_warnings():
        # PIL warns (and later raises) about huge images itself; our own limit below is the one that applies.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = _open(src, name)
        try:
            with image:
                width, height = image.size
                if width < 1 or height < 1:
                    raise ImageError(name, f"empty image ({width}x{height})")
                if width * height > max_pixels:
                    raise ImageError(name, f"too large: {width}x{height} = {width * height} pixels exceeds the "
                                           f"limit of {max_pixels}")
                image.load()
                return _to_rgb(ImageOps.exif_transpose(image))
        except ImageError:
            raise
        except Image.DecompressionBombError as exc:
            raise ImageError(name, f"too large (decompression bomb guard): {exc}") from None
        except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
            # PIL reports truncated data ("image file is truncated"), broken streams and bad headers this way.
            raise ImageError(name, f"truncated or corrupt image data ({exc})") from None


def _open(src: str | Path | bytes | Image.Image, name: str) -> Image.Image:
    """Open lazily (reads the header only)."""
    if isinstance(src, Image.Image):
        return src.copy()
    try:
        return Image.open(io.BytesIO(bytes(src)) if isinstance(src, (bytes, bytearray)) else Path(src))
    except Image.DecompressionBombError as exc:
        raise ImageError(name, f"too large (decompression bomb guard): {exc}") from None
    except UnidentifiedImageError:
        raise ImageError(name, "not an image in a format PIL can read") from None
    except FileNotFoundError:
        raise ImageError(name, "file not found") from None
    except (SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise ImageError(name, f"corrupt image header ({exc})") from None
    except OSError as exc:
        raise ImageError(name, f"cannot read the file ({exc})") from None


def _to_rgb(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode == "RGB":
        rgb = image
    elif mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16/32-bit grayscale: keep the top 8 bits of 16-bit data (PIL's own conversion clips instead).
        values = np.asarray(image, dtype=np.int64)
        shift = 8 if mode.startswith("I;16") or values.max(initial=0) > 255 else 0
        gray = np.clip(values >> shift, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    elif mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(background, rgba).convert("RGB")
    else:  # L, 1, P, CMYK, YCbCr, LAB, HSV, F
        rgb = image.convert("RGB")
    return np.array(rgb, dtype=np.uint8)  # a writable copy


def resize_scale(height: int, width: int, *, scale: int, max_size: int) -> float:
    """The test-time resize factor: shortest side to ``scale`` unless the longest side would exceed ``max_size``.

    Same rule and rounding as py-faster-rcnn's ``_get_image_blob`` (``np.round`` of the longest side).
    """
    short, long = min(height, width), max(height, width)
    factor = float(scale) / float(short)
    if round(factor * long) > max_size:
        factor = float(max_size) / float(long)
    return factor


def resized_shape(height: int, width: int, factor: float) -> tuple[int, int]:
    """(height, width) after resizing by ``factor``, rounded like OpenCV's ``resize`` with fx/fy."""
    return max(1, round(height * factor)), max(1, round(width * factor))


def check_resizable(height: int, width: int, *, scale: int, max_size: int, source: str = "image") -> None:
    """Raise ImageError if the resized image would be too thin for the network (extreme aspect ratios)."""
    h, w = resized_shape(height, width, resize_scale(height, width, scale=scale, max_size=max_size))
    if min(h, w) < MIN_RESIZED_SIDE:
        raise ImageError(source, f"aspect ratio too extreme: {width}x{height} resizes to {w}x{h}, shorter side "
                                 f"below {MIN_RESIZED_SIDE} pixels")
