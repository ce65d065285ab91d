"""The server secret lives in the history, so every replica on one database tells users apart
alike and accepts the task handles of the others; the secret file an earlier build kept in the
home folder is adopted, so the users' tasks and handles made under it stay theirs."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import anyio
import psycopg
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError

from gptunnel_mcp._accounts import account_for_key
from gptunnel_mcp._exceptions import ConfigError
from gptunnel_mcp._postgres import PostgresStore
from gptunnel_mcp._records import TaskRecord
from gptunnel_mcp._sqlite import SQLiteStore
from gptunnel_mcp._store import TaskStore
from gptunnel_mcp._wiring import check_store, open_engine
from gptunnel_mcp.server._task_extension import task_handle

from .conftest import MULTI_USER, ServerLauncher, mcp_client, serve_http, structured, text_of
from .standin import Behaviour, StandIn
from .test_task_extension import ClientTasks, CreateTaskResult, call_claimed, follow, get_task

pytestmark = pytest.mark.anyio

KEY_A = "sk-user-A-3c81f0e92d47"
KEY_B = "sk-user-B-71d5a2c06e98"
#: A secret an earlier build wrote to `server.secret`.
EARLIER = bytes.fromhex("5e" * 16 + "c7" * 16)
TASK_ID = "6a1b2c3d4e5f60718293a4b5"


@pytest.fixture
def open_standin() -> Iterator[StandIn]:
    """Accepts any key: the users of a multi-user server."""
    with StandIn(api_key=None, behaviour=Behaviour(generation_seconds=0.2, image_size=(320, 240))) as s:
        yield s


def replica(standin: StandIn, home: Path, **env: str | None) -> contextlib.AbstractAsyncContextManager[str]:
    """A multi-user server on `home` over in-process HTTP; yields its MCP URL."""
    return serve_http(ServerLauncher(standin, home).settings(**MULTI_USER, **env))


def earlier_home(home: Path) -> Path:
    """A home as an earlier build left it: its secret in a private file."""
    home.mkdir(mode=0o700, parents=True)
    secret_file = home / "server.secret"
    with os.fdopen(os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
        file.write(EARLIER.hex())
    return secret_file


async def record_of(client: Client, task_id: str) -> dict[str, object]:
    content = (await client.read_resource(f"gptunnel://images/{task_id}")).contents[0]
    return dict(json.loads(content.text))  # type: ignore[union-attr]


async def test_replicas_with_homes_of_their_own_share_users_and_task_handles(
    open_standin: StandIn, postgres_url: str, tmp_path: Path
) -> None:
    db = {"GPTUNNEL_MCP_DATABASE_URL": postgres_url}
    async with (
        replica(open_standin, tmp_path / "a", **db) as a,
        replica(open_standin, tmp_path / "b", **db) as b,
        mcp_client(a, KEY_A) as alice_on_a,
        mcp_client(b, KEY_A) as alice_on_b,
        mcp_client(b, KEY_B) as bob_on_b,
    ):
        made = structured(
            await alice_on_a.call_tool("create_image", {"prompt": "a fox seen by two replicas"})
        )
        task_id = made["task_id"]
        # The same user through the other replica: her task, followed there until it is done.
        with anyio.fail_after(10):
            while True:
                seen = await alice_on_b.call_tool("get_result", {"task_id": task_id})
                assert not seen.is_error, text_of(seen)
                if structured(seen)["status"] == "done":
                    break
                await anyio.sleep(0.05)
        assert (await record_of(alice_on_b, task_id))["prompt"] == "a fox seen by two replicas"
        # Another user: as unknown as a task that never existed.
        theirs = await bob_on_b.call_tool("get_result", {"task_id": task_id})
        assert theirs.is_error and "no task" in text_of(theirs).lower()
        with pytest.raises(MCPError, match="not found"):
            await record_of(bob_on_b, task_id)

        # An MCP task handle issued by one replica is followed through the other.
        async with (
            mcp_client(a, KEY_A, extensions=[ClientTasks()]) as tasks_on_a,
            mcp_client(b, KEY_A) as tasks_on_b,
        ):
            created = await call_claimed(tasks_on_a, {"prompt": "a handle for any replica"})
            assert isinstance(created, CreateTaskResult), created
            final = await follow(tasks_on_b, created, [])
            assert final.status == "completed", final
            with pytest.raises(MCPError, match="not found"):
                await get_task(bob_on_b, created.task_id)
    assert open_standin.stats.create_calls == 2


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_the_secret_file_of_an_earlier_build_is_adopted(
    open_standin: StandIn, tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    home = tmp_path / "home"
    secret_file = earlier_home(home)
    # What that build made: alice's task, filed under her fingerprint by the file's secret, and
    # the handle it gave her for it.
    owner = account_for_key(EARLIER, KEY_A).owner
    handle = task_handle(EARLIER, TASK_ID)
    env: dict[str, str | None] = {}
    store: TaskStore
    if backend == "postgres":
        database: str = request.getfixturevalue("postgres_url")
        env["GPTUNNEL_MCP_DATABASE_URL"] = database
        store = await PostgresStore.open(database)
    else:
        store = SQLiteStore(home / "history.sqlite3")
    moment = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
    await store.put(
        TaskRecord(
            task_id=TASK_ID,
            owner=owner,
            status="failed",
            error="content policy",
            model="gpt-image-1-low",
            prompt="made before the upgrade",
            created_at=moment,
            updated_at=moment,
        )
    )
    await store.close()

    async def sees_it(url: str) -> None:
        async with mcp_client(url, KEY_A, extensions=[ClientTasks()]) as alice, mcp_client(url, KEY_B) as bob:
            assert (await record_of(alice, TASK_ID))["prompt"] == "made before the upgrade"
            assert (await get_task(alice, handle)).status == "completed"
            with pytest.raises(MCPError, match="not found"):
                await record_of(bob, TASK_ID)

    async with replica(open_standin, home, **env) as url:
        await sees_it(url)
    if backend == "postgres":
        # Now in the database: a replica whose home never had the file knows it too.
        async with replica(open_standin, tmp_path / "fresh", **env) as url:
            await sees_it(url)
        async with await psycopg.AsyncConnection.connect(database) as conn:
            rows = await (await conn.execute("SELECT key, value FROM server_state")).fetchall()
        assert rows == [("secret", EARLIER.hex())]
    # The file stays as it was: private, and the same secret.
    assert secret_file.read_text() == EARLIER.hex()
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600


async def test_a_secret_file_that_differs_from_the_historys_is_ignored_with_a_warning(
    open_standin: StandIn, postgres_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    launcher = ServerLauncher(open_standin, tmp_path / "first")
    db = {"GPTUNNEL_MCP_DATABASE_URL": postgres_url}
    async with open_engine(launcher.settings(**MULTI_USER, **db)) as first:
        made_first = first.accounts.for_key(KEY_A).owner
    secret_file = earlier_home(tmp_path / "late")
    launcher.home = tmp_path / "late"
    with caplog.at_level(logging.WARNING, logger="gptunnel_mcp"):
        async with open_engine(launcher.settings(**MULTI_USER, **db)) as late:
            assert late.accounts.for_key(KEY_A).owner == made_first
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and f"ignoring {secret_file}" in warned[0], warned
    assert EARLIER.hex() not in caplog.text


async def test_a_damaged_secret_file_stops_the_server_before_it_serves(
    open_standin: StandIn, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    earlier_home(home)
    (home / "server.secret").write_text("not hex at all")
    settings = ServerLauncher(open_standin, home).settings()
    with pytest.raises(ConfigError, match=r"server\.secret is damaged.*delete it"):
        await anyio.to_thread.run_sync(check_store, settings)
