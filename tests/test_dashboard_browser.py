"""The dashboard in a real browser: Playwright driving Debian's Chromium
against a real server process (issue 13).

`make test` installs the chromium package when it runs as root (as CI does);
elsewhere, without /usr/bin/chromium, these tests skip and say how to get it.
With HEADWAY_SCREENSHOTS=DIR they also save the screenshots the README shows.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import httpx
import pytest
from headway.v1 import progress_pb2 as pb
from headway.v1 import progress_pb2_grpc as pb_grpc
from headway_server import auth

if TYPE_CHECKING:  # mypy knows the helpers as tests.*, pytest by their module names
    from tests.redis_e2e import ServerProcess
    from tests.redis_support import RedisServer, free_port
else:
    from redis_e2e import ServerProcess
    from redis_support import RedisServer, free_port

CHROMIUM = Path(os.environ.get("HEADWAY_CHROMIUM", "/usr/bin/chromium"))
pytestmark = pytest.mark.timeout(120)

if not CHROMIUM.exists():
    why = (
        f"browser tests need Debian's Chromium at {CHROMIUM}: run `make test` as root, "
        "or `apt-get install -y chromium`"
    )
    if os.environ.get("CI") == "true":
        raise RuntimeError(why)  # CI must run them: its `make test` installs it
    pytest.skip(why, allow_module_level=True)

from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright  # noqa: E402

# The default assertion wait, generous for a loaded 2-core machine.
expect.set_options(timeout=15_000)


class Headway:
    """A server process with HTTP on, and an HTTP client for its API."""

    def __init__(self, *extra: str, store: str = "memory") -> None:
        self.http_port = free_port()
        self.server = ServerProcess(
            store, free_port(), "--http-listen", f"127.0.0.1:{self.http_port}", *extra
        )
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.token = ""

    def start(self) -> Headway:
        self.server.start()
        return self

    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        reply = httpx.request(method, self.url + path, json=body, headers=headers, timeout=10)
        assert reply.status_code == 200, reply.text
        return reply.json()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM))
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 860})
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda exc: errors.append(str(exc)))
    yield opened
    context.close()
    assert not errors, f"the page threw: {errors}"


@pytest.fixture
def headway() -> Iterator[Headway]:
    running = Headway().start()
    try:
        yield running
    finally:
        running.server.stop()


def screenshot(page: Page, name: str) -> None:
    folder = os.environ.get("HEADWAY_SCREENSHOTS")
    if folder:
        page.screenshot(path=str(Path(folder) / name))


def row(page: Page, operation_id: str) -> Locator:
    return page.locator(f'.viewport a.row[data-id="{operation_id}"]')


def test_progress_moves_live_to_succeeded(page: Page, headway: Headway) -> None:
    page.goto(headway.url)
    expect(page.locator("#connection")).to_have_text("live")
    op = headway.api(
        "POST",
        "/v1/operations",
        {"kind": "ingest", "project": "web", "total": "200", "unit": "files"},
    )
    line = row(page, op["id"])
    expect(line.locator(".state")).to_have_text("QUEUED")
    headway.api("POST", f"/v1/operations/{op['id']}:update", {"completed": "50"})
    expect(line.locator(".state")).to_have_text("RUNNING")
    expect(line.locator(".pct")).to_have_text("25%")
    expect(line.locator(".bar > span")).to_have_attribute("style", "width:25.0%")
    headway.api("POST", f"/v1/operations/{op['id']}:update", {"completed": "150"})
    expect(line.locator(".pct")).to_have_text("75%")
    headway.api("POST", f"/v1/operations/{op['id']}:complete", {"message": "done"})
    expect(line.locator(".state")).to_have_text("SUCCEEDED")
    expect(line.locator(".pct")).to_have_text("100%")
    # The project list and the summary follow too.
    expect(page.locator('#projects a[data-project="web"]')).to_contain_text("web")
    expect(page.locator('[data-count="SUCCEEDED"]')).to_have_text("1")


def test_filters_and_the_operation_page(page: Page, headway: Headway) -> None:
    ids = {}
    for kind, project in (("crawl", "web"), ("upload", "docs"), ("crawl", "docs")):
        op = headway.api("POST", "/v1/operations", {"kind": kind, "project": project})
        ids[(kind, project)] = op["id"]
    target = ids[("crawl", "docs")]
    headway.api(
        "POST",
        f"/v1/operations/{target}/logs",
        {
            "entries": [
                {"level": "INFO", "message": "fetched page 1"},
                {"level": "WARNING", "message": "slow host"},
                {"level": "ERROR", "message": "robots.txt forbids /private", "item": "/private"},
            ]
        },
    )
    child = headway.api(
        "POST", "/v1/operations", {"kind": "fetch", "project": "docs", "parentId": target}
    )
    page.goto(f"{headway.url}/#/?project=docs")
    expect(page.locator(".viewport a.row:visible")).to_have_count(3)
    page.select_option("#f-kind", "crawl")
    expect(page.locator(".viewport a.row:visible")).to_have_count(1)
    row(page, target).click()
    expect(page).to_have_url(f"{headway.url}/#/op/{target}")
    expect(page.locator(".op-head [data-state]")).to_have_text("QUEUED")
    logs = page.locator(".logs tr.log")
    expect(logs).to_have_count(3)
    page.select_option(".log-level", "ERROR")
    expect(logs).to_have_count(1)
    expect(logs.first).to_contain_text("robots.txt forbids /private")
    page.select_option(".log-level", "WARNING")
    expect(logs).to_have_count(2)
    expect(page.locator(".children")).to_contain_text(child["id"])
    expect(page.locator(".children")).to_contain_text("1 queued")
    # The page is live too.
    headway.api("POST", f"/v1/operations/{target}:update", {"percent": 40, "message": "page 2"})
    expect(page.locator(".op-head .pct")).to_have_text("40.0%")
    expect(page.locator(".op-head .message")).to_have_text("page 2")
    expect(page.locator(".timeline")).to_contain_text("RUNNING")


def test_logs_page_on(page: Page, headway: Headway) -> None:
    op = headway.api("POST", "/v1/operations", {"kind": "etl", "project": "logs"})
    entries = [
        {"level": "ERROR" if n % 10 == 0 else "INFO", "message": f"row {n}"} for n in range(150)
    ]
    headway.api("POST", f"/v1/operations/{op['id']}/logs", {"entries": entries})
    page.goto(f"{headway.url}/#/op/{op['id']}")
    logs = page.locator(".logs tr.log")
    expect(logs).to_have_count(100)  # one page
    page.select_option(".log-level", "ERROR")
    expect(logs).to_have_count(10)
    page.click(".log-more")
    expect(logs).to_have_count(15)  # the next page's errors join the filtered view
    expect(page.locator(".log-more")).to_be_hidden()
    page.select_option(".log-level", "")
    expect(logs).to_have_count(150)
    expect(logs.last).to_contain_text("row 149")


def test_cancel_from_the_operation_page(page: Page, headway: Headway) -> None:
    keep = headway.api("POST", "/v1/operations", {"kind": "batch", "project": "web"})
    victim = headway.api("POST", "/v1/operations", {"kind": "batch", "project": "web"})
    page.on("dialog", lambda dialog: dialog.accept("wrong input file"))
    page.goto(f"{headway.url}/#/op/{victim['id']}")
    page.locator("button.cancel").click()
    # A QUEUED operation is cancelled at once.
    expect(page.locator(".op-head [data-state]")).to_have_text("CANCELLED")
    expect(page.locator("button.cancel")).to_have_count(0)
    stored = headway.api("GET", f"/v1/operations/{victim['id']}")
    assert (stored["state"], stored["cancelReason"]) == ("CANCELLED", "wrong input file")
    assert headway.api("GET", f"/v1/operations/{keep['id']}")["state"] == "QUEUED"


def test_the_page_resumes_by_itself_after_a_server_restart(page: Page, headway: Headway) -> None:
    before = headway.api("POST", "/v1/operations", {"kind": "before", "project": "web"})
    page.goto(headway.url)
    expect(row(page, before["id"])).to_be_visible()
    headway.server.stop()
    expect(page.locator("#connection")).to_have_text("reconnecting…")
    headway.server.start()
    # A memory store starts empty: the page drops what the old server had and
    # shows what the new one has, without a reload.
    after = headway.api("POST", "/v1/operations", {"kind": "after", "project": "web"})
    expect(row(page, after["id"])).to_be_visible(timeout=30_000)
    expect(row(page, before["id"])).to_have_count(0)
    expect(page.locator("#connection")).to_have_text("live")
    headway.api("POST", f"/v1/operations/{after['id']}:update", {"percent": 60})
    expect(row(page, after["id"]).locator(".pct")).to_have_text("60%")


def test_on_redis_the_page_resumes_where_it_was_after_a_restart(page: Page, tmp_path: Path) -> None:
    """A restart on a Redis store keeps the epoch: the page resumes from its
    Last-Event-ID with what changed meanwhile, no fresh snapshot."""
    redis = RedisServer(tmp_path).start()
    headway = Headway(store=f"{redis.url}?namespace=dash").start()
    try:
        kept = headway.api("POST", "/v1/operations", {"kind": "kept", "project": "web"})
        page.goto(headway.url)
        expect(row(page, kept["id"])).to_be_visible()
        page.evaluate(RESET_COUNTER)
        headway.server.stop()
        expect(page.locator("#connection")).to_have_text("reconnecting…")
        headway.server.start()
        headway.api("POST", f"/v1/operations/{kept['id']}:update", {"percent": 70})
        expect(row(page, kept["id"]).locator(".pct")).to_have_text("70%", timeout=30_000)
        expect(page.locator("#connection")).to_have_text("live")
        assert page.evaluate("window.__snapshots") == 0, "resumed with a fresh snapshot"
    finally:
        headway.server.stop()
        redis.stop()


# Counts the snapshots the page's list stream receives from now on.
RESET_COUNTER = """() => {
  window.__snapshots = 0;
  const original = window.fetch;
  window.fetch = async (...args) => {
    const response = await original(...args);
    if (String(args[0]).includes(":watch") && response.body) {
      const [mine, theirs] = response.body.tee();
      (async () => {
        const reader = mine.pipeThrough(new TextDecoderStream()).getReader();
        for (;;) {
          const { value, done } = await reader.read();
          if (done) return;
          window.__snapshots += (value.match(/^event: snapshot$/gm) || []).length;
        }
      })();
      return new Response(theirs, { status: response.status, headers: response.headers });
    }
    return response;
  };
}"""


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A server that asks for tokens: its URL, and tokens by name (read and
    admin for project web; root for all)."""
    tokens: dict[str, str] = {}
    blocks = []
    grants = [("read", ["web"], "read"), ("admin", ["web"], "admin"), ("root", ["*"], "admin")]
    for name, projects, role in grants:
        tokens[name] = auth.new_token()
        blocks.append(auth.token_block(f"dash-{name}", tokens[name], projects, [role]))
    path = tmp_path / "tokens.toml"
    path.write_text("\n".join(blocks))
    running = Headway("--auth-tokens", str(path)).start()
    try:
        running.token = tokens["root"]
        running.api("POST", "/v1/operations", {"kind": "crawl", "project": "web", "total": "10"})
        running.api("POST", "/v1/operations", {"kind": "secret", "project": "hr"})
        yield running.url, tokens
    finally:
        running.server.stop()


