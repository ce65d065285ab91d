"""Security of the HTTP transport (issue 3): the whole HTTP app on an in-process uvicorn, the
official MCP client, plain httpx2 for raw HTTP, and the stand-in GPTunnel. No mocks.

- /healthz is open and tells no secret;
- the DNS-rebinding guard (Host and Origin allow-lists) is on by default and can be widened;
- a non-loopback bind without authentication, and meaningless setting combinations, are refused
  by the settings with one line;
- a shared bearer token guards /mcp and never reaches the log;
- multi-user mode: each caller's own GPTunnel key, checked once and remembered, never stored; each
  user sees, hears of and completes only their own tasks;
- several servers on one home folder share the history.

`test_transport_http.py` checks the same guards once against a real server process.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import re
import sqlite3
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client
from mcp_types import BlobResourceContents, ResourceTemplateReference, TextResourceContents

import gptunnel_mcp
import gptunnel_mcp.server
from gptunnel_mcp import load_settings
from gptunnel_mcp._exceptions import ConfigError
from gptunnel_mcp._main import main

from .conftest import (
    API_KEY,
    MCP_HEADERS,
    MULTI_USER,
    ServerLauncher,
    environment,
    initialize_request,
    mcp_client,
    serve_http,
    structured,
    text_of,
)
from .standin import Behaviour, StandIn, Stats

pytestmark = pytest.mark.anyio

MODES = ["auto", "legacy"]  # 2026-07-28 (discovered) and the 2025-11-25 handshake

AUTH_TOKEN = "s3cret-token-4b9e7d21"
#: Two users' GPTunnel keys: distinctive, so a leak anywhere is found by a substring search.
KEY_A = "sk-user-A-5d2e9b7c41f0"
KEY_B = "sk-user-B-8a3f6e0d27c9"
#: A well-formed task id no one ever created.
NEVER = "0123456789abcdef01234567"


INITIALIZE = initialize_request("security-test")


# --- fixtures and helpers ----------------------------------------------------------------------------


def _fast() -> Behaviour:
    return Behaviour(generation_seconds=0.05, image_size=(320, 240))


@pytest.fixture
def keyed_standin() -> Iterator[StandIn]:
    """Accepts only the single-user key of conftest."""
    with StandIn(api_key=API_KEY, behaviour=_fast()) as s:
        yield s


@pytest.fixture
def open_standin() -> Iterator[StandIn]:
    """Accepts any key: the two users of a multi-user server."""
    with StandIn(api_key=None, behaviour=_fast()) as s:
        yield s


@pytest.fixture
def launcher(keyed_standin: StandIn, home: Path) -> ServerLauncher:
    return ServerLauncher(keyed_standin, home, transport="http")


@pytest.fixture
def multi_launcher(open_standin: StandIn, home: Path) -> ServerLauncher:
    return ServerLauncher(open_standin, home, transport="http")


@pytest.fixture
def server_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Everything the in-process servers log, at every level, for leak searches."""
    caplog.set_level(logging.DEBUG)
    return caplog


def serve(launcher: ServerLauncher, **env: str | None) -> contextlib.AbstractAsyncContextManager[str]:
    """One server's HTTP app, configured by these environment variables; yields its /mcp URL."""
    return serve_http(launcher.settings(**env))


def base_of(url: str) -> str:
    return url.removesuffix("/mcp")


@pytest.fixture
async def raw() -> AsyncIterator[httpx2.AsyncClient]:
    """Plain HTTP, with no credentials but those a request names."""
    async with httpx2.AsyncClient(timeout=15) as client:
        yield client


async def post_initialize(
    raw: httpx2.AsyncClient, url: str, headers: dict[str, str] | None = None
) -> httpx2.Response:
    """A proper JSON-RPC initialize POSTed to /mcp, with extra (or overriding) headers."""
    return await raw.post(url, json=INITIALIZE, headers={**MCP_HEADERS, **(headers or {})})


