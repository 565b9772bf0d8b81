"""Accounts: ``POST /api/register``, ``POST /api/login``, ``POST /api/logout``, ``GET /api/me``.

Register and log-in take JSON only: a cross-site HTML form cannot send ``application/json``, which keeps another
site from logging a visitor into an account of its choosing. Log-out, like every state-changing request made with
a session, needs the ``X-CSRF-Token`` header.
"""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from butd.gallery.auth import CurrentUser
from butd.gallery.deps import (
    GalleryContext,
    clear_session_cookie,
    client_address,
    context,
    csrf_user,
    current_user,
    set_session_cookie,
)
from butd.gallery.schemas import Credentials, ErrorResponse, SessionResponse
from butd.serve.limits import ApiError

router = APIRouter(prefix="/api", tags=["accounts"])


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse} for code in codes}


def _user_json(ctx: GalleryContext, user: CurrentUser) -> dict[str, Any]:
    return {"username": user.username, "used_bytes": ctx.gallery.used_bytes(user.id),
            "quota_bytes": ctx.settings.quota_bytes}


def _require_json(request: Request) -> None:
    if not request.headers.get("content-type", "").lower().startswith("application/json"):
        raise ApiError(415, "unsupported_media_type", 'send {"username": ..., "password": ...} as application/json')


@router.post("/register", status_code=201, response_model=SessionResponse, responses=_errors(409, 415, 422),
             dependencies=[Depends(_require_json)])
def register(body: Credentials, request: Request, response: Response) -> dict[str, Any]:
    """Create an account and log it in (sets the session cookie)."""
    ctx = context(request)
    user, lifetime = ctx.accounts.register(body.username, body.password)
    set_session_cookie(response, ctx.settings, user, lifetime)
    return {"user": _user_json(ctx, user), "csrf_token": user.csrf_token}


@router.post("/login", response_model=SessionResponse, responses=_errors(401, 415, 422, 429),
             dependencies=[Depends(_require_json)])
def login(body: Credentials, request: Request, response: Response) -> dict[str, Any]:
    """Open a session (sets the session cookie). Wrong user name and wrong password give the same 401; repeated
    failures are answered 429 with ``Retry-After`` for a while."""
    ctx = context(request)
    user, lifetime = ctx.accounts.login(body.username, body.password, client_address(request))
    set_session_cookie(response, ctx.settings, user, lifetime)
    return {"user": _user_json(ctx, user), "csrf_token": user.csrf_token}


@router.post("/logout", status_code=204, responses=_errors(401, 403))
def logout(request: Request, user: CurrentUser = Depends(csrf_user)) -> Response:
    """Revoke this session on the server and clear its cookie."""
    ctx = context(request)
    ctx.accounts.logout(user)
    response = Response(status_code=204)
    clear_session_cookie(response, ctx.settings)
    return response


@router.get("/me", response_model=SessionResponse, responses=_errors(401))
def me(request: Request, user: CurrentUser = Depends(current_user)) -> dict[str, Any]:
    """The signed-in user, their storage use, and the CSRF token of this session."""
    ctx = context(request)
    return {"user": _user_json(ctx, user), "csrf_token": user.csrf_token}
