"""A user's gallery in the database and on disk: add (all-or-nothing per image), list, search, favourite, delete.

Every query is scoped by the owner's id, so another user's image is simply not found (404), exactly like an image
that never existed. The quota is kept in ``users.used_bytes``, reserved by one conditional UPDATE in the same
transaction that inserts the rows, so concurrent uploads of one user cannot overshoot it.
"""
from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from butd.gallery.db import Database
from butd.gallery.models import Image, User, utc
from butd.gallery.settings import GallerySettings
from butd.gallery.storage import ImageFiles
from butd.serve.limits import ApiError

IMAGE_ID = re.compile(r"[0-9a-f]{32}")
MAX_SEARCH_WORDS = 8


@dataclass(frozen=True, kw_only=True)
class NewImage:
    """One checked, captioned upload, ready to be stored."""

    original_name: str
    content_type: str
    extension: str  # of the stored file: jpg, png, gif, webp or bmp
    data: bytes
    thumbnail: bytes  # JPEG
    width: int
    height: int
    caption: dict[str, Any]  # ImageCaption.to_json()
    beam_size: int
    model: str


@dataclass(frozen=True)
class Page:
    images: list[Image]
    total: int  # images matching the filters, on every page
    next_cursor: str | None


def search_words(query: str | None) -> list[str]:
    """The words of a search box, lower case (at most ``MAX_SEARCH_WORDS``, 40 characters each)."""
    return [word[:40] for word in re.findall(r"[\w']+", (query or "").lower())][:MAX_SEARCH_WORDS]


def not_found(image_id: str) -> ApiError:
    return ApiError(404, "not_found", f"no image {image_id[:40]!r} in your gallery")


