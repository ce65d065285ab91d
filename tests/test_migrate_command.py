"""`gptunnel-mcp migrate`: an embedded history (SQLite in the home) copied into PostgreSQL, run in
this process as the command runs, against a real PostgreSQL (a fresh database per test). A server
on the database then serves what a server on the file made; caps count what was made before."""

from __future__ import annotations

import base64
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import anyio
import psycopg
import pytest
from mcp_types import BlobResourceContents

from gptunnel_mcp._main import main
from gptunnel_mcp._postgres import PostgresStore
from gptunnel_mcp._records import TaskRecord
from gptunnel_mcp._sqlite import SQLiteStore

from .conftest import ServerLauncher, structured, text_of
from .postgres import Cluster
from .processes import free_port
from .standin import StandIn

pytestmark = pytest.mark.anyio

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


@dataclass
class Ran:
    code: int | str | None
    out: str
    err: str


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """`main` points the root logger at the stderr of the moment (a capture that ends with the
    test): later tests must not log into it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


Migrate = Callable[..., Awaitable[Ran]]


@pytest.fixture
def migrate(home: Path, capsys: pytest.CaptureFixture[str]) -> Migrate:
    """`gptunnel-mcp --home HOME migrate ARGS`, in a thread: the command runs its own event loop."""

    def command(args: tuple[str, ...]) -> int | str | None:
        with pytest.raises(SystemExit) as ended:
            main(["--home", str(home), "migrate", *args])
        return ended.value.code

    async def run(*args: str) -> Ran:
        code = await anyio.to_thread.run_sync(command, args)
        captured = capsys.readouterr()
        return Ran(code, captured.out, captured.err)

    return run


def task(n: int, **fields: object) -> TaskRecord:
    values: dict[str, object] = {
        "task_id": f"{n:024x}",
        "model": "gpt-image-1-low",
        "prompt": f"prompt {n}",
        "request_key": f"key {n}",
        "created_at": T0,
        "updated_at": T0,
        **fields,
    }
    return TaskRecord.model_validate(values)


async def made(store: SQLiteStore | PostgresStore, record: TaskRecord, *, now: datetime = T0) -> str:
    """`record` entered as the engine enters a task: a ticket in the ledger, settled with it."""
    (admission,) = await store.admit(
        record.owner,
        [record.request_key],
        now=now,
        reuse_since=None,
        in_flight_since=now,
        caps=(),
        model=record.model,
    )
    assert admission.ticket is not None
    await store.settle(admission.ticket, "created", record)
    return admission.ticket


async def rows(url: str, query: str) -> list[tuple[object, ...]]:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        return await (await conn.execute(query)).fetchall()


async def test_a_history_made_on_sqlite_is_served_from_postgresql_with_its_caps(
    memory_server: ServerLauncher, standin: StandIn, home: Path, postgres_url: str, migrate: Migrate
) -> None:
    standin.behaviour.generation_seconds = 0.1
    async with memory_server.connect() as client:
        done = structured(await client.call_tool("generate_and_wait", {"prompt": "a fox before the move"}))
    assert done["status"] == "done"
    # Another user's task on the same file, made as the engine makes one, its image file since lost.
    store = SQLiteStore(home / "history.sqlite3")
    lost = {"file_name": f"alice/{1:024x}.png", "mime_type": "image/png", "size_bytes": 3}
    alices = task(1, owner="alice", status="done", file={**lost, "sha256": "0" * 64, "width": 1, "height": 1})
    await made(store, alices, now=datetime.now(timezone.utc))
    await store.close()

    ran = await migrate("--to", postgres_url)
    assert ran.code == 0, ran.err
    assert ran.out.splitlines()[0] == (
        f"copied 2 tasks and 2 ledger entries from {home / 'history.sqlite3'} to {postgres_url}"
    )
    # Alice's task is done, but its image is not in the home: counted, and the copy goes on.
    assert ran.out.splitlines()[1:] == [
        "1 images are in the database, for every replica to serve",
        f"1 done tasks have no image in {home / 'images'} as recorded (deleted or damaged): the "
        "replicas download those again while GPTunnel's link lasts",
    ]
    assert ran.err == ""

    # A server on the database, on the same home: it knows the task, serves the same bytes without
    # asking GPTunnel, and counts the create made before the move against the cap.
    async with memory_server.connect(
        GPTUNNEL_MCP_DATABASE_URL=postgres_url, GPTUNNEL_MAX_IMAGES_PER_HOUR="1"
    ) as client:
        again = structured(await client.call_tool("get_result", {"task_id": done["task_id"]}))
        listed = await client.read_resource("gptunnel://images")
        image = await client.read_resource(f"gptunnel://images/{done['task_id']}/file")
        refused = await client.call_tool("create_image", {"prompt": "a fox after the move"})
    assert again["status"] == "done" and again["sha256"] == done["sha256"]
    assert done["task_id"] in listed.contents[0].text  # type: ignore[union-attr]
    blob = image.contents[0]
    assert isinstance(blob, BlobResourceContents)
    assert base64.b64decode(blob.blob) == standin.image_bytes(done["task_id"])
    assert refused.is_error and "GPTUNNEL_MAX_IMAGES_PER_HOUR" in text_of(refused)
    assert standin.stats.create_calls == 1
    shared = await PostgresStore.open(postgres_url)
    try:
        assert await shared.get(alices.task_id, "alice") == alices
    finally:
        await shared.close()


async def test_the_images_go_along_so_a_replica_with_a_fresh_home_serves_them(
    memory_server: ServerLauncher,
    standin: StandIn,
    home: Path,
    tmp_path: Path,
    postgres_url: str,
    migrate: Migrate,
) -> None:
    standin.behaviour.generation_seconds = 0.1
    async with memory_server.connect() as client:
        done = structured(await client.call_tool("generate_and_wait", {"prompt": "a fox before the move"}))
    # Again, as a copy that stopped half-way is finished: the image is there once.
    for _ in range(2):
        ran = await migrate("--to", postgres_url)
        assert (
            ran.code == 0
            and ran.out.splitlines()[-1] == "1 images are in the database, for every replica to serve"
        )
    assert await rows(postgres_url, "SELECT sha256 FROM images") == [(done["sha256"],)]

    fresh = ServerLauncher(standin, tmp_path / "fresh")
    async with fresh.connect(GPTUNNEL_MCP_DATABASE_URL=postgres_url) as client:
        image = await client.read_resource(f"gptunnel://images/{done['task_id']}/file")
    blob = image.contents[0]
    assert isinstance(blob, BlobResourceContents)
    assert base64.b64decode(blob.blob) == standin.image_bytes(done["task_id"])
    assert standin.stats.download_calls == 1


async def test_migrating_again_copies_only_what_changed_and_never_undoes_newer_work(
    home: Path, postgres_url: str, migrate: Migrate
) -> None:
    home.mkdir(parents=True)
    source = SQLiteStore(home / "history.sqlite3")
    await made(source, task(1))  # pending when first copied, then finished by a replica
    await made(source, task(2, status="done", cost=7.5))
    (on_its_way,) = await source.admit(
        "", ["key 3"], now=T0, reuse_since=None, in_flight_since=T0, caps=(), model="flux-dev"
    )
    assert on_its_way.ticket is not None

    first = await migrate("--to", postgres_url)
    assert first.code == 0, first.err
    assert first.out.startswith("copied 2 tasks and 3 ledger entries")

    # Meanwhile a replica on the database finishes task 1, and the embedded server, still in use,
    # settles the create that was on its way and records a task the replica knows nothing of.
    target = await PostgresStore.open(postgres_url)
    finished = task(1, status="done", updated_at=T0 + timedelta(minutes=1))
    await target.put(finished)
    await target.close()
    await source.settle(on_its_way.ticket, "created", task(3, model="flux-dev"))
    await source.put(task(1, upstream_status="processing", updated_at=T0 + timedelta(minutes=2)))
    await source.close()

    second = await migrate("--to", postgres_url)
    assert second.code == 0, second.err
    lines = second.out.splitlines()
    assert lines[0].startswith("copied 1 tasks and 1 ledger entries")
    assert lines[1] == "(2 tasks and 2 ledger entries were there already, as new or newer)"
    third = await migrate("--to", postgres_url)
    assert third.out.startswith("copied 0 tasks and 0 ledger entries")

    assert await rows(postgres_url, "SELECT task_id, status, cost FROM tasks ORDER BY task_id") == [
        (f"{1:024x}", "done", None),
        (f"{2:024x}", "done", 7.5),
        (f"{3:024x}", "pending", None),
    ]
    # Each create with its model, which the budget estimates an unsettled one by.
    ledger = await rows(postgres_url, "SELECT state, task_id, model FROM creates ORDER BY task_id")
    assert ledger == [
        ("created", f"{1:024x}", "gpt-image-1-low"),
        ("created", f"{2:024x}", "gpt-image-1-low"),
        ("created", f"{3:024x}", "flux-dev"),
    ]


async def test_the_server_secret_goes_along_unless_the_database_has_its_own(
    home: Path, postgres_url: str, migrate: Migrate, postgres_cluster: Cluster
) -> None:
    # A history an earlier build left: its secret in the file beside it, a user's task filed under it.
    home.mkdir(parents=True)
    legacy = bytes(range(32))
    (home / "server.secret").write_text(legacy.hex())
    source = SQLiteStore(home / "history.sqlite3")
    await made(source, task(1, owner="0123abcd" * 4))
    await source.close()
    assert (await migrate("--to", postgres_url)).code == 0
    target = await PostgresStore.open(postgres_url)
    try:
        assert await target.server_secret() == legacy
    finally:
        await target.close()

    # A database where a server made a secret of its own: the users' tasks would be lost there.
    with postgres_cluster.database() as used:
        replica = await PostgresStore.open(used)
        await replica.server_secret()
        await replica.close()
        refused = await migrate("--to", used)
        assert refused.code == 2 and refused.out == "" and len(refused.err.splitlines()) == 1
        assert "server secret of its own" in refused.err and "Nothing was copied" in refused.err
        assert await rows(used, "SELECT count(*) FROM tasks") == [(0,)]


async def test_the_database_can_come_from_the_environment(
    home: Path, postgres_url: str, migrate: Migrate, monkeypatch: pytest.MonkeyPatch
) -> None:
    home.mkdir(parents=True)
    await SQLiteStore(home / "history.sqlite3").close()
    monkeypatch.setenv("GPTUNNEL_MCP_DATABASE_URL", postgres_url)
    ran = await migrate()
    assert ran.code == 0 and ran.out.startswith(f"copied 0 tasks and 0 ledger entries from {home}")


async def test_an_unreachable_database_is_one_line_without_the_password(home: Path, migrate: Migrate) -> None:
    home.mkdir(parents=True)
    await SQLiteStore(home / "history.sqlite3").close()
    port = free_port()
    ran = await migrate("--to", f"postgresql://app:hunter2secret@127.0.0.1:{port}/shared")
    assert ran.code == 2 and ran.out == ""
    lines = ran.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gptunnel-mcp: cannot use the PostgreSQL database"), lines
    assert f"'shared' at 127.0.0.1:{port}" in lines[0] and "check --to" in lines[0]
    assert "hunter2secret" not in ran.err


async def test_a_database_of_a_newer_version_is_refused_before_anything_is_copied(
    home: Path, postgres_url: str, migrate: Migrate
) -> None:
    home.mkdir(parents=True)
    source = SQLiteStore(home / "history.sqlite3")
    await made(source, task(1))
    await source.close()
    await (await PostgresStore.open(postgres_url)).close()
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as conn:
        await conn.execute("INSERT INTO schema_version (version) VALUES (99)")
    ran = await migrate("--to", postgres_url)
    assert ran.code == 2 and len(ran.err.splitlines()) == 1
    assert "newer gptunnel-mcp" in ran.err and "upgrade gptunnel-mcp" in ran.err
    assert await rows(postgres_url, "SELECT count(*) FROM tasks") == [(0,)]


@pytest.mark.parametrize(
    ("args", "history", "says"),
    [
        pytest.param((), True, ["name the database with --to postgresql://"], id="no database"),
        pytest.param(
            ("--to", "postgresql://db/h"),
            False,
            ["there is no history to copy at", "--home"],
            id="no history",
        ),
        pytest.param(
            ("--to", "mysql://app:hunter2secret@db/h"),
            True,
            ["invalid --to:", "PostgreSQL URL", "(got 'mysql://app:***@db/h')"],
            id="not postgresql",
        ),
    ],
)
async def test_usage_errors_are_one_line(
    home: Path, migrate: Migrate, args: tuple[str, ...], history: bool, says: list[str]
) -> None:
    if history:
        home.mkdir(parents=True)
        await SQLiteStore(home / "history.sqlite3").close()
    ran = await migrate(*args)
    assert ran.code == 2 and ran.out == ""
    assert len(ran.err.splitlines()) == 1 and "hunter2secret" not in ran.err
    assert all(words in ran.err for words in says), ran.err
    assert not (home / "history.sqlite3").exists() or history
