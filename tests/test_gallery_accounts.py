"""The gallery's accounts through FastAPI's TestClient, on SQLite and (when a server is given) PostgreSQL:
registration rules, the session cookie, log-out revocation, 401 without a session, wrong password and unknown user
alike, the log-in throttle per user name and per address, and session expiry (an injected clock, no sleeping)."""
from __future__ import annotations

import re

import pytest

import gallery_fixtures
from butd.gallery import ThrottlePolicy
from gallery_fixtures import EchoModel, FakeClock, Visitor, assert_error

open_gallery = gallery_fixtures.open_gallery  # the fixture, parametrized over the database backends


@pytest.fixture
def make_model():
    return EchoModel  # accounts need no captions


def test_register_me_logout_and_the_session_cookie(open_gallery):
    gallery = open_gallery()
    alice = Visitor(gallery.client)
    response = alice.register("Alice")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["user"] == {"username": "alice", "used_bytes": 0, "quota_bytes": gallery.settings.quota_bytes}
    cookie = response.headers["set-cookie"]
    assert re.search(r"\bHttpOnly\b", cookie) and re.search(r"SameSite=lax", cookie, re.I)
    assert "Path=/" in cookie and "Max-Age=" in cookie and "Secure" not in cookie
    assert alice.get("/api/me").json()["user"]["username"] == "alice"
    token = alice.token

    assert_error(alice.request("POST", "/api/logout", csrf=False), 403, "csrf_failed", "X-CSRF-Token")
    assert alice.request("POST", "/api/logout").status_code == 204
    assert alice.token is None  # the cookie was cleared
    assert_error(alice.get("/api/me"), 401, "not_authenticated")
    alice.token = token  # a copy of the old cookie is worthless: the session was revoked on the server
    assert_error(alice.get("/api/me"), 401, "not_authenticated")

    again = Visitor(gallery.client)
    assert again.login("ALICE").status_code == 200  # user names are case-insensitive
    assert again.get("/api/me").status_code == 200


def test_wrong_password_and_unknown_user_look_the_same(open_gallery):
    gallery = open_gallery()
    Visitor(gallery.client).register("alice")
    wrong = assert_error(Visitor(gallery.client).login("alice", "not the password"), 401, "invalid_credentials")
    unknown = assert_error(Visitor(gallery.client).login("nobody", "not the password"), 401, "invalid_credentials")
    assert wrong == unknown


def test_registration_refusals(open_gallery):
    gallery = open_gallery()
    visitor = Visitor(gallery.client)
    assert_error(visitor.register("al"), 422, "invalid_username", "3-32")
    assert_error(visitor.register("alice smith"), 422, "invalid_username")
    assert_error(visitor.register("<script>"), 422, "invalid_username")
    assert_error(visitor.register("alice", "short"), 422, "weak_password", "8")
    assert visitor.register("alice").status_code == 201
    assert_error(Visitor(gallery.client).register("Alice"), 409, "username_taken")
    assert_error(gallery.client.post("/api/register", data={"username": "bob", "password": "x" * 12}),
                 415, "unsupported_media_type", "application/json")
    assert_error(gallery.client.post("/api/login", json={"username": "bob"}), 422, "invalid_request", "password")


def test_every_private_route_needs_a_session(open_gallery):
    client = open_gallery().client
    client.cookies.clear()
    some = "0" * 32
    for method, url in [("GET", "/api/me"), ("POST", "/api/logout"), ("GET", "/api/images"), ("POST", "/api/images"),
                        ("DELETE", "/api/images?confirm=true"), ("GET", f"/api/images/{some}"),
                        ("GET", f"/api/images/{some}/file"), ("GET", f"/api/images/{some}/thumbnail"),
                        ("PUT", f"/api/images/{some}/favourite"), ("DELETE", f"/api/images/{some}/favourite"),
                        ("DELETE", f"/api/images/{some}")]:
        assert_error(client.request(method, url), 401, "not_authenticated")
    client.cookies.set("butd_session", "forged-token")
    assert_error(client.get("/api/images"), 401, "not_authenticated")


def test_failed_logins_are_slowed_down_per_user_name(open_gallery):
    clock = FakeClock()
    policy = ThrottlePolicy(free_failures_per_user=3, free_failures_per_address=100, first_delay_s=2,
                            max_delay_s=60, forget_after_s=600)
    gallery = open_gallery(clock=clock, throttle=policy)
    Visitor(gallery.client).register("alice")

    def attempt(name, password="wrong password"):
        return Visitor(gallery.client).login(name, password)

    for name in ("alice", "nobody"):  # a known and an unknown user name are throttled alike
        for _ in range(4):  # three free failures, and the fourth is still checked
            assert_error(attempt(name), 401, "invalid_credentials")
        blocked = attempt(name, "correct horse battery")  # even the right password waits
        assert_error(blocked, 429, "too_many_attempts", "2 s")
        assert blocked.headers["retry-after"] == "2"
        clock.advance(1)
        assert attempt(name).headers["retry-after"] == "1"  # blocked attempts are not counted
        clock.advance(1.5)
        assert_error(attempt(name), 401, "invalid_credentials")  # the fifth failure: now 4 s
        assert attempt(name, "correct horse battery").headers["retry-after"] == "4"
        clock.advance(4.1)
    assert attempt("alice", "correct horse battery").status_code == 200
    for _ in range(3):  # a success starts the user name afresh
        assert_error(attempt("alice"), 401, "invalid_credentials")
    clock.advance(600.1)  # and failures are forgotten after a while
    assert_error(attempt("nobody"), 401, "invalid_credentials")


def test_failed_logins_are_slowed_down_per_address(open_gallery):
    clock = FakeClock()
    policy = ThrottlePolicy(free_failures_per_user=100, free_failures_per_address=3, first_delay_s=5)
    gallery = open_gallery(clock=clock, throttle=policy)
    Visitor(gallery.client).register("alice")
    for name in ("bob", "carol", "dave", "erin"):  # a different name each time: the address still counts
        assert_error(Visitor(gallery.client).login(name, "guess"), 401, "invalid_credentials")
    blocked = Visitor(gallery.client).login("alice")
    assert_error(blocked, 429, "too_many_attempts")
    assert blocked.headers["retry-after"] == "5"
    clock.advance(5.1)
    assert Visitor(gallery.client).login("alice").status_code == 200


def test_sessions_expire(open_gallery):
    clock = FakeClock()
    gallery = open_gallery(clock=clock, session_ttl_s=3600)
    alice = Visitor(gallery.client)
    alice.register("alice")
    clock.advance(3599)
    assert alice.get("/api/me").status_code == 200
    clock.advance(2)
    assert_error(alice.get("/api/me"), 401, "not_authenticated")
    assert alice.login("alice").status_code == 200
