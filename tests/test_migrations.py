"""The history's schema versions: every file an earlier build left opens, and ends at today's schema."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from gptunnel_mcp import _migrations
from gptunnel_mcp._exceptions import StorageError
from gptunnel_mcp._migrations import LATEST, SQLITE_MIGRATIONS, UNVERSIONED_SHAPES, migrate
from gptunnel_mcp._records import TaskRecord
from gptunnel_mcp._sqlite import SQLiteStore
from gptunnel_mcp._store import Cap, Search

pytestmark = pytest.mark.anyio

# The schemas as each build before versioning wrote them, copied from its _sqlite.py.
EARLY_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id    TEXT NOT NULL,
    owner      TEXT NOT NULL DEFAULT '',
    status     TEXT NOT NULL,
    created_at TEXT NOT NULL,
    record     TEXT NOT NULL,
    PRIMARY KEY (owner, task_id)
);
CREATE INDEX IF NOT EXISTS tasks_by_time ON tasks (owner, created_at DESC);
"""  # dabe035

REUSE_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id     TEXT NOT NULL,
    owner       TEXT NOT NULL DEFAULT '',
    status      TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    request_key TEXT NOT NULL DEFAULT '',
    record      TEXT NOT NULL,
    PRIMARY KEY (owner, task_id)
);
CREATE INDEX IF NOT EXISTS tasks_by_time ON tasks (owner, created_at DESC);
CREATE INDEX IF NOT EXISTS tasks_by_request ON tasks (owner, request_key, created_at DESC);
"""  # d9ca34e

DURATION_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id     TEXT NOT NULL,
    owner       TEXT NOT NULL DEFAULT '',
    status      TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    request_key TEXT NOT NULL DEFAULT '',
    model       TEXT NOT NULL DEFAULT '',
    duration    REAL,
    record      TEXT NOT NULL,
    PRIMARY KEY (owner, task_id)
);
CREATE INDEX IF NOT EXISTS tasks_by_time ON tasks (owner, created_at DESC);
CREATE INDEX IF NOT EXISTS tasks_by_request ON tasks (owner, request_key, created_at DESC);
CREATE INDEX IF NOT EXISTS tasks_by_model ON tasks (model, created_at DESC) WHERE duration IS NOT NULL;
"""  # 67d1792

TODAY_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id     TEXT NOT NULL,
    owner       TEXT NOT NULL DEFAULT '',
    status      TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    request_key TEXT NOT NULL DEFAULT '',
    model       TEXT NOT NULL DEFAULT '',
    finished_after REAL,
    finished_by    REAL,
    record      TEXT NOT NULL,
    PRIMARY KEY (owner, task_id)
);
CREATE INDEX IF NOT EXISTS tasks_by_time ON tasks (owner, created_at DESC);
CREATE INDEX IF NOT EXISTS tasks_by_request ON tasks (owner, request_key, created_at DESC);
CREATE INDEX IF NOT EXISTS tasks_by_model ON tasks (model, created_at DESC) WHERE finished_by IS NOT NULL;
"""  # 473c78f to 83b02cb
#: The tasks table now: leases came with migration 7, tasks by their id alone with 8.
LEASED_SCHEMA = (
    TODAY_SCHEMA
    + """
ALTER TABLE tasks ADD COLUMN lease_holder TEXT;
ALTER TABLE tasks ADD COLUMN lease_until TEXT;
CREATE INDEX tasks_pending ON tasks (created_at) WHERE status = 'pending';
"""
)
#: Each prompt in the form it is searched in came with migration 8.
SEARCH_SCHEMA = LEASED_SCHEMA + "ALTER TABLE tasks ADD COLUMN search_text TEXT NOT NULL DEFAULT '';\n"
#: Tasks found by id alone came with migration 9.
CURRENT_SCHEMA = SEARCH_SCHEMA + "CREATE INDEX tasks_by_id ON tasks (task_id);\n"

#: The tasks table now: each task's cost came with migration 10.
COSTED_SCHEMA = (
    CURRENT_SCHEMA
    + """
