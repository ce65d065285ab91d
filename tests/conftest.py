"""Shared fixtures: a stand-in GPTunnel on loopback, and the server driven by the official client.

Behaviour tests run the server in this process (`Client(server)` in memory, or its HTTP app on
an in-process uvicorn), with quick poll timing: connecting costs milliseconds, not a Python
start-up. `ProcessLauncher` keeps the thin layer of tests that need a real server process.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import IO, Any

import anyio
import httpx2
import pytest
import uvicorn
from mcp import Client, StdioServerParameters
from mcp.client.extension import ClientExtension
from mcp.client.session import ListRootsFnT
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client

from gptunnel_mcp import Settings, load_settings
from gptunnel_mcp._schedule import Backoff, PollSchedule
from gptunnel_mcp.server import build_server
from gptunnel_mcp.server._http import build_http_app, http_server

from . import browser
from .postgres import Cluster
from .processes import free_port, running_server
from .standin import Behaviour, StandIn

#: The stand-in's key. Distinctive, so a leak anywhere is found by a substring search.
API_KEY = "sk-gptunnel-TEST-9f3a7c1e5b"
#: Poll timing for in-process servers: the same plan, on a scale of tenths of a second.
QUICK_POLLS = PollSchedule(first=0.05, factor=1.5, cap=0.15, jitter=0.1)
QUICK_BACKOFF = Backoff(base=0.01, cap=0.05)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _no_outside_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own GPTUNNEL_* variables must not reach the server under test."""
    for name in list(os.environ):
        if name.startswith("GPTUNNEL_"):
            monkeypatch.delenv(name)


@pytest.fixture
def standin(request: pytest.FixtureRequest) -> Iterator[StandIn]:
    """The stand-in GPTunnel, with the key `API_KEY`. A module or test marked
    `@pytest.mark.standin(**behaviour)` changes its `Behaviour` defaults (quick, small images)."""
    marker = request.node.get_closest_marker("standin")
    behaviour = {"generation_seconds": 0.3, "image_size": (1200, 800), **(marker.kwargs if marker else {})}
    standin = StandIn(api_key=API_KEY, behaviour=Behaviour(**behaviour))
    standin.start()
    yield standin
    # Its thread ends on its own within about 0.2 s: no need to spend that on every test.
    standin.stop(wait=False)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@contextlib.contextmanager
def environment(env: Mapping[str, str]) -> Iterator[None]:
    """`env` as the process environment's GPTUNNEL_* variables, for as long as the block runs."""
    saved = dict(os.environ)
    for name in [n for n in os.environ if n.startswith("GPTUNNEL_")]:
        del os.environ[name]
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


class _Captured(logging.Handler):
    def __init__(self, sink: io.StringIO) -> None:
        super().__init__(logging.DEBUG)
        self.sink = sink
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.write(self.format(record) + "\n")


class ServerLauncher:
    """The server as a client meets it, in this process: over the SDK's in-memory transport
    (`transport="memory"`) or over streamable HTTP on an in-process uvicorn (`"http"`). Each
    `connect` is a new server on the same home folder, configured as the environment variables
    given would configure it; `logs()` is everything the servers logged."""

    def __init__(self, standin: StandIn, home: Path, transport: str = "memory") -> None:
        self.standin = standin
        self.home = home
        self.transport = transport
        self._log = io.StringIO()

    def env(self, **env: str | None) -> dict[str, str]:
        values: dict[str, str | None] = {
            "GPTUNNEL_API_KEY": API_KEY,
            "GPTUNNEL_BASE_URL": self.standin.url,
            "GPTUNNEL_MCP_HOME": str(self.home),
            "GPTUNNEL_WAIT_TIMEOUT": "10",
            **env,
        }
        return {k: v for k, v in values.items() if v is not None}

    def settings(self, **env: str | None) -> Settings:
        with environment(self.env(**env)):
            return load_settings()

    @contextlib.asynccontextmanager
    async def connect(
        self,
        mode: str = "auto",
        *,
        token: str | None = None,
        extensions: Sequence[ClientExtension] | None = None,
        list_roots: ListRootsFnT | None = None,
        **env: str | None,
    ) -> AsyncIterator[Client]:
        """`list_roots` answers the server's roots/list; without it, the client declares no roots."""
        settings = self.settings(**env)
        handler = _Captured(self._log)
        root = logging.getLogger()
        root.addHandler(handler)
        level, root.level = root.level, logging.DEBUG
        try:
            if self.transport == "memory":
                server = build_server(settings, schedule=QUICK_POLLS, backoff=QUICK_BACKOFF)
                async with Client(
                    server, mode=mode, cache=None, extensions=extensions, list_roots_callback=list_roots
                ) as client:
                    yield client
                return
            async with (
                serve_http(settings) as url,
                mcp_client(url, token, mode, extensions, list_roots) as client,
            ):
                yield client
        finally:
            root.removeHandler(handler)
            root.level = level

    def logs(self) -> str:
        return self._log.getvalue()


