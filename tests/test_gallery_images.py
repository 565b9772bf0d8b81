"""The gallery's images through FastAPI's TestClient, on SQLite and (when a server is given) PostgreSQL, captioned
by the tiny model: upload, list, open, files, search, favourites, pagination, isolation between two users, CSRF
refusal on every state-changing route, deletion and clear-all, every upload refusal, quota, the page and OpenAPI,
and captioning through a separate model service."""
from __future__ import annotations

import io
import os

import pytest
from PIL import Image

import gallery_fixtures
from butd.captioner import Captioner
from butd.gallery import LocalModel, RemoteModel
from butd.gallery.images import prepare_image
from butd.serve import create_app
from butd.models import load_model
from captioner_fixtures import fast_detector, synthetic_image, write_tiny_checkpoint
from gallery_fixtures import Visitor, assert_error, loopback_server, png_bytes, stored_files

open_gallery = gallery_fixtures.open_gallery  # the fixture, parametrized over the database backends

PICTURES = [(f"pic{i}.png", png_bytes(synthetic_image(160, 120, seed))) for i, seed in enumerate((1, 2, 3))]


@pytest.fixture(scope="module")
def captioner(tmp_path_factory):
    checkpoint = write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")
    return Captioner(detector=fast_detector(), loaded=load_model(checkpoint), detector_name="random")


@pytest.fixture
def make_model(captioner):
    return lambda: LocalModel(captioner, max_batch=4, max_wait_ms=5)


def test_upload_list_open_and_files(open_gallery):
    gallery = open_gallery()
    alice = Visitor(gallery.client)
    alice.register("alice")
    response = alice.upload(*PICTURES[:2], data={"beam_size": "2"})
    assert response.status_code == 201, response.text
    uploaded = response.json()["images"]
    assert [image["name"] for image in uploaded] == ["pic0.png", "pic1.png"]
    for image in uploaded:
        assert image["caption"] and image["beam_size"] == 2 and len(image["alternatives"]) == 2
        assert (image["width"], image["height"]) == (160, 120)
        assert all(len(word["attention"]) == len(image["regions"]) for word in image["words"])
        assert "detector random" in image["model"]
    assert response.json()["used_bytes"] == sum(image["bytes"] for image in uploaded)

    listing = alice.get("/api/images").json()
    assert [image["id"] for image in listing["images"]] == [uploaded[1]["id"], uploaded[0]["id"]]  # newest first
    assert listing["total"] == 2 and listing["next_cursor"] is None
    detail = alice.get(f"/api/images/{uploaded[0]['id']}").json()
    assert detail["words"] == uploaded[0]["words"] and detail["regions"] == uploaded[0]["regions"]

    original = alice.get(uploaded[0]["image_url"])
    assert original.status_code == 200 and original.content == PICTURES[0][1]
    assert original.headers["content-type"] == "image/png"
    assert original.headers["x-content-type-options"] == "nosniff"
    assert "sandbox" in original.headers["content-security-policy"]
    thumbnail = alice.get(uploaded[0]["thumbnail_url"])
    assert thumbnail.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(thumbnail.content)) as thumb:
        assert thumb.format == "JPEG" and max(thumb.size) <= gallery.settings.thumbnail_size
    user_dirs = {name.split("/")[0] for name in stored_files(gallery.data_dir)}
    assert len(user_dirs) == 1 and len(stored_files(gallery.data_dir)) == 4  # 2 images + 2 thumbnails, no partials


