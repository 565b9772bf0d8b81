"""The service's memory budget: work is admitted by the pixels it will decode, before anything is decoded.

Decoded images are what fills a captioning server's memory (a 36-megapixel PNG of 100 KB becomes 108 MB of RGB,
plus PIL's own 144 MB copy while it decodes), so requests are admitted by pixels, not by count. The app reads each
upload's header (PIL gives the size without decoding), asks the budget for the request's total pixels, and decodes
only once they are granted; the grant is held until the request's captions are answered, because its arrays wait in
the batcher's queue until then. A request that does not fit now gets 503 with ``Retry-After``; one with more pixels
than the whole budget could never fit and gets 413. Decoding itself runs at most ``max_decodes`` images at a time,
which bounds the decoders' temporary copies on top of the budget.
"""
from __future__ import annotations

import asyncio
import ctypes
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import BinaryIO, Self

from PIL import Image, UnidentifiedImageError

from butd.serve.limits import ApiError


@dataclass
class BudgetStats:
    """Counters for /healthz and the abuse benchmark."""

    pending_pixels: int = 0  # granted to requests not yet answered (decoding, queued or in the model)
    peak_pixels: int = 0
    decoding: int = 0  # images being decoded now
    admitted: int = 0  # requests granted since start
    refused: int = 0  # requests refused because the budget was full


class Grant:
    """Pixels granted to one request; ``release`` (or leaving the ``with`` block) gives them back, once."""

    def __init__(self, budget: PixelBudget, pixels: int) -> None:
        self._budget = budget
        self.pixels = pixels
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._budget._give_back(self.pixels)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()


class PixelBudget:
    """At most ``max_pixels`` decoded pixels admitted at once, and at most ``max_decodes`` decodes running.

    Used from one event loop (the server's); ``try_admit`` never waits: a full budget answers ``None`` at once.
    """

    def __init__(self, *, max_pixels: int, max_decodes: int) -> None:
        if max_pixels < 1 or max_decodes < 1:
            raise ValueError(f"PixelBudget: need max_pixels >= 1 and max_decodes >= 1 (got {max_pixels}, {max_decodes})")
        self.max_pixels = max_pixels
        self.max_decodes = max_decodes
        self.stats = BudgetStats()
        self._decode_slots: asyncio.Semaphore | None = None  # made on first use, inside the server's event loop

    def try_admit(self, pixels: int) -> Grant | None:
        """Grant ``pixels`` if they fit in what is left, else count a refusal and return None."""
        if pixels < 0:
            raise ValueError(f"PixelBudget.try_admit: negative pixel count {pixels}")
        if self.stats.pending_pixels + pixels > self.max_pixels:
            self.stats.refused += 1
            return None
        self.stats.pending_pixels += pixels
        self.stats.peak_pixels = max(self.stats.peak_pixels, self.stats.pending_pixels)
        self.stats.admitted += 1
        return Grant(self, pixels)

    @asynccontextmanager
    async def decode_slot(self) -> AsyncIterator[None]:
        """Wait for one of the ``max_decodes`` decode slots and hold it for the ``async with`` block."""
        if self._decode_slots is None:
            self._decode_slots = asyncio.Semaphore(self.max_decodes)
        async with self._decode_slots:
            self.stats.decoding += 1
            try:
                yield
            finally:
                self.stats.decoding -= 1

    def _give_back(self, pixels: int) -> None:
        self.stats.pending_pixels -= pixels


@dataclass(frozen=True)
class ImageHeader:
    """What an upload's header says, before anything is decoded."""

    width: int
    height: int
    format: str | None  # PIL's name of the format ("JPEG", "PNG", ...)


def read_image_header(source: BinaryIO, name: str, *, max_pixels: int) -> ImageHeader:
    """The size and format of the image in ``source`` from its header alone (PIL decodes nothing here).

    ``ApiError`` naming the file: 413 above ``max_pixels`` (decompression bombs included), 422 when it is not an
    image. The model service and the gallery both check uploads with it.
    """
    try:
        with Image.open(source) as image:  # PIL leaves a file object it did not open open
            header = ImageHeader(width=image.size[0], height=image.size[1], format=image.format)
    except Image.DecompressionBombError as err:
        raise ApiError(413, "too_many_pixels", f"{name}: {err}") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        raise ApiError(422, "undecodable_image", f"{name}: not an image this server can decode ({err})") from err
    if header.width * header.height > max_pixels:
        raise ApiError(413, "too_many_pixels", f"{name}: {header.width}x{header.height} = "
                       f"{header.width * header.height} pixels exceeds the limit of {max_pixels}")
    return header


def admit(budget: PixelBudget, names: Sequence[str], sizes: Sequence[tuple[int, int]], *,
          retry_after_s: int) -> Grant:
    """Grant a request's decoded pixels from ``budget``, or refuse it: 413 if it can never fit, else 503 busy
    with ``Retry-After``."""
    pixels = sum(width * height for width, height in sizes)
    if pixels > budget.max_pixels:
        what = names[0] if len(names) == 1 else f"the {len(names)} images of this request"
        raise ApiError(413, "too_many_pixels",
                       f"{what}: {pixels} pixels in all, more than the server decodes at once ({budget.max_pixels}); "
                       "send fewer or smaller images per request")
    grant = budget.try_admit(pixels)
    if grant is None:
        raise ApiError(503, "busy", f"the server is busy: {budget.stats.pending_pixels} of its {budget.max_pixels} "
                                    f"pixels are being captioned; retry in {retry_after_s} s",
                       headers={"Retry-After": str(retry_after_s)})
    return grant


# glibc's mallopt parameter number of M_MMAP_THRESHOLD (malloc.h).
_M_MMAP_THRESHOLD = -3


def return_large_frees_to_the_os(threshold_bytes: int = 1 << 20) -> bool:
    """Have glibc serve allocations of ``threshold_bytes`` or more with mmap, so that freeing them returns the memory.

    By default glibc raises its mmap threshold to the size of the largest block freed so far (up to 32 MB): after the
    first large image, PIL's 16 MB decode blocks come from per-thread heaps that keep the memory once freed, and the
    server's resident memory ratchets up with every decoding thread (measured in docs/service.md: 2.1 GB left after
    an attack, 0.9 GB with this). Setting the threshold explicitly turns that adjustment off. Returns False where the
    C library is not glibc (nothing is changed there).
    """
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(threshold_bytes)))
    except (OSError, AttributeError):
        return False
