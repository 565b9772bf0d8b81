"""Start-up repair of the gallery's files against its rows (see ``butd.gallery.storage`` for the protocol).

After a kill at any point of an upload or a deletion, and after files were removed by hand, this brings the data
folder and the database back to "every row has its files, every file has its row":

- a row whose final file is missing but whose partial file exists was committed: the rename is completed;
- a row whose file is gone altogether is dropped (its bytes are given back to the quota), with a warning;
- partial files without rows (upload killed before its commit), final files without rows (deletion killed before
  the files went) and interrupted partial writes are deleted. Files of other shapes are left alone and reported.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sqlalchemy import select

from butd.gallery.db import Database
from butd.gallery.models import Image
from butd.gallery.storage import ImageFiles, UserFiles
from butd.gallery.store import Gallery

log = logging.getLogger("butd.gallery")


@dataclass
class ReconcileReport:
    completed: int = 0  # committed uploads whose renames were finished
    dropped_rows: int = 0  # rows whose files were lost
    removed_files: int = 0  # orphan final files, partial files and temporaries deleted
    unknown_files: list[str] = field(default_factory=list)  # files of no gallery shape, left in place

    @property
    def changed(self) -> bool:
        return bool(self.completed or self.dropped_rows or self.removed_files)


def reconcile(db: Database, files: ImageFiles, gallery: Gallery) -> ReconcileReport:
    """Repair ``files`` against the rows of ``db``; returns what was done."""
    report = ReconcileReport()
    on_disk = files.scan()  # before the rows are read: see the race notes in butd.gallery.storage
    with db.read() as session:
        owners = set(session.scalars(select(Image.user_id).distinct()))
    for user_id in sorted(owners | set(on_disk)):
        _reconcile_user(db, files, gallery, user_id, on_disk.get(user_id, UserFiles()), report)
    if report.changed:
        log.warning("reconciled the data folder with the database: %s", report)
    for name in report.unknown_files:
        log.warning("unexpected file in the gallery's data folder, left in place: %s", name)
    return report


def _reconcile_user(db: Database, files: ImageFiles, gallery: Gallery, user_id: int, found: UserFiles,
                    report: ReconcileReport) -> None:
    with db.read() as session:
        rows = session.execute(
            select(Image.id, Image.file_name, Image.thumb_name).where(Image.user_id == user_id)
        ).all()
    referenced: set[str] = set()
    broken: list[str] = []
    for row in rows:
        names = [row.file_name, row.thumb_name]
        referenced.update(names)
        for name in names:
            if files.path(user_id, name).exists():
                continue
            try:
                files.promote(user_id, [name])  # committed before the kill: finish its rename
                report.completed += 1
            except FileNotFoundError:
                broken.append(row.id)
    if broken:
        log.warning("user %d: %d image(s) lost their files; their rows are dropped", user_id, len(set(broken)))
        report.dropped_rows += gallery.remove_rows(user_id, sorted(set(broken)))
    orphans = (found.final | found.partial) - referenced
    files.discard(user_id, sorted(orphans))
    for name in found.temporary:
        files.remove_temporary(user_id, name)
    report.removed_files += len(orphans) + len(found.temporary)
    report.unknown_files += [f"{user_id}/{name}" for name in sorted(found.unknown)]
