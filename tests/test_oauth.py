"""OAuth sign-in (issue 13), as hosts do it: the SDK's own OAuth client against the whole HTTP
app on an in-process uvicorn, a user who fills in the sign-in page as a browser would, and the
stand-in GPTunnel. Then each refusal, driven by hand: what a hostile or broken client meets.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import html
import json
import logging
import re
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import httpx2
import pytest

from gptunnel_mcp import _accounts, _client_documents, _oauth
from gptunnel_mcp.server._authorization import oauth_urls

from .conftest import (
    MCP_HEADERS,
    MULTI_USER,
    ServerLauncher,
    initialize_request,
    mcp_client,
    serve_http,
    structured,
    text_of,
)
from .oauth import CALLBACK, Form, MemoryStorage, User, host_auth, host_client, oauth_server
from .standin import Behaviour, StandIn

pytestmark = pytest.mark.anyio

#: Two users' GPTunnel keys: distinctive, so a leak anywhere is found by a substring search.
KEY_A = "sk-oauth-A-71c3e9d05b2a"
KEY_B = "sk-oauth-B-2f8a6d4c90e1"
#: The only key the strict stand-in accepts.
GOOD_KEY = "sk-oauth-good-4e1b7a"


@pytest.fixture
def open_standin() -> Iterator[StandIn]:
    """Accepts any key: every user signs in."""
    with StandIn(api_key=None, behaviour=Behaviour(generation_seconds=0.05, image_size=(320, 240))) as s:
        yield s


@pytest.fixture
def launcher(open_standin: StandIn, home: Path) -> ServerLauncher:
    return ServerLauncher(open_standin, home, transport="http")


@pytest.fixture
def strict_launcher(home: Path) -> Iterator[ServerLauncher]:
    """A GPTunnel that accepts `GOOD_KEY` only."""
    with StandIn(api_key=GOOD_KEY, behaviour=Behaviour(generation_seconds=0.05)) as standin:
        yield ServerLauncher(standin, home, transport="http")


@pytest.fixture
def server_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    return caplog


def base_of(url: str) -> str:
    return url.removesuffix("/mcp")


async def history_ids(client: Any) -> list[str]:
    content = (await client.read_resource("gptunnel://images")).contents[0]
    return [t["task_id"] for t in json.loads(content.text)["tasks"]]


# --- the whole flow, through the SDK's OAuth client --------------------------------------------------


async def test_a_host_discovers_registers_signs_the_user_in_and_calls_tools(
    launcher: ServerLauncher, open_standin: StandIn, server_log: pytest.LogCaptureFixture
) -> None:
    user = User(KEY_A)
    storage = MemoryStorage()
    async with oauth_server(launcher) as url:
        async with host_client(url, host_auth(url, user, storage)) as client:
            done = structured(await client.call_tool("generate_and_wait", {"prompt": "a lighthouse"}))
            assert done["status"] == "done"
            assert await history_ids(client) == [done["task_id"]]

        # The host registered itself, and the user saw one sign-in page, labelled, naming the host
        # and where the browser goes next, with the key field empty.
        assert storage.client_info is not None and storage.client_info.client_id
        page = user.pages[0]
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        form = Form(page.text)
        assert form.labels["key"] == "Your GPTunnel API key"
        assert form.fields["key"] == "" and set(form.fields) == {"request", "csrf", "key"}
        assert "Test Host" in page.text and "127.0.0.1:43117" in page.text
        assert "<script" not in page.text
        # The browser went back to the host with a code, the state, and the issuer.
        returned = parse_qs(urlsplit(user.returned_to or "").query)
        assert returned["iss"] == [base_of(url)]
        # GPTunnel was asked about the key once, at sign-in; the tool calls then used it.
        assert open_standin.stats.balance_calls == 1
        assert set(open_standin.stats.auth_headers) == {KEY_A}

        tokens = storage.tokens
        assert tokens is not None and tokens.refresh_token and tokens.expires_in == _oauth.ACCESS_SECONDS
        assert tokens.access_token.startswith(_oauth.ACCESS_PREFIX)
    # Neither the key nor a token is anywhere in the log.
    for secret in (KEY_A, tokens.access_token, tokens.refresh_token):
        assert secret not in server_log.text


async def test_an_oauth_user_is_the_same_account_as_their_key(launcher: ServerLauncher) -> None:
    """The static bearer mode works beside OAuth, and the token acts for the very account the
    key does: one history."""
    async with oauth_server(launcher) as url:
        async with host_client(url, host_auth(url, User(KEY_A))) as oauth_user:
            made = structured(await oauth_user.call_tool("generate_and_wait", {"prompt": "one history"}))
        async with mcp_client(url, KEY_A) as keyed:
            assert await history_ids(keyed) == [made["task_id"]]
            again = structured(await keyed.call_tool("get_result", {"task_id": made["task_id"]}))
            assert again["sha256"] == made["sha256"]


async def test_a_second_user_cannot_see_the_first_users_images(launcher: ServerLauncher) -> None:
    async with (
        oauth_server(launcher) as url,
        host_client(url, host_auth(url, User(KEY_A))) as alice,
        host_client(url, host_auth(url, User(KEY_B))) as bob,
    ):
        a = structured(await alice.call_tool("generate_and_wait", {"prompt": "alice's garden"}))
        theirs = await bob.call_tool("get_result", {"task_id": a["task_id"]})
        assert theirs.is_error and "no task" in text_of(theirs).lower()
        assert await history_ids(bob) == []
        listed = [str(r.uri) for r in (await bob.list_resources()).resources]
        assert not [uri for uri in listed if a["task_id"] in uri]
        with pytest.raises(Exception, match="not found"):
            await bob.read_resource(a["resource_uri"])
        assert await history_ids(alice) == [a["task_id"]]


async def test_refresh_rotates_and_a_replayed_refresh_token_ends_the_sign_in(
    launcher: ServerLauncher,
) -> None:
    user = User(KEY_A)
    storage = MemoryStorage()
    async with oauth_server(launcher) as url:
        auth = host_auth(url, user, storage)
        async with host_client(url, auth) as client:
            await client.list_tools()
            first = storage.tokens
            assert first is not None and first.refresh_token
            # The host's clock says the access token is spent: it refreshes before the next call.
            auth.context.token_expiry_time = time.time() - 1
            await client.call_tool("get_balance", {})
            second = storage.tokens
            assert second is not None and second.refresh_token
            assert second.access_token != first.access_token and second.refresh_token != first.refresh_token
            assert len(user.pages) == 2, "the refresh needed no new sign-in"

            async with httpx2.AsyncClient(timeout=15) as raw:
                # The old access token ended with the refresh; the new one works.
                assert (await post_mcp(raw, url, first.access_token)).status_code == 401
                assert (await post_mcp(raw, url, second.access_token)).status_code == 200
                # The old refresh token was spent: presented again (stolen?), it is refused, and
                # the sign-in it came from ends, with the tokens that replaced it.
                assert storage.client_info is not None
                replay = await refresh(raw, url, storage.client_info.client_id, first.refresh_token)
                assert replay.status_code == 400 and replay.json()["error"] == "invalid_grant"
                assert (await post_mcp(raw, url, second.access_token)).status_code == 401
                again = await refresh(raw, url, storage.client_info.client_id, second.refresh_token)
                assert again.json()["error"] == "invalid_grant"

            # The host meets a 401, and the user signs in again.
            await client.call_tool("get_balance", {})
            assert len(user.pages) == 4


@pytest.mark.parametrize("grant", ["authorization_code", "refresh_token"])
async def test_a_code_or_refresh_token_spent_twice_at_once_ends_the_sign_in(
    launcher: ServerLauncher, monkeypatch: pytest.MonkeyPatch, grant: str
) -> None:
    """Two requests with one code or refresh token, both past the lookup before either spends
    it: one of them is a thief, so the loser ends what the winner got (RFC 9700 4.14.2)."""
    async with hand_host(launcher) as host:
        verifier, challenge = pkce()
        code = await host.code(challenge)
        if grant == "authorization_code":
            spend = partial(host.exchange, code, verifier)
            method = "redeem"
        else:
            tokens = (await host.exchange(code, verifier)).json()
            spend = partial(refresh, host.raw, host.url, host.client_id, tokens["refresh_token"])
            method = "rotate"
        original = getattr(_oauth.Authorizations, method)
        arrived: list[str] = []
        both = anyio.Event()

        async def together(self: _oauth.Authorizations, token: str) -> _oauth.Tokens | None:
            arrived.append(token)
            if len(arrived) == 2:
                both.set()
            with anyio.fail_after(10):
                await both.wait()
            return await original(self, token)

        monkeypatch.setattr(_oauth.Authorizations, method, together)
        answers: list[httpx2.Response] = []
        async with anyio.create_task_group() as tasks:
            for _ in range(2):
                tasks.start_soon(lambda: _append(answers, spend()))
        # The winner may have its answer before the loser ends the grant: what it got is dead.
        assert sorted(a.status_code for a in answers) in ([200, 400], [400, 400])
        for won in (a.json() for a in answers if a.status_code == 200):
            assert (await post_mcp(host.raw, host.url, won["access_token"])).status_code == 401
            again = await refresh(host.raw, host.url, host.client_id, won["refresh_token"])
            assert again.status_code == 400


async def _append(answers: list[httpx2.Response], answer: Awaitable[httpx2.Response]) -> None:
    answers.append(await answer)


async def test_revoking_a_token_ends_the_sign_in(launcher: ServerLauncher) -> None:
    storage = MemoryStorage()
    async with oauth_server(launcher) as url:
        async with host_client(url, host_auth(url, User(KEY_A), storage)) as client:
            await client.list_tools()
        tokens, info = storage.tokens, storage.client_info
        assert tokens is not None and tokens.refresh_token and info is not None
        async with httpx2.AsyncClient(timeout=15) as raw:
            assert (await post_mcp(raw, url, tokens.access_token)).status_code == 200
            # A public client names itself alone (RFC 7009 2.1), as the SDK's client sends it.
            form = {"token": tokens.access_token, "client_id": info.client_id}
            revoked = await raw.post(f"{base_of(url)}/revoke", data=form)
            assert revoked.status_code == 200
            refused = await post_mcp(raw, url, tokens.access_token)
            assert refused.status_code == 401
            assert 'error="invalid_token"' in refused.headers["www-authenticate"]
            assert (await refresh(raw, url, info.client_id, tokens.refresh_token)).status_code == 400


async def test_a_confidential_client_revokes_only_with_its_secret(launcher: ServerLauncher) -> None:
    async with hand_host(launcher) as host:
        registered = await host.raw.post(
            f"{host.base}/register",
            json={"redirect_uris": [CALLBACK], "token_endpoint_auth_method": "client_secret_post"},
        )
        # The answer holds the client's secret: no cache may keep it (RFC 7591 3.2.1).
        assert registered.headers["cache-control"] == "no-store"
        host.client_id, secret = registered.json()["client_id"], registered.json()["client_secret"]
        verifier, challenge = pkce()
        tokens = (await host.exchange(await host.code(challenge), verifier, client_secret=secret)).json()
        revoke = f"{host.base}/revoke"
        for credentials in ({}, {"client_secret": ""}, {"client_secret": "0" * 64}):
            form = {"token": tokens["access_token"], "client_id": host.client_id, **credentials}
            refused = await host.raw.post(revoke, data=form)
            assert refused.status_code == 401, (credentials, refused.text)
            assert (await post_mcp(host.raw, host.url, tokens["access_token"])).status_code == 200
        form = {"token": tokens["access_token"], "client_id": host.client_id, "client_secret": secret}
        assert (await host.raw.post(revoke, data=form)).status_code == 200
        assert (await post_mcp(host.raw, host.url, tokens["access_token"])).status_code == 401


async def test_a_key_gptunnel_no_longer_accepts_ends_the_sign_in(
    strict_launcher: ServerLauncher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refresh cannot mend a key revoked at GPTunnel: the sign-in ends, so that the host asks
    the user to sign in again rather than refreshing into refusals for ever. GPTunnel out of
    reach for a while ends nothing."""
    standin = strict_launcher.standin
    async with hand_host(strict_launcher, GOOD_KEY) as host:
        verifier, challenge = pkce()
        tokens = (await host.exchange(await host.code(challenge), verifier)).json()
        assert (await post_mcp(host.raw, host.url, tokens["access_token"])).status_code == 200
        # Past the time the server remembers an accepted key: the next request asks GPTunnel again.
        later = time.monotonic() + 3600
        monkeypatch.setattr(_accounts, "time", SimpleNamespace(monotonic=lambda: later))

        standin.behaviour.transient_failures = 1000
        unreachable = await post_mcp(host.raw, host.url, tokens["access_token"])
        assert unreachable.status_code == 503
        standin.behaviour.transient_failures = 0
        renewed = await refresh(host.raw, host.url, host.client_id, tokens["refresh_token"])
        assert renewed.status_code == 200, renewed.text
        tokens = renewed.json()

        standin.api_key = "sk-oauth-another-key"
        refused = await post_mcp(host.raw, host.url, tokens["access_token"])
        assert refused.status_code == 401
        assert 'error="invalid_token"' in refused.headers["www-authenticate"]
        ended = await refresh(host.raw, host.url, host.client_id, tokens["refresh_token"])
        assert ended.status_code == 400 and ended.json()["error"] == "invalid_grant"


