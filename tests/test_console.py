"""The console at GET / in a real browser (SPEC §4 "Console and metrics").

Playwright drives Debian's Chromium (installed by .ci/run) against a real
crushd on a real socket.  Elements are found by role and accessible name,
as a person finds them: the textbox **Prompt**, the buttons **Send**,
**Cancel**, **Allow**, **Token**, **Sign in**.
"""

from __future__ import annotations

import configparser
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import wait_for
from fakeprovider import Drop, HTTPError, Pause, Text, ToolCall
from helpers import CHROMIUM_ARGS, PageServer, chromium, free_port
from playwright.sync_api import Browser, Page, expect, sync_playwright
from prometheus_client.parser import text_string_to_metric_families

import crushd
from crushd.console import ASSETS
from crushd.events import EventType

KEY_ENV = "CRUSHD_TEST_CONSOLE_KEY"
TOKEN = "console-browser-token"
WORDS = " ".join(f"word{i}" for i in range(40))
TIMEOUT_MS = 20_000
expect.set_options(timeout=TIMEOUT_MS)  # generous: the machine may be busy


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[Browser]:
    home = tmp_path_factory.mktemp("chromium-home")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=chromium(),
            args=CHROMIUM_ARGS,
            chromium_sandbox=False,  # the tests run as root
            env={**os.environ, "HOME": str(home)},
        )
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert errors == [], errors


def api(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=30)


def assistant_texts(page: Page) -> list[str]:
    return page.locator("article.msg.assistant .text").all_inner_texts()


def register_in_page(page: Page, path: Path) -> None:
    page.get_by_role("textbox", name="Workspace path", exact=True).fill(str(path))
    page.get_by_role("button", name="Register", exact=True).click()
    expect(page.get_by_role("button", name=str(path.resolve()), exact=True)).to_have_attribute(
        "aria-current", "true"
    )
    expect(page.get_by_role("status")).to_have_text("Connected")


def runs_list(page: Page):
    return page.get_by_role("list", name="Runs")


# ---------------------------------------------------------------- prompts


def test_a_prompt_typed_and_sent_streams_into_the_page_and_completes(live_factory, project, page):
    live = live_factory(echo_delay=0.04)
    page.goto(live.url)
    register_in_page(page, project)
    page.get_by_role("textbox", name="Prompt", exact=True).fill(WORDS)
    page.get_by_role("button", name="Send", exact=True).click()
    # Part of the answer is on the page while the rest is still coming.
    page.wait_for_function(
        """(full) => {
            const parts = [...document.querySelectorAll("article.msg.assistant .text")];
            const text = parts.map((p) => p.textContent).join("");
            return text.length > 0 && text.length < full.length;
        }""",
        arg=WORDS,
        polling="raf",
    )
    expect(runs_list(page)).to_contain_text("completed")
    assert assistant_texts(page) == [WORDS]
    with api(live.url) as http:
        (workspace,) = http.get("/v1/workspaces").json()
        (run,) = http.get(f"/v1/workspaces/{workspace['id']}/runs").json()
        (session,) = http.get(f"/v1/workspaces/{workspace['id']}/sessions").json()
    assert run["status"] == "completed" and run["text"] == WORDS
    # No session was selected: the prompt made one, and the page selected it.
    expect(page.get_by_role("button", name=session["title"], exact=True)).to_have_attribute(
        "aria-current", "true"
    )

    # By keyboard alone: the next prompt goes to the same session.
    prompt = page.get_by_role("textbox", name="Prompt", exact=True)
    prompt.focus()
    page.keyboard.type("second turn")
    page.keyboard.press("Control+Enter")
    expect(runs_list(page).get_by_role("listitem")).to_have_count(2)
    expect(runs_list(page).get_by_role("listitem").first).to_contain_text("completed")
    prompt.focus()
    page.keyboard.type("third by Tab")
    page.keyboard.press("Tab")  # the Model picker
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Send"
    page.keyboard.press("Enter")
    expect(runs_list(page).get_by_role("listitem")).to_have_count(3)
    expect(runs_list(page).get_by_role("listitem").first).to_contain_text("completed")
    assert assistant_texts(page) == [WORDS, "second turn", "third by Tab"]
    with api(live.url) as http:
        runs = http.get(f"/v1/workspaces/{workspace['id']}/runs").json()
    assert {r["session_id"] for r in runs} == {run["session_id"]}


