"""Slowing down repeated failed log-ins, per user name and per client address, in the database.

Every attempt is counted *before* the password is checked (and forgiven after a success), so parallel guesses
cannot slip past the count while a hash is being verified. A key over its free failures stays blocked for a delay
that doubles with each further failure (``ThrottlePolicy``); a blocked attempt is refused with 429 and
``Retry-After`` whether or not its password is right, and is not counted. Unknown user names are counted exactly
like known ones, so the throttle says nothing about which accounts exist.
"""
from __future__ import annotations

import math
from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from butd.gallery.models import LoginThrottle, utc
from butd.gallery.settings import ThrottlePolicy
from butd.serve.limits import ApiError


class Throttled(ApiError):
    """Too many failed log-ins for this user name or address: retry after ``retry_after_s`` seconds (HTTP 429)."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(429, "too_many_attempts",
                         f"too many failed log-ins: wait {retry_after_s} s before trying again",
                         headers={"Retry-After": str(retry_after_s)})
        self.retry_after_s = retry_after_s


def throttle_keys(username: str, address: str, policy: ThrottlePolicy) -> list[tuple[str, int]]:
    """The keys an attempt counts against, each with its number of free failures."""
    return [(f"user:{username[:64]}", policy.free_failures_per_user),
            (f"ip:{address[:64]}", policy.free_failures_per_address)]


def admit_attempt(session: Session, keys: list[tuple[str, int]], now: float, policy: ThrottlePolicy) -> None:
    """Raise ``Throttled`` if a key is blocked at ``now``; otherwise count this attempt against every key."""
    rows = [_locked_row(session, key, now) for key, _ in keys]
    wait = 0.0
    for row, (_, free) in zip(rows, keys):
        if (now - row.last_attempt.timestamp()) > policy.forget_after_s:
            row.failures = 0
        delay = policy.delay_s(row.failures, free)
        if delay > 0:  # (a fresh row's microsecond rounding must not read as a tiny block)
            wait = max(wait, row.last_attempt.timestamp() + delay - now)
    if wait > 0:
        raise Throttled(max(1, math.ceil(wait)))
    for row in rows:
        row.failures += 1
        row.last_attempt = utc(now)


def forgive_attempt(session: Session, keys: list[tuple[str, int]]) -> None:
    """A successful log-in: the user name starts afresh; the address loses only this attempt's count."""
    (user_key, _), *others = keys
    session.execute(delete(LoginThrottle).where(LoginThrottle.key == user_key))
    for key, _ in others:
        row = session.get(LoginThrottle, key, with_for_update=True)
        if row is not None:
            row.failures = max(0, row.failures - 1)


def _locked_row(session: Session, key: str, now: float) -> LoginThrottle:
    """The key's row, created if missing, locked until the transaction ends (PostgreSQL; SQLite locks the file)."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    fresh: datetime = utc(now)
    session.execute(insert(LoginThrottle).values(key=key, failures=0, last_attempt=fresh).on_conflict_do_nothing())
    return session.scalars(select(LoginThrottle).where(LoginThrottle.key == key).with_for_update()).one()