async def test_metadata_and_the_challenge_point_a_client_to_sign_in(launcher: ServerLauncher) -> None:
    async with oauth_server(launcher) as url, httpx2.AsyncClient(timeout=15) as raw:
        base = base_of(url)
        refused = await raw.post(url, json=initialize_request("t"), headers=MCP_HEADERS)
        assert refused.status_code == 401
        challenge = refused.headers["www-authenticate"]
        prm_url = f"{base}/.well-known/oauth-protected-resource/mcp"
        assert f'resource_metadata="{prm_url}"' in challenge
        # RFC 6750 3.1: a request with no credentials is told where to get some, not of an error.
        assert "error" not in challenge
        prm = (await raw.get(prm_url)).json()
        assert prm["resource"] == url and prm["authorization_servers"] == [base]
        asm = (await raw.get(f"{base}/.well-known/oauth-authorization-server")).json()
        assert asm["issuer"] == base
        assert asm["code_challenge_methods_supported"] == ["S256"]
        assert asm["registration_endpoint"] == f"{base}/register"
        assert asm["revocation_endpoint"] == f"{base}/revoke"
        assert asm["authorization_response_iss_parameter_supported"] is True
        assert set(asm["grant_types_supported"]) == {"authorization_code", "refresh_token"}
        # Public clients (a metadata document's always are) authenticate with nothing, and say so.
        for methods in (
            "token_endpoint_auth_methods_supported",
            "revocation_endpoint_auth_methods_supported",
        ):
            assert set(asm[methods]) == {"none", "client_secret_post", "client_secret_basic"}


