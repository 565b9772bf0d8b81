"""Shared by the gallery tests: a fresh database of either backend, cheap settings, a fake clock, and a visitor
that keeps one user's session cookie and CSRF token while several users share one test client."""
from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from serve_fixtures import loopback_server, png_bytes  # noqa: F401 (the gallery tests serve the same way)

POSTGRES_ENV = "BUTD_TEST_POSTGRES_URL"
BACKENDS = [
    "sqlite",
    pytest.param("postgresql", marks=pytest.mark.skipif(
        not os.environ.get(POSTGRES_ENV),
        reason=f"{POSTGRES_ENV} is not set: no PostgreSQL server for this run (.ci/run starts one; "
               "or: source scripts/test_postgres.sh)")),
]


@contextmanager
def fresh_database(backend: str, folder: Path) -> Iterator[str]:
    """The URL of an empty database: an SQLite file in ``folder``, or a new PostgreSQL database dropped after."""
    if backend == "sqlite":
        yield f"sqlite:///{folder / 'gallery.db'}"
        return
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    server = make_url(os.environ[POSTGRES_ENV])
    name = f"butd_gallery_{secrets.token_hex(6)}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        yield server.set(database=name).render_as_string(hide_password=False)
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.fixture(params=BACKENDS)
def open_gallery(request, tmp_path):
    """start(model=None, **settings) -> a running gallery (TestClient) on a fresh database of the parametrized
    backend. Without ``model``, the test module's ``make_model`` fixture (a function) builds one. Small upload limits
    by default: 2 MB per request, 4 megapixels, 3 images."""
    stack = ExitStack()

    def start(model: Any = None, **overrides: Any) -> SimpleNamespace:
        from fastapi.testclient import TestClient

        from butd.gallery import create_gallery_app

        url = stack.enter_context(fresh_database(request.param, tmp_path))
        overrides.setdefault("max_upload_bytes", 2_000_000)
        overrides.setdefault("max_pixels", 4_000_000)
        overrides.setdefault("max_images", 3)
        settings = cheap_settings(url, tmp_path / "data", **overrides)
        app = create_gallery_app(settings, model or request.getfixturevalue("make_model")())
        client = stack.enter_context(TestClient(app))
        return SimpleNamespace(client=client, settings=settings, data_dir=tmp_path / "data", backend=request.param)

    with stack:
        yield start


def cheap_settings(database_url: str, data_dir: Path, **overrides: Any):
    """Gallery settings with a fast argon2 cost (tests hash many passwords); everything else as given."""
    from butd.gallery import GallerySettings

    values: dict[str, Any] = {"password_time_cost": 1, "password_memory_kib": 1024, "password_parallelism": 1}
    values.update(overrides)
    return GallerySettings(database_url=database_url, data_dir=data_dir, **values)


class FakeClock:
    """Seconds since the epoch that move only when the test says so."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Visitor:
    """One user of a shared TestClient: its own session cookie and CSRF token, swapped in for each request."""

    def __init__(self, client: Any, cookie_name: str = "butd_session") -> None:
        self.client = client
        self.cookie_name = cookie_name
        self.token: str | None = None
        self.csrf: str | None = None

    def request(self, method: str, url: str, *, csrf: bool = True, **kwargs: Any):
        self.client.cookies.clear()
        if self.token:
            self.client.cookies.set(self.cookie_name, self.token)
        headers = dict(kwargs.pop("headers", {}))
        if csrf and self.csrf:
            headers["X-CSRF-Token"] = self.csrf
        response = self.client.request(method, url, headers=headers, **kwargs)
        for header in response.headers.get_list("set-cookie"):  # what a browser would keep
            name, _, rest = header.partition("=")
            if name == self.cookie_name:
                value = rest.split(";")[0].strip('"')
                self.token = None if not value or "Max-Age=0" in header else value
        if response.status_code in (200, 201) and url in ("/api/register", "/api/login", "/api/me"):
            self.csrf = response.json()["csrf_token"]
        return response

    def get(self, url: str, **kwargs: Any):
        return self.request("GET", url, **kwargs)

    def register(self, username: str, password: str = "correct horse battery"):
        return self.request("POST", "/api/register", json={"username": username, "password": password})

    def login(self, username: str, password: str = "correct horse battery"):
        return self.request("POST", "/api/login", json={"username": username, "password": password})

    def upload(self, *images: tuple[str, bytes], **kwargs: Any):
        files = [("images", (name, data, "image/png")) for name, data in images]
        return self.request("POST", "/api/images", files=files, **kwargs)


def assert_error(response, status: int, code: str, *mentions: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    for text in mentions:
        assert text in error["message"], error
    return error


def stored_files(data_dir: Path) -> set[str]:
    """Every file under the data folder's image tree, as "USER/NAME" (partial files and temporaries included)."""
    root = data_dir / "images"
    return {f"{p.parent.name}/{p.name}" for p in root.glob("*/*")} if root.is_dir() else set()


class EchoModel:
    """A stand-in for the captioning model where the storage is under test: instant, no torch, and a caption that
    names the file ("a picture of NAME"), with one region covering the image."""

    description = "echo (test double)"
    random_detector = False

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def check_image(self, image: Any) -> None:
        pass

    async def caption(self, images: list[Any], beam_size: int) -> list[dict[str, Any]]:
        results = []
        for image in images:
            words = ["a", "picture", "of", Path(image.name).stem.lower()]
            region = {"box": [0.0, 0.0, float(image.width), float(image.height)], "object": "thing",
                      "object_confidence": 0.9, "attribute": None, "attribute_confidence": None}
            results.append({"name": image.name, "width": image.width, "height": image.height,
                            "caption": " ".join(words), "logprob": -1.0,
                            "alternatives": [{"caption": " ".join(words), "logprob": -1.0}] * beam_size,
                            "regions": [region], "words": [{"word": w, "attention": [1.0]} for w in words]})
        return results
