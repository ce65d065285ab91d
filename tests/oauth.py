"""A host signing a user in, for the OAuth tests: the SDK's own OAuth client, a token store in
memory, and a user at a browser who opens the sign-in page and fills in the form."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Protocol
from urllib.parse import parse_qs, urlsplit

import httpx2
from mcp import Client
from mcp.client.auth import OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import (
    AuthorizationCodeResult,
    OAuthClientInformationFull,
    OAuthClientMetadata,
    OAuthToken,
)

from gptunnel_mcp import Settings

from .conftest import MULTI_USER, ServerLauncher, loopback_socket, serve_http

#: Where the host would receive the browser after sign-in; nothing listens there (a browser test
#: catches the request). Not a port browsers refuse to visit, such as 1.
CALLBACK = "http://127.0.0.1:43117/callback"


def oauth_settings(launcher: ServerLauncher, sock: socket.socket, **env: str | None) -> Settings:
    """A multi-user server whose public URL is `sock`'s address: OAuth sign-in on."""
    port = sock.getsockname()[1]
    return launcher.settings(**MULTI_USER, GPTUNNEL_MCP_PUBLIC_URL=f"http://127.0.0.1:{port}", **env)


@contextlib.asynccontextmanager
async def oauth_server(launcher: ServerLauncher, **env: str | None) -> AsyncIterator[str]:
    """Such a server on an in-process uvicorn; yields its MCP URL."""
    sock = loopback_socket()
    async with serve_http(oauth_settings(launcher, sock, **env), sock) as url:
        yield url


@dataclass
class MemoryStorage:
    """What a host remembers of its connection: the registration and the tokens."""

    tokens: OAuthToken | None = None
    client_info: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client_info

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client_info = client_info


class Form(HTMLParser):
    """The first form of a page: where it posts, and its fields' names and values."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.action: str | None = None
        self.fields: dict[str, str] = {}
        self.labels: dict[str, str] = {}
        self._label_for: str | None = None
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = {k: v or "" for k, v in attrs}
        if tag == "form" and self.action is None:
            self.action = named.get("action", "")
        elif tag == "input" and "name" in named:
            self.fields[named["name"]] = named.get("value", "")
        elif tag == "label":
            self._label_for = named.get("for")

    def handle_data(self, data: str) -> None:
        if self._label_for is not None:
            self.labels[self._label_for] = self.labels.get(self._label_for, "") + data

    def handle_endtag(self, tag: str) -> None:
        if tag == "label":
            self._label_for = None


@dataclass
class User:
    """A person at a browser (cookies kept) with their GPTunnel key. `sign_in` is the host's
    redirect handler: open the authorization URL, fill in the sign-in form, and keep where the
    browser was sent back to."""

    key: str
    #: Each page the browser showed, in order.
    pages: list[httpx2.Response] = field(default_factory=list)
    returned_to: str | None = None
    browser: httpx2.AsyncClient = field(default_factory=lambda: httpx2.AsyncClient(timeout=15))

    async def sign_in(self, authorization_url: str) -> None:
        page = await self.open(authorization_url)
        await self.submit(page, key=self.key)

    async def open(self, authorization_url: str) -> httpx2.Response:
        """Follow /authorize to the sign-in page."""
        response = await self.browser.get(authorization_url)
        assert response.status_code == 302, (response.status_code, response.text)
        page = await self.browser.get(response.headers["location"])
        self.pages.append(page)
        return page

    async def submit(self, page: httpx2.Response, **changes: str) -> httpx2.Response:
        """Post the page's form as a browser would, with `changes` to its fields."""
        form = Form(page.text)
        assert form.action, page.text
        # Browsers name the page's origin on a form's POST.
        origin = "{0.scheme}://{0.netloc}".format(urlsplit(str(page.url)))
        response = await self.browser.post(
            form.action, data={**form.fields, **changes}, headers={"Origin": origin}
        )
        self.pages.append(response)
        if response.status_code == 303:
            self.returned_to = response.headers["location"]
        return response

    async def callback(self) -> AuthorizationCodeResult:
        """What the host's redirect URI received."""
        assert self.returned_to is not None, [p.text for p in self.pages[-1:]]
        return returned(self.returned_to)


class SignsIn(Protocol):
    """Whoever answers a host's redirect: a `User` over plain HTTP, or a real browser."""

    async def sign_in(self, authorization_url: str) -> None: ...

    async def callback(self) -> AuthorizationCodeResult: ...


def returned(url: str) -> AuthorizationCodeResult:
    """What a redirect URI received, from the address the browser was sent to."""
    query = parse_qs(urlsplit(url).query)
    assert "error" not in query, query
    return AuthorizationCodeResult(code=query["code"][0], state=query["state"][0], iss=query["iss"][0])


def host_auth(
    url: str, user: SignsIn, storage: MemoryStorage | None = None, document_url: str | None = None
) -> OAuthClientProvider:
    """The SDK's OAuth client as a host sets it up: one redirect URI, and dynamic registration
    or, given `document_url`, a client ID metadata document there."""
    return OAuthClientProvider(
        server_url=url,
        client_metadata=OAuthClientMetadata(
            client_name="Test Host",
            redirect_uris=[CALLBACK],  # type: ignore[list-item]
            grant_types=["authorization_code", "refresh_token"],
            response_types=["code"],
            token_endpoint_auth_method="none",
        ),
        storage=storage or MemoryStorage(),
        redirect_handler=user.sign_in,
        callback_handler=user.callback,
        client_metadata_url=document_url,
    )


@contextlib.asynccontextmanager
async def host_client(url: str, auth: httpx2.Auth, mode: str = "auto") -> AsyncIterator[Client]:
    """The official MCP client over streamable HTTP, authorizing with `auth`."""
    async with (
        httpx2.AsyncClient(auth=auth, timeout=httpx2.Timeout(30, read=120)) as http,
        Client(streamable_http_client(url, http_client=http), mode=mode, cache=None) as client,
    ):
        yield client
