"""Accounts and sessions: argon2id password hashes, random session tokens of which only a hash is stored, CSRF
tokens bound to the session, the user-name and password rules, and the throttled log-in.

The session token travels only in an ``HttpOnly`` cookie. Its CSRF token is an HMAC of it: the page reads it from
``/api/me`` (or the log-in answer) and sends it back as the ``X-CSRF-Token`` header on every state-changing request;
another site can make the browser send the cookie, but can neither read the CSRF token nor compute it.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from butd.gallery.db import Database
from butd.gallery.models import AuthSession, User, utc
from butd.gallery.settings import GallerySettings
from butd.gallery.throttle import admit_attempt, forgive_attempt, throttle_keys
from butd.serve.limits import ApiError

USERNAME = re.compile(r"[a-z0-9][a-z0-9_.-]{2,31}")
CSRF_HEADER = "X-CSRF-Token"


@dataclass(frozen=True)
class CurrentUser:
    """The user a request's session cookie belongs to."""

    id: int
    username: str
    session_token: str

    @property
    def csrf_token(self) -> str:
        return csrf_token_for(self.session_token)


def hash_token(token: str) -> str:
    """What the database keeps of a session token: a leaked table cannot be replayed as cookies."""
    return hashlib.sha256(token.encode()).hexdigest()


def csrf_token_for(session_token: str) -> str:
    return hmac.new(session_token.encode(), b"butd-gallery-csrf", hashlib.sha256).hexdigest()


def csrf_matches(session_token: str, header_value: str | None) -> bool:
    return header_value is not None and hmac.compare_digest(csrf_token_for(session_token), header_value)


def normalize_username(raw: str) -> str:
    """The stored form of a user name (lower case); 422 ``invalid_username`` when it breaks the rules."""
    name = raw.lower()
    if not USERNAME.fullmatch(name):
        raise ApiError(422, "invalid_username",
                       "a user name has 3-32 characters: letters, digits, '.', '_' or '-', starting with a letter "
                       "or digit")
    return name


class Accounts:
    """Registration, throttled log-in, sessions and log-out over ``db``."""

    def __init__(self, *, db: Database, settings: GallerySettings) -> None:
        self.db = db
        self.settings = settings
        self._hasher = PasswordHasher(time_cost=settings.password_time_cost, memory_cost=settings.password_memory_kib,
                                      parallelism=settings.password_parallelism)
        # Verified when the user name is unknown, so that a miss costs as much time as a wrong password.
        self._decoy_hash = self._hasher.hash(secrets.token_urlsafe(16))

    def register(self, username: str, password: str) -> tuple[CurrentUser, float]:
        """Create the account and a session for it; returns the user and the session's lifetime in seconds."""
        name = normalize_username(username)
        self._check_new_password(password)
        password_hash = self._hasher.hash(password)
        now = self.settings.clock()
        try:
            with self.db.write() as session:
                user = User(username=name, password_hash=password_hash, created_at=utc(now), used_bytes=0)
                session.add(user)
                session.flush()
                token = self._open_session(session, user.id, now)
        except IntegrityError:
            raise ApiError(409, "username_taken", f"the user name {name!r} is taken: choose another") from None
        return CurrentUser(id=user.id, username=name, session_token=token), self.settings.session_ttl_s

    def login(self, username: str, password: str, address: str) -> tuple[CurrentUser, float]:
        """A new session if the password is right; 401 ``invalid_credentials`` whether the name or the password is
        wrong; 429 ``too_many_attempts`` while the name or the address is blocked."""
        name = username.lower()
        policy = self.settings.throttle
        keys = throttle_keys(name, address, policy)
        with self.db.write() as session:
            admit_attempt(session, keys, self.settings.clock(), policy)
        with self.db.read() as session:
            user = session.scalars(select(User).where(User.username == name)).first()
        if not self._verify(user.password_hash if user else self._decoy_hash, password) or user is None:
            raise ApiError(401, "invalid_credentials", "wrong user name or password")
        now = self.settings.clock()
        with self.db.write() as session:
            forgive_attempt(session, keys)
            if self._hasher.check_needs_rehash(user.password_hash):  # the cost settings were raised since
                session.get(User, user.id).password_hash = self._hasher.hash(password)
            session.execute(delete(AuthSession).where(AuthSession.expires_at <= utc(now)))
            token = self._open_session(session, user.id, now)
        return CurrentUser(id=user.id, username=user.username, session_token=token), self.settings.session_ttl_s

    def authenticate(self, token: str | None) -> CurrentUser | None:
        """The user of a live session token, or None (no, unknown, revoked or expired session)."""
        if not token or len(token) > 128:
            return None
        with self.db.read() as session:
            row = session.execute(
                select(User.id, User.username)
                .join(AuthSession, AuthSession.user_id == User.id)
                .where(AuthSession.token_hash == hash_token(token),
                       AuthSession.expires_at > utc(self.settings.clock()))
            ).first()
        return CurrentUser(id=row.id, username=row.username, session_token=token) if row else None

    def logout(self, user: CurrentUser) -> None:
        """Revoke the session: its cookie is worthless from now on, even if it was copied."""
        with self.db.write() as session:
            session.execute(delete(AuthSession).where(AuthSession.token_hash == hash_token(user.session_token)))

    def _open_session(self, session, user_id: int, now: float) -> str:
        token = secrets.token_urlsafe(32)
        session.add(AuthSession(token_hash=hash_token(token), user_id=user_id, created_at=utc(now),
                                expires_at=utc(now + self.settings.session_ttl_s)))
        return token

    def _check_new_password(self, password: str) -> None:
        low, high = self.settings.password_min_length, self.settings.password_max_length
        if not low <= len(password) <= high:
            raise ApiError(422, "weak_password", f"a password needs {low} to {high} characters")

    def _verify(self, password_hash: str, password: str) -> bool:
        try:
            return self._hasher.verify(password_hash, password)
        except (VerificationError, InvalidHashError):
            return False
