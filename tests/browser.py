"""MCP Apps views in a real browser: Debian's Chromium, driven by Playwright, around the test host
page in tests/apps_host/ (the official host bridge, bundled by esbuild; see its README).

One Chromium runs per test process (`chromium`); each `app_host` is a fresh browser context
whose page sits at the MCP server's own origin, under `HOST_PATH`: Playwright answers those
requests from tests/apps_host/, and everything else (the MCP endpoint) reaches the real server,
so the server's Host/Origin guard sees an ordinary same-origin browser client.

Browsers and npm are outside Python's reach: without them these tests fail in CI and are
skipped elsewhere (`missing`).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import anyio
import pytest
from PIL import Image
from playwright.async_api import ConsoleMessage, FrameLocator, Locator, Page, Route, async_playwright

from .processes import dies_with_parent, stop_server

HOST_DIR = Path(__file__).parent / "apps_host"
BUNDLE = HOST_DIR / "dist" / "host.js"
CHROMIUM = Path("/usr/bin/chromium")
#: Where the host page's files are served, on the MCP server's origin.
HOST_PATH = "/__test_host/"

#: What hosts allow a view that declares no domains of its own: inline script and style, images,
#: fonts and media from data: and blob:, and no network at all (so a CDN reference fails).
VIEW_CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'unsafe-inline'",
        "style-src 'unsafe-inline'",
        "img-src data: blob:",
        "font-src data:",
        "media-src data: blob:",
        "connect-src 'none'",
        "frame-src 'none'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
    ]
)

#: The host's files: name under HOST_PATH -> (file, content type, extra headers).
_FILES = {
    "host.html": (HOST_DIR / "src" / "host.html", "text/html", {}),
    "host.js": (BUNDLE, "text/javascript", {}),
    "sandbox.html": (HOST_DIR / "src" / "sandbox.html", "text/html", {"Content-Security-Policy": VIEW_CSP}),
}

_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # Loopback only: a stray request anywhere else fails at once instead of leaving the machine.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]
_START_SECONDS = 20
#: How long a view may take from the tool call to ui/initialize and the tool input.
OPEN_SECONDS = 10
#: Playwright's wait for any one element or action.
_ACTION_MS = 10_000


def missing(what: str) -> NoReturn:
    """CI must run the browser tests, so there a missing program fails them; elsewhere they are
    skipped with the reason."""
    message = f"{what}: the MCP Apps browser tests need it (.ci/run installs it)"
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def build_host() -> None:
    """Builds the host page's bundle (npm ci, then esbuild) unless it is newer than its sources.
    Test processes build one at a time: the first builds, the others find it fresh."""
    npm = shutil.which("npm")
    if npm is None:
        missing("npm is not installed (apt-get install nodejs npm)")
    with (HOST_DIR / ".build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lockfile = HOST_DIR / "package-lock.json"
        installed = HOST_DIR / "node_modules" / ".package-lock.json"
        if not installed.exists() or installed.stat().st_mtime < lockfile.stat().st_mtime:
            _npm(npm, "ci")
        sources = [HOST_DIR / "package.json", lockfile, *(HOST_DIR / "src").iterdir()]
        if not BUNDLE.exists() or BUNDLE.stat().st_mtime < max(p.stat().st_mtime for p in sources):
            _npm(npm, "run", "build")


def _npm(npm: str, *args: str) -> None:
    done = subprocess.run(
        [npm, *args], cwd=HOST_DIR, capture_output=True, text=True, timeout=300, check=False
    )
    if done.returncode != 0:
        pytest.fail(f"npm {' '.join(args)} in {HOST_DIR} failed:\n{done.stdout}{done.stderr}", pytrace=False)


@contextlib.contextmanager
def chromium(profile: Path) -> Iterator[str]:
    """Runs Chromium with a fresh profile in `profile`; yields its DevTools endpoint."""
    if not os.access(CHROMIUM, os.X_OK):
        missing(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    log = profile / "chromium.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [str(CHROMIUM), *_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            preexec_fn=dies_with_parent(signal.SIGKILL),
        )
    try:
        yield _endpoint(process, profile / "DevToolsActivePort", log)
    finally:
        stop_server(process)


def _endpoint(process: subprocess.Popen[bytes], port_file: Path, log: Path) -> str:
    """The DevTools WebSocket address Chromium writes into its profile once it listens."""
    for _ in range(_START_SECONDS * 20):
        if process.poll() is not None:
            break
        lines = port_file.read_text().splitlines() if port_file.exists() else []
        if len(lines) == 2:
            return f"ws://127.0.0.1:{lines[0]}{lines[1]}"
        time.sleep(0.05)
    pytest.fail(f"Chromium did not start:\n{log.read_text()[-3000:]}", pytrace=False)


def not_blank(png: bytes) -> Image.Image:
    """The screenshot `png` as an image, asserting it shows something: a blank or flat view has a
    handful of colours at most, a rendered one (text, images, anti-aliasing) many."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 16)
    count = len(colours) if colours is not None else 1 << 16
    assert count > 8, f"the screenshot is blank: {count} distinct colours"
    return image