def assert_initialized(response: httpx2.Response) -> None:
    assert response.status_code == 200, (response.status_code, response.text)
    # An SSE stream or plain JSON: either way it carries the initialize result.
    assert '"result"' in response.text and '"protocolVersion"' in response.text, response.text


def assert_unauthorized(response: httpx2.Response, error: str) -> None:
    assert response.status_code == 401, (response.status_code, response.text)
    challenge = response.headers.get("www-authenticate", "")
    assert challenge.startswith("Bearer "), response.headers
    if error == "invalid_request":
        # No credentials at all: RFC 6750 3.1 gives the challenge no error.
        assert "error" not in challenge, challenge
    else:
        assert f'error="{error}"' in challenge
    assert response.json()["error"] == error


def dump(result: Any) -> str:
    """Everything a client received, as text, for leak searches."""
    return result.model_dump_json() if hasattr(result, "model_dump_json") else str(result)


def home_bytes(home: Path) -> dict[str, bytes]:
    files = {str(p.relative_to(home)): p.read_bytes() for p in sorted(home.rglob("*")) if p.is_file()}
    assert "history.sqlite3" in files, sorted(files)
    return files


def anonymised(text: str, *ids: str) -> str:
    for task_id in ids:
        text = re.sub(re.escape(task_id), "<ID>", text, flags=re.IGNORECASE)
    return text


async def poll_until_finished(client: Client, task_id: str) -> dict[str, Any]:
    with anyio.fail_after(15):
        while True:
            data = structured(await client.call_tool("get_result", {"task_id": task_id}))
            if data["status"] != "pending":
                return data
            await anyio.sleep(0.05)


async def history_ids(client: Client) -> list[str]:
    history = await read_json(client, "gptunnel://images")
    return [t["task_id"] for t in history["tasks"]]


async def read_json(client: Client, uri: str) -> dict[str, Any]:
    content = (await client.read_resource(uri)).contents[0]
    assert isinstance(content, TextResourceContents), content
    assert content.mime_type == "application/json"
    return dict(json.loads(content.text))


async def read_blob(client: Client, uri: str) -> bytes:
    content = (await client.read_resource(uri)).contents[0]
    assert isinstance(content, BlobResourceContents), content
    return base64.b64decode(content.blob)


# --- 1. /healthz -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "auth", "multi_user"),
    [
        ({}, False, False),
        ({"GPTUNNEL_MCP_AUTH_TOKEN": AUTH_TOKEN}, True, False),
        (MULTI_USER, True, True),
    ],
    ids=["no-auth", "token", "multi-user"],
)
async def test_healthz_is_open_and_tells_the_version_but_no_secret(
    launcher: ServerLauncher,
    raw: httpx2.AsyncClient,
    env: dict[str, str | None],
    auth: bool,
    multi_user: bool,
) -> None:
    async with serve(launcher, **env) as url:
        health = await raw.get(f"{base_of(url)}/healthz")
        # The health check needs no credentials, even where /mcp does.
        guarded = await post_initialize(raw, url)
    assert "authorization" not in {k.lower() for k in health.request.headers}
    assert health.status_code == 200
    assert health.headers["content-type"].startswith("application/json")
    body = health.json()
    assert body["status"] == "ok"
    if auth:  # a stranger learns that it is up, no more (the rest: test_http_hardening.py)
        assert body == {"status": "ok"}
    else:
        assert body["version"] == gptunnel_mcp.__version__
        assert body["auth"] is auth and body["multi_user"] is multi_user
    for secret in (API_KEY, AUTH_TOKEN):
        assert secret not in health.text
    if auth:
        assert guarded.status_code == 401
    else:
        assert_initialized(guarded)


# --- 2. DNS-rebinding guard ---------------------------------------------------------------------------


