"""The history's schema as it grew: an ordered list of migrations, and `migrate` to run the pending ones.

Migration N takes the schema from version N-1 to N; the version is kept in `PRAGMA user_version`.
A migration, once released, is never edited, because files in the field have already run it: a
change to the schema is a new migration at the end. PostgreSQL keeps a list of its own beside
it (`POSTGRES_MIGRATIONS`), with the same tables and columns, and one of its own (the images
every replica serves): a change to the schema is a new migration at the end of both lists.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import datetime, timezone
from typing import Any

from ._exceptions import StorageError
from ._records import searchable

Migration = Callable[[sqlite3.Connection], None]


def _m001_tasks(db: sqlite3.Connection) -> None:
    """The history as the first build (dabe035) made it."""
    db.execute(
        """CREATE TABLE tasks (
               task_id    TEXT NOT NULL,
               owner      TEXT NOT NULL DEFAULT '',
               status     TEXT NOT NULL,
               created_at TEXT NOT NULL,
               record     TEXT NOT NULL,
               PRIMARY KEY (owner, task_id)
           )"""
    )
    db.execute("CREATE INDEX tasks_by_time ON tasks (owner, created_at DESC)")


def _utc_text(text: str) -> str:
    # The form d9ca34e began to compare in SQL, frozen here: the running code may change its own.
    return datetime.fromisoformat(text).astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")


def _m002_request_key(db: sqlite3.Connection) -> None:
    """Identical requests reuse a task (d9ca34e).

    The first build wrote `created_at` as `isoformat()`, whose width varies, and from here on it is
    compared as text against fixed-width UTC, so old rows are rewritten to that form. Their
    `request_key` stays "" (never reused): the key cannot be rebuilt from an old record, which does
    not tell a task made here from one adopted from elsewhere."""
    db.execute("ALTER TABLE tasks ADD COLUMN request_key TEXT NOT NULL DEFAULT ''")
    db.execute("UPDATE tasks SET request_key = COALESCE(json_extract(record, '$.request_key'), '')")
    db.execute("CREATE INDEX tasks_by_request ON tasks (owner, request_key, created_at DESC)")
    rows = db.execute("SELECT rowid, created_at FROM tasks").fetchall()
    db.executemany("UPDATE tasks SET created_at = ? WHERE rowid = ?", [(_utc_text(c), r) for r, c in rows])


def _m003_model_duration(db: sqlite3.Connection) -> None:
    """Per-model durations for the poll plan (67d1792)."""
    db.execute("ALTER TABLE tasks ADD COLUMN model TEXT NOT NULL DEFAULT ''")
    db.execute("ALTER TABLE tasks ADD COLUMN duration REAL")
    db.execute(
        "UPDATE tasks SET model = COALESCE(json_extract(record, '$.model'), ''), "
        "duration = json_extract(record, '$.duration')"
    )
    db.execute("CREATE INDEX tasks_by_model ON tasks (model, created_at DESC) WHERE duration IS NOT NULL")


def _bracket(duration: float, submitted_at: str, completed_at: str) -> tuple[float | None, float]:
    """67d1792's single duration as the (finished after, finished by) pair that replaced it.

    That build stamped `completed_at` at the poll that saw the task done, and stored the middle of
    that poll and the one before (or the former alone when no earlier poll followed submission),
    so both ends can be recovered."""
    by = (_instant(completed_at) - _instant(submitted_at)).total_seconds()
    after = 2 * duration - by
    return (after if 0 <= after < by else None), by


def _instant(text: str) -> datetime:
    # Pydantic writes UTC as "Z", which `fromisoformat` reads only from Python 3.11 on.
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    return datetime.fromisoformat(text)


def _m004_finish_bracket(db: sqlite3.Connection) -> None:
    """When a task finished as a bracket of two polls instead of one estimate (473c78f).

    The table is rebuilt rather than `duration` dropped: DROP COLUMN needs SQLite 3.35, newer than
    some Pythons this package supports still bundle."""
    db.execute(
        """CREATE TABLE tasks_v4 (
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
           )"""
    )
    # rowid is kept: it breaks ties between tasks created in the same second.
    db.execute(
        """INSERT INTO tasks_v4 (rowid, task_id, owner, status, created_at, request_key, model,
                                 finished_after, finished_by, record)
           SELECT rowid, task_id, owner, status, created_at, request_key, model,
                  json_extract(record, '$.finished_after'), json_extract(record, '$.finished_by'),
                  json_remove(record, '$.duration')
           FROM tasks"""
    )
    timed = db.execute(
        """SELECT rowid, duration,
                  json_extract(record, '$.submitted_at'), json_extract(record, '$.completed_at')
           FROM tasks WHERE duration IS NOT NULL
           AND json_extract(record, '$.submitted_at') IS NOT NULL
           AND json_extract(record, '$.completed_at') IS NOT NULL"""
    ).fetchall()
    for rowid, duration, submitted_at, completed_at in timed:
        after, by = _bracket(duration, submitted_at, completed_at)
        # The record too: a later put of it rewrites the columns from its fields.
        db.execute(
            """UPDATE tasks_v4 SET finished_after = ?, finished_by = ?,
                   record = json_set(record, '$.finished_after', ?, '$.finished_by', ?)
               WHERE rowid = ?""",
            (after, by, after, by, rowid),
        )
    db.execute("DROP TABLE tasks")
    db.execute("ALTER TABLE tasks_v4 RENAME TO tasks")
    db.execute("CREATE INDEX tasks_by_time ON tasks (owner, created_at DESC)")
    db.execute("CREATE INDEX tasks_by_request ON tasks (owner, request_key, created_at DESC)")
    db.execute("CREATE INDEX tasks_by_model ON tasks (model, created_at DESC) WHERE finished_by IS NOT NULL")


def _m005_creates(db: sqlite3.Connection) -> None:
    """The ledger of create requests sent to GPTunnel, each made by this server's clock: caps
    count it, and a slot is taken in it before the request goes out, in the same transaction
    that checks the caps and looks for an identical request to reuse. Tasks made before it are
    entered as they were made, so a cap holds across the upgrade."""
    db.execute(
        """CREATE TABLE creates (
               ticket      TEXT PRIMARY KEY,
               owner       TEXT NOT NULL,
               request_key TEXT NOT NULL,
               made_at     TEXT NOT NULL,
               state       TEXT NOT NULL,
               task_id     TEXT
           )"""
    )
    db.execute("CREATE INDEX creates_by_time ON creates (owner, made_at)")
    db.execute("CREATE INDEX creates_by_request ON creates (owner, request_key, state)")
    db.execute(
        """INSERT INTO creates (ticket, owner, request_key, made_at, state, task_id)
           SELECT 'history:' || owner || ':' || task_id, owner, request_key,
                  COALESCE(json_extract(record, '$.submitted_at'), created_at), 'created', task_id
           FROM tasks WHERE request_key != '' OR json_extract(record, '$.submitted_at') IS NOT NULL"""
    )


def _m006_server_state(db: sqlite3.Connection) -> None:
    """Values the whole server shares, by name: the server secret, which earlier builds kept in
    the file `server.secret` beside the history (adopted from it on first use, by `_wiring`)."""
    db.execute("CREATE TABLE server_state (key TEXT PRIMARY KEY, value TEXT NOT NULL)")


def _m007_leases(db: sqlite3.Connection) -> None:
    """Who follows a pending task, and until when (`TaskStore.claim`): outside the record, so
    that writing a record never changes who holds it."""
    db.execute("ALTER TABLE tasks ADD COLUMN lease_holder TEXT")
    db.execute("ALTER TABLE tasks ADD COLUMN lease_until TEXT")
    db.execute("CREATE INDEX tasks_pending ON tasks (created_at) WHERE status = 'pending'")


def _m008_search_text(db: sqlite3.Connection) -> None:
    """Each prompt as it is searched (`searchable`), in a column of its own: folded by Python,
    since neither database's SQL folds Cyrillic reliably. Not frozen, unlike the forms above:
    the column must hold what the running code searches for, so a change to `searchable` is a
    new migration that folds every prompt again."""
    db.execute("ALTER TABLE tasks ADD COLUMN search_text TEXT NOT NULL DEFAULT ''")
    db.create_function("searchable", 1, searchable, deterministic=True)
    db.execute("UPDATE tasks SET search_text = searchable(COALESCE(json_extract(record, '$.prompt'), ''))")


def _m009_tasks_by_id(db: sqlite3.Connection) -> None:
    """A task found by its id alone, whoever's it is: for the signed links to stored images
    (`TaskStore.done_anywhere`), which name no owner."""
    db.execute("CREATE INDEX tasks_by_id ON tasks (task_id)")


def _m010_costs(db: sqlite3.Connection) -> None:
    """What each task cost, as GPTunnel reported it, for SQL to sum against a daily budget and
    to average per model; and the model of each create in the ledger, whose cost is estimated
    before its task exists. Records before it carry no cost, so there is nothing to fill in."""
    db.execute("ALTER TABLE tasks ADD COLUMN cost REAL")
    db.execute("CREATE INDEX tasks_cost_by_model ON tasks (model, created_at DESC) WHERE cost IS NOT NULL")
    db.execute("ALTER TABLE creates ADD COLUMN model TEXT NOT NULL DEFAULT ''")


def _m011_oauth(db: sqlite3.Connection) -> None:
    """OAuth sign-in (`OAuthRecords`): registered clients, pending authorizations, grants, codes
    and tokens, each by its kind and id (a token's or code's by its SHA-256 only), with the grant
    it belongs to, so that a grant goes with everything issued under it."""
    db.execute(
        """CREATE TABLE oauth_items (
               kind       TEXT NOT NULL,
               id         TEXT NOT NULL,
               grant_id   TEXT NOT NULL,
               expires_at REAL NOT NULL,
               body       TEXT NOT NULL,
               PRIMARY KEY (kind, id)
           )"""
    )
    db.execute("CREATE INDEX oauth_items_by_grant ON oauth_items (grant_id)")
    db.execute("CREATE INDEX oauth_items_by_expiry ON oauth_items (expires_at)")


SQLITE_MIGRATIONS: Sequence[Migration] = (
    _m001_tasks,
    _m002_request_key,
    _m003_model_duration,
    _m004_finish_bracket,
    _m005_creates,
    _m006_server_state,
    _m007_leases,
    _m008_search_text,
    _m009_tasks_by_id,
    _m010_costs,
    _m011_oauth,
)
LATEST = len(SQLITE_MIGRATIONS)

#: What a PostgreSQL migration runs, in order: statements, and functions of the connection
#: (psycopg's `AsyncConnection`, not named here so that SQLite needs no driver) for what SQL
#: cannot do.
PostgresStep = str | Callable[[Any], Awaitable[None]]
#: Prompts folded per statement by `_p008_search_text`: a bounded share of memory.
_FOLD_BATCH = 1000


async def _p008_search_text(conn: Any) -> None:
    """SQLite's 8, the folding: a database's lower() follows its locale, and folds nothing but
    ASCII in a "C" one."""
    last = 0
    while True:
        cursor = await conn.execute(
            "SELECT seq, record->>'prompt' FROM tasks WHERE seq > %s ORDER BY seq LIMIT %s",
            (last, _FOLD_BATCH),
        )
        rows = await cursor.fetchall()
        if not rows:
            return
        async with conn.cursor() as update:
            await update.executemany(
                "UPDATE tasks SET search_text = %s WHERE seq = %s",
                [(searchable(prompt or ""), seq) for seq, prompt in rows],
            )
        last = rows[-1][0]


#: PostgreSQL's history, each migration as the steps it runs (run by `_postgres`, under an
#: advisory lock, its version kept in the table `schema_version`). Its version 1 is SQLite's 5:
#: the same tables and columns, times as `timestamptz` and the record as `jsonb`, and `seq` where
#: SQLite has its implicit rowid, to order tasks created in the same second.
POSTGRES_MIGRATIONS: Sequence[Sequence[PostgresStep]] = (
    (
        """CREATE TABLE tasks (
               task_id     text NOT NULL,
               owner       text NOT NULL DEFAULT '',
               status      text NOT NULL,
               created_at  timestamptz NOT NULL,
               request_key text NOT NULL DEFAULT '',
               model       text NOT NULL DEFAULT '',
               finished_after double precision,
               finished_by    double precision,
               record      jsonb NOT NULL,
               seq         bigint GENERATED ALWAYS AS IDENTITY,
               PRIMARY KEY (owner, task_id)
           )""",
        "CREATE INDEX tasks_by_time ON tasks (owner, created_at DESC, seq DESC)",
        "CREATE INDEX tasks_by_request ON tasks (owner, request_key, created_at DESC)",
        "CREATE INDEX tasks_by_model ON tasks (model, created_at DESC) WHERE finished_by IS NOT NULL",
        """CREATE TABLE creates (
               ticket      text PRIMARY KEY,
               owner       text NOT NULL,
               request_key text NOT NULL,
               made_at     timestamptz NOT NULL,
               state       text NOT NULL,
               task_id     text
           )""",
        "CREATE INDEX creates_by_time ON creates (owner, made_at)",
        "CREATE INDEX creates_by_request ON creates (owner, request_key, state)",
    ),
    # SQLite's 6: the server secret, shared by every replica.
    ("CREATE TABLE server_state (key text PRIMARY KEY, value text NOT NULL)",),
    # SQLite's 7: leases on the tasks being followed.
    (
        "ALTER TABLE tasks ADD COLUMN lease_holder text, ADD COLUMN lease_until timestamptz",
        "CREATE INDEX tasks_pending ON tasks (created_at) WHERE status = 'pending'",
    ),
    # PostgreSQL's own, with no SQLite counterpart (a SQLite server's images are its home folder's):
    # the images, by their SHA-256, so a replica serves an image another one downloaded.
    (
        """CREATE TABLE images (
               sha256     text PRIMARY KEY,
               mime_type  text NOT NULL,
               size_bytes bigint NOT NULL,
               data       bytea NOT NULL,
               kept_at    timestamptz NOT NULL DEFAULT now()
           )""",
    ),
    # SQLite's 8: prompts as they are searched.
    ("ALTER TABLE tasks ADD COLUMN search_text text NOT NULL DEFAULT ''", _p008_search_text),
    # SQLite's 9: tasks by their id alone, for signed links to stored images.
    ("CREATE INDEX tasks_by_id ON tasks (task_id)",),
    # SQLite's 10: each task's cost, and each create's model.
    (
        "ALTER TABLE tasks ADD COLUMN cost double precision",
        "CREATE INDEX tasks_cost_by_model ON tasks (model, created_at DESC) WHERE cost IS NOT NULL",
        "ALTER TABLE creates ADD COLUMN model text NOT NULL DEFAULT ''",
    ),
    # PostgreSQL's own, like its images: users' keys, sealed, for replicas to finish their tasks.
    (
        """CREATE TABLE sealed_keys (
               owner   text PRIMARY KEY,
               sealed  bytea NOT NULL,
               kept_at timestamptz NOT NULL DEFAULT now()
           )""",
    ),
    # SQLite's 11: OAuth sign-in.
    (
        """CREATE TABLE oauth_items (
               kind       text NOT NULL,
               id         text NOT NULL,
               grant_id   text NOT NULL,
               expires_at double precision NOT NULL,
               body       text NOT NULL,
               PRIMARY KEY (kind, id)
           )""",
        "CREATE INDEX oauth_items_by_grant ON oauth_items (grant_id)",
        "CREATE INDEX oauth_items_by_expiry ON oauth_items (expires_at)",
    ),
)
POSTGRES_LATEST = len(POSTGRES_MIGRATIONS)

_V1_COLUMNS = frozenset({"task_id", "owner", "status", "created_at", "record"})
_V2_COLUMNS = _V1_COLUMNS | {"request_key"}
_V3_COLUMNS = _V2_COLUMNS | {"model", "duration"}
_V4_COLUMNS = (_V3_COLUMNS - {"duration"}) | {"finished_after", "finished_by"}
#: The columns of `tasks` that each build before versioning left, by the version they amount to.
#: Each of those builds failed to open the file of an earlier one, so no file mixes two shapes.
UNVERSIONED_SHAPES: dict[frozenset[str], int] = {
    _V1_COLUMNS: 1,
    _V2_COLUMNS: 2,
    _V3_COLUMNS: 3,
    _V4_COLUMNS: 4,
}


def migrate(db: sqlite3.Connection) -> None:
    """Bring the history on `db` (a connection in autocommit mode, `isolation_level=None`) to
    `LATEST`, all pending migrations in one transaction. `BEGIN IMMEDIATE` takes the write lock
    before the version is read, so of two processes opening one old file, the second waits and
    then finds nothing left to do."""
    if _version(db) == LATEST:
        return
    with immediate_transaction(db):
        _upgrade(db)


@contextlib.contextmanager
def immediate_transaction(db: sqlite3.Connection) -> Iterator[None]:
    """A transaction that holds the write lock from its first statement, so that what it reads
    is still true when it writes, whichever other connection or process wants the file."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        # Some errors (a full disk) end the transaction themselves.
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _upgrade(db: sqlite3.Connection) -> None:
    stored = _version(db)
    if stored > LATEST:
        raise StorageError(
            f"the history at {_path(db)} was written by a newer gptunnel-mcp (schema {stored}; "
            f"this version reads up to {LATEST}): upgrade gptunnel-mcp, or point GPTUNNEL_MCP_HOME elsewhere"
        )
    if stored == LATEST:
        return
    for migration in SQLITE_MIGRATIONS[stored or _unversioned(db) :]:
        migration(db)
    # PRAGMA takes no parameters; LATEST is this module's own integer.
    db.execute(f"PRAGMA user_version = {LATEST:d}")


def _unversioned(db: sqlite3.Connection) -> int:
    """The version a file from before versioning amounts to: 0 for a new file, else by its columns."""
    columns = frozenset(row[1] for row in db.execute("PRAGMA table_info(tasks)"))
    if not columns:
        return 0
    if columns not in UNVERSIONED_SHAPES:
        raise StorageError(
            f"the history at {_path(db)} has a tasks table that no gptunnel-mcp wrote "
            f"(columns {', '.join(sorted(columns))}): move the file away, "
            "or point GPTUNNEL_MCP_HOME elsewhere"
        )
    return UNVERSIONED_SHAPES[columns]


def _version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def _path(db: sqlite3.Connection) -> str:
    # The main database comes first; its file is the third column.
    return str(db.execute("PRAGMA database_list").fetchone()[2])
