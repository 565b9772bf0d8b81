"""The gallery's database and files: migrations match the models, uploads are all-or-nothing per image even when
the server is SIGKILLed in the middle (a subprocess killed at controlled points), and start-up reconciles files
with rows after kills and hand-made damage."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import httpx
import pytest
from fastapi.testclient import TestClient

from butd.gallery import create_gallery_app
from butd.gallery.db import Database
from butd.gallery.models import Base, User, utc
from butd.gallery.reconcile import reconcile
from butd.gallery.storage import ImageFiles
from butd.gallery.store import Gallery, NewImage
from butd.serve.limits import ApiError
from captioner_fixtures import ROOT, synthetic_image
from gallery_fixtures import (
    BACKENDS,
    EchoModel,
    Visitor,
    cheap_settings,
    fresh_database,
    loopback_server,
    png_bytes,
    stored_files,
)

PICTURES = [(f"kill{i}.png", png_bytes(synthetic_image(64, 48, seed))) for i, seed in enumerate((11, 12))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_migrations_build_exactly_the_models_schema(backend, tmp_path):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    with fresh_database(backend, tmp_path) as url:
        db = Database(url)
        try:
            assert db.migrate() == db.migrate()  # idempotent
            with db.engine.connect() as connection:
                context = MigrationContext.configure(connection, opts={"compare_type": True})
                assert compare_metadata(context, Base.metadata) == []
        finally:
            db.dispose()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


KILL_POINTS = {  # where the server is killed -> how many of the two uploaded images must survive
    "write_partial:3": 0,  # one image's files written, the other's not, nothing committed
    "promote": 2,  # rows committed, no file renamed yet: the upload happened
    "replace:3": 2,  # killed between the renames
    "discard": 1,  # a deletion killed after its row went, before its files did
}


def start_armed_server(folder, point: str) -> tuple[subprocess.Popen, str, object]:
    """The gallery in a subprocess that SIGKILLs itself at ``point`` (tests/gallery_kill_target.py)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    log = folder / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "gallery_kill_target.py"), f"sqlite:///{folder / 'g.db'}",
             str(folder / "data"), str(port), point], stdout=out, stderr=subprocess.STDOUT, env=env)
    return process, f"http://127.0.0.1:{port}", log