class View:
    """One view the host rendered: its frame for locators, its element for screenshots."""

    def __init__(self, page: Page, number: int) -> None:
        self.page = page
        self.number = number
        self.element: Locator = page.locator(f"#view-{number}")
        self.frame: FrameLocator = page.frame_locator(f"#view-{number}")

    async def outcome(self) -> dict[str, Any]:
        """What the model's tool call behind this view ended with: {"result": CallToolResult}
        or {"error": message}."""
        with anyio.fail_after(OPEN_SECONDS):
            outcome: dict[str, Any] = await self.page.evaluate("n => testHost.outcome(n)", self.number)
        return outcome

    async def events(self) -> list[str]:
        """The notifications the view sent the host so far, in order: "initialized", "sizechange"."""
        events: list[str] = await self.page.evaluate("n => testHost.events(n)", self.number)
        return events

    async def request(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Sends the view the request `method` as a host would: {"result": ...} or {"error":
        message, "code": JSON-RPC code}."""
        with anyio.fail_after(OPEN_SECONDS):
            answer: dict[str, Any] = await self.page.evaluate(
                "([n, method, params]) => testHost.request(n, method, params)",
                [self.number, method, params or {}],
            )
        return answer

    async def screenshot(self, path: Path | None = None) -> Image.Image:
        """The view as the user sees it (also saved to `path`), asserted not blank."""
        return not_blank(await self.element.screenshot(path=path))


class AppHost:
    """The test host page: opens views as a host would and tells what they asked the host for."""

    def __init__(self, page: Page, tools: list[str]) -> None:
        self.page = page
        self.tools = tools

    async def open(
        self,
        tool: str,
        arguments: dict[str, Any] | None = None,
        *,
        theme: str | None = None,
        width: int = 720,
        server_tools: bool = True,
        refuse: tuple[str, ...] = (),
        result_first: bool = False,
    ) -> View:
        """Calls `tool` as the model would and renders its view `width` pixels wide, in `theme`
        ("light" or "dark"; the host's current one if None). Returns once the view is initialized
        and has the tool input; the result reaches it whenever the call ends.

        Other hosts, within the spec: `server_tools=False` calls no tools for the view, `refuse`
        names tools whose calls the host refuses (a JSON-RPC error), `result_first` sends the
        result, once the call ends, before the input."""
        options: dict[str, Any] = {
            "width": width,
            "serverTools": server_tools,
            "refuse": list(refuse),
            "resultFirst": result_first,
        } | ({"theme": theme} if theme else {})
        try:
            with anyio.fail_after(OPEN_SECONDS):
                number = await self.page.evaluate(
                    "([tool, args, options]) => testHost.open(tool, args, options)",
                    [tool, arguments or {}, options],
                )
        except TimeoutError:
            pytest.fail(
                f"the {tool} view was not up within {OPEN_SECONDS} s: it never completed ui/initialize",
                pytrace=False,
            )
        view = View(self.page, number)
        # Chat hosts scroll to the newest turn; Chromium also throttles the rendering (and so
        # the resize observers) of frames out of sight.
        await view.element.scroll_into_view_if_needed()
        return view

    async def set_theme(self, theme: str) -> None:
        """Switches the host's theme; every view is told (ui/notifications/host-context-changed)."""
        await self.page.evaluate("theme => testHost.setTheme(theme)", theme)

    async def records(self) -> dict[str, Any]:
        """Everything the views asked the host for: `calls` (tool calls: view, name, arguments,
        then result or error), `messages` (ui/message), `links` (ui/open-link), `modelContext`
        (the last ui/update-model-context) and `logs`."""
        records: dict[str, Any] = await self.page.evaluate(
            "() => { const { calls, messages, links, modelContext, logs } = testHost;"
            " return { calls, messages, links, modelContext, logs }; }"
        )
        return records

    async def call_to(self, tool: str) -> dict[str, Any]:
        """The first call a view made to `tool`, once it has its result or error."""
        handle = await self.page.wait_for_function(
            "tool => testHost.calls.find(c => c.name === tool && ('result' in c || 'error' in c))",
            arg=tool,
            timeout=_ACTION_MS,
        )
        call: dict[str, Any] = await handle.json_value()
        return call


@contextlib.asynccontextmanager
async def app_host(endpoint: str, mcp_url: str) -> AsyncIterator[AppHost]:
    """The host page in a fresh browser context of the Chromium at `endpoint`, connected to the MCP
    server at `mcp_url`. On the way out, anything the page or a view reported as an error (a
    console error, an uncaught exception, a request the content security policy refused) fails
    the test."""
    origin = "{0.scheme}://{0.netloc}".format(urlsplit(mcp_url))
    errors: list[str] = []

    def console(message: ConsoleMessage) -> None:
        if message.type == "error":
            errors.append(f"console error: {message.text} ({message.location.get('url')})")

    async def serve(route: Route) -> None:
        name = urlsplit(route.request.url).path.removeprefix(HOST_PATH)
        if name not in _FILES:
            await route.fulfill(status=404, body=f"the test host has no {name}")
            return
        path, content_type, headers = _FILES[name]
        await route.fulfill(body=path.read_bytes(), headers={"Content-Type": content_type, **headers})

    async with async_playwright() as playwright:
        browser = await playwright.chromium.connect_over_cdp(endpoint)
        context = await browser.new_context(viewport={"width": 1280, "height": 900})
        context.set_default_timeout(_ACTION_MS)
        try:
            page = await context.new_page()
            page.on("console", console)
            page.on("pageerror", lambda error: errors.append(f"uncaught: {error}"))
            await page.route(f"{origin}{HOST_PATH}**", serve)
            await page.goto(f"{origin}{HOST_PATH}host.html")
            await page.wait_for_function("window.testHost")
            with anyio.fail_after(OPEN_SECONDS):
                tools = await page.evaluate("url => testHost.connect(url)", mcp_url)
            yield AppHost(page, tools)
        except BaseException:
            if errors:
                print("The browser reported:", *errors, sep="\n  ", file=sys.stderr)
            raise
        finally:
            await context.close()
            # Only this connection ends: the browser belongs to the test process.
            await browser.close()
    if errors:
        pytest.fail("The browser reported:\n  " + "\n  ".join(errors), pytrace=False)