async def test_dns_rebinding_guard_is_on_by_default(
    launcher: ServerLauncher, raw: httpx2.AsyncClient
) -> None:
    async with serve(launcher) as url:
        port = httpx2.URL(url).port
        # Refused: a page on another origin, or a name that was rebound to 127.0.0.1.
        evil_origin = await post_initialize(raw, url, {"Origin": "http://evil.example"})
        assert evil_origin.status_code == 403, evil_origin.text
        # The SDK answers 421 Misdirected Request for a Host it does not serve.
        evil_host = await post_initialize(raw, url, {"Host": "evil.example"})
        assert evil_host.status_code == 421, evil_host.text
        evil_host_port = await post_initialize(raw, url, {"Host": f"evil.example:{port}"})
        assert evil_host_port.status_code == 421
        # Nothing beyond loopback is allowed unless the deployment says so.
        assert (await post_initialize(raw, url, {"Origin": "https://app.example.com"})).status_code == 403
        assert (await post_initialize(raw, url, {"Host": f"mcp.internal:{port}"})).status_code == 421
        # Accepted: loopback origins and hosts, and no Origin at all (non-browser clients).
        assert_initialized(await post_initialize(raw, url))
        assert_initialized(await post_initialize(raw, url, {"Origin": f"http://127.0.0.1:{port}"}))
        assert_initialized(await post_initialize(raw, url, {"Origin": f"http://localhost:{port}"}))
        assert_initialized(await post_initialize(raw, url, {"Host": f"localhost:{port}"}))
        # The official client (loopback Host, no Origin) works.
        async with mcp_client(url) as client:
            assert "generate_and_wait" in {t.name for t in (await client.list_tools()).tools}


@pytest.mark.parametrize(
    "variable", ["GPTUNNEL_MCP_ALLOWED_ORIGINS", "GPTUNNEL_MCP_ALLOWED_HOSTS"], ids=["origins", "hosts"]
)
async def test_allowed_origins_and_hosts_widen_the_guard(
    launcher: ServerLauncher, raw: httpx2.AsyncClient, variable: str
) -> None:
    value = "https://app.example.com" if variable.endswith("ORIGINS") else "mcp.internal:*"
    async with serve(launcher, **{variable: value}) as url:
        port = httpx2.URL(url).port
        app_origin = await post_initialize(raw, url, {"Origin": "https://app.example.com"})
        internal_host = await post_initialize(raw, url, {"Host": f"mcp.internal:{port}"})
        if variable.endswith("ORIGINS"):
            assert_initialized(app_origin)
            assert internal_host.status_code == 421, "widening origins must not widen hosts"
        else:
            assert_initialized(internal_host)
            assert app_origin.status_code == 403, "widening hosts must not widen origins"
        # Everything else is refused as before; loopback still works.
        assert (await post_initialize(raw, url, {"Origin": "http://evil.example"})).status_code == 403
        assert (
            await post_initialize(raw, url, {"Origin": "https://app.example.com.evil.example"})
        ).status_code == 403
        assert (await post_initialize(raw, url, {"Host": "evil.example"})).status_code == 421
        assert_initialized(await post_initialize(raw, url))


# --- 3. refusing to start ----------------------------------------------------------------------------


def refusal(home: Path, env: Mapping[str, str | None], **flags: str) -> str:
    """The one line `load_settings` refuses these variables and flags with (the server prints it)."""
    values = {"GPTUNNEL_API_KEY": API_KEY, "GPTUNNEL_MCP_HOME": str(home), **env}
    with environment({k: v for k, v in values.items() if v is not None}), pytest.raises(ConfigError) as info:
        load_settings(**flags)
    line = str(info.value)
    assert line and "\n" not in line, line
    assert API_KEY not in line
    return line


def test_public_bind_without_auth_is_refused(home: Path) -> None:
    env = {"GPTUNNEL_MCP_TRANSPORT": "http", "GPTUNNEL_MCP_HOST": "0.0.0.0", "GPTUNNEL_MCP_PORT": "8123"}
    line = refusal(home, env)
    assert "GPTUNNEL_MCP_AUTH_TOKEN" in line and "0.0.0.0" in line


