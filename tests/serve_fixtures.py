"""Shared by the service tests: a real uvicorn server on a loopback port, a captioner the test can hold inside the
model, and raw HTTP requests for clients that misbehave (slow, or hanging up)."""
from __future__ import annotations

import io
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import uvicorn
from PIL import Image

from butd.serve.connections import ConnectionLimits, server_config


def png_bytes(image: np.ndarray | Image.Image) -> bytes:
    buffer = io.BytesIO()
    (Image.fromarray(image) if isinstance(image, np.ndarray) else image).save(buffer, format="PNG")
    return buffer.getvalue()


@contextmanager
def loopback_server(app: Any, limits: ConnectionLimits | None = None) -> Iterator[str]:
    """Serve ``app`` as tools/serve.py does (header deadline, connection limits) on a free 127.0.0.1 port, in a
    background thread; yields its URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = server_config(app, host="127.0.0.1", port=port, limits=limits or ConnectionLimits(), log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def wait_until(condition: Any, what: str, timeout: float = 30.0) -> None:
    """Poll ``condition()`` until it is true; fail naming ``what`` after ``timeout`` seconds (a generous bound)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting until {what}")
        time.sleep(0.02)


class GatedCaptioner:
    """A captioner whose every call records the image names, then waits until the test opens ``gate``.

    Holding the gate keeps a request inside the model, so that others queue behind it; ``inner`` does the work.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[list[str]] = []
        self.gate = threading.Event()
        self.entered = threading.Event()

    def info(self) -> dict[str, Any]:
        return self.inner.info()

    def check_image(self, width: int, height: int, name: str) -> None:
        self.inner.check_image(width, height, name)

    def caption(self, images: list[Any], *, beam_size: int, names: list[str]) -> list[Any]:
        self.calls.append(list(names))
        self.entered.set()
        if not self.gate.wait(timeout=60):
            raise RuntimeError("the test never opened the gate")
        return self.inner.caption(images, beam_size=beam_size, names=names)


def multipart_request(files: list[tuple[str, bytes]], *, path: str = "/v1/captions") -> tuple[bytes, bytes]:
    """(head, body) of an HTTP/1.1 POST uploading ``files`` (name, PNG bytes) in the field ``images``."""
    boundary = uuid.uuid4().hex
    parts = [
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"{name}\"\r\n"
        f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n"
        for name, data in files
    ]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head, body


def connect(url: str) -> socket.socket:
    """A raw TCP connection to the server at ``url``, with a 20 s bound on every blocking call."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=20)
    return sock


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took; AssertionError if it
    keeps the connection open longer than ``timeout`` seconds."""
    start = time.monotonic()
    received = b""
    while True:
        remaining = timeout - (time.monotonic() - start)
        if remaining <= 0:
            raise AssertionError(f"the server kept the connection open for more than {timeout:.0f} s "
                                 f"(received {received[:80]!r})")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return received, time.monotonic() - start
        received += chunk
