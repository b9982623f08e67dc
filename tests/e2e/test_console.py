"""The web console (/ui) in a real browser: Playwright drives Debian's Chromium against a real
server. It logs in with a key, starts a sandbox, types into its terminal, uploads and
downloads a file, opens a preview, visits every page, and on each checks that text is
readable (WCAG AA contrast) and that the page can be used from the keyboard. Screenshots of
the main pages go to CORRAL_TEST_SCREENSHOTS (default: a folder in the system's temp dir)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.e2e.conftest import Server

CHROMIUM = "/usr/bin/chromium"
SHOTS = Path(
    os.environ.get("CORRAL_TEST_SCREENSHOTS", Path(tempfile.gettempdir()) / "corral-console")
)
# As root, with no display and no network beyond this machine (see the machine notes).
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# Every visible text's contrast against the background it is drawn on (WCAG 2 AA: 4.5:1,
# 3:1 for large text); the terminal's own colours are the terminal's.
CONTRAST = """() => {
  const rgb = (c) => (c.match(/[\\d.]+/g) || []).map(Number);
  const lin = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
  const lum = ([r, g, b]) => 0.2126 * lin(r) + 0.7152 * lin(g) + 0.0722 * lin(b);
  const background = (element) => {
    for (let e = element; e; e = e.parentElement) {
      const c = rgb(getComputedStyle(e).backgroundColor);
      if (c.length === 3 || (c.length === 4 && c[3] > 0)) return c.slice(0, 3);
    }
    return [255, 255, 255];
  };
  const failures = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  while (walker.nextNode()) {
    const element = walker.currentNode.parentElement;
    const text = walker.currentNode.textContent.trim();
    if (!text || !element || element.closest('.xterm, .skip, .visually-hidden')) continue;
    if (!element.checkVisibility()) continue;
    const style = getComputedStyle(element);
    const [a, b] = [lum(rgb(style.color).slice(0, 3)), lum(background(element))];
    const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    const size = parseFloat(style.fontSize);
    const large = size >= 24 || (size >= 18.66 && Number(style.fontWeight) >= 700);
    if (ratio < (large ? 3 : 4.5)) failures.push(`${text.slice(0, 40)}: ${ratio.toFixed(2)}`);
  }
  return failures;
}"""

# What has the keyboard's focus, and whether it shows (an outline or a changed look).
FOCUSED = """() => {
  const e = document.activeElement;
  if (!e || e === document.body) return null;
  const style = getComputedStyle(e);
  const named = e.labels && e.labels.length ? e.labels[0].textContent.trim() : '';
  const label = e.getAttribute('aria-label') || named || e.textContent.trim().slice(0, 40) || e.id;
  return {tag: e.tagName, label, visible: style.outlineStyle !== 'none' && style.outlineWidth !== '0px'};
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), "Chromium is missing: run scripts/setup --dev"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield launched
        launched.close()


def new_page(browser: Browser) -> Page:
    page = browser.new_context(viewport={"width": 1280, "height": 860}, accept_downloads=True)
    made = page.new_page()
    made.set_default_timeout(60_000)
    return made


def log_in(page: Page, server: Server, key: str) -> None:
    page.goto(f"{server.url}/ui")
    expect(page.get_by_label("API key")).to_be_focused()
    page.keyboard.type(key)
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="Sandboxes")).to_be_visible()


