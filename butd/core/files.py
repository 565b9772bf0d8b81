"""The one atomic file write of butd, and the removal of what a killed write leaves behind.

Every file butd writes for a user (checkpoints, configs, results, metrics, DATA_DIR files, figures, weights) goes
through :func:`write_atomic`: the content is written to a temporary file in the same folder (so the rename cannot
cross file systems), flushed to disk, then renamed over the destination, and the folder entry is flushed too. A
reader therefore sees either the old file or the new one, never half of one, even after a power loss.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

TEMP_SUFFIX = ".tmp"

Content = bytes | str | Callable[[Path], None]


def write_atomic(path: str | Path, content: Content) -> Path:
    """Replace ``path`` atomically with ``content``; returns ``path``.

    ``content`` is bytes, text (written as UTF-8), or a function that writes the file at the temporary path it is
    given (``torch.save``, ``h5py``, ``PIL.Image.save`` ...). The temporary name is unique
    (``.NAME.<random>.tmp``), so concurrent writers never share one; it is removed if writing fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    tmp = Path(tmp_name)
    try:
        if callable(content):
            os.close(fd)
            fd = -1
            content(tmp)
        else:
            data = content.encode("utf-8") if isinstance(content, str) else content
            with os.fdopen(fd, "wb") as handle:
                fd = -1
                handle.write(data)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def rename_durably(source: str | Path, destination: str | Path) -> None:
    """Rename ``source`` (a file, or a folder over an empty one) to ``destination``, atomically within one file
    system, and flush the folder entry so the rename survives a power loss. For files already complete on disk (e.g. written by :func:`write_atomic` under
    another name): the gallery's two-phase uploads publish their files this way."""
    os.replace(source, destination)
    _fsync_dir(Path(destination).parent)


def write_json_atomic(path: str | Path, document: Any, **dump_options: Any) -> Path:
    """:func:`write_atomic` of ``json.dumps(document, **dump_options)``."""
    return write_atomic(path, json.dumps(document, **dump_options))


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete the temporary files a killed :func:`write_atomic` of ``path`` left beside it; returns them.

    Call it only when no other process is writing ``path`` (for example at the start of a run that owns it).
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    stale = sorted(path.parent.glob(f".{_glob_escape(path.name)}.*{TEMP_SUFFIX}"))
    for leftover in stale:
        leftover.unlink(missing_ok=True)
    return stale


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the folder entry is flushed (POSIX); some file systems refuse: ignore.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