class Gallery:
    """The stored images of every user (``db`` rows + ``files``), always addressed through their owner."""

    def __init__(self, *, db: Database, files: ImageFiles, settings: GallerySettings) -> None:
        self.db = db
        self.files = files
        self.settings = settings

    def add(self, user_id: int, items: list[NewImage]) -> list[Image]:
        """Store ``items`` for the user: all of them or, on any failure (quota included), none."""
        now = utc(self.settings.clock())
        rows = [self._row(user_id, item, now) for item in items]
        names = [name for row in rows for name in (row.file_name, row.thumb_name)]
        total = sum(row.bytes for row in rows)
        try:
            for row, item in zip(rows, items):
                self.files.write_partial(user_id, row.file_name, item.data)
                self.files.write_partial(user_id, row.thumb_name, item.thumbnail)
            with self.db.write() as session:
                self._reserve(session, user_id, total, len(rows))
                session.add_all(rows)
        except OSError as err:  # disk full, folder not writable: nothing is kept, and the client is told why
            self.files.discard(user_id, names)
            raise ApiError(503, "storage_unavailable", f"the server cannot write its data folder "
                                                       f"({err.strerror or err}); nothing was stored") from err
        except BaseException:
            self.files.discard(user_id, names)
            raise
        try:
            self.files.promote(user_id, names)
        except FileNotFoundError:
            self.remove_rows(user_id, [row.id for row in rows])
            self.files.discard(user_id, names)
            raise ApiError(503, "storage_conflict", "the upload collided with another server's clean-up; "
                                                    "send it again") from None
        return rows

    def page(self, user_id: int, *, limit: int, cursor: str | None = None, query: str | None = None,
             favourites: bool = False) -> Page:
        """Newest first; ``cursor`` (from the previous page) continues after its last image."""
        filters = [Image.user_id == user_id]
        if favourites:
            filters.append(Image.favourite.is_(True))
        for word in search_words(query):
            escaped = word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            filters.append(Image.search_text.like(f"% {escaped}%", escape="\\"))  # a word starting so
        before = _cursor_seq(cursor)
        with self.db.read() as session:
            total = session.scalar(select(func.count()).select_from(Image).where(*filters)) or 0
            if before is not None:
                filters.append(Image.seq < before)
            rows = list(session.scalars(select(Image).where(*filters).order_by(Image.seq.desc()).limit(limit + 1)))
        more = len(rows) > limit
        return Page(images=rows[:limit], total=total, next_cursor=str(rows[limit - 1].seq) if more else None)

    def get(self, user_id: int, image_id: str) -> Image:
        """The user's image ``image_id``; 404 ``not_found`` if there is none (whoever else may own that id)."""
        if not IMAGE_ID.fullmatch(image_id):
            raise not_found(image_id)
        with self.db.read() as session:
            row = session.scalars(select(Image).where(Image.id == image_id, Image.user_id == user_id)).first()
        if row is None:
            raise not_found(image_id)
        return row

    def set_favourite(self, user_id: int, image_id: str, favourite: bool) -> Image:
        if not IMAGE_ID.fullmatch(image_id):
            raise not_found(image_id)
        with self.db.write() as session:
            row = session.scalars(select(Image).where(Image.id == image_id, Image.user_id == user_id)).first()
            if row is None:
                raise not_found(image_id)
            row.favourite = favourite
        return row

    def delete(self, user_id: int, image_id: str) -> None:
        """Remove the row (and give back its bytes), then the files."""
        if not IMAGE_ID.fullmatch(image_id) or not self.remove_rows(user_id, [image_id]):
            raise not_found(image_id)

    def clear(self, user_id: int) -> int:
        """Remove every image of the user (rows, images, thumbnails); returns how many there were."""
        return self.remove_rows(user_id, None)

    def check_room(self, user_id: int, incoming: int, count: int) -> None:
        """413 ``quota_exceeded`` if ``incoming`` more bytes would not fit (a cheap early refusal; ``add`` decides)."""
        used = self.used_bytes(user_id)
        if used + incoming > self.settings.quota_bytes:
            raise _quota_error(count, incoming, used, self.settings.quota_bytes)

    def used_bytes(self, user_id: int) -> int:
        with self.db.read() as session:
            return int(session.scalar(select(User.used_bytes).where(User.id == user_id)) or 0)

    def _row(self, user_id: int, item: NewImage, now: Any) -> Image:
        image_id = secrets.token_hex(16)
        caption = item.caption
        return Image(
            id=image_id, user_id=user_id, created_at=now, original_name=item.original_name[:255] or "upload",
            file_name=f"{image_id}.{item.extension}", thumb_name=f"{image_id}.thumb.jpg",
            content_type=item.content_type, width=item.width, height=item.height,
            bytes=len(item.data) + len(item.thumbnail), caption=caption["caption"],
            search_text=f" {' '.join(caption['caption'].lower().split())} ", logprob=float(caption["logprob"]),
            beam_size=item.beam_size, model=item.model[:255], favourite=False,
            result={key: caption[key] for key in ("alternatives", "regions", "words")},
        )

    def _reserve(self, session: Session, user_id: int, total: int, count: int) -> None:
        quota = self.settings.quota_bytes
        reserved = session.execute(
            update(User).where(User.id == user_id, User.used_bytes + total <= quota)
            .values(used_bytes=User.used_bytes + total)
        ).rowcount
        if reserved != 1:
            used = session.scalar(select(User.used_bytes).where(User.id == user_id)) or 0
            raise _quota_error(count, total, used, quota)

    def remove_rows(self, user_id: int, image_ids: list[str] | None) -> int:
        """Delete the user's rows (all of them when ``image_ids`` is None) and then their files; returns the count."""
        statement = delete(Image).where(Image.user_id == user_id)
        if image_ids is not None:
            statement = statement.where(Image.id.in_(image_ids))
        with self.db.write() as session:
            removed = session.execute(statement.returning(Image.file_name, Image.thumb_name, Image.bytes)).all()
            freed = sum(row.bytes for row in removed)
            if freed:
                session.execute(update(User).where(User.id == user_id).values(used_bytes=User.used_bytes - freed))
        # A kill here leaves files without rows: reconcile removes them at the next start.
        self.files.discard(user_id, [name for row in removed for name in (row.file_name, row.thumb_name)])
        return len(removed)


def _cursor_seq(cursor: str | None) -> int | None:
    if cursor is None or cursor == "":
        return None
    if not cursor.isdigit() or len(cursor) > 19:
        raise ApiError(422, "invalid_cursor", "cursor must be the next_cursor of a previous page")
    return int(cursor)


def _quota_error(count: int, incoming: int, used: int, quota: int) -> ApiError:
    return ApiError(413, "quota_exceeded", f"storing {count} more image(s) ({_mb(incoming)}) would exceed your storage "
                                           f"quota: {_mb(used)} of {_mb(quota)} used. Delete some images first")


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"