@pytest.fixture(params=["memory", "http"])
def server(request: pytest.FixtureRequest, standin: StandIn, home: Path) -> ServerLauncher:
    """The server as clients meet it, once per transport: every test using it runs over both."""
    return ServerLauncher(standin, home, transport=request.param)


@pytest.fixture
def memory_server(standin: StandIn, home: Path) -> ServerLauncher:
    """For behaviour that does not depend on the transport."""
    return ServerLauncher(standin, home)


def loopback_socket() -> socket.socket:
    """A TCP socket on a free loopback port, for `serve_http`: bound before the server is made,
    so its address can be in the server's settings (GPTUNNEL_MCP_PUBLIC_URL)."""
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and
    # without it every keep-alive request waits ~40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.asynccontextmanager
async def serve_http(settings: Settings, sock: socket.socket | None = None) -> AsyncIterator[str]:
    """The server's whole HTTP app (auth, Host/Origin guard, /healthz) on an in-process uvicorn
    on `sock`, or a free loopback port; yields the MCP URL."""
    app = build_http_app(settings, schedule=QUICK_POLLS, backoff=QUICK_BACKOFF)
    sock = sock or loopback_socket()
    # Started as server/_serve.py starts it: with the connection guard.
    server = http_server(settings, app, log_config=None, log_level="warning", lifespan="on", access_log=False)
    async with running(server, sock):
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/mcp"


@contextlib.asynccontextmanager
async def running(server: uvicorn.Server, sock: socket.socket) -> AsyncIterator[None]:
    """An in-process uvicorn `server` on `sock`, from when it is ready until the block ends."""
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(server.serve, [sock])
        with anyio.fail_after(10):
            while not server.started:  # noqa: ASYNC110 - uvicorn offers a flag, not an event
                await anyio.sleep(0.005)
        try:
            yield
        finally:
            server.should_exit = True
    sock.close()


class ProcessLauncher:
    """Starts `python -m gptunnel_mcp` as a client would, over stdio or streamable HTTP, and keeps
    what it wrote to stderr: for the tests that need a real process (transports, crashes)."""

    def __init__(self, standin: StandIn, home: Path, log_dir: Path, transport: str = "stdio") -> None:
        self.standin = standin
        self.home = home
        self.log_dir = log_dir
        self.transport = transport
        self.logs: list[Path] = []

    def env(self, **env: str | None) -> dict[str, str]:
        values: dict[str, str | None] = {
            "GPTUNNEL_API_KEY": API_KEY,
            "GPTUNNEL_BASE_URL": self.standin.url,
            "GPTUNNEL_MCP_HOME": str(self.home),
            "GPTUNNEL_WAIT_TIMEOUT": "20",
            **env,
        }
        merged = {k: v for k, v in values.items() if v is not None}
        merged.setdefault("PATH", os.environ.get("PATH", ""))
        return merged

    def params(self, **env: str | None) -> StdioServerParameters:
        return StdioServerParameters(
            command=sys.executable, args=["-m", "gptunnel_mcp", "--log-level", "DEBUG"], env=self.env(**env)
        )

    @contextlib.asynccontextmanager
    async def connect(
        self, mode: str = "auto", *, token: str | None = None, **env: str | None
    ) -> AsyncIterator[Client]:
        log = self.log_dir / f"server-{len(self.logs)}.log"
        self.logs.append(log)
        with log.open("w") as errlog:
            if self.transport == "stdio":
                transport = stdio_client(self.params(**env), errlog=errlog)
                async with Client(transport, mode=mode, cache=None) as client:
                    yield client
                return
            async with self.http_server(errlog, **env) as url, mcp_client(url, token, mode) as client:
                yield client

    @contextlib.asynccontextmanager
    async def http_server(self, errlog: IO[str], **env: str | None) -> AsyncIterator[str]:
        """A server process on a free loopback port; yields its MCP URL once /healthz answers."""
        port = free_port()
        command = [sys.executable, "-m", "gptunnel_mcp", "--transport", "http", "--port", str(port)]
        async with running_server([*command, "--log-level", "DEBUG"], self.env(**env), errlog, port):
            yield f"http://127.0.0.1:{port}/mcp"

    def stderr(self) -> str:
        return "".join(p.read_text() for p in self.logs if p.exists())


