"""Browser safety: no web page may drive crushd (SPEC §3 "Browser safety").

Every test talks to a real waitress server on a real socket (or a real
``crushd serve``), sends what a browser sends for the attack — a
``text/plain`` POST with a foreign ``Origin``, ``Sec-Fetch-Site``, a rebound
``Host`` — and checks both the 403 and that nothing changed.  The last test
runs the attack page in a real headless Chromium.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import AGENT_KEY_ENV, wait_for
from fakeprovider import Text, ToolCall
from helpers import CHROMIUM_ARGS, PageServer, chromium

from crushd.config import Config, ConfigError

EVIL = "http://evil.example"
KEY_ENV = AGENT_KEY_ENV
FORBIDDEN = "forbidden"


# ---------------------------------------------------------------- helpers


@contextmanager
def api(url: str, **kwargs: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=20, **kwargs) as http:
        yield http


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def assert_forbidden(response: httpx.Response) -> None:
    assert response.status_code == 403, (response.request.method, response.request.url)
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == FORBIDDEN and error["message"]
    assert not any(k.lower().startswith("access-control-") for k in response.headers)


def browser_post(http: httpx.Client, path: str, payload: Any, **headers: str) -> httpx.Response:
    """A "simple" cross-origin POST: text/plain, so browsers send it without asking."""
    return http.post(
        path,
        content=json.dumps(payload),
        headers={"Content-Type": "text/plain;charset=UTF-8", **headers},
    )


def state(http: httpx.Client, wid: str) -> dict[str, Any]:
    """Everything an attack could change, read without any browser header."""
    return {
        "workspaces": http.get("/v1/workspaces").json(),
        "sessions": http.get(f"/v1/workspaces/{wid}/sessions").json(),
        "runs": http.get(f"/v1/workspaces/{wid}/runs").json(),
        "permissions": http.get(f"/v1/workspaces/{wid}/permissions").json(),
    }


# ---------------------------------------------------------------- foreign origins


@pytest.mark.parametrize(
    "origin",
    [
        EVIL,
        "null",  # sandboxed iframes, file:// pages
        "http://127.0.0.1:1",  # another local port is another origin
        "http://localhost.evil.example",
        "https://127.0.0.1",
    ],
)
def test_cross_site_simple_posts_are_refused_and_change_nothing(
    fake, agent, project, tmp_path, origin
):
    live = agent(permission_timeout=30)
    fake.script([ToolCall("bash", {"command": "touch pwned"}), Text("done")])
    target = tmp_path / "target"
    target.mkdir()
    with api(live.url) as http:
        wid = http.post("/v1/workspaces", json={"path": str(project)}).json()["id"]
        run = http.post(f"/v1/workspaces/{wid}/agent", json={"prompt": "run it"}).json()
        pending = wait_for(lambda: http.get(f"/v1/workspaces/{wid}/permissions").json())
        before = state(http, wid)
        headers = {"Origin": origin, "Sec-Fetch-Site": "cross-site"}

        attacks = [
            ("/v1/workspaces", {"path": str(target), "yolo": True}),
            (f"/v1/workspaces/{wid}/agent", {"prompt": "rm -rf ~"}),
            (f"/v1/workspaces/{wid}/sessions", {"title": "evil"}),
            (f"/v1/workspaces/{wid}/permissions/{pending[0]['id']}", {"decision": "allow"}),
            (f"/v1/workspaces/{wid}/runs/{run['id']}/cancel", {}),
        ]
        for path, payload in attacks:
            assert_forbidden(browser_post(http, path, payload, **headers))
        assert_forbidden(http.delete(f"/v1/workspaces/{wid}", headers=headers))
        assert_forbidden(
            http.put(f"/v1/workspaces/{wid}/sessions/{run['session_id']}", headers=headers)
        )

        assert state(http, wid) == before
        assert not (project / "pwned").exists()
        assert len(fake.requests) == 1  # only the legitimate run's first step
        # The legitimate client, which sends no Origin, still decides.
        decided = http.post(
            f"/v1/workspaces/{wid}/permissions/{pending[0]['id']}", json={"decision": "deny"}
        )
        assert decided.status_code == 200
        done = http.get(f"/v1/workspaces/{wid}/runs/{run['id']}?wait=10").json()
        assert done["status"] == "completed"


@pytest.mark.parametrize("site", ["cross-site", "same-site"])
def test_sec_fetch_site_without_origin_is_refused(live, project, site):
    with api(live.url) as http:
        assert_forbidden(http.get("/v1/workspaces", headers={"Sec-Fetch-Site": site}))
        assert_forbidden(
            browser_post(http, "/v1/workspaces", {"path": str(project)}, **{"Sec-Fetch-Site": site})
        )
        assert http.get("/v1/workspaces").json() == []
        for harmless in ("same-origin", "none"):  # the user typed it, or our own page
            assert http.get("/v1/workspaces", headers={"Sec-Fetch-Site": harmless}).json() == []


def test_streams_and_long_polls_refuse_foreign_origins(live, project):
    with api(live.url) as http:
        wid = http.post("/v1/workspaces", json={"path": str(project)}).json()["id"]
        run = http.post(f"/v1/workspaces/{wid}/agent", json={"prompt": "hi"}).json()
        headers = {"Origin": EVIL}
        assert_forbidden(http.get(f"/v1/workspaces/{wid}/events", headers=headers))
        assert_forbidden(
            http.get(f"/v1/workspaces/{wid}/runs/{run['id']}?wait=30", headers=headers)
        )
        assert_forbidden(http.get("/v1/health", headers=headers))
        assert_forbidden(http.get("/v1/openapi.json", headers=headers))
        assert_forbidden(http.get("/v1/no-such-route", headers=headers))
        # No stream slot was taken by the refused requests.
        assert live.server._streams._value == live.server.config.max_streams


def test_own_origin_is_allowed_and_other_local_origins_are_not(live, project):
    port = port_of(live.url)
    with api(live.url) as http:
        own = browser_post(
            http, "/v1/workspaces", {"path": str(project)}, Origin=f"http://127.0.0.1:{port}"
        )
        assert own.status_code == 201, own.text
        assert "Access-Control-Allow-Origin" not in own.headers  # same origin needs no CORS
        other_name = http.get("/v1/workspaces", headers={"Origin": f"http://localhost:{port}"})
        assert_forbidden(other_name)  # sent to 127.0.0.1, so localhost is another origin
        as_localhost = http.get(
            "/v1/workspaces",
            headers={"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"},
        )
        assert as_localhost.status_code == 200


# ---------------------------------------------------------------- Host (DNS rebinding)


def test_rebound_host_is_refused_loopback_names_are_not(live, project):
    port = port_of(live.url)
    with api(live.url) as http:
        for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.nip.io", "::1"):
            assert_forbidden(http.get("/v1/health", headers={"Host": host}))
            assert_forbidden(
                browser_post(http, "/v1/workspaces", {"path": str(project)}, Host=host)
            )
        assert http.get("/v1/workspaces").json() == []
        for host in (
            f"localhost:{port}",
            f"LOCALHOST:{port}",
            f"127.0.0.1:{port}",
            f"[::1]:{port}",
            "127.0.0.2",
            "localhost",
        ):
            response = http.get("/v1/health", headers={"Host": host})
            assert response.status_code == 200, host


def test_allow_host_accepts_that_name(live_factory):
    live = live_factory(allow_hosts=["crushd.internal"])
    with api(live.url) as http:
        assert http.get("/v1/health", headers={"Host": "crushd.internal:7433"}).status_code == 200
        assert_forbidden(http.get("/v1/health", headers={"Host": "other.internal"}))


# ---------------------------------------------------------------- CORS


def test_allowed_origin_gets_cors_and_a_foreign_one_still_none(live_factory, project):
    ui = "http://localhost:5173"
    live = live_factory(allow_origins=[ui])
    with api(live.url) as http:
        preflight = http.options(
            "/v1/workspaces",
            headers={
                "Origin": ui,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type, authorization",
            },
        )
        assert preflight.status_code == 204
        assert preflight.headers["Access-Control-Allow-Origin"] == ui
        assert preflight.headers["Vary"] == "Origin"
        assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
        allowed_headers = preflight.headers["Access-Control-Allow-Headers"].lower()
        for name in ("authorization", "content-type", "last-event-id"):
            assert name in allowed_headers

        created = http.post(
            "/v1/workspaces",
            json={"path": str(project)},
            headers={"Origin": ui, "Sec-Fetch-Site": "same-site"},
        )
        assert created.status_code == 201
        assert created.headers["Access-Control-Allow-Origin"] == ui
        assert created.headers["Vary"] == "Origin"
        assert "Retry-After" in created.headers["Access-Control-Expose-Headers"]
        missing = http.get("/v1/workspaces/nope", headers={"Origin": ui})
        assert missing.status_code == 404  # errors carry CORS too, so the page can read them
        assert missing.headers["Access-Control-Allow-Origin"] == ui

        refused = http.options(
            "/v1/workspaces",
            headers={"Origin": EVIL, "Access-Control-Request-Method": "POST"},
        )
        assert_forbidden(refused)
        assert_forbidden(http.get("/v1/workspaces", headers={"Origin": EVIL}))
        plain = http.get("/v1/workspaces")  # no Origin: no CORS headers
        assert plain.status_code == 200 and "Access-Control-Allow-Origin" not in plain.headers
        assert len(http.get("/v1/workspaces").json()) == 1


# ---------------------------------------------------------------- with a token, over a socket


def test_a_token_does_not_let_a_foreign_origin_in(live_factory, project):
    live = live_factory(token="t0ken")
    auth = {"Authorization": "Bearer t0ken"}
    with api(live.url) as http:
        for headers in ({"Origin": EVIL}, {"Origin": EVIL, **auth}):
            assert_forbidden(
                browser_post(http, "/v1/workspaces", {"path": str(project)}, **headers)
            )
            assert_forbidden(http.get("/v1/health", headers=headers))
        assert_forbidden(http.get("/v1/workspaces", headers={"Host": "attacker.example", **auth}))
        assert http.get("/v1/workspaces", headers=auth).json() == []
        assert http.get("/v1/workspaces").status_code == 401


def test_unix_socket_takes_any_host_but_no_foreign_origin(daemon_factory, tmp_path, project):
    path = tmp_path / "crushd.sock"
    daemon_factory("--unix-socket", str(path))
    transport = httpx.HTTPTransport(uds=str(path))
    with api("http://whatever.example", transport=transport) as http:
        assert http.get("/v1/health").status_code == 200
        created = http.post("/v1/workspaces", json={"path": str(project)})
        assert created.status_code == 201
        assert_forbidden(http.get("/v1/workspaces", headers={"Origin": EVIL}))
        assert_forbidden(http.get("/v1/workspaces", headers={"Sec-Fetch-Site": "cross-site"}))


def test_curl_without_origin_keeps_working(live, project):
    curl = shutil.which("curl")
    assert curl, "curl is part of the test setup"
    done = subprocess.run(
        [
            curl,
            "-sS",
            "--max-time",
            "10",
            f"{live.url}/v1/workspaces",
            "-d",
            json.dumps({"path": str(project)}),
        ],
        capture_output=True,
        text=True,
        timeout=15,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["path"] == str(project.resolve())


# ---------------------------------------------------------------- configuration


def test_allow_lists_from_flags_env_and_toml(tmp_path):
    env = {
        "CRUSHD_ALLOW_ORIGIN": "http://localhost:3000, https://ui.example",
        "CRUSHD_ALLOW_HOST": "crushd.lan,box",
    }
    config = Config.load(env=env)
    assert config.allow_origins == ["http://localhost:3000", "https://ui.example"]
    assert config.allow_hosts == ["crushd.lan", "box"]
    toml = tmp_path / "crushd.toml"
    toml.write_text('allow_origins = ["http://a.example:8080"]\nallow_hosts = ["a.example"]\n')
    config = Config.load({"allow_origins": ("http://b.example",)}, env={}, config_file=str(toml))
    assert config.allow_origins == ["http://b.example"]  # the flag wins
    assert config.allow_hosts == ["a.example"]
    for bad in (
        {"allow_origins": ["*"]},
        {"allow_origins": ["localhost:3000"]},
        {"allow_hosts": ["a b"]},
    ):
        with pytest.raises(ConfigError):
            Config.from_mapping(bad)


def test_serve_rejects_a_bad_allow_origin(tmp_path):
    import sys

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "crushd",
            "serve",
            "--data-dir",
            str(tmp_path / "d"),
            "--allow-origin",
            "*",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0
    assert "allow_origins" in done.stderr and "'*'" in done.stderr


# ---------------------------------------------------------------- a real browser

ATTACK_PAGE = """<!doctype html>
<html><body>
<iframe name="sink" id="sink"></iframe>
<form id="form" method="POST" enctype="text/plain" target="sink"
      action="{base}/v1/workspaces/{wid}/agent">