def test_public_bind_without_auth_is_refused_from_the_command_line(
    home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def serve_instead(*_: object) -> None:
        pytest.fail("the server started instead of refusing")

    # A server that did start would serve until killed: fail instead of hanging.
    monkeypatch.setattr(gptunnel_mcp.server, "serve", serve_instead)
    with (
        environment({"GPTUNNEL_API_KEY": API_KEY, "GPTUNNEL_MCP_HOME": str(home)}),
        pytest.raises(SystemExit) as exited,
    ):
        main(["--transport", "http", "--host", "0.0.0.0", "--port", "8123"])
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "GPTUNNEL_MCP_AUTH_TOKEN" in lines[0] and "0.0.0.0" in lines[0]
    assert API_KEY not in err


async def test_public_bind_with_a_token_serves_behind_it(
    launcher: ServerLauncher, raw: httpx2.AsyncClient, server_log: pytest.LogCaptureFixture
) -> None:
    settings = launcher.settings(
        GPTUNNEL_MCP_TRANSPORT="http",
        GPTUNNEL_MCP_HOST="0.0.0.0",  # the app a public bind builds, served on loopback here
        GPTUNNEL_MCP_AUTH_TOKEN=AUTH_TOKEN,
    )
    async with serve_http(settings) as url:
        health = await raw.get(f"{base_of(url)}/healthz", headers={"Authorization": f"Bearer {AUTH_TOKEN}"})
        assert health.status_code == 200 and health.json()["auth"] is True
        assert_unauthorized(await post_initialize(raw, url), "invalid_request")
        assert_initialized(await post_initialize(raw, url, {"Authorization": f"Bearer {AUTH_TOKEN}"}))
    assert AUTH_TOKEN not in server_log.text


@pytest.mark.parametrize(
    ("flags", "env", "needles", "secret"),
    [
        (
            {},
            MULTI_USER | {"GPTUNNEL_MCP_TRANSPORT": None},
            ("GPTUNNEL_MCP_MULTI_USER", "GPTUNNEL_MCP_TRANSPORT=http"),
            None,
        ),
        (
            {"transport": "stdio"},
            MULTI_USER,
            ("GPTUNNEL_MCP_MULTI_USER", "GPTUNNEL_MCP_TRANSPORT=http"),
            None,
        ),
        (
            {"transport": "http"},
            {"GPTUNNEL_MCP_MULTI_USER": "1"},  # GPTUNNEL_API_KEY stays set
            ("GPTUNNEL_MCP_MULTI_USER", "GPTUNNEL_API_KEY"),
            API_KEY,
        ),
        (
            {"transport": "http"},
            {**MULTI_USER, "GPTUNNEL_MCP_AUTH_TOKEN": AUTH_TOKEN},
            ("GPTUNNEL_MCP_AUTH_TOKEN",),
            AUTH_TOKEN,
        ),
    ],
    ids=[
        "multi-user-stdio-default",
        "multi-user-stdio-flag",
        "multi-user-with-api-key",
        "multi-user-with-token",
    ],
)
def test_invalid_combinations_are_refused_with_one_line(
    home: Path,
    flags: dict[str, str],
    env: dict[str, str | None],
    needles: tuple[str, ...],
    secret: str | None,
) -> None:
    line = refusal(home, env, **flags)
    for needle in needles:
        assert needle in line, line
    if secret is not None:
        assert secret not in line


# --- 4. shared bearer token ---------------------------------------------------------------------------


async def test_auth_token_guards_mcp_and_never_reaches_the_log(
    launcher: ServerLauncher,
    keyed_standin: StandIn,
    raw: httpx2.AsyncClient,
    server_log: pytest.LogCaptureFixture,
) -> None:
    async with serve(launcher, GPTUNNEL_MCP_AUTH_TOKEN=AUTH_TOKEN) as url:
        assert_unauthorized(await post_initialize(raw, url), "invalid_request")
        for wrong in ("Bearer wrong-token", f"Bearer {AUTH_TOKEN}x", f"Bearer {AUTH_TOKEN[:-1]}"):
            assert_unauthorized(await post_initialize(raw, url, {"Authorization": wrong}), "invalid_token")
        # Not a bearer credential at all: as good as none.
        for not_bearer in (AUTH_TOKEN, f"Basic {AUTH_TOKEN}", "Bearer"):
            assert_unauthorized(
                await post_initialize(raw, url, {"Authorization": not_bearer}), "invalid_request"
            )
        for method in ("GET", "DELETE"):
            response = await raw.request(method, url, headers={"Accept": "text/event-stream"})
            assert response.status_code == 401, (method, response.status_code)
        # Authentication does not switch the rebinding guard off.
        authorized = {"Authorization": f"Bearer {AUTH_TOKEN}"}
        evil = await post_initialize(raw, url, {**authorized, "Origin": "http://evil.example"})
        assert evil.status_code == 403
        assert_initialized(
            await post_initialize(raw, url, {**authorized, "authorization": f"bearer {AUTH_TOKEN}"})
        )

        for mode in MODES:
            async with mcp_client(url, AUTH_TOKEN, mode) as client:
                tools = {t.name for t in (await client.list_tools()).tools}
                assert {"create_image", "get_result", "generate_and_wait"} <= tools
                result = await client.call_tool("generate_and_wait", {"prompt": f"behind a token ({mode})"})
                assert not result.is_error, text_of(result)
                data = structured(result)
                assert data["status"] == "done"
                assert Path(data["file_path"]).read_bytes() == keyed_standin.image_bytes(data["task_id"])
                assert AUTH_TOKEN not in dump(result)
    assert keyed_standin.stats.create_calls == 2
    # The upstream got the GPTunnel key, never the MCP token.
    assert set(keyed_standin.stats.auth_headers) == {API_KEY}
    assert "created task" in server_log.text, "the server's log was not captured"
    assert AUTH_TOKEN not in server_log.text


# --- 5. multi-user -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_users_see_only_their_own_tasks(
    multi_launcher: ServerLauncher, open_standin: StandIn, mode: str
) -> None:
    ref = ResourceTemplateReference(uri="gptunnel://images/{task_id}")
    async with (
        serve(multi_launcher, **MULTI_USER) as url,
        mcp_client(url, KEY_A, mode) as alice,
        mcp_client(url, KEY_B, mode) as bob,
    ):
        a = structured(await alice.call_tool("generate_and_wait", {"prompt": "alice's secret garden"}))
        assert a["status"] == "done"
        a_id = a["task_id"]
        assert a_id != NEVER

        # get_result: A's task is as unknown to B as a task that never existed, and B's question
        # does not go upstream (where it would be found, and adopted into B's history).
        polls = open_standin.stats.result_calls
        theirs = await bob.call_tool("get_result", {"task_id": a_id})
        shouted = await bob.call_tool("get_result", {"task_id": a_id.upper()})
        never = await bob.call_tool("get_result", {"task_id": NEVER})
        assert theirs.is_error and shouted.is_error and never.is_error
        assert theirs.structured_content is None
        assert "no task" in text_of(theirs).lower() and a_id in text_of(theirs)
        assert anonymised(text_of(theirs), a_id) == anonymised(text_of(never), NEVER)
        assert anonymised(text_of(shouted), a_id) == anonymised(text_of(never), NEVER)
        assert open_standin.stats.result_calls == polls

        # resources/list, the history, and completion show B nothing of A's.
        listed = [r.uri for r in (await bob.list_resources()).resources]
        assert "gptunnel://images" in listed
        assert not [uri for uri in listed if a_id in uri], listed
        assert await history_ids(bob) == []
        for typed in ("", a_id[:6]):
            offered = (await bob.complete(ref, {"name": "task_id", "value": typed})).completion
            assert a_id not in offered.values and offered.values == [], offered

        # Reading A's record or file: the same "not found" as for an id that never existed.
        for suffix in ("", "/file"):
            messages = []
            for task_id in (a_id, NEVER):
                with pytest.raises(Exception, match="not found") as info:
                    await bob.read_resource(f"gptunnel://images/{task_id}{suffix}")
                assert getattr(info.value, "code", None) == -32602
                assert "alice" not in str(info.value)
                messages.append(anonymised(str(info.value), task_id))
            assert messages[0] == messages[1]

        # B asking for the very same image gets a new one of B's own, never A's task reused; B's
        # image is B's alone, and A still has everything of A's.
        b = structured(await bob.call_tool("generate_and_wait", {"prompt": "alice's secret garden"}))
        assert b["status"] == "done"
        b_id = b["task_id"]
        assert b_id != a_id and not b.get("reused")
        assert Path(b["file_path"]).read_bytes() == open_standin.image_bytes(b_id)
        assert await history_ids(bob) == [b_id]
        assert await history_ids(alice) == [a_id]
        assert (await alice.call_tool("get_result", {"task_id": b_id})).is_error

        mine = await alice.call_tool("get_result", {"task_id": a_id})
        assert not mine.is_error and structured(mine)["sha256"] == a["sha256"]
        alice_listed = [r.uri for r in (await alice.list_resources()).resources]
        assert a["resource_uri"] in alice_listed and b["resource_uri"] not in alice_listed
        record = await read_json(alice, f"gptunnel://images/{a_id}")
        assert record["sha256"] == a["sha256"]
        assert await read_blob(alice, a["resource_uri"]) == open_standin.image_bytes(a_id)
        offered = (await alice.complete(ref, {"name": "task_id", "value": ""})).completion
        assert offered.values == [a_id]
    assert open_standin.stats.create_calls == 2


