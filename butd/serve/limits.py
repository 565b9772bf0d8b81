"""Request limits of the service and the error type its handlers turn into ``{"error": {"code", "message"}}``."""
from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class ApiError(Exception):
    """A refused request: HTTP ``status``, a machine-readable ``code`` and a message naming the problem."""

    def __init__(self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers  # e.g. Retry-After on 503


class UploadTooLarge(Exception):
    """The request body grew past the limit while it was being read (no or a false Content-Length)."""


class BodyTimeout(Exception):
    """The request body did not arrive within the read deadline (a slow or stalled client): HTTP 408."""


class BodyLimitMiddleware:
    """Bounds request bodies in size (413) and in time (408).

    Size: a body whose Content-Length is over ``max_bytes`` is refused without being read; bodies sent without one
    (chunked) are counted as they are read, and ``receive`` raises ``UploadTooLarge`` at the first byte over the
    limit, so an endless upload cannot fill the disk or memory.

    Time: the whole body must arrive within ``timeout_s`` seconds of the request's headers; past that, ``receive``
    raises ``BodyTimeout`` (the app answers 408), so a client that sends its body a byte at a time, or stops half-way,
    holds its connection for a bounded time only. (uvicorn itself has no such deadline; the request headers have
    theirs in ``butd.serve.connections``.)

    A response sent before the body was read to its end — a refusal made from the headers alone, a 404 — carries
    ``Connection: close``: the server then closes the connection rather than wait for the rest of a body nobody reads.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int, timeout_s: float | None = None) -> None:
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"BodyLimitMiddleware: timeout_s must be > 0, got {timeout_s}")
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        body_done = not _has_body(scope, declared)
        received = 0
        deadline = None if self.timeout_s is None else asyncio.get_running_loop().time() + self.timeout_s

        async def guarded_receive() -> Message:
            nonlocal received, body_done
            if body_done or deadline is None:
                message = await receive()  # after the body only http.disconnect is left to wait for: no deadline
            else:
                try:
                    async with asyncio.timeout_at(deadline):
                        message = await receive()
                except TimeoutError:
                    raise BodyTimeout(f"the request body did not arrive within {self.timeout_s:g} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise UploadTooLarge(f"the request body exceeds the limit of {self.max_bytes} bytes")
                if not message.get("more_body", False):
                    body_done = True
            return message

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start" and not body_done:
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        if declared is not None and declared > self.max_bytes:
            await _send_json(closing_send, 413, "upload_too_large",
                             f"the request body is {declared} bytes; the limit is {self.max_bytes} bytes")
            return
        await self.app(scope, guarded_receive, closing_send)


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", []):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # malformed: the server rejects it, or the body is counted as it arrives
    return None


def _has_body(scope: Scope, declared: int | None) -> bool:
    """Whether the request announces a body (a Content-Length above 0, or a chunked transfer encoding)."""
    if declared is not None:
        return declared > 0
    return any(key == b"transfer-encoding" for key, _ in scope.get("headers", []))


async def _send_json(send: Send, status: int, code: str, message: str) -> None:
    body: Any = json.dumps({"error": {"code": code, "message": message}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
