"""Alembic migrations of the gallery's schema (run by ``butd.gallery.db.Database.migrate``)."""