async def test_upstream_gets_each_users_own_key_and_storage_gets_none(
    multi_launcher: ServerLauncher, open_standin: StandIn
) -> None:
    async with (
        serve(multi_launcher, **MULTI_USER) as url,
        mcp_client(url, KEY_A) as alice,
        mcp_client(url, KEY_B, "legacy") as bob,
    ):
        for client, key in ((alice, KEY_A), (bob, KEY_B)):
            open_standin.stats = Stats()
            created = structured(await client.call_tool("create_image", {"prompt": f"paid by {key[:9]}"}))
            assert open_standin.stats.create_calls == 1
            assert open_standin.stats.auth_headers == [key], "the create was not sent with the caller's key"
            await poll_until_finished(client, created["task_id"])
            assert open_standin.stats.download_calls == 1
            # Every request upstream for this user carried this user's key, bare.
            assert set(open_standin.stats.auth_headers) == {key}
            assert open_standin.stats.file_auth_headers == []


async def test_keys_are_checked_once_with_gptunnel_and_refused_when_it_says_no(
    home: Path, raw: httpx2.AsyncClient
) -> None:
    with StandIn(api_key="only-this", behaviour=_fast()) as standin:
        launcher = ServerLauncher(standin, home, transport="http")
        async with serve(launcher, **MULTI_USER) as url:
            # No key: refused without asking GPTunnel.
            assert_unauthorized(await post_initialize(raw, url), "invalid_request")
            assert_unauthorized(
                await post_initialize(raw, url, {"Authorization": "only-this"}), "invalid_request"
            )
            assert standin.stats.balance_calls == 0
            # A key GPTunnel refuses: refused, after asking GPTunnel.
            assert_unauthorized(
                await post_initialize(raw, url, {"Authorization": "Bearer not-this"}), "invalid_token"
            )
            assert standin.stats.balance_calls == 1
            assert standin.stats.auth_headers == ["not-this"]
            # GPTunnel unreachable: no key gets in unchecked (503, try again), and none is remembered.
            standin.behaviour.transient_failures = 3
            down = await post_initialize(raw, url, {"Authorization": "Bearer only-this"})
            assert down.status_code == 503 and down.headers.get("retry-after"), (down.status_code, down.text)
            assert standin.behaviour.transient_failures == 0

            # The right key: checked once, then remembered across requests, sessions and eras.
            standin.stats = Stats()
            made: list[str] = []
            for mode in MODES:
                async with mcp_client(url, "only-this", mode) as client:
                    await client.list_tools()
                    await client.list_resources()
                    assert await history_ids(client) == made[::-1]
                    created = structured(
                        await client.call_tool("create_image", {"prompt": f"checked once {mode}"})
                    )
                    made.append(created["task_id"])
                    await client.call_tool("get_result", {"task_id": created["task_id"]})
            assert standin.stats.balance_calls == 1
            assert standin.stats.create_calls == 2
            # A refused key stays refused, without asking GPTunnel again so soon.
            assert_unauthorized(
                await post_initialize(raw, url, {"Authorization": "Bearer not-this"}), "invalid_token"
            )
            assert standin.stats.balance_calls == 1