def test_signing_in_with_a_token(page: Page, secured: tuple[str, dict[str, str]]) -> None:
    url, tokens = secured
    page.goto(url)
    expect(page.locator("#login")).to_be_visible()
    page.fill("#login-token", "hw_not-a-token")
    page.click("#login button[type=submit]")
    expect(page.locator("#login-why")).to_contain_text("refused")
    page.fill("#login-token", tokens["read"])
    page.click("#login button[type=submit]")
    expect(page.locator("#who")).to_have_text("signed in as dash-read")
    expect(page.locator("#connection")).to_have_text("live")
    # Only project web is visible to this token.
    expect(page.locator(".viewport a.row:visible")).to_have_count(1)
    expect(page.locator(".viewport a.row:visible")).to_contain_text("crawl")
    expect(page.locator('#projects a[data-project="hr"]')).to_have_count(0)
    # A reader sees no cancel button.
    page.locator(".viewport a.row:visible").click()
    expect(page.locator(".op-head [data-state]")).to_have_text("QUEUED")
    expect(page.locator("button.cancel")).to_have_count(0)
    # The token is not in any URL the page fetched.
    page.click("#signout")
    expect(page.locator("#login")).to_be_visible()


def test_an_admin_token_may_cancel(page: Page, secured: tuple[str, dict[str, str]]) -> None:
    url, tokens = secured
    page.goto(url)
    page.fill("#login-token", tokens["admin"])
    page.click("#login button[type=submit]")
    page.locator(".viewport a.row:visible").click()
    expect(page.locator("button.cancel")).to_be_visible()


