"""The database connection: SQLite (the embedded default, one file) or PostgreSQL (several gallery instances).

``Database.read()`` and ``Database.write()`` give ORM sessions whose transaction commits when the block ends. On
SQLite a write transaction starts with ``BEGIN IMMEDIATE``, so it takes the write lock up front and waits for it
(``busy_timeout``) instead of failing with "database is locked" when it upgrades from reading to writing; the file
runs in WAL mode so readers are never blocked. ``migrate()`` brings the schema to the newest Alembic revision.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.orm import Session, sessionmaker

from butd.errors import ConfigError

log = logging.getLogger("butd.gallery")
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_WRITE = "butd_write"
_MIGRATION_LOCK = 0x6275_7464  # "butd": PostgreSQL advisory lock held while one instance migrates


class Database:
    """One engine and its session factories for ``url`` (``sqlite:///PATH`` or ``postgresql+psycopg://...``)."""

    def __init__(self, url: str, *, pool_size: int = 8) -> None:
        try:
            parsed = make_url(url)
        except ArgumentError as err:
            raise ConfigError(f"--database {url!r} is not a database URL (e.g. sqlite:///gallery.db): {err}") from None
        self.dialect = parsed.get_backend_name()
        options: dict[str, Any] = {"pool_pre_ping": True}
        if self.dialect == "sqlite":
            if not parsed.database or parsed.database == ":memory:":
                raise ConfigError(f"--database {url!r}: give a file, e.g. sqlite:///gallery/gallery.db")
            folder = Path(parsed.database).expanduser().parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise ConfigError(f"--database {url!r}: cannot create its folder {folder} ({err})") from None
            options["connect_args"] = {"check_same_thread": False}
        elif self.dialect == "postgresql":
            options.update(pool_size=pool_size, max_overflow=pool_size)
        else:
            raise ConfigError(f"--database {url!r}: only sqlite:/// and postgresql+psycopg:// URLs are supported")
        try:
            self.engine: Engine = create_engine(parsed, **options)
        except (NoSuchModuleError, ModuleNotFoundError) as err:
            raise ConfigError(f"--database {url!r}: driver missing ({err}); pip install 'butd[gallery]'") from None
        if self.dialect == "sqlite":
            _configure_sqlite(self.engine)
        self.safe_url = parsed.render_as_string(hide_password=True)
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        self._write = sessionmaker(self.engine.execution_options(**{_WRITE: True}), expire_on_commit=False)

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for queries; its transaction ends (rolled back: nothing to keep) with the block."""
        with self._read() as session:
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A session whose transaction commits when the block ends, or rolls back if it raises."""
        with self._write() as session, session.begin():
            yield session

    def migrate(self) -> str:
        """Create or upgrade the schema to the newest migration; returns the revision now in place."""
        from alembic import command
        from alembic.config import Config
        from alembic.runtime.migration import MigrationContext

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.execution_options(**{_WRITE: True}).begin() as connection:
            if self.dialect == "postgresql":  # instances starting together migrate one after the other
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
            revision = MigrationContext.configure(connection).get_current_revision()
        log.info("database %s at migration %s", self.safe_url, revision)
        return str(revision)

    def ping(self) -> bool:
        """Whether the database answers a trivial query."""
        try:
            with self.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            return True
        except Exception:  # noqa: BLE001 - reported as "unreachable" by /healthz
            log.exception("database %s does not answer", self.safe_url)
            return False

    def dispose(self) -> None:
        self.engine.dispose()


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # the driver's own BEGIN is replaced by the one below
        cursor = dbapi_connection.cursor()
        for pragma in ("journal_mode=WAL", "foreign_keys=ON", "busy_timeout=30000", "synchronous=FULL"):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        immediate = connection.get_execution_options().get(_WRITE, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