async def test_users_keys_are_never_stored_logged_or_returned(
    multi_launcher: ServerLauncher, open_standin: StandIn, home: Path, server_log: pytest.LogCaptureFixture
) -> None:
    received: list[str] = []
    ref = ResourceTemplateReference(uri="gptunnel://images/{task_id}/file")
    async with serve(multi_launcher, **MULTI_USER) as url:
        for mode in MODES:
            async with mcp_client(url, KEY_A, mode) as alice, mcp_client(url, KEY_B, mode) as bob:
                for client in (alice, bob):
                    prompt = f"keys stay secret {mode} {len(received)}"
                    done = await client.call_tool("generate_and_wait", {"prompt": prompt})
                    task_id = structured(done)["task_id"]
                    received += [
                        dump(done),
                        dump(await client.call_tool("get_result", {"task_id": task_id})),
                        dump(await client.call_tool("get_result", {"task_id": NEVER})),
                        dump(await client.call_tool("get_balance", {})),
                        dump(await client.list_resources()),
                        dump(await client.read_resource("gptunnel://images")),
                        dump(await client.read_resource(f"gptunnel://images/{task_id}")),
                        dump(await client.complete(ref, {"name": "task_id", "value": ""})),
                    ]
        # While the server runs (the WAL holds the newest rows) ...
        running = home_bytes(home)
    # ... and after it stopped.
    stopped = home_bytes(home)
    log = server_log.text
    assert "created task" in log, "the server's log was not captured"
    assert open_standin.stats.create_calls == 4

    with contextlib.closing(sqlite3.connect(home / "history.sqlite3")) as db:
        owners = {row[0] for row in db.execute("SELECT owner FROM tasks")}
    assert len(owners) == 2 and "" not in owners
    for key in (KEY_A, KEY_B):
        plain_hash = hashlib.sha256(key.encode()).hexdigest()
        assert key not in owners and plain_hash not in owners and plain_hash[:32] not in owners
        for files in (running, stopped):
            for name, data in files.items():
                assert key.encode() not in data, f"{key} stored in {name}"
                assert plain_hash.encode() not in data and plain_hash[:32].encode() not in data, name
        assert key not in log
        for text in received:
            assert key not in text