def wait_ready(process: subprocess.Popen, url: str, log, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, log.read_text()
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet
        assert time.monotonic() < deadline, f"the gallery did not start within {timeout} s:\n{log.read_text()}"
        time.sleep(0.1)


def register_and_upload(client, *, then_delete: bool = False) -> None:
    response = client.post("/api/register", json={"username": "alice", "password": "correct horse battery"})
    assert response.status_code == 201, response.text
    headers = {"X-CSRF-Token": response.json()["csrf_token"]}
    files = [("images", (name, data, "image/png")) for name, data in PICTURES]
    response = client.post("/api/images", files=files, headers=headers)
    if then_delete:
        assert response.status_code == 201, response.text
        client.delete(f"/api/images/{response.json()['images'][0]['id']}", headers=headers)
    raise AssertionError(f"the server was not killed: {response.status_code} {response.text[:200]}")


def check_after_restart(folder, point: str, survivors: int) -> None:
    settings = cheap_settings(f"sqlite:///{folder / 'g.db'}", folder / "data")
    with TestClient(create_gallery_app(settings, EchoModel())) as client:  # start-up reconciles
        alice = Visitor(client)
        assert alice.login("alice").status_code == 200, point
        listing = alice.get("/api/images").json()
        assert listing["total"] == survivors, (point, listing)
        for image in listing["images"]:
            assert alice.get(image["image_url"]).content == dict(PICTURES)[image["name"]], point
            assert alice.get(image["thumbnail_url"]).status_code == 200, point
        files = stored_files(folder / "data")
        assert len(files) == 2 * survivors, (point, files)  # whole images only: no partial files, no orphans
        assert not any(name.split("/")[1].startswith(".") for name in files), (point, files)
        used = sum(image["bytes"] for image in listing["images"])
        assert alice.get("/api/me").json()["user"]["used_bytes"] == used, point
        assert alice.upload(PICTURES[0]).status_code == 201, point  # and the gallery goes on working


def test_kills_mid_upload_or_delete_leave_whole_images_only(tmp_path):
    # The servers start together (start-up is most of the time), then each is driven until it kills itself.
    servers = {}
    try:
        for point in KILL_POINTS:
            folder = tmp_path / point.replace(":", "-")
            folder.mkdir()
            servers[point] = (folder, *start_armed_server(folder, point))
        for point, (folder, process, url, log) in servers.items():
            wait_ready(process, url, log)
            with httpx.Client(base_url=url, timeout=30) as client, pytest.raises(httpx.TransportError):
                register_and_upload(client, then_delete=point == "discard")
            assert process.wait(timeout=30) == -9, (point, log.read_text())
    finally:
        for _, process, _, _ in servers.values():
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
    for point, survivors in KILL_POINTS.items():
        check_after_restart(servers[point][0], point, survivors)


def new_image(name: str, data: bytes) -> NewImage:
    caption = {"caption": f"a picture of {name}", "logprob": -1.0, "alternatives": [], "regions": [], "words": []}
    return NewImage(original_name=name, content_type="image/png", extension="png", data=data, thumbnail=b"thumb",
                    width=64, height=48, caption=caption, beam_size=1, model="test")


@contextmanager
def store_with_one_user(tmp_path):
    """(settings, db, files, gallery) over a fresh SQLite database holding user 1."""
    settings = cheap_settings(f"sqlite:///{tmp_path / 'g.db'}", tmp_path / "data")
    db = Database(settings.database_url)
    db.migrate()
    files = ImageFiles(settings.data_dir)
    with db.write() as session:
        session.add(User(username="alice", password_hash="x", created_at=utc(0), used_bytes=0))
    try:
        yield settings, db, files, Gallery(db=db, files=files, settings=settings)
    finally:
        db.dispose()


def test_an_unwritable_data_folder_is_a_clear_503_that_stores_nothing(tmp_path):
    with store_with_one_user(tmp_path) as (settings, _, _, gallery):
        (settings.data_dir / "images" / "1").write_text("a file where the user's folder should be")
        with pytest.raises(ApiError) as refusal:
            gallery.add(1, [new_image("a", b"a" * 100)])
        assert (refusal.value.status, refusal.value.code) == (503, "storage_unavailable")
        assert "nothing was stored" in refusal.value.message
        assert gallery.page(1, limit=10).total == 0 and gallery.used_bytes(1) == 0


def test_reconcile_repairs_hand_made_damage_and_leaves_strangers_alone(tmp_path):
    with store_with_one_user(tmp_path) as (settings, db, files, gallery):
        kept, lost = gallery.add(1, [new_image("kept", b"k" * 100), new_image("lost", b"l" * 200)])
        folder = settings.data_dir / "images" / "1"
        (folder / lost.file_name).unlink()  # removed by hand: the row must go
        (folder / "notes.txt").write_text("mine")  # not the gallery's: left alone
        (folder / f"{'a' * 32}.jpg").write_bytes(b"orphan")  # a gallery-shaped file without a row
        (folder / f".{'b' * 32}.png.partial").write_bytes(b"partial")  # an upload that never committed
        (folder / f"..{'c' * 32}.png.partial.x1y2.tmp").write_bytes(b"half")  # a partial write cut short
        report = reconcile(db, files, gallery)
        assert (report.dropped_rows, report.removed_files, report.completed) == (1, 3, 0)
        assert report.unknown_files == ["1/notes.txt"]
        assert sorted(p.name for p in folder.iterdir()) == sorted([kept.file_name, kept.thumb_name, "notes.txt"])
        assert [row.id for row in gallery.page(1, limit=10).images] == [kept.id]
        assert gallery.used_bytes(1) == kept.bytes
        assert not reconcile(db, files, gallery).changed  # a second pass finds nothing to do


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_benchmark_loses_and_duplicates_nothing(backend, tmp_path):
    """benchmarks/gallery_load.py (a short run) against a loopback gallery: users upload and list at once."""
    image = tmp_path / "load.png"
    image.write_bytes(png_bytes(synthetic_image(64, 48, 21)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with fresh_database(backend, tmp_path) as url:
        app = create_gallery_app(cheap_settings(url, tmp_path / "data"), EchoModel())
        with loopback_server(app) as server:
            command = [sys.executable, str(ROOT / "benchmarks" / "gallery_load.py"), "--url", server, "--users", "4",
                       "--uploads", "3", "--lists", "1", "--image", str(image), "--max-seconds", "120"]
            proc = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (report["uploads"], report["lists"], report["errors"]) == (12, 12, 0), report
    assert report["lost_rows"] == report["duplicated_rows"] == report["unexpected_rows"] == 0
    assert report["database"] == backend and report["upload_p99_ms"] >= report["upload_p50_ms"] > 0
    assert len(stored_files(tmp_path / "data")) == 2 * 12
