"""What every gallery route shares: the application's parts, the signed-in user, the CSRF check, the cookie."""
from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request, Response

from butd.gallery.auth import CSRF_HEADER, Accounts, CurrentUser, csrf_matches
from butd.gallery.db import Database
from butd.gallery.model_client import CaptionModel
from butd.gallery.settings import GallerySettings
from butd.gallery.storage import ImageFiles
from butd.gallery.store import Gallery
from butd.serve.limits import ApiError


@dataclass(frozen=True, kw_only=True)
class GalleryContext:
    """The parts of one gallery application (``app.state.gallery``)."""

    settings: GallerySettings
    db: Database
    files: ImageFiles
    accounts: Accounts
    gallery: Gallery
    model: CaptionModel


def context(request: Request) -> GalleryContext:
    return request.app.state.gallery


def current_user(request: Request) -> CurrentUser:
    """The user of the request's session cookie; 401 ``not_authenticated`` without a live session."""
    ctx = context(request)
    user = ctx.accounts.authenticate(request.cookies.get(ctx.settings.cookie_name))
    if user is None:
        raise ApiError(401, "not_authenticated", "log in first (no valid session: it expired, was revoked or "
                                                 "never existed)")
    return user


def csrf_user(request: Request) -> CurrentUser:
    """``current_user`` for state-changing requests: 403 ``csrf_failed`` unless ``X-CSRF-Token`` matches the session."""
    user = current_user(request)
    if not csrf_matches(user.session_token, request.headers.get(CSRF_HEADER)):
        raise ApiError(403, "csrf_failed", f"missing or wrong {CSRF_HEADER} header: send the csrf_token that "
                                           "/api/me returns for this session")
    return user


def client_address(request: Request) -> str:
    """The peer address (behind a proxy, uvicorn's --forwarded-allow-ips decides whether X-Forwarded-For counts)."""
    return request.client.host if request.client else "unknown"


def set_session_cookie(response: Response, settings: GallerySettings, user: CurrentUser, lifetime_s: float) -> None:
    response.set_cookie(settings.cookie_name, user.session_token, max_age=int(lifetime_s), path="/", httponly=True,
                        samesite="lax", secure=settings.secure_cookies)


def clear_session_cookie(response: Response, settings: GallerySettings) -> None:
    response.delete_cookie(settings.cookie_name, path="/", httponly=True, samesite="lax",
                           secure=settings.secure_cookies)