@pytest.fixture
def process_server(standin: StandIn, home: Path, tmp_path: Path) -> ProcessLauncher:
    logs = tmp_path / "logs"
    logs.mkdir()
    return ProcessLauncher(standin, home, logs)


@contextlib.asynccontextmanager
async def http_client(url: str, token: str | None) -> AsyncIterator[httpx2.AsyncClient]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=120)) as client:
        yield client


@contextlib.asynccontextmanager
async def mcp_client(
    url: str,
    token: str | None = None,
    mode: str = "auto",
    extensions: Sequence[ClientExtension] | None = None,
    list_roots: ListRootsFnT | None = None,
) -> AsyncIterator[Client]:
    """The official client over streamable HTTP, sending `token` as its bearer."""
    async with (
        http_client(url, token) as http,
        Client(
            streamable_http_client(url, http_client=http),
            mode=mode,
            cache=None,
            extensions=extensions,
            list_roots_callback=list_roots,
        ) as client,
    ):
        yield client


#: A multi-user HTTP server: no key of its own, each client brings theirs.
MULTI_USER: dict[str, str | None] = {
    "GPTUNNEL_API_KEY": None,
    "GPTUNNEL_MCP_MULTI_USER": "1",
    "GPTUNNEL_MCP_TRANSPORT": "http",
}


#: Every tool the server offers an agent, with or without a key (the gallery view's own tools
#: are listed only to hosts that draw views).
TOOL_NAMES = frozenset(
    {"create_image", "get_result", "generate_and_wait", "get_balance", "search_images", "save_image"}
    | {"show_gallery"}
)

#: Headers of a raw streamable-HTTP request, for tests below the official client.
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


def initialize_request(client: str, capabilities: dict[str, Any] | None = None) -> dict[str, Any]:
    """A raw 2025-11-25 `initialize`, for tests that speak the wire format themselves."""
    return {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": capabilities or {},
            "clientInfo": {"name": client, "version": "1"},
        },
    }


def structured(result: Any) -> dict[str, Any]:
    assert result.structured_content is not None, result.content
    return dict(result.structured_content)


def text_of(result: Any) -> str:
    return "\n".join(block.text for block in result.content if block.type == "text")


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[Cluster]:
    """A real PostgreSQL, started once per test process on first use (see tests/postgres.py)."""
    with Cluster.running() as cluster:
        yield cluster


@pytest.fixture
def postgres_url(postgres_cluster: Cluster) -> Iterator[str]:
    """The URL of a fresh, empty database for this test alone."""
    with postgres_cluster.database() as url:
        yield url


@pytest.fixture(scope="session")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One Chromium per test process, and the test host page built: its DevTools endpoint
    (tests/browser.py). Fails in CI, and skips elsewhere, without Chromium or npm."""
    with browser.chromium(tmp_path_factory.mktemp("chromium")) as endpoint:
        browser.build_host()
        yield endpoint


@pytest.fixture
def app_host(chromium: str) -> Callable[[str], AbstractAsyncContextManager[browser.AppHost]]:
    """`async with app_host(mcp_url) as host`: the MCP Apps test host page, in a fresh browser
    context, connected to any MCP server on loopback HTTP; browser errors fail the test."""

    def open_host(mcp_url: str) -> AbstractAsyncContextManager[browser.AppHost]:
        return browser.app_host(chromium, mcp_url)

    return open_host


#: `async with gallery(**env) as (host, agent)`, see the fixture.
Gallery = Callable[..., AbstractAsyncContextManager[tuple[browser.AppHost, Client]]]


@pytest.fixture
def gallery(
    app_host: Callable[[str], AbstractAsyncContextManager[browser.AppHost]], standin: StandIn, home: Path
) -> Gallery:
    """`async with gallery(**env) as (host, agent)`: this server, configured as the environment
    variables `env` would, over HTTP (`serve_http`), the MCP Apps test host page on it, and an
    agent's own client beside them."""

    @contextlib.asynccontextmanager
    async def open_gallery(**env: str) -> AsyncIterator[tuple[browser.AppHost, Client]]:
        settings = ServerLauncher(standin, home, transport="http").settings(**env)
        async with serve_http(settings) as url, app_host(url) as host, mcp_client(url, None) as agent:
            yield host, agent

    return open_gallery