def test_five_thousand_operations_changing(page: Page, headway: Headway) -> None:
    """A project of 5,000 operations changing constantly: the page keeps up
    and draws only the rows in view."""
    with grpc.insecure_channel(headway.server.address) as channel:
        stub = pb_grpc.ProgressTrackerStub(channel)
        ids: list[str] = []
        for start in range(0, 5000, 500):
            futures = [
                stub.StartOperation.future(
                    pb.StartOperationRequest(kind=f"job-{i % 7}", project="big", total=100)
                )
                for i in range(start, start + 500)
            ]
            ids.extend(f.result().id for f in futures)
        page.goto(f"{headway.url}/#/?project=big")
        expect(page.locator("#shown")).to_have_text("5,000 of 5,000")
        frames_before = page.evaluate(FRAME_COUNTER)
        for step in range(1, 11):
            for first in range(0, 5000, 1000):
                stub.BatchUpdateOperations(
                    pb.BatchUpdateOperationsRequest(
                        updates=[
                            # Operation i ends at 10 * (i % 10 + 1) percent.
                            pb.UpdateOperationRequest(
                                operation_id=ids[i], completed=min(100, step * (i % 10 + 1))
                            )
                            for i in range(first, first + 1000)
                        ]
                    )
                )
        expect(page.locator('[data-count="RUNNING"]')).to_have_text("5,000")
        expect(row(page, ids[-1]).locator(".pct")).to_have_text("100%")
        expect(row(page, ids[-2]).locator(".pct")).to_have_text("90%")
        # Virtualized: a screenful of rows in the page, not 5,000.
        assert page.locator(".viewport a.row").count() < 100
        frames = page.evaluate(FRAME_COUNTER) - frames_before
        assert frames > 0, "the page stopped drawing"