<input type="hidden" name='{{"prompt": "form post", "x": "' value='"}}'>
</form>
<script>
const base = "{base}";
async function attack() {{
  const results = [];
  const posts = [
    [base + "/v1/workspaces", JSON.stringify({{path: {target}, yolo: true}})],
    [base + "/v1/workspaces/{wid}/agent", JSON.stringify({{prompt: "write the file"}})],
  ];
  for (const [url, body] of posts) {{
    try {{
      await fetch(url, {{method: "POST", mode: "no-cors", body: body}});
      results.push("sent");
    }} catch (e) {{ results.push("failed"); }}
  }}
  results.push(navigator.sendBeacon(base + "/v1/workspaces/{wid}/agent",
      JSON.stringify({{prompt: "beacon"}})) ? "beacon" : "no-beacon");
  try {{
    await fetch(base + "/v1/workspaces/{wid}", {{method: "DELETE"}});
    results.push("deleted");
  }} catch (e) {{ results.push("delete-refused"); }}
  await new Promise((resolve) => {{
    document.getElementById("sink").onload = resolve;
    document.getElementById("form").submit();
  }});
  results.push("form");
  document.body.setAttribute("data-attack", results.join(","));
}}
attack();
</script>
</body></html>
"""

CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",  # tests run as root
    *CHROMIUM_ARGS,
    "--virtual-time-budget=15000",
]


def open_in_browser(url: str, profile: Path) -> str:
    done = subprocess.run(
        [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, "HOME": str(profile)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.parametrize("allowed", [False, True], ids=["default", "origin-allowed"])
def test_a_web_page_in_chromium_cannot_drive_crushd(
    fake, daemon_factory, tmp_path, project, monkeypatch, allowed
):
    """The attack of the issue, in a real browser.  With the attacker's origin
    allowed (the control) the same page does register and run — so the
    default's "nothing happened" is crushd refusing, not the page failing."""
    page = PageServer()
    try:
        monkeypatch.setenv(KEY_ENV, "sk-browser-test")
        extra = ["--allow-origin", page.url] if allowed else []
        daemon = daemon_factory(
            "--provider",
            "openai",
            "--model",
            "m",
            "--base-url",
            fake.openai_base_url,
            "--api-key-env",
            KEY_ENV,
            *extra,
        )
        for _ in range(3):  # a write for each prompt that gets through, then answers
            fake.script([ToolCall("write", {"path": "pwned.txt", "content": "owned"})])
        fake.set_default([Text("done")])
        target = tmp_path / "target"
        target.mkdir()
        with daemon.client() as http:
            created = http.post("/v1/workspaces", json={"path": str(project), "yolo": True})
            wid = created.json()["id"]
            page.page = ATTACK_PAGE.format(
                base=daemon.url, wid=wid, target=json.dumps(str(target))
            ).encode()
            dom = open_in_browser(page.url, tmp_path / "profile")
            workspaces = {w["path"] for w in http.get("/v1/workspaces").json()}
            refusals = [line for line in daemon.log().splitlines() if "request_forbidden" in line]
            if allowed:
                assert 'data-attack="sent,sent,beacon,deleted,form"' in dom, dom[-3000:]
                assert str(target.resolve()) in workspaces
                assert refusals == []
                return
            assert 'data-attack="sent,sent,beacon,delete-refused,form"' in dom, dom[-3000:]
            assert workspaces == {str(project.resolve())}
            assert http.get(f"/v1/workspaces/{wid}/runs").json() == []
            assert not (project / "pwned.txt").exists()
            assert not any(target.iterdir())
            assert fake.requests == []
        # two fetches, the beacon, the form and the DELETE's preflight
        assert len(refusals) >= 5, daemon.log()[-3000:]
        assert all("origin=" + page.url in line for line in refusals), refusals
    finally:
        page.close()
