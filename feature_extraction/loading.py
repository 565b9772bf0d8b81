"""Reading images for extraction in DataLoader workers that die with their parent, with optional device decoding.

Decoding: by default each worker decodes its images with PIL (:func:`feature_extraction.images.load_image`). With
``decode="device"`` the workers only read the files and check their headers, and the main process decodes the
baseline RGB JPEGs of a batch in one ``torchvision.io.decode_jpeg(..., device=...)`` call (nvJPEG on CUDA). Any
other file (PNG, CMYK or grayscale JPEG, an EXIF rotation) is decoded by the worker as usual, and a file the device
decoder rejects falls back to PIL.

Orphans: a worker killed with its parent's ``kill -9`` must not live on. On Linux each worker asks the kernel for
SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``); everywhere a daemon thread also polls the parent's pid
and exits the worker once the parent is gone (PyTorch's own check only runs between two batches, so a worker
blocked on a slow file was seen to survive for minutes).
"""
from __future__ import annotations

import ctypes
import functools
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from feature_extraction.images import ImageError, check_resizable, load_image
from feature_extraction.sources import ImageItem

log = logging.getLogger(__name__)

DECODERS = ("workers", "device")
_PR_SET_PDEATHSIG = 1
_PARENT_POLL_SECONDS = 0.5


@dataclass
class Loaded:
    """A decoded image, the raw bytes of a JPEG left to the device decoder, or why the image cannot be used."""

    item: ImageItem
    image: np.ndarray | torch.Tensor | None
    reason: str | None
    jpeg: bytes | None = None


class ImageDataset(Dataset):
    """Reads images in DataLoader workers; a bad image becomes a ``Loaded`` with a reason, never an exception."""

    def __init__(self, items: list[ImageItem], *, max_pixels: int, scale: int, max_size: int,
                 decode: str = "workers") -> None:
        self.items, self.max_pixels, self.scale, self.max_size = items, max_pixels, scale, max_size
        self.decode = decode

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Loaded:
        item = self.items[index]
        try:
            if self.decode == "device":
                data = item.path.read_bytes()
                if _device_decodable(data, self.max_pixels, self.scale, self.max_size):
                    return Loaded(item, None, None, jpeg=data)
                image = load_image(data, max_pixels=self.max_pixels)
            else:
                image = load_image(item.path, max_pixels=self.max_pixels)
            check_resizable(image.shape[0], image.shape[1], scale=self.scale, max_size=self.max_size,
                            source=str(item.path))
        except ImageError as exc:
            return Loaded(item, None, exc.reason)
        except OSError as exc:
            return Loaded(item, None, f"cannot read the file ({exc})")
        return Loaded(item, image, None)


def _device_decodable(data: bytes, max_pixels: int, scale: int, max_size: int) -> bool:
    """True for a baseline-style colour JPEG that needs no rotation and passes the size checks (header only)."""
    import io

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            upright = image.getexif().get(0x0112, 1) == 1
            fits = 0 < width * height <= max_pixels
            if fits:
                check_resizable(height, width, scale=scale, max_size=max_size)
            return image.format == "JPEG" and image.mode == "RGB" and upright and fits
    except Exception:  # anything unusual is left to the worker's full decode, which reports it properly
        return False


def decode_on_device(batch: list[Loaded], device: torch.device, *, max_pixels: int) -> None:
    """Decode the batch's JPEG bytes on ``device`` in place (H x W x 3 RGB uint8 tensors); PIL where it fails."""
    with warnings.catch_warnings():  # torchvision >= 0.29 announces a move of its decoders to TorchCodec
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

    pending = [entry for entry in batch if entry.jpeg is not None]
    if not pending:
        return
    data = [torch.frombuffer(bytearray(entry.jpeg), dtype=torch.uint8) for entry in pending]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as exc:
        log.warning("device JPEG decoding failed for a batch (%s); decoding it with PIL", exc)
        decoded = [None] * len(pending)
    for entry, image in zip(pending, decoded):
        if image is not None:
            entry.image = image.permute(1, 2, 0)
        else:
            try:
                entry.image = load_image(entry.jpeg, max_pixels=max_pixels)
            except ImageError as exc:
                entry.reason = exc.reason
        entry.jpeg = None


def die_with_parent(worker_id: int, *, parent_pid: int, forked: bool) -> None:
    """``worker_init_fn``: end this worker when the process that started the DataLoader (``parent_pid``) dies.

    ``forked``: the worker is a direct child of that process (the "fork" start method), so a change of
    ``os.getppid()`` means the parent is gone; otherwise the parent's pid is probed.
    """
    if forked and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watchdog below still applies
    if not _parent_alive(parent_pid, forked):  # the parent died before prctl took effect
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid, forked), name="parent-watchdog", daemon=True).start()


def _parent_alive(pid: int, forked: bool) -> bool:
    if forked:
        return os.getppid() == pid  # an orphan is re-parented at once, even while its parent is an unreaped zombie
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie still answers kill(0); on Linux its state says it is dead
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return True


def _watch_parent(parent_pid: int, forked: bool) -> None:
    while _parent_alive(parent_pid, forked):
        time.sleep(_PARENT_POLL_SECONDS)
    os._exit(1)


def _collate(batch: list[Loaded]) -> list[Loaded]:
    return batch


def make_loader(dataset: Dataset, *, batch_size: int, num_workers: int) -> DataLoader:
    """An in-order DataLoader of ``Loaded`` lists whose workers die with this process."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_collate,
                      prefetch_factor=4 if num_workers > 0 else None,
                      worker_init_fn=functools.partial(die_with_parent, parent_pid=os.getpid(),
                                                       forked=multiprocessing.get_start_method() == "fork"))