async def test_without_a_public_url_there_is_no_oauth(launcher: ServerLauncher) -> None:
    async with serve_http(launcher.settings(**MULTI_USER)) as url, httpx2.AsyncClient(timeout=15) as raw:
        refused = await raw.post(url, json=initialize_request("t"), headers=MCP_HEADERS)
        assert refused.status_code == 401 and "resource_metadata" not in refused.headers["www-authenticate"]
        metadata = await raw.get(f"{base_of(url)}/.well-known/oauth-authorization-server")
        assert metadata.status_code == 401


def test_oauth_needs_a_multi_user_server_and_an_https_public_url(launcher: ServerLauncher) -> None:
    assert oauth_urls(launcher.settings(GPTUNNEL_MCP_PUBLIC_URL="https://mcp.example.com")) is None
    multi = {**MULTI_USER, "GPTUNNEL_MCP_HOST": "0.0.0.0"}
    assert oauth_urls(launcher.settings(**multi, GPTUNNEL_MCP_PUBLIC_URL="http://mcp.example.com")) is None
    urls = oauth_urls(launcher.settings(**multi, GPTUNNEL_MCP_PUBLIC_URL="https://mcp.example.com/"))
    assert urls is not None
    assert (urls.issuer, urls.resource) == ("https://mcp.example.com", "https://mcp.example.com/mcp")
    assert urls.resource_metadata == "https://mcp.example.com/.well-known/oauth-protected-resource/mcp"


