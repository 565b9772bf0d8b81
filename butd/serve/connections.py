"""Connection limits of the service: a deadline for request headers, and the uvicorn configuration that applies them.

uvicorn (read in 0.55, h11 protocol) closes idle keep-alive connections after ``timeout_keep_alive`` but has no
deadline for receiving a request: a client that opens a connection and sends its headers a byte at a time, or never
finishes them ("slowloris"), keeps the connection for as long as it likes. ``HeaderDeadlineProtocol`` is uvicorn's h11
protocol plus one timer: a connection whose request headers are not complete ``header_timeout_s`` seconds after the
server started waiting for them (the connection opened, or the previous response was sent) is closed, with a 408 if
part of a request had arrived. Request bodies have their own deadline in ``butd.serve.limits.BodyLimitMiddleware``;
``limit_concurrency`` (``max_connections``) bounds how many connections are served at once.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol


@dataclass(frozen=True)
class ConnectionLimits:
    """How long a client may take to send request headers, how long an idle connection stays, how many at once."""

    header_timeout_s: float = 10.0
    keep_alive_s: int = 5
    max_connections: int | None = 100  # uvicorn answers 503 beyond this many open connections

    def __post_init__(self) -> None:
        if self.header_timeout_s <= 0 or self.keep_alive_s < 1:
            raise ValueError(f"ConnectionLimits: need header_timeout_s > 0 and keep_alive_s >= 1 (got "
                             f"{self.header_timeout_s}, {self.keep_alive_s})")
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError(f"ConnectionLimits: max_connections must be >= 1, got {self.max_connections}")


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol that closes connections whose request headers take longer than ``header_timeout_s``.

    Use ``header_deadline_protocol(seconds)`` for a subclass with another deadline (uvicorn builds protocols itself,
    from the class).
    """

    header_timeout_s: float = ConnectionLimits.header_timeout_s
    _header_timer: asyncio.TimerHandle | None = None
    _partial_request = False  # bytes of a request arrived while its headers were awaited

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch_headers()

    def data_received(self, data: bytes) -> None:
        if self._header_timer is not None:
            self._partial_request = True
        super().data_received(data)
        self._watch_headers()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def _watch_headers(self) -> None:
        """Arm the deadline when the connection starts waiting for a request's headers, disarm it once they came."""
        waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        if not waiting:
            self._stop_header_timer()
        elif self._header_timer is None:
            self._partial_request = False
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_timed_out)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self._partial_request:
            # Written directly: h11 cannot answer a request it has not parsed. The connection closes right after.
            self.transport.write(_request_timeout_response(self.header_timeout_s))
        self.transport.close()


def header_deadline_protocol(header_timeout_s: float) -> type[HeaderDeadlineProtocol]:
    """A ``HeaderDeadlineProtocol`` subclass with this deadline, to pass as uvicorn's ``http`` protocol class."""
    if header_timeout_s <= 0:
        raise ValueError(f"header_timeout_s must be > 0, got {header_timeout_s}")
    return type("HeaderDeadlineProtocol", (HeaderDeadlineProtocol,), {"header_timeout_s": float(header_timeout_s)})


def server_config(app: Any, *, host: str, port: int, limits: ConnectionLimits, log_level: str = "info") -> uvicorn.Config:
    """uvicorn's configuration for the service: one process, the header deadline, keep-alive and connection limits."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        workers=1,  # one process: the model lives once in memory and one inference thread owns it
        http=header_deadline_protocol(limits.header_timeout_s),
        timeout_keep_alive=limits.keep_alive_s,
        limit_concurrency=limits.max_connections,
        log_level=log_level,
    )


def _request_timeout_response(seconds: float) -> bytes:
    body = json.dumps({"error": {"code": "request_timeout",
                                 "message": f"the request headers did not arrive within {seconds:g} s"}}).encode()
    head = (f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode()
    return head + body
