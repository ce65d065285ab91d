"""Hardening of the HTTP server (issue 9): cheap checks before GPTunnel is asked about a key,
refusals remembered, failed attempts limited per client address and key checks run a few at a
time; a limit on each user's 2025-11-25 sessions that follows their real lifetime; slow clients
cut off and a limit on connections; weak configurations refused; a health check that tells
strangers nothing; cursors that cannot break `resources/list`."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import httpx2
import pytest
import uvicorn
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from starlette.types import Receive, Scope, Send

import gptunnel_mcp
import gptunnel_mcp.server
from gptunnel_mcp import ConfigError, Settings, load_settings
from gptunnel_mcp._main import main

from .conftest import (
    API_KEY,
    MCP_HEADERS,
    MULTI_USER,
    ServerLauncher,
    environment,
    http_client,
    initialize_request,
    serve_http,
)
from .standin import Behaviour, StandIn

pytestmark = pytest.mark.anyio

#: The one key the stand-in takes in the multi-user tests.
GOOD_KEY = "sk-the-only-good-key-7c2e41"
TOKEN = "a-strong-token-5e1f9b2d"
INITIALIZE = initialize_request("hardening-test")


@pytest.fixture
def picky_standin() -> Iterator[StandIn]:
    with StandIn(api_key=GOOD_KEY, behaviour=Behaviour(generation_seconds=0.05)) as standin:
        yield standin


@pytest.fixture
def open_standin() -> Iterator[StandIn]:
    """Takes any key: every user of a multi-user server."""
    with StandIn(api_key=None, behaviour=Behaviour(generation_seconds=0.05)) as standin:
        yield standin


@pytest.fixture
async def raw() -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(timeout=15) as client:
        yield client


def settings_for(standin: StandIn, home: Path, **env: str | None) -> Settings:
    return ServerLauncher(standin, home, transport="http").settings(**env)


async def post_initialize(raw: httpx2.AsyncClient, url: str, **headers: str) -> httpx2.Response:
    return await raw.post(url, json=INITIALIZE, headers={**MCP_HEADERS, **headers})


def bearer(key: str) -> str:
    return f"Bearer {key}"


# --- 1. bad keys cost no upstream calls ---------------------------------------------------------------


async def test_a_bad_key_sent_fifty_times_at_once_is_asked_about_once(
    picky_standin: StandIn, home: Path, raw: httpx2.AsyncClient
) -> None:
    async with serve_http(settings_for(picky_standin, home, **MULTI_USER)) as url:
        statuses: list[int] = []

        async def guess() -> None:
            statuses.append((await post_initialize(raw, url, Authorization=bearer("sk-wrong"))).status_code)

        async with anyio.create_task_group() as group:
            for _ in range(50):
                group.start_soon(guess)
        # Sent again later: remembered, GPTunnel is not asked again.
        again = await post_initialize(raw, url, Authorization=bearer("sk-wrong"))
    assert picky_standin.stats.balance_calls == 1
    assert set(statuses) <= {401, 429} and statuses.count(401) >= 1, statuses
    assert again.status_code in (401, 429)


async def test_many_bad_keys_from_one_address_cost_at_most_the_failure_limit_then_429(
    picky_standin: StandIn, home: Path, raw: httpx2.AsyncClient
) -> None:
    env = {**MULTI_USER, "GPTUNNEL_MCP_AUTH_FAILURES_PER_MINUTE": "5"}
    async with serve_http(settings_for(picky_standin, home, **env)) as url:
        assert (await post_initialize(raw, url, Authorization=bearer(GOOD_KEY))).status_code == 200
        responses: list[httpx2.Response] = []

        async def guess(i: int) -> None:
            responses.append(await post_initialize(raw, url, Authorization=bearer(f"sk-guess-{i}")))

        async with anyio.create_task_group() as group:
            for i in range(50):
                group.start_soon(guess, i)
        statuses = [r.status_code for r in responses]
        assert picky_standin.stats.balance_calls <= 1 + 5
        assert statuses.count(401) <= 5 and statuses.count(429) >= 45, statuses
        turned_away = next(r for r in responses if r.status_code == 429)
        assert 1 <= int(turned_away.headers["retry-after"]) <= 60
        assert "try again" in turned_away.json()["error_description"]
        for response in responses:
            assert "sk-guess" not in response.text

        # The known user at the same address still gets in, without another question to GPTunnel;
        # another address (through a proxy on loopback) is not held to this one's failures.
        calls = picky_standin.stats.balance_calls
        assert (await post_initialize(raw, url, Authorization=bearer(GOOD_KEY))).status_code == 200
        elsewhere = await post_initialize(
            raw, url, Authorization=bearer("sk-other"), **{"X-Forwarded-For": "203.0.113.9"}
        )
        assert elsewhere.status_code == 401
        assert picky_standin.stats.balance_calls == calls + 1


@pytest.mark.parametrize(
    "headers",
    [{"Host": "evil.example"}, {"Origin": "http://evil.example"}, {"Content-Type": "text/plain"}],
    ids=["host", "origin", "content-type"],
)
async def test_a_bad_key_refused_for_its_headers_costs_no_upstream_call(
    picky_standin: StandIn, home: Path, raw: httpx2.AsyncClient, headers: dict[str, str]
) -> None:
    async with serve_http(settings_for(picky_standin, home, **MULTI_USER)) as url:
        refused = await post_initialize(raw, url, Authorization=bearer("sk-wrong"), **headers)
    assert refused.status_code in (400, 403, 421), refused.text
    assert picky_standin.stats.balance_calls == 0


async def test_a_bad_key_with_a_body_too_large_costs_no_upstream_call(
    picky_standin: StandIn, home: Path
) -> None:
    async with serve_http(settings_for(picky_standin, home, **MULTI_USER)) as url:
        port = httpx2.URL(url).port
        assert port is not None
        head = (
            f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer sk-wrong\r\n"
            "Content-Type: application/json\r\nContent-Length: 5000000\r\nConnection: close\r\n\r\n"
        )
        _, answer = await talk(port, head.encode())
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert picky_standin.stats.balance_calls == 0


async def test_wrong_tokens_from_one_address_get_429_and_the_right_one_still_works(
    picky_standin: StandIn, home: Path, raw: httpx2.AsyncClient
) -> None:
    env = {"GPTUNNEL_API_KEY": GOOD_KEY, "GPTUNNEL_MCP_AUTH_TOKEN": TOKEN}
    async with serve_http(settings_for(picky_standin, home, **env)) as url:
        statuses = [
            (await post_initialize(raw, url, Authorization=bearer(f"guess-{i:020}"))).status_code
            for i in range(12)
        ]
        right = await post_initialize(raw, url, Authorization=bearer(TOKEN))
    assert statuses == [401] * 10 + [429] * 2
    assert right.status_code == 200


class SlowGPTunnel:
    """A GPTunnel whose balance check takes a while: how many run at once is what it counts."""

    def __init__(self) -> None:
        self.running = 0
        self.most = 0
        self.calls = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http" and scope["path"] == "/v1/balance", scope
        self.calls += 1
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await anyio.sleep(0.05)
        finally:
            self.running -= 1
        await send({"type": "http.response.start", "status": 401, "headers": []})
        await send({"type": "http.response.body", "body": b'{"error": {"message": "bad key"}}'})


async def test_key_checks_run_a_few_at_a_time(home: Path, raw: httpx2.AsyncClient) -> None:
    upstream = SlowGPTunnel()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(upstream, log_config=None, lifespan="off", access_log=False))
    env = {
        "GPTUNNEL_API_KEY": None,
        "GPTUNNEL_MCP_MULTI_USER": "1",
        "GPTUNNEL_MCP_TRANSPORT": "http",
        "GPTUNNEL_MCP_HOME": str(home),
        "GPTUNNEL_BASE_URL": f"http://127.0.0.1:{sock.getsockname()[1]}",
    }
    with environment({k: v for k, v in env.items() if v is not None}):
        settings = load_settings()
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(server.serve, [sock])
        async with serve_http(settings) as url:
            # Each from its own address (a proxy on loopback), so none is held to a failure limit.
            async def newcomer(i: int) -> None:
                headers = {"Authorization": bearer(f"sk-new-{i}"), "X-Forwarded-For": f"198.51.100.{i}"}
                assert (await post_initialize(raw, url, **headers)).status_code == 401

            async with anyio.create_task_group() as group:
                for i in range(16):
                    group.start_soon(newcomer, i)
        server.should_exit = True
    sock.close()
    assert upstream.calls == 16
    assert upstream.most <= 4, upstream.most


# --- 2. sessions per user -------------------------------------------------------------------------


async def open_session(raw: httpx2.AsyncClient, url: str, key: str) -> str:
    opened = await post_initialize(raw, url, Authorization=bearer(key))
    assert opened.status_code == 200, opened.text
    return opened.headers["mcp-session-id"]


async def ping(raw: httpx2.AsyncClient, url: str, key: str, session: str) -> httpx2.Response:
    message = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
    headers = {**MCP_HEADERS, "Authorization": bearer(key), "mcp-session-id": session}
    return await raw.post(url, json=message, headers=headers)


async def test_one_user_cannot_open_more_sessions_than_the_limit_and_others_still_can(
    open_standin: StandIn, home: Path, raw: httpx2.AsyncClient
) -> None:
    env = {**MULTI_USER, "GPTUNNEL_MCP_MAX_SESSIONS_PER_USER": "2"}
    async with serve_http(settings_for(open_standin, home, **env)) as url:
        first = await open_session(raw, url, "sk-alice")
        await open_session(raw, url, "sk-alice")
        refused = await post_initialize(raw, url, Authorization=bearer("sk-alice"))
        assert refused.status_code == 429, refused.text
        assert "2 open MCP sessions" in refused.json()["error"]["message"]
        assert int(refused.headers["retry-after"]) >= 1
        # Other users are not locked out, and the user's own 2026-07-28 client needs no session.
        await open_session(raw, url, "sk-bob")
        async with (
            http_client(url, "sk-alice") as http,
            Client(streamable_http_client(url, http_client=http), cache=None) as modern,
        ):
            assert modern.protocol_version == "2026-07-28"
            await modern.list_tools()

        # A session the client ends frees its place at once.
        ended = await raw.delete(url, headers={"Authorization": bearer("sk-alice"), "mcp-session-id": first})
        assert ended.status_code < 400, ended.text
        assert (await ping(raw, url, "sk-alice", first)).status_code == 404
        await open_session(raw, url, "sk-alice")
        assert (await post_initialize(raw, url, Authorization=bearer("sk-alice"))).status_code == 429


async def test_sessions_that_expire_free_their_place(
    open_standin: StandIn, home: Path, raw: httpx2.AsyncClient
) -> None:
    env = {
        **MULTI_USER,
        "GPTUNNEL_MCP_MAX_SESSIONS_PER_USER": "2",
        "GPTUNNEL_MCP_SESSION_IDLE_TIMEOUT": "0.3",
    }
    async with serve_http(settings_for(open_standin, home, **env)) as url:
        old = [await open_session(raw, url, "sk-alice") for _ in range(2)]
        assert (await post_initialize(raw, url, Authorization=bearer("sk-alice"))).status_code == 429
        await anyio.sleep(0.4)
        # The SDK ended them (404), and the user may open as many again.
        for session in old:
            assert (await ping(raw, url, "sk-alice", session)).status_code == 404
        new = [await open_session(raw, url, "sk-alice") for _ in range(2)]
        assert (await ping(raw, url, "sk-alice", new[0])).status_code == 200


# --- 3. slow clients and too many connections -------------------------------------------------------


@contextlib.asynccontextmanager
async def serve_guarded(settings: Settings) -> AsyncIterator[int]:
    """The HTTP app on uvicorn as `server/_serve.py` starts it (with its connection guard), on a
    free loopback port; yields the port."""
    async with serve_http(settings) as url:
        port = urlsplit(url).port
        assert port is not None
        yield port


async def talk(port: int, *chunks: bytes, every: float = 0.0, limit: float = 3.0) -> tuple[float, bytes]:
    """Connects, sends `chunks` `every` seconds apart, and reads until the server closes the
    connection: how long that took, and what the server sent."""
    started = time.monotonic()
    received = b""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:

        async def trickle() -> None:
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                for chunk in chunks:
                    await stream.send(chunk)
                    await anyio.sleep(every)

        with anyio.fail_after(limit):
            async with anyio.create_task_group() as group:
                group.start_soon(trickle)
                with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    while True:
                        received += await stream.receive()
                group.cancel_scope.cancel()
    return time.monotonic() - started, received


def slow_settings(memory_server: ServerLauncher, **env: str) -> Settings:
    return memory_server.settings(GPTUNNEL_MCP_HEADER_TIMEOUT="0.3", GPTUNNEL_MCP_BODY_TIMEOUT="0.3", **env)


async def test_a_client_that_sends_nothing_or_half_a_request_is_cut_off(
    memory_server: ServerLauncher,
) -> None:
    results: dict[str, tuple[float, bytes]] = {}
    async with serve_guarded(slow_settings(memory_server)) as port:
        head = f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode()
        body = (
            f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            "Accept: application/json, text/event-stream\r\nContent-Length: 200\r\n\r\n{"
        )
        clients = {
            "silent": (),
            "half a header": (head,),
            # One byte at a time, each well within any per-read timeout: the deadline is for the whole.
            "dripping": tuple(head[i : i + 1] for i in range(len(head))),
            "half a body": (body.encode(),),
        }

        async def client(name: str, chunks: tuple[bytes, ...]) -> None:
            results[name] = await talk(port, *chunks, every=0.02)

        async with anyio.create_task_group() as group:
            for name, chunks in clients.items():
                group.start_soon(client, name, chunks)
            # A client that pauses between requests is idle, not late: its connection stays open.
            group.start_soon(pausing_client, port, 0.4)
    for name, (took, answer) in results.items():
        assert 0.25 <= took < 1.0, (name, took)
        assert answer == b"", (name, answer)


async def pausing_client(port: int, pause: float) -> None:
    request = f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        for _ in range(2):
            await stream.send(request)
            answer = b""
            with anyio.fail_after(2):
                while b'"status":"ok"' not in answer:
                    answer += await stream.receive()
            assert answer.startswith(b"HTTP/1.1 200"), answer
            await anyio.sleep(pause)


async def test_connections_beyond_the_limit_are_refused_until_one_closes(
    memory_server: ServerLauncher,
) -> None:
    async with serve_guarded(memory_server.settings(GPTUNNEL_MCP_MAX_CONNECTIONS="2")) as port:
        first = await anyio.connect_tcp("127.0.0.1", port)
        async with await anyio.connect_tcp("127.0.0.1", port):
            took, answer = await talk(port)
            assert answer.startswith(b"HTTP/1.1 503"), answer
            assert took < 0.5
            await first.aclose()
            with anyio.fail_after(2):
                while True:
                    _, answer = await talk(
                        port,
                        f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                        "Connection: close\r\n\r\n".encode(),
                    )
                    if not answer.startswith(b"HTTP/1.1 503"):
                        break
                    await anyio.sleep(0.02)
            assert answer.startswith(b"HTTP/1.1 200"), answer


# --- 4. weak configurations ---------------------------------------------------------------------------


def refusal(home: Path, **env: str) -> str:
    """The one line `load_settings` refuses these variables with."""
    values = {"GPTUNNEL_MCP_HOME": str(home), "GPTUNNEL_MCP_TRANSPORT": "http", **env}
    with environment(values), pytest.raises(ConfigError) as info:
        load_settings()
    line = str(info.value)
    assert line and "\n" not in line, line
    return line


@pytest.mark.parametrize(
    "token", ["x", "short-token-15c", "correct horse battery staple", "tab\tinside-a-long-token"]
)
@pytest.mark.parametrize("host", ["0.0.0.0", "127.0.0.1"])
def test_a_weak_token_is_refused(home: Path, token: str, host: str) -> None:
    line = refusal(home, GPTUNNEL_API_KEY=API_KEY, GPTUNNEL_MCP_AUTH_TOKEN=token, GPTUNNEL_MCP_HOST=host)
    assert "GPTUNNEL_MCP_AUTH_TOKEN" in line and "16" in line and "openssl rand" in line
    assert repr(token) not in line


def test_a_strong_token_is_taken(home: Path) -> None:
    env = {
        "GPTUNNEL_MCP_HOME": str(home),
        "GPTUNNEL_MCP_TRANSPORT": "http",
        "GPTUNNEL_MCP_HOST": "0.0.0.0",
        "GPTUNNEL_MCP_AUTH_TOKEN": "0123456789abcdef",
    }
    with environment(env):
        settings = load_settings()
    assert settings.auth_token is not None and settings.auth_token.get_secret_value() == "0123456789abcdef"


def test_a_sandbox_for_many_users_stays_on_loopback(home: Path) -> None:
    # The sandbox takes any key, so a multi-user sandbox on a public address serves anyone.
    line = refusal(home, GPTUNNEL_SANDBOX="1", GPTUNNEL_MCP_MULTI_USER="1", GPTUNNEL_MCP_HOST="0.0.0.0")
    assert "GPTUNNEL_SANDBOX" in line and "GPTUNNEL_MCP_MULTI_USER" in line and "127.0.0.1" in line
    env = {
        "GPTUNNEL_MCP_HOME": str(home),
        "GPTUNNEL_MCP_TRANSPORT": "http",
        "GPTUNNEL_SANDBOX": "1",
        "GPTUNNEL_MCP_MULTI_USER": "1",
    }
    with environment(env):
        assert load_settings().is_loopback


def test_a_weak_token_stops_the_command_line_with_one_line(
    home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def serve_instead(*_: object) -> None:
        pytest.fail("the server started instead of refusing")

    monkeypatch.setattr(gptunnel_mcp.server, "serve", serve_instead)
    env = {"GPTUNNEL_API_KEY": API_KEY, "GPTUNNEL_MCP_HOME": str(home), "GPTUNNEL_MCP_AUTH_TOKEN": "x"}
    with environment(env), pytest.raises(SystemExit) as exited:
        main(["--transport", "http", "--host", "0.0.0.0", "--port", "8123"])
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1, err
    assert "GPTUNNEL_MCP_AUTH_TOKEN" in lines[0] and API_KEY not in err


# --- 5. /healthz --------------------------------------------------------------------------------------


async def test_healthz_tells_strangers_only_that_it_is_up(
    picky_standin: StandIn, home: Path, raw: httpx2.AsyncClient
) -> None:
    env = {"GPTUNNEL_API_KEY": GOOD_KEY, "GPTUNNEL_MCP_AUTH_TOKEN": TOKEN}
    async with serve_http(settings_for(picky_standin, home, **env)) as url:
        health = url.removesuffix("/mcp") + "/healthz"
        anonymous = await raw.get(health)
        # A load balancer probing by IP address: any Host, an answer, and nothing more.
        probe = await raw.get(health, headers={"Host": "10.1.2.3:8000"})
        wrong = await raw.get(health, headers={"Authorization": bearer("not-the-token-at-all")})
        authorised = await raw.get(health, headers={"Authorization": bearer(TOKEN)})
        foreign = await raw.get(health, headers={"Authorization": bearer(TOKEN), "Host": "evil.example"})
    for answer in (anonymous, probe, wrong, foreign):
        assert answer.status_code == 200 and answer.json() == {"status": "ok"}, answer.text
    assert authorised.status_code == 200
    details = authorised.json()
    assert details["version"] == gptunnel_mcp.__version__ and details["auth"] is True
    for secret in (TOKEN, GOOD_KEY):
        assert secret not in json.dumps(details)


async def test_healthz_tells_a_known_user_of_a_multi_user_server_the_details(
    picky_standin: StandIn, home: Path, raw: httpx2.AsyncClient
) -> None:
    async with serve_http(settings_for(picky_standin, home, **MULTI_USER)) as url:
        health = url.removesuffix("/mcp") + "/healthz"
        anonymous = (await raw.get(health)).json()
        refused = (await raw.get(health, headers={"Authorization": bearer("sk-wrong")})).json()
        known = (await raw.get(health, headers={"Authorization": bearer(GOOD_KEY)})).json()
    assert anonymous == refused == {"status": "ok"}
    assert known["multi_user"] is True and known["version"] == gptunnel_mcp.__version__


# --- 6. resources/list cursors ------------------------------------------------------------------------


@pytest.mark.parametrize("cursor", ["²", "1" * 20, "1000000001", "١٢"])
async def test_a_cursor_that_is_not_a_plain_page_offset_is_invalid_params(
    memory_server: ServerLauncher, cursor: str
) -> None:
    async with memory_server.connect() as client:
        with pytest.raises(MCPError) as info:
            await client.list_resources(cursor=cursor)
        assert info.value.error.code == -32602, info.value
        assert "cursor" in info.value.error.message
        # A cursor the server handed out still works.
        assert (await client.list_resources(cursor="50")).resources == []