# --- hand-driven: each refusal -----------------------------------------------------------------------


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
    return verifier, challenge


async def post_mcp(raw: httpx2.AsyncClient, url: str, token: str) -> httpx2.Response:
    return await raw.post(
        url, json=initialize_request("t"), headers={**MCP_HEADERS, "Authorization": f"Bearer {token}"}
    )


async def refresh(raw: httpx2.AsyncClient, url: str, client_id: str, token: str) -> httpx2.Response:
    return await raw.post(
        f"{base_of(url)}/token",
        data={"grant_type": "refresh_token", "refresh_token": token, "client_id": client_id},
    )


@dataclass
class Host:
    """A client speaking OAuth by hand, and the user's browser."""

    url: str
    raw: httpx2.AsyncClient
    user: User
    client_id: str = ""

    @property
    def base(self) -> str:
        return base_of(self.url)

    async def register(self, redirect_uris: list[str] | None = None) -> httpx2.Response:
        response = await self.raw.post(
            f"{self.base}/register",
            json={
                "client_name": "Hand Host",
                "redirect_uris": redirect_uris or [CALLBACK],
                "token_endpoint_auth_method": "none",
            },
        )
        if response.status_code == 201:
            self.client_id = response.json()["client_id"]
        return response

    def authorize_url(self, challenge: str, **changes: str | None) -> str:
        params: dict[str, str | None] = {
            "response_type": "code",
            "client_id": self.client_id,
            "redirect_uri": CALLBACK,
            "state": "st-1",
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "resource": self.url,
            **changes,
        }
        query = httpx2.QueryParams({k: v for k, v in params.items() if v is not None})
        return f"{self.base}/authorize?{query}"

    async def code(self, challenge: str) -> str:
        await self.user.sign_in(self.authorize_url(challenge))
        return (await self.user.callback()).code

    async def exchange(self, code: str, verifier: str, **changes: str) -> httpx2.Response:
        data = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": CALLBACK,
            "client_id": self.client_id,
            "code_verifier": verifier,
            **changes,
        }
        return await self.raw.post(f"{self.base}/token", data=data)