def test_search_favourites_and_pagination(open_gallery):
    gallery = open_gallery()
    alice = Visitor(gallery.client)
    alice.register("alice")
    images = alice.upload(*PICTURES).json()["images"]
    captions = {image["id"]: image["caption"].split() for image in images}
    word = captions[images[0]["id"]][0]
    expected = {i for i, words in captions.items() if any(w.startswith(word) for w in words)}
    found = alice.get("/api/images", params={"q": word}).json()
    assert {image["id"] for image in found["images"]} == expected and found["total"] == len(expected)
    assert alice.get("/api/images", params={"q": f"{word} zebra"}).json()["total"] == 0
    assert alice.get("/api/images", params={"q": "%"}).json()["total"] == 3  # no words: no filter, no wildcard

    first = images[1]["id"]
    for _ in range(2):  # idempotent
        marked = alice.request("PUT", f"/api/images/{first}/favourite")
        assert marked.status_code == 200 and marked.json()["favourite"] is True
    favourites = alice.get("/api/images", params={"favourites": "true"}).json()
    assert [image["id"] for image in favourites["images"]] == [first]
    assert alice.request("DELETE", f"/api/images/{first}/favourite").json()["favourite"] is False
    assert alice.get("/api/images", params={"favourites": "true"}).json()["total"] == 0

    seen, cursor = [], None
    while True:
        page = alice.get("/api/images", params={"limit": 1, **({"cursor": cursor} if cursor else {})}).json()
        assert page["total"] == 3 and len(page["images"]) == 1
        seen += [image["id"] for image in page["images"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [image["id"] for image in reversed(images)]
    assert_error(alice.get("/api/images", params={"cursor": "abc"}), 422, "invalid_cursor")
    assert_error(alice.get("/api/images", params={"limit": 0}), 422, "invalid_request", "limit")


def test_another_users_images_are_not_found(open_gallery):
    gallery = open_gallery()
    alice, bob = Visitor(gallery.client), Visitor(gallery.client)
    alice.register("alice")
    bob.register("bob")
    image = alice.upload(PICTURES[0]).json()["images"][0]
    image_id = image["id"]
    never = "f" * 32
    assert bob.get("/api/images").json() == {"images": [], "total": 0, "next_cursor": None}
    assert bob.get("/api/images", params={"q": image["caption"].split()[0]}).json()["total"] == 0
    for method, path in [("GET", ""), ("GET", "/file"), ("GET", "/thumbnail"), ("PUT", "/favourite"),
                         ("DELETE", "/favourite"), ("DELETE", "")]:
        theirs = assert_error(bob.request(method, f"/api/images/{image_id}{path}"), 404, "not_found")
        missing = assert_error(bob.request(method, f"/api/images/{never}{path}"), 404, "not_found")
        assert theirs["message"].replace(image_id, never) == missing["message"]  # nothing tells them apart
    assert bob.request("DELETE", "/api/images", params={"confirm": "true"}).json()["deleted"] == 0
    mine = alice.get(f"/api/images/{image_id}")
    assert mine.status_code == 200 and mine.json()["favourite"] is False
    assert alice.get(image["image_url"]).content == PICTURES[0][1]


def test_csrf_is_required_on_every_state_changing_request(open_gallery):
    gallery = open_gallery()
    alice, bob = Visitor(gallery.client), Visitor(gallery.client)
    alice.register("alice")
    bob.register("bob")
    image_id = alice.upload(PICTURES[0]).json()["images"][0]["id"]
    attempts = [("POST", "/api/images", {"files": [("images", PICTURES[1][0:1] + (PICTURES[1][1], "image/png"))]}),
                ("PUT", f"/api/images/{image_id}/favourite", {}), ("DELETE", f"/api/images/{image_id}/favourite", {}),
                ("DELETE", f"/api/images/{image_id}", {}), ("DELETE", "/api/images?confirm=true", {}),
                ("POST", "/api/logout", {})]
    for method, url, extra in attempts:
        assert_error(alice.request(method, url, csrf=False, **extra), 403, "csrf_failed")
        # Another session's token is no good either: the token is bound to the session.
        assert_error(alice.request(method, url, csrf=False, headers={"X-CSRF-Token": bob.csrf}, **extra),
                     403, "csrf_failed")
    listing = alice.get("/api/images").json()
    assert [image["id"] for image in listing["images"]] == [image_id]
    assert listing["images"][0]["favourite"] is False
    assert alice.get("/api/me").status_code == 200  # still logged in


def test_delete_one_and_clear_all(open_gallery):
    gallery = open_gallery()
    alice, bob = Visitor(gallery.client), Visitor(gallery.client)
    alice.register("alice")
    bob.register("bob")
    images = alice.upload(*PICTURES[:2]).json()["images"]
    bob.upload(PICTURES[2])
    assert len(stored_files(gallery.data_dir)) == 6
    assert alice.request("DELETE", f"/api/images/{images[0]['id']}").status_code == 204
    assert_error(alice.get(f"/api/images/{images[0]['id']}"), 404, "not_found")
    assert_error(alice.get(images[0]["image_url"]), 404, "not_found")
    assert_error(alice.request("DELETE", f"/api/images/{images[0]['id']}"), 404, "not_found")
    assert alice.get("/api/me").json()["user"]["used_bytes"] == images[1]["bytes"]
    assert len(stored_files(gallery.data_dir)) == 4

    assert_error(alice.request("DELETE", "/api/images"), 422, "confirmation_required", "confirm=true")
    assert_error(alice.request("DELETE", "/api/images/"), 404, "not_found")  # a trailing slash is not clear-all
    cleared = alice.request("DELETE", "/api/images", params={"confirm": "true"})
    assert cleared.json() == {"deleted": 1, "used_bytes": 0}
    assert alice.get("/api/images").json()["total"] == 0
    assert len(stored_files(gallery.data_dir)) == 2  # bob's image and thumbnail
    assert bob.get("/api/images").json()["total"] == 1
    assert alice.get("/api/me").status_code == 200  # the account stays


def test_upload_refusals_store_nothing(open_gallery):
    gallery = open_gallery()
    alice = Visitor(gallery.client)
    alice.register("alice")
    big = b"\xff\xd8" + os.urandom(2_100_000)
    assert_error(alice.request("POST", "/api/images", files={"images": ("big.jpg", big, "image/jpeg")}),
                 413, "upload_too_large", "2000000")
    bomb = png_bytes(Image.new("1", (10_000, 5_000)))
    assert_error(alice.upload(("bomb.png", bomb)), 413, "too_many_pixels", "bomb.png", "10000x5000")
    assert_error(alice.request("POST", "/api/images", files={"images": ("a.txt", b"text", "text/plain")}),
                 415, "unsupported_media_type", "a.txt")
    assert_error(alice.request("POST", "/api/images", json={"images": []}), 415, "unsupported_media_type")
    assert_error(alice.upload(("notes.png", b"hello, world")), 422, "undecodable_image", "notes.png")
    assert_error(alice.upload(("empty.png", b"")), 422, "empty_file", "empty.png")
    strip = png_bytes(synthetic_image(2000, 8, 6))
    # One unusable file refuses the whole upload: the good one is not stored either.
    assert_error(alice.upload(PICTURES[0], ("strip.png", strip)), 422, "unusable_image", "strip.png")
    assert_error(alice.upload(*PICTURES, PICTURES[0]), 422, "too_many_images", "limit is 3")
    assert_error(alice.request("POST", "/api/images", data={"beam_size": "2"},
                               files={"other": ("x.png", PICTURES[0][1], "image/png")}), 422, "no_file")
    assert_error(alice.upload(PICTURES[0], data={"beam_size": "11"}), 422, "invalid_beam_size")
    assert_error(alice.request("POST", "/api/images", data={"images": "text"}, files={"x": ("a.png", b"1")}),
                 422, "not_a_file")
    assert alice.get("/api/images").json()["total"] == 0
    assert stored_files(gallery.data_dir) == set()
    assert alice.get("/api/me").json()["user"]["used_bytes"] == 0


def test_storage_quota(open_gallery):
    sizes = []
    for name, data in PICTURES:
        prepared = prepare_image(name, data, max_pixels=4_000_000, thumbnail_size=320)
        sizes.append(len(prepared.data) + len(prepared.thumbnail))
    gallery = open_gallery(quota_bytes=sizes[0] + max(sizes[1:]) + 10)  # room for one more, not two
    alice, bob = Visitor(gallery.client), Visitor(gallery.client)
    alice.register("alice")
    bob.register("bob")
    assert alice.upload(PICTURES[0]).status_code == 201
    # Two more would not fit (files + thumbnails): refused as a whole, nothing of them is kept.
    assert_error(alice.upload(*PICTURES[1:]), 413, "quota_exceeded", "quota")
    assert alice.get("/api/images").json()["total"] == 1
    assert len(stored_files(gallery.data_dir)) == 2
    assert bob.upload(PICTURES[1]).status_code == 201  # the quota is per user


def test_page_health_openapi_and_unknown_routes(open_gallery):
    client = open_gallery().client
    page = client.get("/")
    assert page.status_code == 200 and "/static/gallery.js" in page.text
    assert "script-src" not in page.headers["content-security-policy"]  # default-src 'self' covers scripts
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("gallery.js", "api.js", "viewer.js", "gallery.css"):
        assert client.get(f"/static/{name}").status_code == 200
    health = client.get("/healthz").json()
    assert health["database"] == "ok" and health["random_detector"] is True and health["max_images"] == 3
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/register", "/api/login", "/api/logout", "/api/me", "/api/images", "/api/images/{image_id}",
            "/api/images/{image_id}/favourite", "/api/images/{image_id}/file"} <= set(paths)
    assert "multipart/form-data" in paths["/api/images"]["post"]["requestBody"]["content"]
    assert_error(client.get("/api/nothing"), 404, "not_found")
    assert_error(client.put("/api/images"), 405, "method_not_allowed")


def test_captioning_through_a_separate_model_service(open_gallery, captioner):
    """--model-url: the gallery sends the files to tools/serve.py's POST /v1/captions; the model service's refusals
    come back as the gallery's, and an unreachable service is a 502 that stores nothing."""
    service = create_app(captioner, max_batch=4, max_wait_ms=5)
    with loopback_server(service) as url:
        gallery = open_gallery(model=RemoteModel(url))
        alice = Visitor(gallery.client)
        alice.register("alice")
        response = alice.upload(PICTURES[0], data={"beam_size": "2"})
        assert response.status_code == 201, response.text
        (image,) = response.json()["images"]
        (expected,) = captioner.caption([PICTURES[0][1]], beam_size=2)
        assert image["caption"] == expected.caption and len(image["alternatives"]) == 2
        assert "detector random" in image["model"] and url in image["model"]
        assert gallery.client.get("/healthz").json()["random_detector"] is True
        strip = png_bytes(synthetic_image(2000, 8, 6))
        assert_error(alice.upload(("strip.png", strip)), 422, "unusable_image", "model service:", "strip.png")
    assert_error(alice.upload(PICTURES[1]), 502, "model_unavailable", url)  # the service is gone
    assert alice.get("/api/images").json()["total"] == 1
    assert len(stored_files(gallery.data_dir)) == 2