ALTER TABLE tasks ADD COLUMN cost REAL;
CREATE INDEX tasks_cost_by_model ON tasks (model, created_at DESC) WHERE cost IS NOT NULL;
"""
)

FOX_ID = "65a1b2c3d4e5f60718293a4b"
# What dabe035 wrote for a finished task: `created_at.isoformat()` in the column, its TaskRecord as JSON.
FOX_CREATED_AT = "2026-11-24T10:31:07+00:00"
FOX_RECORD = (
    '{"task_id":"65a1b2c3d4e5f60718293a4b","owner":"","status":"done","upstream_status":"done",'
    '"model":"flux-pro","prompt":"a red fox in snow","aspect_ratio":"16:9","images":[],'
    '"created_at":"2026-11-24T10:31:07Z","updated_at":"2026-11-24T10:31:27.250000Z",'
    '"completed_at":"2026-11-24T10:31:27.250000Z","source_url":"https://cdn.example/fox.png",'
    '"error":null,"file":{"file_name":"65a1b2c3d4e5f60718293a4b.png","mime_type":"image/png",'
    '"size_bytes":1234,"sha256":"abababababababababababababababababababababababababababababababab",'
    '"width":1200,"height":800}}'
)
OWL_ID = "65a1b2c3d4e5f60718293a4c"
OWL_CREATED_AT = "2026-11-24T10:32:00.125000+00:00"
OWL_RECORD = (
    '{"task_id":"65a1b2c3d4e5f60718293a4c","owner":"","status":"pending","upstream_status":"processing",'
    '"model":"midjourney","prompt":"an owl","aspect_ratio":null,"images":[],'
    '"created_at":"2026-11-24T10:32:00.125000Z","updated_at":"2026-11-24T10:32:01Z",'
    '"completed_at":null,"source_url":null,"error":null,"file":null}'
)


@contextlib.contextmanager
def raw(path: Path) -> Iterator[sqlite3.Connection]:
    db = sqlite3.connect(path, isolation_level=None)
    try:
        yield db
    finally:
        db.close()


def write_history(path: Path, schema: str, rows: list[dict[str, object]]) -> None:
    with raw(path) as db:
        db.executescript(schema)
        for row in rows:
            db.execute(
                f"INSERT INTO tasks ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                tuple(row.values()),
            )


def early_history(path: Path) -> None:
    write_history(
        path,
        EARLY_SCHEMA,
        [
            {
                "task_id": FOX_ID,
                "owner": "",
                "status": "done",
                "created_at": FOX_CREATED_AT,
                "record": FOX_RECORD,
            },
            {
                "task_id": OWL_ID,
                "owner": "",
                "status": "pending",
                "created_at": OWL_CREATED_AT,
                "record": OWL_RECORD,
            },
        ],
    )


def version(path: Path) -> int:
    with raw(path) as db:
        return int(db.execute("PRAGMA user_version").fetchone()[0])


def schema(db: sqlite3.Connection) -> tuple[list[tuple[object, ...]], set[str]]:
    columns = db.execute("PRAGMA table_info(tasks)").fetchall()
    indexes = {
        r[0]
        for r in db.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'tasks' AND sql IS NOT NULL"
        )
    }
    return columns, indexes


def today_record(task_id: str = "75a1b2c3d4e5f60718293a4b", **fields: object) -> TaskRecord:
    created = datetime(2026, 11, 25, 9, 0, 0, tzinfo=timezone.utc)
    values: dict[str, object] = {
        "task_id": task_id,
        "model": "flux-pro",
        "prompt": "a grey wolf",
        "created_at": created,
        "updated_at": created,
        "submitted_at": created,
        "request_key": "k" * 64,
    }
    return TaskRecord.model_validate(values | fields)


async def reusable(store: SQLiteStore, request_key: str, since: datetime) -> TaskRecord | None:
    """The task the store would answer an identical request with."""
    now = datetime.now(timezone.utc)
    (admission,) = await store.admit(
        "", [request_key], now=now, reuse_since=since, in_flight_since=now, caps=[]
    )
    return admission.reuse


async def test_new_history_is_at_latest_and_works(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    store = SQLiteStore(path)
    try:
        assert version(path) == LATEST
        pending = today_record()
        await store.put(pending)
        assert await store.get(pending.task_id) == pending
        since = pending.created_at - timedelta(hours=1)
        assert await reusable(store, pending.request_key, since) == pending
        done = today_record(status="done", finished_after=8.5, finished_by=11.0)
        await store.put(done)
        assert await store.durations("flux-pro", limit=5) == [(8.5, 11.0)]
    finally:
        await store.close()


async def test_early_history_opens_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    early_history(path)

    store = SQLiteStore(path)
    try:
        fox = await store.get(FOX_ID)
        assert fox is not None
        assert (fox.status, fox.model, fox.aspect_ratio, fox.request_key) == ("done", "flux-pro", "16:9", "")
        assert fox.file is not None and fox.file.width == 1200
        assert [r.task_id for r in await store.recent()] == [OWL_ID, FOX_ID]
        await store.put(today_record(status="done", finished_after=3.0, finished_by=4.0))
        assert await store.count() == 3
    finally:
        await store.close()

    assert version(path) == LATEST
    with raw(path) as db:
        rows = db.execute(
            "SELECT task_id, created_at, request_key, model, finished_after, finished_by FROM tasks "
            "WHERE task_id IN (?, ?) ORDER BY task_id",
            (FOX_ID, OWL_ID),
        ).fetchall()
    assert rows == [
        (FOX_ID, "2026-11-24T10:31:07.000000+00:00", "", "flux-pro", None, None),
        (OWL_ID, "2026-11-24T10:32:00.125000+00:00", "", "midjourney", None, None),
    ]


async def test_duration_history_becomes_a_bracket(tmp_path: Path) -> None:
    """67d1792 kept one estimate, the middle of the last pending poll and the first done one;
    both polls are recovered from it and the record's own times."""
    path = tmp_path / "history.db"
    submitted = "2026-11-24T11:00:00.500000Z"

    def row(task_id: str, completed: str, duration: float) -> dict[str, object]:
        record = json.loads(OWL_RECORD) | {
            "task_id": task_id,
            "status": "done",
            "model": "flux-pro",
            "completed_at": completed,
            "last_polled_at": completed,
            "submitted_at": submitted,
            "request_key": task_id * 2,
            "duration": duration,
        }
        return {
            "task_id": task_id,
            "status": "done",
            "created_at": f"2026-11-24T11:00:00.{task_id[-6:]}+00:00",
            "request_key": task_id * 2,
            "model": "flux-pro",
            "duration": duration,
            "record": json.dumps(record),
        }

    # Polled pending at +10 s, done at +14 s; the other was done at the first poll, +9 s.
    write_history(
        path,
        DURATION_SCHEMA,
        [
            row("75a1b2c3d4e5f60718000001", "2026-11-24T11:00:14.500000Z", 12.0),
            row("75a1b2c3d4e5f60718000002", "2026-11-24T11:00:09.500000Z", 9.0),
        ],
    )

    store = SQLiteStore(path)
    try:
        assert await store.durations("flux-pro", limit=5) == [(None, 9.0), (10.0, 14.0)]
        first = await store.get("75a1b2c3d4e5f60718000001")
        assert first is not None
        assert (first.finished_after, first.finished_by) == (10.0, 14.0)
        since = datetime(2026, 11, 24, tzinfo=timezone.utc)
        assert await reusable(store, first.request_key, since) == first
    finally:
        await store.close()
    with raw(path) as db:
        assert "duration" not in {r[1] for r in db.execute("PRAGMA table_info(tasks)")}
        assert db.execute("SELECT COUNT(*) FROM tasks WHERE record LIKE '%duration%'").fetchone() == (0,)