# Counts animation frames since the page loaded (installed on first call).
FRAME_COUNTER = """() => {
  if (!window.__frames) {
    window.__frames = 1;
    const tick = () => { window.__frames += 1; requestAnimationFrame(tick); };
    requestAnimationFrame(tick);
  }
  return window.__frames;
}"""


def test_badges_stages_and_errors_show_as_a_user_would_see_them(
    page: Page, headway: Headway
) -> None:
    """A realistic scene (it is also the README's screenshot): kinds, stage
    plans, a stalled producer, a failure with its error, logged errors."""
    plan = [{"name": n, "weight": w} for n, w in (("clone", 1), ("parse", 3), ("embed", 5))]
    scene = []
    for i, (kind, project) in enumerate(
        [("repo-ingest", "acme")] * 4 + [("web-crawl", "acme")] * 3 + [("batch-upload", "beta")] * 3
    ):
        op = headway.api(
            "POST",
            "/v1/operations",
            {
                "kind": kind,
                "project": project,
                "total": str(200 + 40 * i),
                "unit": "files",
                "stages": plan,
                "labels": {"team": "search" if i % 2 else "data"},
                "heartbeatTimeout": "1s" if i == 3 else "600s",
            },
        )
        scene.append(op["id"])
        for step, stage in enumerate(("clone", "parse", "embed")[: 1 + i % 3]):
            headway.api(
                "POST",
                f"/v1/operations/{op['id']}:update",
                {
                    "stage": stage,
                    "stageCompleted": str(10 + 7 * i),
                    "stageTotal": "100",
                    "completed": str((10 + 7 * i) * (step + 1)),
                    "message": f"{stage} batch {i}",
                },
            )
    failed, done, stalled, noisy = scene[1], scene[2], scene[3], scene[5]
    headway.api(
        "POST",
        f"/v1/operations/{failed}:fail",
        {"error": {"code": "RATE_LIMITED", "message": "GitHub API quota exhausted"}},
    )
    headway.api("POST", f"/v1/operations/{done}:complete", {"message": "indexed"})
    headway.api(
        "POST",
        f"/v1/operations/{noisy}/logs",
        {"entries": [{"level": "ERROR", "message": f"HTTP 503 on page {n}"} for n in range(3)]},
    )
    page.goto(f"{headway.url}/#/?project=acme")
    expect(row(page, stalled).locator(".badge.stalled")).to_be_visible()
    expect(row(page, noisy).locator(".badge.errors")).to_have_text("3 err")
    expect(row(page, failed).locator(".state")).to_have_text("FAILED")
    expect(page.locator('#projects a[data-project="beta"]')).to_be_visible()
    screenshot(page, "dashboard.png")
    row(page, failed).click()
    expect(page.locator(".facts-card.error")).to_contain_text("GitHub API quota exhausted")
    expect(page.locator('.stages tr[data-stage="parse"]')).to_contain_text("INTERRUPTED")
    screenshot(page, "dashboard-operation.png")