def test_legible_at_phone_width(live_factory, tmp_path, browser):
    """One column at 390 px: nothing wider than the screen, long paths and
    unbroken output wrap instead of scrolling sideways."""
    deep = tmp_path / ("a-rather-long-directory-name-" * 4) / "project"
    deep.mkdir(parents=True)
    live = live_factory()
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    context.set_default_timeout(TIMEOUT_MS)
    try:
        phone = context.new_page()
        phone.goto(live.url)
        register_in_page(phone, deep)
        phone.get_by_role("textbox", name="Prompt", exact=True).fill("x" * 300 + " " + WORDS)
        phone.get_by_role("button", name="Send", exact=True).click()
        expect(runs_list(phone)).to_contain_text("completed")
        overflow = phone.evaluate(
            "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        wide = phone.evaluate(
            """() => [...document.querySelectorAll("body *")]
                .filter((e) => e.getBoundingClientRect().right > 391 || e.scrollWidth > 391)
                .map((e) => e.tagName + "." + e.className + "#" + e.id)"""
        )
        assert overflow <= 0, wide
        send = phone.get_by_role("button", name="Send", exact=True).bounding_box()
        prompt = phone.get_by_role("textbox", name="Prompt", exact=True).bounding_box()
        assert send and prompt and send["x"] + send["width"] <= 390
        assert prompt["width"] > 300  # the textbox takes the width, not a sidebar's share
    finally:
        context.close()


def test_cancel_stops_the_running_run(live_factory, project, page):
    live = live_factory(echo_delay=0.05)
    long_prompt = " ".join(f"w{i}" for i in range(400))
    page.goto(live.url)
    register_in_page(page, project)
    cancel = page.get_by_role("button", name="Cancel", exact=True)
    expect(cancel).to_be_disabled()
    page.get_by_role("textbox", name="Prompt", exact=True).fill(long_prompt)
    page.get_by_role("button", name="Send", exact=True).click()
    page.wait_for_function(
        "() => document.querySelector('article.msg.assistant .text')?.textContent.length > 10"
    )
    cancel.click()
    expect(runs_list(page)).to_contain_text("cancelled")
    expect(page.get_by_role("log", name="Conversation")).to_contain_text("Finished: canceled")
    expect(cancel).to_be_disabled()
    with api(live.url) as http:
        (workspace,) = http.get("/v1/workspaces").json()
        (run,) = http.get(f"/v1/workspaces/{workspace['id']}/runs").json()
    assert run["status"] == "cancelled"
    assert 0 < len(run["text"]) < len(long_prompt)
    assert assistant_texts(page) == [run["text"]]