async def test_list_changed_notices_reach_only_the_user_whose_list_changed(
    multi_launcher: ServerLauncher,
) -> None:
    async with (
        serve(multi_launcher, **MULTI_USER) as url,
        mcp_client(url, KEY_A) as alice,
        mcp_client(url, KEY_B) as bob,
    ):
        assert alice.protocol_version == bob.protocol_version == "2026-07-28"
        async with (
            alice.listen(resources_list_changed=True) as alice_events,
            bob.listen(resources_list_changed=True) as bob_events,
        ):
            await alice.call_tool("generate_and_wait", {"prompt": "only alice hears of this"})
            with anyio.fail_after(5):
                event = await alice_events.__anext__()
            assert "resources" in type(event).__name__.lower() or "list_changed" in str(event)

            # B's stream is alive: B's own image reaches B.
            await bob.call_tool("generate_and_wait", {"prompt": "only bob hears of this"})
            with anyio.fail_after(5):
                await bob_events.__anext__()

            # A notice meant for the other user was sent long before the one just received (and
            # on loopback): a short quiet window on both streams at once is enough to catch it.
            async def quiet(events: AsyncIterator[Any], who: str) -> None:
                with anyio.move_on_after(0.5) as window:
                    leaked = await events.__anext__()
                    pytest.fail(f"{who} heard of the other user's image: {leaked!r}")
                assert window.cancelled_caught

            async with anyio.create_task_group() as group:
                group.start_soon(quiet, alice_events, "A")
                group.start_soon(quiet, bob_events, "B")


