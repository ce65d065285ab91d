"""OAuth sign-in once through a real browser (Debian's headless chromium, driven by Playwright):
the host's redirect opens the sign-in page, the user types their key into the labelled field
and presses the button, and the browser lands on the host's redirect URI with a code."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from mcp.shared.auth import AuthorizationCodeResult
from playwright.async_api import Page, Route, async_playwright

from . import browser
from .conftest import ServerLauncher, structured
from .oauth import CALLBACK, host_auth, host_client, oauth_server, returned
from .standin import Behaviour, StandIn

pytestmark = pytest.mark.anyio

KEY = "sk-browser-user-3c9e51a7"


@pytest.fixture
async def chromium_page(tmp_path: Path) -> AsyncIterator[Page]:
    """A page in the Chromium of tests/browser.py (a fresh profile, loopback only); the npm-built
    MCP Apps host is not needed here."""
    with browser.chromium(tmp_path) as endpoint:
        async with async_playwright() as playwright:
            connected = await playwright.chromium.connect_over_cdp(endpoint)
            context = await connected.new_context()
            context.set_default_timeout(10_000)
            try:
                yield await context.new_page()
            finally:
                await context.close()
                await connected.close()


class BrowserUser:
    """A user at Chromium: opens the authorization URL, types the key into the field labelled for
    it, presses the button, and lands on the host's redirect URI (answered by Playwright)."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.landed: list[str] = []

    async def sign_in(self, authorization_url: str) -> None:
        async def redirect_uri(route: Route) -> None:
            self.landed.append(route.request.url)
            await route.fulfill(status=200, content_type="text/html", body="<p>Signed in.</p>")

        await self.page.route(f"{CALLBACK}**", redirect_uri)
        await self.page.goto(authorization_url)
        field = self.page.get_by_label("Your GPTunnel API key")
        assert await field.get_attribute("type") == "password"
        await field.fill(KEY)
        await self.page.get_by_role("button", name="Sign in").click()
        await self.page.wait_for_url(f"{CALLBACK}**")
        assert KEY not in await self.page.content()

    async def callback(self) -> AuthorizationCodeResult:
        return returned(self.landed[-1])


async def test_a_user_signs_in_through_the_real_page(chromium_page: Page, home: Path) -> None:
    user = BrowserUser(chromium_page)
    with StandIn(api_key=KEY, behaviour=Behaviour(generation_seconds=0.05, image_size=(320, 240))) as standin:
        launcher = ServerLauncher(standin, home, transport="http")
        async with oauth_server(launcher) as url, host_client(url, host_auth(url, user)) as client:
            done = structured(await client.call_tool("generate_and_wait", {"prompt": "through chromium"}))
            assert done["status"] == "done"
    assert len(user.landed) == 1