async def test_unversioned_history_of_today_opens(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    record = today_record(status="done", finished_after=5.0, finished_by=6.0)
    write_history(
        path,
        TODAY_SCHEMA,
        [
            {
                "task_id": record.task_id,
                "status": "done",
                "created_at": "2026-11-25T09:00:00.000000+00:00",
                "request_key": record.request_key,
                "model": record.model,
                "finished_after": 5.0,
                "finished_by": 6.0,
                "record": record.model_dump_json(),
            }
        ],
    )
    assert version(path) == 0

    store = SQLiteStore(path)
    try:
        assert await store.recent() == [record]
        assert await store.durations("flux-pro", limit=5) == [(5.0, 6.0)]
    finally:
        await store.close()
    assert version(path) == LATEST


@pytest.mark.parametrize(
    "build",
    ["new", EARLY_SCHEMA, REUSE_SCHEMA, DURATION_SCHEMA, TODAY_SCHEMA],
    ids=["new", "dabe035", "d9ca34e", "67d1792", "473c78f"],
)
def test_every_history_ends_at_todays_schema(tmp_path: Path, build: str) -> None:
    path = tmp_path / "history.db"
    if build != "new":
        write_history(path, build, [])
    with raw(path) as db:
        migrate(db)
        migrated = schema(db)
    with raw(tmp_path / "today.db") as db:
        db.executescript(COSTED_SCHEMA)
        assert migrated == schema(db)


def test_unversioned_shapes_are_what_the_migrations_make() -> None:
    with raw(Path(":memory:")) as db:
        # Versioning came with migration 5: only the builds before it left unversioned files.
        for number, migration in enumerate(SQLITE_MIGRATIONS[: max(UNVERSIONED_SHAPES.values())], start=1):
            migration(db)
            columns = frozenset(r[1] for r in db.execute("PRAGMA table_info(tasks)"))
            assert UNVERSIONED_SHAPES.get(columns) == number


def test_newer_history_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    with raw(path) as db:
        db.executescript(TODAY_SCHEMA)
        db.execute(f"PRAGMA user_version = {LATEST + 1}")

    with pytest.raises(StorageError) as caught:
        SQLiteStore(path)
    message = str(caught.value)
    assert "newer" in message and f"schema {LATEST + 1}" in message and f"up to {LATEST}" in message
    assert str(path) in message and "writable" not in message
    assert version(path) == LATEST + 1


def test_file_that_is_not_a_database_says_so(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    path.write_bytes(b"these are notes, not a database\n" * 200)
    with pytest.raises(StorageError, match="is not a SQLite database") as caught:
        SQLiteStore(path)
    assert "writable" not in str(caught.value)


def test_foreign_tasks_table_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    with raw(path) as db:
        db.execute("CREATE TABLE tasks (id INTEGER PRIMARY KEY, title TEXT)")
    with pytest.raises(StorageError, match="no gptunnel-mcp wrote"):
        SQLiteStore(path)


def test_failed_migration_leaves_the_history_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "history.db"
    early_history(path)
    with raw(path) as db:
        before = schema(db), db.execute("SELECT * FROM tasks ORDER BY rowid").fetchall()

    def last_fails(db: sqlite3.Connection) -> None:
        SQLITE_MIGRATIONS[-1](db)
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(_migrations, "SQLITE_MIGRATIONS", (*SQLITE_MIGRATIONS[:-1], last_fails))
    with pytest.raises(StorageError, match="disk I/O error"):
        SQLiteStore(path)

    assert version(path) == 0
    with raw(path) as db:
        assert (schema(db), db.execute("SELECT * FROM tasks ORDER BY rowid").fetchall()) == before


def open_together(path: Path) -> tuple[list[SQLiteStore], list[BaseException]]:
    """Two stores opening one file at the same moment, as two servers starting together."""
    start = threading.Barrier(2)
    stores: list[SQLiteStore] = []
    errors: list[BaseException] = []

    def open_store() -> None:
        start.wait()
        try:
            stores.append(SQLiteStore(path))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return stores, errors


async def test_one_history_opened_twice_at_once(tmp_path: Path) -> None:
    # The race (both switching a new file to WAL) is lost only now and then: run it often.
    for attempt in range(20):
        path = tmp_path / f"history-{attempt}.db"
        early_history(path)
        stores, errors = open_together(path)
        try:
            assert errors == []
            first, second = stores
            assert version(path) == LATEST
            record = today_record()
            await first.put(record)
            assert await second.get(record.task_id) == record
            assert [r.task_id for r in await second.recent()] == [record.task_id, OWL_ID, FOX_ID]
        finally:
            for store in stores:
                await store.close()


async def test_tasks_made_before_the_ledger_count_for_the_caps(tmp_path: Path) -> None:
    """Migration 5 enters the tasks this server made into the ledger of creates, by when they
    were sent, so a cap holds across the upgrade; tasks adopted from elsewhere cost nothing here."""
    path = tmp_path / "history.db"
    now = datetime.now(timezone.utc)
    made = today_record("75a1b2c3d4e5f60718000001", submitted_at=now - timedelta(minutes=5))
    adopted = today_record("75a1b2c3d4e5f60718000002", submitted_at=None, request_key="")
    old = today_record("75a1b2c3d4e5f60718000003", submitted_at=now - timedelta(hours=2))
    with raw(path) as db:
        db.executescript(TODAY_SCHEMA)
        for record in (made, adopted, old):
            db.execute(
                "INSERT INTO tasks (task_id, owner, status, created_at, request_key, model, record) "
                "VALUES (?, '', 'pending', ?, ?, 'flux-pro', ?)",
                (record.task_id, record.created_at.isoformat(), record.request_key, record.model_dump_json()),
            )
    store = SQLiteStore(path)
    try:
        hour = Cap(limit=1, span=timedelta(hours=1), unit="hour", setting="GPTUNNEL_MAX_IMAGES_PER_HOUR")
        day = Cap(limit=3, span=timedelta(days=1), unit="day", setting="GPTUNNEL_MAX_IMAGES_PER_DAY")
        (refused,) = await store.admit(
            "", ["new request"], now=now, reuse_since=None, in_flight_since=now, caps=[hour]
        )
        assert refused.cap == hour and refused.made == 1
        (admitted,) = await store.admit(
            "", ["new request"], now=now, reuse_since=None, in_flight_since=now, caps=[day]
        )
        assert admitted.ticket is not None, "the adopted task was counted as a create"
    finally:
        await store.close()


async def test_prompts_stored_before_search_are_found_in_any_case(tmp_path: Path) -> None:
    """Migration 8 folds the prompts already stored, Russian ones too, as new ones are."""
    path = tmp_path / "history.db"
    fox = today_record("75a1b2c3d4e5f60718000001", prompt="Лиса в СНЕГУ")
    wolf = today_record("75a1b2c3d4e5f60718000002", prompt="a grey wolf")
    with raw(path) as db:
        # A history of version 7, as the migrations made it.
        for migration in SQLITE_MIGRATIONS[:7]:
            migration(db)
        for record in (fox, wolf):
            db.execute(
                "INSERT INTO tasks (task_id, owner, status, created_at, request_key, model, record) "
                "VALUES (?, '', 'pending', ?, ?, 'flux-pro', ?)",
                (record.task_id, record.created_at.isoformat(), record.request_key, record.model_dump_json()),
            )
        db.execute("PRAGMA user_version = 7")
    store = SQLiteStore(path)
    try:
        assert [r.task_id for r in await store.search("", Search(text="снегу"), limit=5)] == [fox.task_id]
        assert [r.task_id for r in await store.search("", Search(text="ЛИСА"), limit=5)] == [fox.task_id]
        assert [r.task_id for r in await store.search("", Search(text="Wolf"), limit=5)] == [wolf.task_id]
    finally:
        await store.close()
    assert version(path) == LATEST
