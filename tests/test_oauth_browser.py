"""OAuth sign-in once through a real browser (Debian's headless chromium, driven by Playwright):
the host's redirect opens the sign-in page, the user types their key into the labelled field
and presses the button, and the browser lands on the host's redirect URI with a code."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from mcp.client.auth import OAuthClientProvider
from mcp.shared.auth import AuthorizationCodeResult, OAuthClientMetadata
from playwright.async_api import Browser, Route, async_playwright

from .conftest import ServerLauncher, structured
from .oauth import CALLBACK, MemoryStorage, host_client, oauth_server
from .standin import Behaviour, StandIn

pytestmark = pytest.mark.anyio

CHROMIUM = "/usr/bin/chromium"
KEY = "sk-browser-user-3c9e51a7"
#: Playwright adds --headless itself, and a fresh profile for each launch.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
async def chromium() -> AsyncIterator[Browser]:
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield browser
        await browser.close()


async def test_a_user_signs_in_through_the_real_page(chromium: Browser, home: Path) -> None:
    landed: list[str] = []

    async def sign_in(authorization_url: str) -> None:
        page = await chromium.new_page()

        async def callback(route: Route) -> None:
            landed.append(route.request.url)
            await route.fulfill(status=200, content_type="text/html", body="<p>Signed in.</p>")

        await page.route(f"{CALLBACK}**", callback)
        await page.goto(authorization_url)
        field = page.get_by_label("Your GPTunnel API key")
        assert await field.get_attribute("type") == "password"
        await field.fill(KEY)
        await page.get_by_role("button", name="Sign in").click()
        await page.wait_for_url(f"{CALLBACK}**")
        assert KEY not in await page.content()
        await page.close()

    async def came_back() -> AuthorizationCodeResult:
        query = parse_qs(urlsplit(landed[-1]).query)
        return AuthorizationCodeResult(code=query["code"][0], state=query["state"][0], iss=query["iss"][0])

    with StandIn(api_key=KEY, behaviour=Behaviour(generation_seconds=0.05, image_size=(320, 240))) as standin:
        launcher = ServerLauncher(standin, home, transport="http")
        async with oauth_server(launcher) as url:
            auth = OAuthClientProvider(
                server_url=url,
                client_metadata=OAuthClientMetadata(
                    client_name="Browser Host",
                    redirect_uris=[CALLBACK],  # type: ignore[list-item]
                    token_endpoint_auth_method="none",
                ),
                storage=MemoryStorage(),
                redirect_handler=sign_in,
                callback_handler=came_back,
            )
            async with host_client(url, auth) as client:
                done = structured(await client.call_tool("generate_and_wait", {"prompt": "through chromium"}))
                assert done["status"] == "done"
    assert len(landed) == 1
