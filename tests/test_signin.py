"""Browser sign-in over a real socket (SPEC §4 "Console and metrics"):
POST /v1/login trades the token for the ``crushd_session`` cookie, accepted
wherever a Bearer token is; POST /v1/logout ends it; the browser guard
stays in front of both."""

from __future__ import annotations

from http.cookies import SimpleCookie

import httpx
import pytest

TOKEN = "console-token-123"
EVIL = "http://evil.example"


def parse_cookie(response: httpx.Response):
    headers = response.headers.get_list("Set-Cookie")
    assert len(headers) == 1, headers
    jar = SimpleCookie()
    jar.load(headers[0])
    return jar["crushd_session"], headers[0]


def cookie_header(value: str) -> dict[str, str]:
    return {"Cookie": f"crushd_session={value}"}


def login(http: httpx.Client, token: str = TOKEN, **headers: str) -> httpx.Response:
    return http.post("/v1/login", json={"token": token}, headers=headers)


@pytest.fixture
def live(live_factory):
    return live_factory(token=TOKEN)


def test_the_console_and_sign_in_are_open_and_everything_else_is_not(live):
    with httpx.Client(base_url=live.url, timeout=30) as http:
        page = http.get("/")
        assert page.status_code == 200
        assert page.headers["Content-Type"].startswith("text/html")
        assert 'id="token"' in page.text and "Sign in" in page.text
        assert "default-src 'none'" in page.headers["Content-Security-Policy"]
        assert page.headers["X-Frame-Options"] == "DENY"
        script = http.get("/console/console.js")
        assert script.status_code == 200
        assert script.headers["Content-Type"].startswith("text/javascript")
        cached = http.get("/console/console.js", headers={"If-None-Match": script.headers["ETag"]})
        assert cached.status_code == 304
        assert http.get("/console/%2E%2E%2Fopenapi.json").status_code == 404
        assert http.get("/console/nothing.js").status_code == 404
        for path in ("/v1/workspaces", "/metrics", "/v1/version"):
            assert http.get(path).status_code == 401, path


def test_login_sets_a_random_http_only_strict_cookie_accepted_like_bearer(live, project):
    with httpx.Client(base_url=live.url, timeout=30) as http:
        response = login(http)
        assert response.status_code == 204
        assert "Content-Type" not in response.headers and response.content == b""
        cookie, raw = parse_cookie(response)
        assert cookie["httponly"] is True
        assert cookie["samesite"] == "Strict"
        assert cookie["path"] == "/"
        assert not cookie["secure"]  # plain http on loopback
        assert TOKEN not in raw and len(cookie.value) >= 40
        second, _ = parse_cookie(login(http))
        assert second.value != cookie.value

    jar = {"crushd_session": cookie.value}
    with httpx.Client(base_url=live.url, timeout=30, cookies=jar) as http:
        created = http.post("/v1/workspaces", json={"path": str(project)})
        assert created.status_code == 201
        wid = created.json()["id"]
        assert http.get("/v1/workspaces").json()[0]["id"] == wid
        assert http.get("/metrics").status_code == 200
        with http.stream("GET", f"/v1/workspaces/{wid}/events") as stream:
            assert stream.status_code == 200
            assert next(stream.iter_lines()) == ": open"
        # A wrong Bearer token is refused even with a good cookie beside it.
        wrong = http.get("/v1/workspaces", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401


def test_a_wrong_token_is_401_and_sets_nothing(live):
    with httpx.Client(base_url=live.url, timeout=30) as http:
        for token in ("wrong", TOKEN + "x", TOKEN[:-1]):
            response = login(http, token)
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "unauthorized"
            assert "Set-Cookie" not in response.headers
        for bad in ({}, {"token": 5}, {"token": "  "}):
            response = http.post("/v1/login", json=bad)
            assert response.status_code == 400
            assert response.json()["error"]["code"] == "invalid_request"
            assert "Set-Cookie" not in response.headers
        made_up = cookie_header("made-up-session-id")
        assert http.get("/v1/workspaces", headers=made_up).status_code == 401
        # The token itself is not a cookie value either.
        assert http.get("/v1/workspaces", headers=cookie_header(TOKEN)).status_code == 401


def test_logout_clears_the_cookie_and_forgets_the_sign_in(live):
    with httpx.Client(base_url=live.url, timeout=30) as http:
        cookie, _ = parse_cookie(login(http))
        jar = cookie_header(cookie.value)
        assert http.get("/v1/workspaces", headers=jar).status_code == 200
        out = http.post("/v1/logout", headers=jar)
        assert out.status_code == 204
        cleared, _ = parse_cookie(out)
        assert cleared.value == "" and cleared["max-age"] == "0" and cleared["path"] == "/"
        assert http.get("/v1/workspaces", headers=jar).status_code == 401
        assert http.post("/v1/logout").status_code == 204  # signed out already: still 204


def test_the_browser_guard_stands_in_front_of_sign_in(live):
    with httpx.Client(base_url=live.url, timeout=30) as http:
        for headers in (
            {"Origin": EVIL},
            {"Sec-Fetch-Site": "cross-site"},
            {"Sec-Fetch-Site": "same-site"},
            {"Host": "evil.example"},
        ):
            response = login(http, **headers)
            assert response.status_code == 403, headers
            assert "Set-Cookie" not in response.headers
            assert http.get("/", headers=headers).status_code == 403
        cookie, _ = parse_cookie(login(http, Origin=live.url))  # the console's own origin
        foreign = http.get(
            "/v1/workspaces", headers={**cookie_header(cookie.value), "Origin": EVIL}
        )
        assert foreign.status_code == 403


def test_a_restart_signs_every_browser_out(daemon_factory, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    daemon = daemon_factory("--token-file", str(token_file))
    with daemon.client() as http:
        cookie, _ = parse_cookie(login(http))
    jar = cookie_header(cookie.value)
    with daemon.client() as http:
        assert http.get("/v1/workspaces", headers=jar).status_code == 200
    daemon.signal()
    assert daemon.wait() == 0
    daemon.start()
    with daemon.client() as http:
        assert http.get("/v1/workspaces", headers=jar).status_code == 401
        assert login(http).status_code == 204


def test_without_a_token_login_has_nothing_to_check(live_factory):
    live = live_factory()
    with httpx.Client(base_url=live.url, timeout=30) as http:
        response = login(http, "anything")
        assert response.status_code == 204
        assert "Set-Cookie" not in response.headers
        assert http.get("/v1/workspaces").status_code == 200
