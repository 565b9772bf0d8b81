"""The image files of the gallery, under ``DATA_DIR/images/<user id>/``, with server-generated names only.

An upload is all-or-nothing per image, also across a kill at any instant:

1. the image and its thumbnail are written (atomically, fsynced) as ``.<name>.partial``;
2. their rows are inserted in one transaction;
3. the partial files are renamed to their final names.

A deletion removes the rows first, then the files. So a final file always has its row, except for leftovers of a
deletion; and a row whose final file is missing still has its partial file (killed between 2 and 3). ``reconcile``
repairs both at start-up: it completes the renames of committed uploads, deletes the partial files of uncommitted
ones and the files whose rows are gone, and drops rows whose files were lost (removed by hand). It is safe while
other instances run: an upload whose partial file disappears under it fails and takes its rows back.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from butd.core.files import rename_durably, write_atomic

log = logging.getLogger("butd.gallery")
PARTIAL = ".partial"
# Only files of these shapes are ever created (or deleted) here: <32 hex>[.thumb].<ext>, their partial files and
# the temporaries write_atomic makes for those.
FINAL_NAME = re.compile(r"[0-9a-f]{32}(\.thumb)?\.(jpg|png|gif|webp|bmp)")
PARTIAL_NAME = re.compile(rf"\.({FINAL_NAME.pattern}){re.escape(PARTIAL)}")
TEMP_NAME = re.compile(rf"\.{PARTIAL_NAME.pattern}\..+\.tmp")


@dataclass
class UserFiles:
    """What one user's folder holds, by kind (names only)."""

    final: set[str] = field(default_factory=set)
    partial: set[str] = field(default_factory=set)  # final names whose partial file exists
    temporary: set[str] = field(default_factory=set)  # file names of interrupted partial writes
    unknown: set[str] = field(default_factory=set)


class ImageFiles:
    """The folder of image files; every method takes server-generated names (checked against ``FINAL_NAME``)."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir) / "images"
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, user_id: int, name: str) -> Path:
        if not FINAL_NAME.fullmatch(name):
            raise ValueError(f"not a gallery file name: {name!r}")
        return self.root / str(int(user_id)) / name

    def partial_path(self, user_id: int, name: str) -> Path:
        final = self.path(user_id, name)
        return final.with_name(f".{name}{PARTIAL}")

    def write_partial(self, user_id: int, name: str, data: bytes) -> None:
        """Step 1: the content under its partial name, complete and on disk before any row refers to it."""
        write_atomic(self.partial_path(user_id, name), data)

    def promote(self, user_id: int, names: list[str]) -> None:
        """Step 3: rename partial files to their final names. Raises ``FileNotFoundError`` if one vanished (another
        instance's reconcile removed it before the rows were committed)."""
        for name in names:
            try:
                rename_durably(self.partial_path(user_id, name), self.path(user_id, name))
            except FileNotFoundError:
                if not self.path(user_id, name).exists():  # not renamed by a concurrent reconcile either
                    raise

    def discard(self, user_id: int, names: list[str]) -> None:
        """Remove final and partial files of ``names`` (missing ones are fine). Best effort: a file that cannot be
        removed now is logged, and the next start-up's reconcile removes it."""
        for name in names:
            for path in (self.path(user_id, name), self.partial_path(user_id, name)):
                try:
                    path.unlink(missing_ok=True)
                except OSError as err:
                    log.warning("cannot remove %s (%s); it goes at the next start-up", path, err)

    def scan(self) -> dict[int, UserFiles]:
        """Every user folder and what it holds."""
        found: dict[int, UserFiles] = {}
        for folder in sorted(self.root.iterdir()):
            if not (folder.is_dir() and folder.name.isdigit()):
                continue
            files = found.setdefault(int(folder.name), UserFiles())
            for entry in folder.iterdir():
                name = entry.name
                if FINAL_NAME.fullmatch(name):
                    files.final.add(name)
                elif TEMP_NAME.fullmatch(name):
                    files.temporary.add(name)
                elif match := PARTIAL_NAME.fullmatch(name):
                    files.partial.add(match.group(1))
                else:
                    files.unknown.add(name)
        return found

    def remove_temporary(self, user_id: int, file_name: str) -> None:
        if TEMP_NAME.fullmatch(file_name):
            (self.root / str(int(user_id)) / file_name).unlink(missing_ok=True)
