"""Alembic environment: migrates the connection ``Database.migrate`` hands over, or the ``sqlalchemy.url`` option
(or ``-x url=...`` on Alembic's command line).

To write a new revision after changing ``butd/gallery/models.py`` (autogenerate compares the models with a database
at the newest revision; review the file it writes, then add a test):

    from alembic import command
    from alembic.config import Config
    config = Config()
    config.set_main_option("script_location", "butd/gallery/migrations")
    config.set_main_option("sqlalchemy.url", "sqlite:///scratch.db")
    command.upgrade(config, "head")
    command.revision(config, message="what changed", autogenerate=True)
"""
from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from butd.gallery.models import Base

config = context.config


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _migrate(connection)
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("give the database as: alembic -x url=sqlite:///gallery.db ...")
    engine = create_engine(url)
    with engine.begin() as connection:
        _migrate(connection)
    engine.dispose()


def _migrate(connection) -> None:
    # render_as_batch: SQLite cannot ALTER most things in place; batch mode rebuilds the table instead.
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                      compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


run()