@contextlib.asynccontextmanager
async def hand_host(launcher: ServerLauncher, key: str = KEY_A, **env: str | None) -> AsyncIterator[Host]:
    async with oauth_server(launcher, **env) as url, httpx2.AsyncClient(timeout=15) as raw:
        host = Host(url, raw, User(key))
        assert (await host.register()).status_code == 201
        yield host


async def test_a_code_is_single_use_and_a_reused_code_ends_its_tokens(launcher: ServerLauncher) -> None:
    async with hand_host(launcher) as host:
        verifier, challenge = pkce()
        code = await host.code(challenge)
        assert code.startswith(_oauth.CODE_PREFIX)
        first = await host.exchange(code, verifier)
        assert first.status_code == 200, first.text
        access = first.json()["access_token"]
        assert (await post_mcp(host.raw, host.url, access)).status_code == 200
        reused = await host.exchange(code, verifier)
        assert reused.status_code == 400 and reused.json()["error"] == "invalid_grant"
        # RFC 6749 4.1.2: what the code gave is taken back.
        assert (await post_mcp(host.raw, host.url, access)).status_code == 401


async def test_pkce_is_required_and_checked(launcher: ServerLauncher) -> None:
    async with hand_host(launcher) as host:
        _, challenge = pkce()
        for changes in ({"code_challenge": None}, {"code_challenge_method": "plain"}):
            refused = await host.raw.get(host.authorize_url(challenge, **changes))
            # Sent back to the (registered) redirect URI with the error, never to a sign-in page.
            query = parse_qs(urlsplit(way_back(refused)).query)
            assert query["error"] == ["invalid_request"] and query["state"] == ["st-1"]
        code = await host.code(challenge)
        wrong = await host.exchange(code, pkce()[0])
        assert wrong.status_code == 400 and wrong.json()["error"] == "invalid_grant"


async def test_state_and_resource_are_enforced(launcher: ServerLauncher) -> None:
    async with hand_host(launcher) as host:
        _, challenge = pkce()
        stateless = await host.raw.get(host.authorize_url(challenge, state=None))
        assert parse_qs(urlsplit(way_back(stateless)).query)["error"] == ["invalid_request"]
        assert "state is required" in stateless.text
        elsewhere = await host.raw.get(host.authorize_url(challenge, resource="https://other.example/mcp"))
        assert parse_qs(urlsplit(way_back(elsewhere)).query)["error"] == ["invalid_target"]


