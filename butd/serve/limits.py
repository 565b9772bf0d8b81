"""Request limits of the service and the error type its handlers turn into ``{"error": {"code", "message"}}``."""
from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class ApiError(Exception):
    """A refused request: HTTP ``status``, a machine-readable ``code`` and a message naming the problem."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class UploadTooLarge(Exception):
    """The request body grew past the limit while it was being read (no or a false Content-Length)."""


class BodyLimitMiddleware:
    """Refuses request bodies over ``max_bytes`` with 413, without reading them when Content-Length says so.

    Bodies sent without a Content-Length (chunked) are counted as they are read: ``receive`` raises
    ``UploadTooLarge`` at the first byte over the limit, so an endless upload cannot fill the disk or memory.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await _send_json(send, 413, "upload_too_large",
                             f"the request body is {declared} bytes; the limit is {self.max_bytes} bytes")
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise UploadTooLarge(f"the request body exceeds the limit of {self.max_bytes} bytes")
            return message

        await self.app(scope, limited_receive, send)


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", []):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # malformed: the server rejects it, or the body is counted as it arrives
    return None


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