def test_light_and_dark_schemes(page: Page, headway: Headway) -> None:
    def background() -> str:
        return str(page.evaluate("getComputedStyle(document.body).backgroundColor"))

    page.emulate_media(color_scheme="dark")
    page.goto(headway.url)
    expect(page.locator("#connection")).to_have_text("live")
    dark = background()
    page.emulate_media(color_scheme="light")
    light = background()
    assert dark != light
    assert _luminance(dark) < 0.2 < 0.8 < _luminance(light)
    # ◐ cycles: as the system → light → dark, and the choice is kept.
    page.emulate_media(color_scheme="light")
    page.click("#theme")
    assert background() == light
    page.click("#theme")
    assert background() == dark
    screenshot(page, "dashboard-dark.png")
    page.reload()
    assert background() == dark


def _luminance(css: str) -> float:
    red, green, blue = (int(part) for part in css[css.index("(") + 1 : -1].split(",")[:3])
    return (0.2126 * red + 0.7152 * green + 0.0722 * blue) / 255


def test_what_producers_write_is_shown_as_text_never_run(page: Page, headway: Headway) -> None:
    hostile = '<img src=x onerror="window.__pwned=1">'
    op = headway.api(
        "POST",
        "/v1/operations",
        {"kind": "crawl", "project": "web", "labels": {"note": hostile}},
    )
    headway.api(
        "POST",
        f"/v1/operations/{op['id']}:update",
        {"stage": hostile, "message": hostile, "checkpoint": hostile},
    )
    headway.api("POST", f"/v1/operations/{op['id']}/logs", {"entries": [{"message": hostile}]})
    page.goto(f"{headway.url}/#/op/{op['id']}")
    expect(page.locator(".op-head .message")).to_have_text(hostile)
    expect(page.locator(".logs")).to_contain_text(hostile)
    page.goto(f"{headway.url}/#/?project=web")
    expect(row(page, op["id"])).to_contain_text(hostile)
    assert page.evaluate("window.__pwned") is None
    assert page.locator("img").count() == 0
