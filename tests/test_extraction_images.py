"""feature_extraction.images: decoding real COCO images and every kind of bad or unusual image file."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from butd.errors import DataError
from feature_extraction.images import ImageError, check_resizable, load_image, resize_scale, resized_shape

COCO_IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco_images"


def coco_image(name: str = "COCO_val2014_000000273052.jpg") -> Path:
    path = COCO_IMAGES / name
    if not path.is_file():
        pytest.skip(f"shared COCO images not found at {COCO_IMAGES}")
    return path


def pattern(width: int = 64, height: int = 48) -> np.ndarray:
    """An asymmetric RGB test picture (a bright block in the top-left corner)."""
    img = np.zeros((height, width, 3), np.uint8)
    img[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    img[..., 1] = np.linspace(0, 255, height, dtype=np.uint8)[:, None]
    img[: height // 4, : width // 4] = 255
    return img


def png_bytes(image: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **kwargs)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with almost no pixel data (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_real_coco_jpeg_decodes_to_rgb_uint8():
    path = coco_image()
    img = load_image(path)
    with Image.open(path) as ref:
        expected = np.asarray(ref.convert("RGB"))
    assert img.dtype == np.uint8 and img.shape == expected.shape and img.flags.c_contiguous
    np.testing.assert_array_equal(img, expected)
    # bytes and PIL inputs give the same pixels
    np.testing.assert_array_equal(load_image(path.read_bytes()), img)
    with Image.open(path) as opened:
        np.testing.assert_array_equal(load_image(opened), img)


def test_exif_orientation_is_applied():
    original = pattern()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90-degree clockwise turn
    buf = io.BytesIO()
    Image.fromarray(original).save(buf, format="PNG", exif=exif)
    img = load_image(buf.getvalue())
    assert img.shape == (64, 48, 3)  # width and height swapped
    np.testing.assert_array_equal(img, np.rot90(original, k=-1))


def test_grayscale_is_replicated_on_three_channels():
    gray = pattern()[..., 1]
    img = load_image(png_bytes(Image.fromarray(gray, mode="L")))
    assert img.shape == (48, 64, 3)
    for c in range(3):
        np.testing.assert_array_equal(img[..., c], gray)


def test_sixteen_bit_grayscale_keeps_the_top_byte():
    values = (np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 21)
    img = load_image(png_bytes(Image.fromarray(values)))
    np.testing.assert_array_equal(img[..., 0], (values >> 8).astype(np.uint8))


def test_cmyk_jpeg_is_converted_to_rgb():
    cmyk = Image.new("CMYK", (40, 30), (0, 255, 255, 0))  # pure red in CMYK
    buf = io.BytesIO()
    cmyk.save(buf, format="JPEG", quality=95)
    img = load_image(buf.getvalue())
    assert img.shape == (30, 40, 3)
    assert img[..., 0].min() > 200 and img[..., 1].max() < 60 and img[..., 2].max() < 60


def test_alpha_is_composited_on_white():
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 2] = 255  # blue
    rgba[:, :15, 3] = 255  # left half opaque, right half fully transparent
    img = load_image(png_bytes(Image.fromarray(rgba, mode="RGBA")))
    np.testing.assert_array_equal(img[:, :15], np.broadcast_to([0, 0, 255], (20, 15, 3)))
    np.testing.assert_array_equal(img[:, 15:], np.full((20, 15, 3), 255))


def test_palette_with_transparency_is_composited_on_white():
    pal = Image.new("P", (10, 10), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.info["transparency"] = 1  # palette entry 1 (green) is transparent
    img = load_image(png_bytes(pal, transparency=1))
    np.testing.assert_array_equal(img, np.full((10, 10, 3), 255))


def test_truncated_jpeg_is_refused_with_the_reason(tmp_path):
    data = coco_image().read_bytes()
    bad = tmp_path / "cut.jpg"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageError) as err:
        load_image(bad)
    assert "truncated" in err.value.reason and str(bad) in str(err.value)
    assert isinstance(err.value, DataError)


def test_random_bytes_are_not_an_image(tmp_path):
    bad = tmp_path / "noise.jpg"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ImageError, match="not an image"):
        load_image(bad)


def test_corrupt_jpeg_stream_is_refused():
    data = bytearray(coco_image().read_bytes())
    data[600:4000] = b"\xff" * 3400  # scan data replaced by markers
    with pytest.raises(ImageError):
        load_image(bytes(data))


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="file not found"):
        load_image(tmp_path / "nope.jpg")


def test_decompression_bomb_header_is_refused_before_decoding():
    with pytest.raises(ImageError, match="too large"):
        load_image(png_header_only(60_000, 60_000))  # 3.6 gigapixels: PIL's own bomb guard trips
    with pytest.raises(ImageError, match="exceeds the limit"):
        load_image(png_header_only(10_000, 10_000))  # 100 megapixels: over our default limit
    with pytest.raises(ImageError, match="exceeds the limit of 1000"):
        load_image(png_bytes(Image.fromarray(pattern())), max_pixels=1000)


def test_resize_rule_matches_the_reference():
    assert resize_scale(480, 640, scale=600, max_size=1000) == 1.25
    assert resized_shape(480, 640, 1.25) == (600, 800)
    assert resize_scale(500, 2000, scale=600, max_size=1000) == 0.5  # longest side capped at 1000
    check_resizable(480, 640, scale=600, max_size=1000)
    with pytest.raises(ImageError, match="aspect ratio"):
        check_resizable(1, 5000, scale=600, max_size=1000, source="strip.png")