def way_back(refused: httpx2.Response) -> str:
    """Where the page for a refused authorization request links back to."""
    assert refused.status_code == 400 and refused.headers["content-type"].startswith("text/html")
    assert refused.headers["x-frame-options"] == "DENY"
    links = re.findall(r'<a href="([^"]*)"', refused.text)
    assert len(links) == 1, refused.text
    return html.unescape(links[0])


async def test_a_refused_request_is_no_open_redirect(launcher: ServerLauncher) -> None:
    """Anybody may register a client with their own site as its redirect URI: a link to
    /authorize that is bound to fail would send a browser there straight from this server's
    address (RFC 9700 4.11.2). The user sees the refusal, and where the link goes, first."""
    async with hand_host(launcher) as host:
        assert (await host.register(["https://phish.example/cb"])).status_code == 201
        link = host.authorize_url("", redirect_uri="https://phish.example/cb", code_challenge=None)
        shown = await host.raw.get(link)
        assert "location" not in shown.headers
        assert way_back(shown).startswith("https://phish.example/cb?error=invalid_request")
        assert "phish.example" in shown.text and "<script" not in shown.text


async def test_redirect_uris_match_exactly_and_unsafe_ones_are_not_registered(
    launcher: ServerLauncher,
) -> None:
    async with hand_host(launcher) as host:
        _, challenge = pkce()
        for other in (
            CALLBACK + "/",
            CALLBACK + "?x=1",
            "http://127.0.0.1:43118/callback",
            "https://evil.example/cb",
        ):
            refused = await host.raw.get(host.authorize_url(challenge, redirect_uri=other))
            # Not redirected anywhere: the error is shown, not sent to an unregistered address.
            assert refused.status_code == 400, (other, refused.status_code)
            assert refused.json()["error"] == "invalid_request"
        for unsafe in ("http://example.com/cb", "javascript:alert(1)", "https://example.com/cb#frag"):
            registered = await host.register([unsafe])
            assert registered.status_code == 400, unsafe
            assert registered.json()["error"] == "invalid_redirect_uri"
        # The sign-in page would name the site by what precedes the "@".
        disguised = await host.register(["https://claude.ai@evil.example/cb"])
        assert disguised.status_code == 400 and disguised.json()["error"] == "invalid_redirect_uri"
        assert "user name" in disguised.json()["error_description"]
        huge = await host.raw.post(
            f"{host.base}/register", json={"redirect_uris": [CALLBACK], "client_name": "x" * 20_000}
        )
        assert huge.status_code == 400


async def test_the_form_needs_its_csrf_field_and_cookie(
    launcher: ServerLauncher, open_standin: StandIn
) -> None:
    async with hand_host(launcher) as host:
        _, challenge = pkce()
        page = await host.user.open(host.authorize_url(challenge))
        forged = await host.user.submit(page, key=KEY_A, csrf="0" * 64)
        assert forged.status_code == 403 and "not sent from this page" in forged.text
        # Another browser (no cookie) posting the right fields is refused too.
        async with httpx2.AsyncClient(timeout=15) as stranger:
            form = Form(page.text)
            elsewhere = await stranger.post(form.action or "", data={**form.fields, "key": KEY_A})
            assert elsewhere.status_code == 403
        # A form posted from another site's page is refused before it is read.
        form = Form(page.text)
        foreign = await host.user.browser.post(
            form.action or "", data={**form.fields, "key": KEY_A}, headers={"Origin": "https://evil.example"}
        )
        assert foreign.status_code == 403
        assert open_standin.stats.balance_calls == 0, "a forged form reached GPTunnel"
        # The form as served still works.
        done = await host.user.submit(forged, key=KEY_A)
        assert done.status_code == 303


async def test_refused_keys_are_told_clearly_never_echoed_and_rate_limited(
    strict_launcher: ServerLauncher,
) -> None:
    wrong = "sk-wrong-key-6b1d0f"
    async with hand_host(strict_launcher, GOOD_KEY, GPTUNNEL_MCP_AUTH_FAILURES_PER_MINUTE="2") as host:
        _, challenge = pkce()
        page = await host.user.open(host.authorize_url(challenge))
        # An empty field is the user's slip, not a refused key: said so, and not counted.
        page = await host.user.submit(page, key="  ")
        assert page.status_code == 400 and "Enter your GPTunnel API key" in page.text
        for _ in range(2):
            page = await host.user.submit(page, key=wrong)
            assert page.status_code == 400
            assert "GPTunnel does not accept this key" in page.text
            assert wrong not in page.text
            assert 'aria-describedby="key-hint key-error"' in page.text and 'aria-invalid="true"' in page.text
        limited = await host.user.submit(page, key=GOOD_KEY)
        assert limited.status_code == 429 and "Too many refused keys" in limited.text
        assert GOOD_KEY not in limited.text
        assert host.user.returned_to is None


