"""The captioning gallery: accounts, each user's captioned images (searchable, favourites, deletion) on a real
database (SQLAlchemy 2 + Alembic; SQLite by default, PostgreSQL by URL), and its page.

Run it with ``tools/gallery.py --database sqlite:///gallery/gallery.db --data-dir gallery/ ...``; see
docs/service.md ("Gallery").
"""
from __future__ import annotations

from butd.gallery.app import create_gallery_app
from butd.gallery.model_client import LocalModel, RemoteModel
from butd.gallery.settings import GallerySettings, ThrottlePolicy

__all__ = ["GallerySettings", "LocalModel", "RemoteModel", "ThrottlePolicy", "create_gallery_app"]