# --- 6. several servers on one home ------------------------------------------------------------------


async def test_servers_sharing_a_home_share_the_history(
    launcher: ServerLauncher, keyed_standin: StandIn
) -> None:
    # Two apps, each with its own engine and SQLite connection, on one folder: what separate
    # processes share is the folder and the database, and that is what this exercises.
    results: dict[str, list[dict[str, Any]]] = {"one": [], "two": []}
    async with serve(launcher) as url_one, serve(launcher) as url_two:
        async with mcp_client(url_one, mode="auto") as one, mcp_client(url_two, mode="legacy") as two:

            async def generate(client: Client, name: str, i: int) -> None:
                result = await client.call_tool("generate_and_wait", {"prompt": f"{name} #{i}"})
                assert not result.is_error, text_of(result)
                results[name].append(structured(result))

            with anyio.fail_after(40):
                async with anyio.create_task_group() as group:
                    for i in range(4):
                        group.start_soon(generate, one, "one", i)
                        group.start_soon(generate, two, "two", i)

            everything = [r for batch in results.values() for r in batch]
            ids = {r["task_id"] for r in everything}
            assert len(ids) == 8 and ids == set(keyed_standin.task_ids())
            assert keyed_standin.stats.create_calls == 8
            assert keyed_standin.stats.download_calls == 8
            for r in everything:
                assert r["status"] == "done"
                assert Path(r["file_path"]).read_bytes() == keyed_standin.image_bytes(r["task_id"])
            for client in (one, two):
                history = await read_json(client, "gptunnel://images")
                assert history["total"] == 8
                assert {t["task_id"] for t in history["tasks"]} == ids
                assert {t["status"] for t in history["tasks"]} == {"done"}

        # A task started through server one is finished and served through server two, by a
        # 2026-07-28 client: no session ties it to the server that created it.
        async with mcp_client(url_one, mode="auto") as one, mcp_client(url_two, mode="auto") as two:
            assert two.protocol_version == "2026-07-28"
            made_in_one = results["one"][0]
            again = await two.call_tool("get_result", {"task_id": made_in_one["task_id"]})
            assert not again.is_error and structured(again)["sha256"] == made_in_one["sha256"]
            served = keyed_standin.image_bytes(made_in_one["task_id"])
            assert await read_blob(two, made_in_one["resource_uri"]) == served

            pending = structured(await one.call_tool("create_image", {"prompt": "started in one"}))
            assert pending["status"] == "pending"
            finished = await poll_until_finished(two, pending["task_id"])
            assert finished["status"] == "done"
            assert Path(finished["file_path"]).read_bytes() == keyed_standin.image_bytes(pending["task_id"])
            assert pending["task_id"] in await history_ids(one)
    assert keyed_standin.stats.create_calls == 9
    assert keyed_standin.stats.download_calls == 9


async def test_a_2025_session_belongs_to_the_user_who_opened_it(
    multi_launcher: ServerLauncher, raw: httpx2.AsyncClient
) -> None:
    async with serve(multi_launcher, **MULTI_USER) as url:
        opened = await post_initialize(raw, url, {"Authorization": "Bearer key-of-user-a"})
        assert_initialized(opened)
        session = opened.headers["mcp-session-id"]
        ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
        intruder = await raw.post(
            url,
            json=ping,
            headers={**MCP_HEADERS, "Authorization": "Bearer key-of-user-b", "mcp-session-id": session},
        )
        owner = await raw.post(
            url,
            json=ping,
            headers={**MCP_HEADERS, "Authorization": "Bearer key-of-user-a", "mcp-session-id": session},
        )
    assert intruder.status_code == 404
    assert owner.status_code == 200, owner.text
