"""Every error of the model service and the gallery answers one JSON shape: ``{"error": {"code", "message"}}``.

``ApiError`` (``butd.serve.limits``) is a refusal the app chose; request validation errors, unknown routes and
methods, and unexpected exceptions are mapped to the same shape here, once for both apps.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from butd.serve.limits import ApiError


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON error body with its status (and headers such as ``Retry-After``)."""
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI, *, log: logging.Logger, crash_detail: bool) -> None:
    """Map every error to :func:`error_response`. ``crash_detail``: an unexpected exception's message is shown to
    the client (the model service, used by developers) or only its type (the gallery, open to the public)."""

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, err: ApiError) -> JSONResponse:
        return error_response(err.status, err.code, err.message, err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, err: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
        return error_response(422, "invalid_request", problems)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, err: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        return error_response(err.status_code, codes.get(err.status_code, f"http_{err.status_code}"), str(err.detail))

    @app.exception_handler(Exception)
    async def crashed(request: Request, err: Exception) -> JSONResponse:
        log.exception("internal error while serving %s %s", request.method, request.url.path)
        detail = f": {err}" if crash_detail else ""
        return error_response(500, "internal_error", f"internal error: {type(err).__name__}{detail}")