def test_a_permission_answered_with_allow(fake, live_factory, project, page, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-console")
    fake.script(
        [Text("Let me write it. "), ToolCall("write", {"path": "hello.txt", "content": "hi"})]
    )
    fake.script([Text("Written.")])
    live = live_factory(
        provider="openai",
        model="m",
        base_url=fake.openai_base_url,
        api_key_env=KEY_ENV,
        permission_timeout=60,
    )
    with api(live.url) as http:
        wid = http.post("/v1/workspaces", json={"path": str(project)}).json()["id"]
    page.goto(live.url)
    expect(page.get_by_role("status")).to_have_text("Connected")
    page.get_by_role("textbox", name="Prompt", exact=True).fill("write hello.txt")
    page.get_by_role("button", name="Send", exact=True).click()
    request = page.get_by_role("region", name="Permission for write")
    expect(request).to_be_visible()
    with api(live.url) as http:
        (pending,) = http.get(f"/v1/workspaces/{wid}/permissions").json()
    expect(request).to_contain_text(f"write wants to {pending['action']}")
    expect(request).to_contain_text("hello.txt")
    expect(request.get_by_role("button", name="Allow for session", exact=True)).to_be_visible()
    expect(request.get_by_role("button", name="Deny", exact=True)).to_be_visible()
    assert not (project / "hello.txt").exists()
    request.get_by_role("button", name="Allow", exact=True).click()
    expect(runs_list(page)).to_contain_text("completed")
    expect(request).to_have_count(0)
    conversation = page.get_by_role("log", name="Conversation")
    expect(conversation).to_contain_text("Tool call: write")
    expect(conversation).to_contain_text("Result of write")
    expect(conversation).to_contain_text("Written.")
    assert (project / "hello.txt").read_text() == "hi"
    with api(live.url) as http:
        assert http.get(f"/v1/workspaces/{wid}/permissions").json() == []


def test_a_runs_diff_is_shown_and_revert_undoes_it(fake, live_factory, project, page, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-console")
    (project / "a.txt").write_text("one\n")
    command = "echo two >> a.txt && echo new > b.txt"
    fake.script([ToolCall("bash", {"command": command}, id="call_bash")])
    fake.script([Text("Changed a and b.")])
    live = live_factory(
        provider="openai", model="m", base_url=fake.openai_base_url, api_key_env=KEY_ENV
    )
    with api(live.url) as http:
        http.post("/v1/workspaces", json={"path": str(project), "yolo": True})
    page.goto(live.url)
    expect(page.get_by_role("status")).to_have_text("Connected")
    page.get_by_role("textbox", name="Prompt", exact=True).fill("change a and b")
    page.get_by_role("button", name="Send", exact=True).click()
    run = runs_list(page).get_by_role("listitem").first
    expect(run).to_contain_text("completed")
    run.get_by_role("button", name="Diff", exact=True).click()
    diff = run.get_by_label("Diff", exact=True)
    expect(diff).to_contain_text("+two")
    expect(diff).to_contain_text("+++ b/b.txt")

    reverted = page.locator("article.msg.reverted")
    run.get_by_role("button", name="Revert", exact=True).click()
    expect(reverted).to_have_count(4)
    expect(run).to_contain_text("reverted")
    assert (project / "a.txt").read_text() == "one\n" and not (project / "b.txt").exists()
    page.get_by_role("button", name="Undo revert", exact=True).click()
    expect(reverted).to_have_count(0)
    expect(page.get_by_role("button", name="Undo revert", exact=True)).to_be_hidden()
    assert (project / "b.txt").read_text() == "new\n"

    # A file changed by hand since: the page names it and asks before overwriting.
    (project / "a.txt").write_text("by hand\n")
    run.get_by_role("button", name="Revert", exact=True).click()
    expect(run.get_by_role("alert")).to_contain_text("a.txt")
    assert (project / "a.txt").read_text() == "by hand\n"
    run.get_by_role("button", name="Revert anyway", exact=True).click()
    expect(reverted).to_have_count(4)
    assert (project / "a.txt").read_text() == "one\n" and not (project / "b.txt").exists()


def test_a_retry_shows_on_its_run_and_a_reset_drops_the_streamed_text(
    fake, live_factory, project, page, monkeypatch
):
    monkeypatch.setenv(KEY_ENV, "sk-console")
    fake.script([HTTPError(503, "upstream busy", headers={"retry-after-ms": "1500"})])
    fake.script([Text("half of "), Text("an answer"), Drop()])
    fake.script([Text("the whole "), Pause(1.5), Text("answer")])
    live = live_factory(
        provider="openai",
        model="m",
        base_url=fake.openai_base_url,
        api_key_env=KEY_ENV,
        retry_base_delay=0.05,
    )
    with api(live.url) as http:
        http.post("/v1/workspaces", json={"path": str(project)})
    page.goto(live.url)
    expect(page.get_by_role("status")).to_have_text("Connected")
    page.get_by_role("textbox", name="Prompt", exact=True).fill("answer me")
    page.get_by_role("button", name="Send", exact=True).click()
    run = runs_list(page).get_by_role("listitem")
    expect(run).to_contain_text("Retrying (attempt 1, in 1.5s): upstream busy")
    expect(run).to_contain_text("running")
    # The dropped attempt's text is discarded by message.reset, live.
    page.wait_for_function(
        """() => {
            const parts = [...document.querySelectorAll("article.msg.assistant .text")];
            return parts.map((p) => p.textContent).join("") === "the whole ";
        }"""
    )
    expect(run).to_contain_text("completed")
    expect(run).to_contain_text("Retried 2×")
    assert assistant_texts(page) == ["the whole answer"]
    with api(live.url) as http:
        (workspace,) = http.get("/v1/workspaces").json()
        (stored,) = http.get(f"/v1/workspaces/{workspace['id']}/runs").json()
    # The run shows the model it used, first in its details.
    assert run.locator(".meta").inner_text().split(" · ")[0] == stored["model"]
    assert stored["text"] == "the whole answer"


# ---------------------------------------------------------------- restarts


def test_the_page_reconnects_across_a_daemon_restart(daemon_factory, project, page):
    port = free_port()
    daemon = daemon_factory("--port", str(port), "--echo-delay", "0.01")
    with daemon.client() as http:
        wid = http.post("/v1/workspaces", json={"path": str(project)}).json()["id"]
    page.goto(daemon.url)
    expect(page.get_by_role("status")).to_have_text("Connected")
    page.get_by_role("textbox", name="Prompt", exact=True).fill("before the restart")
    page.get_by_role("button", name="Send", exact=True).click()
    expect(runs_list(page)).to_contain_text("completed")

    daemon.signal()
    assert daemon.wait() == 0
    expect(page.get_by_role("status")).not_to_have_text("Connected")
    daemon.start()
    assert daemon.url.endswith(f":{port}")
    expect(page.get_by_role("status")).to_have_text("Connected")

    # A prompt sent by another client shows up live in the open page.
    with daemon.client() as http:
        session_id = http.get(f"/v1/workspaces/{wid}/sessions").json()[0]["id"]
        run = http.post(
            f"/v1/workspaces/{wid}/agent",
            json={"prompt": "after the restart", "session_id": session_id},
        ).json()
        assert http.get(f"/v1/workspaces/{wid}/runs/{run['id']}?wait=20").json()["status"] == (
            "completed"
        )
    expect(runs_list(page).get_by_role("listitem")).to_have_count(2)
    expect(runs_list(page).get_by_role("listitem").first).to_contain_text("completed")
    expect(page.locator("article.msg.assistant .text")).to_have_text(
        ["before the restart", "after the restart"]
    )
    # And the page still submits.
    page.get_by_role("textbox", name="Prompt", exact=True).fill("from the page again")
    page.get_by_role("button", name="Send", exact=True).click()
    expect(runs_list(page).get_by_role("listitem")).to_have_count(3)
    expect(runs_list(page).get_by_role("listitem").first).to_contain_text("completed")


# ---------------------------------------------------------------- token mode


def test_token_sign_in_sets_the_cookie_and_a_wrong_token_is_refused(live_factory, project, page):
    live = live_factory(token=TOKEN)
    page.goto(live.url)
    token = page.get_by_role("textbox", name="Token", exact=True)
    expect(token).to_be_visible()
    expect(page.get_by_role("textbox", name="Prompt", exact=True)).to_be_hidden()
    token.fill("not the token")
    page.get_by_role("button", name="Sign in", exact=True).click()
    expect(page.get_by_role("alert").filter(has_text="Wrong token")).to_be_visible()
    assert page.context.cookies() == []

    token.fill(TOKEN)
    token.press("Enter")
    expect(page.get_by_role("textbox", name="Prompt", exact=True)).to_be_visible()
    (cookie,) = page.context.cookies()
    assert cookie["name"] == "crushd_session"
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    assert cookie["path"] == "/"
    assert cookie["value"] != TOKEN and TOKEN not in cookie["value"]
    assert page.evaluate("document.cookie") == ""  # HttpOnly: scripts cannot read it

    register_in_page(page, project)
    page.get_by_role("textbox", name="Prompt", exact=True).fill("signed in")
    page.get_by_role("button", name="Send", exact=True).click()
    expect(runs_list(page)).to_contain_text("completed")
    assert assistant_texts(page) == ["signed in"]

    page.reload()  # the cookie keeps the browser signed in
    expect(page.get_by_role("textbox", name="Prompt", exact=True)).to_be_visible()
    page.get_by_role("button", name="Sign out", exact=True).click()
    expect(page.get_by_role("textbox", name="Token", exact=True)).to_be_visible()
    assert page.context.cookies() == []
    with api(live.url) as http:
        stale = {"Cookie": f"crushd_session={cookie['value']}"}
        assert http.get("/v1/workspaces", headers=stale).status_code == 401


ATTACK = """<!doctype html><html><body><script>
async function attack() {{
  const results = [];
  for (const [method, path, body] of [
    ["POST", "/v1/workspaces", {{path: {target}}}],
    ["GET", "/v1/workspaces", null],
    ["GET", "/metrics", null],
  ]) {{
    try {{
      await fetch("{base}" + path, {{
        method, credentials: "include", mode: "no-cors",
        headers: body ? {{"Content-Type": "text/plain"}} : {{}},
        body: body ? JSON.stringify(body) : undefined,
      }});
      results.push("sent");
    }} catch (e) {{ results.push("failed"); }}
  }}
  document.body.dataset.done = results.join(",");
}}
attack();
</script></body></html>"""


def test_a_page_from_another_origin_is_refused_even_when_signed_in(
    live_factory, project, tmp_path, page
):
    live = live_factory(token=TOKEN)
    page.goto(live.url)
    page.get_by_role("textbox", name="Token", exact=True).fill(TOKEN)
    page.get_by_role("button", name="Sign in", exact=True).click()
    expect(page.get_by_role("textbox", name="Prompt", exact=True)).to_be_visible()
    target = tmp_path / "target"
    target.mkdir()
    other = PageServer(ATTACK.format(base=live.url, target=json.dumps(str(target))).encode())
    try:
        evil = page.context.new_page()
        evil.goto(other.url)
        evil.wait_for_function("() => document.body.dataset.done === 'sent,sent,sent'")
        # Following a link from that page to the console is refused too.
        with evil.expect_navigation() as navigation:
            evil.evaluate("(url) => { location.href = url; }", live.url)
        assert navigation.value is not None and navigation.value.status == 403
        evil.close()
    finally:
        other.close()
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    with api(live.url) as http:
        assert http.get("/v1/workspaces", headers=bearer).json() == []
        metrics = http.get("/metrics", headers=bearer).text
    refused = sum(
        sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "crushd_http_requests_total" and sample.labels["status"] == "403"
    )
    assert refused == 4, metrics  # three fetches and the navigation
    wait_for(lambda: page.get_by_role("status").inner_text() == "Connected")


def test_every_console_file_ships_in_the_package():
    """A non-editable install carries only what package_data lists."""
    setup = configparser.ConfigParser()
    setup.read(Path(__file__).parent.parent / "setup.cfg")
    listed = {name.strip() for name in setup["options.package_data"]["crushd"].split(",")}
    web = Path(crushd.__file__).parent / "web"
    shipped = {f"web/{path.name}" for path in web.iterdir()}
    assert shipped and shipped <= listed
    assert {f"web/{filename}" for filename, _ in ASSETS.values()} == shipped


def test_the_page_gets_the_event_types_from_their_one_declaration(client):
    """The console listens for exactly :class:`EventType`, which the server
    writes into the page; every event type console.js names is among them."""
    page = client.get("/").get_data(as_text=True)
    found = re.search(r'<script type="application/json" id="event-types">(.*?)</script>', page)
    assert found is not None, page
    assert json.loads(found.group(1)) == [t.value for t in EventType]
    script = (Path(crushd.__file__).parent / "web" / "console.js").read_text()
    prefixes = "|".join(sorted({t.value.split(".")[0] for t in EventType if "." in t.value}))
    named = set(re.findall(rf"""["']((?:{prefixes})\.[A-Za-z_.]+)["']""", script))
    assert named, "console.js names no event type: the pattern above is out of date"
    assert named <= {t.value for t in EventType}, named - {t.value for t in EventType}
    assert "const EVENT_TYPES = JSON.parse(" in script  # no list of its own