async def test_an_expired_code_or_sign_in_link_is_refused(
    launcher: ServerLauncher, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with hand_host(launcher) as host:
        verifier, challenge = pkce()
        code = await host.code(challenge)
        page = await host.user.open(host.authorize_url(challenge))
        later = time.time() + _oauth.REQUEST_SECONDS + 1
        monkeypatch.setattr(_oauth, "now", lambda: later)
        expired = await host.exchange(code, verifier)
        assert expired.status_code == 400 and expired.json()["error"] == "invalid_grant"
        gone = await host.user.submit(page, key=KEY_A)
        assert gone.status_code == 400 and "expired" in gone.text


async def test_a_registration_never_used_is_soon_forgotten(
    launcher: ServerLauncher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anybody may register, as often as they like: registrations nobody signs in through are
    kept a day, not the months of a client in use, so a flood of them does not stay."""
    async with hand_host(launcher) as host:
        verifier, challenge = pkce()
        assert (await host.exchange(await host.code(challenge), verifier)).status_code == 200
        used = host.client_id
        assert (await host.register()).status_code == 201
        later = time.time() + _oauth.UNUSED_CLIENT_SECONDS + 1
        monkeypatch.setattr(_oauth, "now", lambda: later)
        forgotten = await host.raw.get(host.authorize_url(challenge))
        assert forgotten.status_code == 400 and "not found" in forgotten.json()["error_description"]
        host.client_id = used
        assert (await host.raw.get(host.authorize_url(challenge))).status_code == 302


async def test_the_store_holds_no_key_token_or_code_in_the_clear(
    launcher: ServerLauncher, home: Path
) -> None:
    async with hand_host(launcher) as host:
        verifier, challenge = pkce()
        code = await host.code(challenge)
        tokens = (await host.exchange(code, verifier)).json()
        with contextlib.closing(sqlite3.connect(home / "history.sqlite3")) as db:
            rows = db.execute("SELECT kind, id, body FROM oauth_items").fetchall()
        dumped = repr(rows)
        assert {"client", "access", "refresh", "spent"} <= {r[0] for r in rows}
        for secret in (KEY_A, code, tokens["access_token"], tokens["refresh_token"]):
            assert secret not in dumped
        assert hashlib.sha256(tokens["access_token"].encode()).hexdigest() in dumped


async def test_replicas_on_postgresql_share_sign_ins(launcher: ServerLauncher, postgres_url: str) -> None:
    """Signed in through one replica, the host is served by another, which also refreshes."""
    storage = MemoryStorage()
    shared = {"GPTUNNEL_MCP_DATABASE_URL": postgres_url}
    async with oauth_server(launcher, **shared) as first, oauth_server(launcher, **shared) as second:
        async with host_client(first, host_auth(first, User(KEY_A), storage)) as client:
            made = structured(await client.call_tool("generate_and_wait", {"prompt": "on replica one"}))
        tokens, info = storage.tokens, storage.client_info
        assert tokens is not None and tokens.refresh_token and info is not None
        async with httpx2.AsyncClient(timeout=15) as raw:
            assert (await post_mcp(raw, second, tokens.access_token)).status_code == 200
            renewed = await refresh(raw, second, info.client_id, tokens.refresh_token)
            assert renewed.status_code == 200, renewed.text
            assert (await post_mcp(raw, first, tokens.access_token)).status_code == 401
        async with mcp_client(second, renewed.json()["access_token"]) as client:
            assert await history_ids(client) == [made["task_id"]]


# --- client ID metadata documents --------------------------------------------------------------------

DOCUMENT_URL = "https://host.example/oauth/client.json"


@dataclass
class Web:
    """The documents the web holds, by URL, and each fetch made."""

    documents: dict[str, bytes]
    fetched: list[str]


@pytest.fixture
def web(monkeypatch: pytest.MonkeyPatch) -> Web:
    """The test-only switch: documents are fetched from `Web` in place of the network (over
    loopback there is no https address the fetcher's guard would allow)."""
    web = Web({}, [])

    async def fetch(url: str) -> bytes:
        web.fetched.append(url)
        if url not in web.documents:
            raise _client_documents.DocumentError("HTTP 404")
        return web.documents[url]

    monkeypatch.setattr(_client_documents, "fetch_document", fetch)
    return web


def document(**changes: Any) -> bytes:
    fields = {
        "client_id": DOCUMENT_URL,
        "client_name": "Published Host",
        "redirect_uris": [CALLBACK],
        "token_endpoint_auth_method": "none",
        **changes,
    }
    return json.dumps({k: v for k, v in fields.items() if v is not None}).encode()


async def test_a_host_signs_in_with_a_client_id_metadata_document(launcher: ServerLauncher, web: Web) -> None:
    web.documents[DOCUMENT_URL] = document()
    user = User(KEY_A)
    async with oauth_server(launcher) as url, httpx2.AsyncClient(timeout=15) as raw:
        asm = (await raw.get(f"{base_of(url)}/.well-known/oauth-authorization-server")).json()
        assert asm["client_id_metadata_document_supported"] is True
        storage = MemoryStorage()
        async with host_client(url, host_auth(url, user, storage, DOCUMENT_URL)) as client:
            await client.call_tool("get_balance", {})
        assert storage.client_info is not None and storage.client_info.client_id == DOCUMENT_URL
        assert "Published Host" in user.pages[0].text
        # A second sign-in within the hour uses the document as fetched.
        async with host_client(url, host_auth(url, User(KEY_B), None, DOCUMENT_URL)) as client:
            await client.call_tool("get_balance", {})
    assert web.fetched == [DOCUMENT_URL]


@pytest.mark.parametrize(
    "changes",
    [
        {"client_id": "https://other.example/oauth/client.json"},
        {"client_secret": "s3cret"},
        {"token_endpoint_auth_method": "client_secret_post"},
        {"redirect_uris": None},
        {"redirect_uris": ["http://evil.example/cb"]},
        {"redirect_uris": ["https://claude.ai@evil.example/cb"]},
    ],
    ids=["other-client-id", "secret", "auth-method", "no-redirects", "plain-http-redirect", "user-name"],
)
async def test_unfit_documents_are_refused(
    launcher: ServerLauncher, web: Web, changes: dict[str, Any]
) -> None:
    web.documents[DOCUMENT_URL] = document(**changes)
    async with hand_host(launcher) as host:
        host.client_id = DOCUMENT_URL
        _, challenge = pkce()
        refused = await host.raw.get(host.authorize_url(challenge))
        assert refused.status_code == 400 and "not found" in refused.json()["error_description"]


async def test_a_client_id_cannot_write_lines_into_the_log(
    launcher: ServerLauncher, web: Web, server_log: pytest.LogCaptureFixture
) -> None:
    """A client_id is the client's word, and reaches the log: a line break in it must not start
    a line of its own there, which could pass for the server's."""
    forged = DOCUMENT_URL + "\nINFO gptunnel_mcp: forged"
    async with hand_host(launcher) as host:
        host.client_id = forged
        _, challenge = pkce()
        assert (await host.raw.get(host.authorize_url(challenge))).status_code == 400
        web.documents[forged] = document(client_id=forged)
        assert (await host.code(challenge)).startswith(_oauth.CODE_PREFIX)
    assert "\nINFO gptunnel_mcp: forged" not in server_log.text
    assert "signed in for the OAuth client" in server_log.text
    assert "refused the client metadata document" in server_log.text


@pytest.mark.parametrize(
    "url",
    [
        "http://host.example/client.json",
        "https://127.0.0.1/client.json",
        "https://localhost/client.json",
        "https://10.1.2.3/client.json",
        "https://[::1]/client.json",
        "https://169.254.169.254/latest/meta-data",
        "https://user:pw@host.example/client.json",
    ],
)
async def test_documents_are_fetched_only_over_https_from_public_addresses(url: str) -> None:
    with pytest.raises(_client_documents.DocumentError):
        await _client_documents.fetch_document(url)
