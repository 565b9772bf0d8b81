"""The gallery's tables (SQLAlchemy 2 declarative models). Schema changes go through Alembic migrations.

``users`` (with the bytes they store, for the quota), ``sessions`` (only a hash of each session token),
``images`` (one row per stored image: its files, caption and attention) and ``login_throttle`` (failed logins
per user name and per client address).
"""
from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit identity.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class UtcDateTime(TypeDecorator):
    """A timezone-aware UTC datetime on every backend (SQLite hands back naive values: they are UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("UtcDateTime: naive datetime (give a timezone-aware one)")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utc(seconds: float) -> datetime:
    """A clock reading (seconds since the epoch) as an aware UTC datetime."""
    return datetime.fromtimestamp(seconds, UTC)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("username", name="uq_users_username"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    username: Mapped[str] = mapped_column(String(32))  # lower case, validated
    password_hash: Mapped[str] = mapped_column(String(255))  # argon2id, PHC string
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    used_bytes: Mapped[int] = mapped_column(BigInteger, default=0)  # images + thumbnails; the quota bounds it


class AuthSession(Base):
    __tablename__ = "sessions"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 of the cookie's token
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)


class Image(Base):
    __tablename__ = "images"
    __table_args__ = (
        Index("ix_images_user_seq", "user_id", "seq"),
        Index("ix_images_user_favourite_seq", "user_id", "favourite", "seq"),
        UniqueConstraint("id", name="uq_images_id"),
        {"sqlite_autoincrement": True},  # sequence numbers never reused: they order the gallery
    )

    seq: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(32))  # public, random: nothing to enumerate
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    original_name: Mapped[str] = mapped_column(String(255))  # what the client called it: shown, never a path
    file_name: Mapped[str] = mapped_column(String(64))  # server-generated, under the user's folder
    thumb_name: Mapped[str] = mapped_column(String(64))
    content_type: Mapped[str] = mapped_column(String(32))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    bytes: Mapped[int] = mapped_column(BigInteger)  # file + thumbnail, counted against the quota
    caption: Mapped[str] = mapped_column(Text)
    search_text: Mapped[str] = mapped_column(Text)  # " word word ... " for word-prefix search
    logprob: Mapped[float] = mapped_column(Float)
    beam_size: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(255))  # which model produced the caption
    favourite: Mapped[bool] = mapped_column(Boolean, default=False)
    result: Mapped[dict[str, Any]] = mapped_column(JSON)  # alternatives, regions, words with attention


class LoginThrottle(Base):
    __tablename__ = "login_throttle"

    key: Mapped[str] = mapped_column(String(320), primary_key=True)  # "user:NAME" or "ip:ADDRESS"
    failures: Mapped[int] = mapped_column(Integer)
    last_attempt: Mapped[datetime] = mapped_column(UtcDateTime)