def check_page(page: Page, name: str, must_reach: list[str]) -> None:
    """Readable text, every control in `must_reach` reachable with Tab and its focus visible,
    and a screenshot."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
    assert page.evaluate(CONTRAST) == [], f"{name}: text below WCAG AA contrast"
    page.locator(".skip").focus()  # the first thing on every page: walk on from there
    reached: list[str] = [page.evaluate(FOCUSED)["label"]]
    for _ in range(60):
        page.keyboard.press("Tab")
        focused = page.evaluate(FOCUSED)
        if focused is None:
            continue
        assert focused["visible"], f"{name}: no visible focus on {focused}"
        reached.append(focused["label"])
    missing = [label for label in must_reach if not any(label in seen for seen in reached)]
    assert not missing, f"{name}: not reachable by keyboard: {missing} (reached {reached})"


def test_the_console_from_login_to_terminal_files_and_previews(
    server: Server, browser: Browser, tmp_path: Path
) -> None:
    page = new_page(browser)
    refused = new_page(browser)
    refused.goto(f"{server.url}/ui/")
    refused.get_by_label("API key").fill("corral_not_a_key")
    refused.get_by_role("button", name="Log in").click()
    expect(refused.get_by_text("That key was not accepted")).to_be_visible()
    check_page(refused, "login", ["API key", "Log in"])

    log_in(page, server, server.admin_key)
    # The key is in this tab's session storage only: not in local storage, not in a cookie.
    stored = page.evaluate("() => [sessionStorage.length, localStorage.length, document.cookie]")
    assert stored == [1, 0, ""]
    check_page(page, "sandboxes", ["Sandboxes", "Images", "Keys", "Log out", "New sandbox"])

    page.get_by_label("Runtime").select_option("namespaces")
    page.get_by_role("button", name="New sandbox").click()
    expect(page.get_by_role("heading", name="Sandbox sb-")).to_be_visible()
    sandbox_id = page.url.rsplit("/", 1)[-1]
    headers = {"Authorization": f"Bearer {server.admin_key}"}
    try:
        # The terminal: a real shell over the PTY WebSocket, typed into like a person would.
        expect(page.get_by_text("Connected: a shell in the sandbox.")).to_be_visible()
        page.locator(".xterm").click()
        page.keyboard.type("echo $((6*7))-from-the-console\n")
        expect(page.locator(".xterm-rows")).to_contain_text("42-from-the-console")
        check_page(page, "terminal", ["Terminal", "Pause", "Terminate", "Terminal input"])
        # Tab stays in the shell (completion); Shift+Tab leaves the terminal: no keyboard trap.
        page.locator(".xterm").click()
        page.keyboard.press("Shift+Tab")
        assert page.evaluate(FOCUSED)["label"] != "Terminal input"

        # Files: upload from this computer, then download it back.
        page.get_by_role("tab", name="Files").click()
        page.get_by_role("textbox", name="Directory").fill("/tmp")
        page.get_by_role("button", name="Open", exact=True).click()
        local = tmp_path / "hello.txt"
        local.write_bytes(b"uploaded through the browser\n" * 1000)
        page.locator("#files-upload").set_input_files(str(local))
        page.get_by_role("button", name="Upload", exact=True).click()
        expect(page.get_by_text("Uploaded hello.txt.")).to_be_visible()
        inside = httpx.get(
            f"{server.url}/v1/sandboxes/{sandbox_id}/files/content",
            params={"path": "/tmp/hello.txt"},
            headers=headers,
        )
        assert inside.content == local.read_bytes()
        with page.expect_download() as download:
            page.get_by_role("button", name="Download hello.txt").click()
        saved = tmp_path / "downloaded.txt"
        download.value.save_as(saved)
        assert saved.read_bytes() == local.read_bytes()
        check_page(page, "files", ["Directory", "Upload", "Download hello.txt"])

        # A preview: a server in the sandbox, opened in one click (its signed link).
        httpx.post(
            f"{server.url}/v1/sandboxes/{sandbox_id}/exec",
            json={
                "cmd": "mkdir -p /srv && echo '<h1>served from the sandbox</h1>' > /srv/index.html"
                " && cd /srv && nohup python3 -m http.server 8000 > /dev/null 2>&1 &"
            },
            headers=headers,
            timeout=60,
        ).raise_for_status()
        page.get_by_role("tab", name="Previews").click()
        page.get_by_label("Port", exact=True).fill("8000")
        page.get_by_role("button", name="Open port", exact=True).click()
        with page.context.expect_page() as opened:
            page.get_by_role("link", name="Open port 8000").click()
        preview = opened.value
        for _ in range(50):  # the server in the sandbox may still be starting
            if "served from the sandbox" in preview.content():
                break
            preview.wait_for_timeout(200)
            preview.reload()
        expect(preview.get_by_role("heading")).to_have_text("served from the sandbox")
        preview.close()
        check_page(page, "previews", ["Port", "Open port 8000", "Revoke the preview of port 8000"])

        # The list, live: this sandbox with its CPU and memory drawn as they are sampled.
        page.get_by_role("link", name="Sandboxes").click()
        row = page.get_by_role("row").filter(has_text=sandbox_id)
        expect(row.locator("polyline").first).to_be_attached(timeout=60_000)
        expect(row).to_contain_text("running")
        check_page(page, "sandboxes-live", [sandbox_id, "New sandbox"])
        page.get_by_role("link", name=sandbox_id).click()

        for tab in ("Processes", "Events", "Audit"):
            page.get_by_role("tab", name=tab).click()
            expect(page.get_by_role("tabpanel")).not_to_be_empty()
            check_page(page, tab.lower(), [tab])
        expect(page.get_by_role("tabpanel")).to_contain_text("exec")  # the audit trail

        # The tabs follow the arrow keys, as a tab list should.
        page.get_by_role("tab", name="Audit").focus()
        page.keyboard.press("ArrowRight")
        expect(page.get_by_role("tab", name="Previews")).to_have_attribute("aria-selected", "true")
    finally:
        httpx.delete(f"{server.url}/v1/sandboxes/{sandbox_id}", headers=headers)

    for name, reach in [
        ("images", ["Images"]),
        ("volumes", ["Name", "New volume"]),
        ("snapshots", ["Snapshots"]),
        ("pools", ["Pools"]),
        ("keys", ["Name", "New key"]),
    ]:
        page.goto(f"{server.url}/ui/#/{name}")
        expect(page.get_by_role("heading", name=name.capitalize())).to_be_visible()
        check_page(page, name, reach)

    # A reload keeps the login (the same tab); a new tab of another browser context does not.
    page.reload()
    expect(page.get_by_role("heading", name="Keys")).to_be_visible()
    other = new_page(browser)
    other.goto(f"{server.url}/ui/#/keys")
    expect(other.get_by_label("API key")).to_be_visible()


def test_a_tenants_console_shows_only_its_own_and_no_admin_pages(
    server: Server, browser: Browser
) -> None:
    tenant = server.new_key("console-tenant")
    page = new_page(browser)
    log_in(page, server, tenant)
    page.goto(f"{server.url}/ui/#/keys")
    expect(page.get_by_text("Keys are managed with an admin key")).to_be_visible()
    page.goto(f"{server.url}/ui/#/sandboxes/sb-0000000000000000")
    expect(page.get_by_role("alert")).to_contain_text("sb-0000000000000000")


def test_the_console_is_served_with_headers_that_keep_it_to_itself(server: Server) -> None:
    page = httpx.get(f"{server.url}/ui/")
    assert page.status_code == 200 and '<div id="app">' in page.text
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["referrer-policy"] == "no-referrer"
    assert httpx.get(f"{server.url}/ui").headers["location"] == "/ui/"
    assert httpx.get(f"{server.url}/ui/../v1/keys").status_code in (401, 404)
    missing = httpx.get(f"{server.url}/ui/nothing-here.js")
    assert missing.status_code == 404
