"""The embedded history: one SQLite file in WAL mode, safe for several processes at once."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TypeVar

import anyio

from ._exceptions import StorageError
from ._migrations import immediate_transaction, migrate
from ._records import TaskRecord, searchable, utcnow
from ._store import (
    COST_MEMORY,
    Admission,
    Budget,
    Cap,
    Claim,
    LedgerEntry,
    OAuthItem,
    Position,
    Search,
    Settlement,
    Spending,
    Spent,
    average,
    cap_refusal,
    charges,
    weigh,
)

_T = TypeVar("_T")

#: How long to wait for another process's write lock before giving up.
_BUSY_SECONDS = 30
#: How long a health check waits for an answer.
_PING_SECONDS = 2


def _iso(moment: datetime) -> str:
    """One fixed-width UTC form, so that text order is time order in SQL comparisons."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")


def _moment(text: str) -> datetime:
    # Tasks older than the ledger entered it with their record's time, which pydantic writes
    # with "Z": Python reads that only from 3.11 on.
    return datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)


def _open_error(path: Path, exc: sqlite3.Error) -> StorageError:
    """The usual reasons a history does not open, each with its own remedy. SQLite's error texts
    are matched because its error codes reach Python only from 3.11 on."""
    text = str(exc)
    if "not a database" in text or "malformed" in text:
        return StorageError(
            f"{path} is not a SQLite database, or is damaged ({exc}), so it cannot hold the history: "
            "move it away, or set GPTUNNEL_MCP_HOME to another folder"
        )
    if "locked" in text:
        return StorageError(
            f"the history database {path} stayed locked by another process for {_BUSY_SECONDS} s ({exc}): "
            "try again, or stop the other process"
        )
    return StorageError(
        f"cannot open the history database {path} ({exc}); set GPTUNNEL_MCP_HOME to a writable folder"
    )


class SQLiteStore:
    """`TaskStore` on SQLite. Calls run in a worker thread, one at a time on one connection: a
    single slot, rather than a lock, so that waiting callers hold no thread (threads cost memory
    under load, and SQLite serialises writers anyway)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # The history holds every prompt. SQLite would make the file as the umask allows, and its
        # -wal and -shm copy the file's mode: so the file is made private before SQLite opens it
        # (an empty file is a new database to SQLite). Any other failure is SQLite's to report.
        with contextlib.suppress(OSError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        try:
            self._db = sqlite3.connect(
                path, timeout=_BUSY_SECONDS, check_same_thread=False, isolation_level=None
            )
        except sqlite3.Error as exc:
            raise _open_error(path, exc) from None
        try:
            _use_wal(self._db)
            self._db.execute("PRAGMA synchronous=NORMAL")
            migrate(self._db)
        except BaseException as exc:
            self._db.close()
            if isinstance(exc, sqlite3.Error):
                raise _open_error(path, exc) from None
            raise
        self._slot = anyio.CapacityLimiter(1)

    async def _run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        def call() -> _T:
            try:
                return fn(self._db)
            except sqlite3.Error as exc:
                raise StorageError(f"the history database failed: {exc}") from None

        return await anyio.to_thread.run_sync(call, limiter=self._slot)

    async def put(self, record: TaskRecord) -> None:
        await self._run(lambda db: _put(db, record))

    async def get(self, task_id: str, owner: str = "") -> TaskRecord | None:
        row = await self._run(
            lambda db: db.execute(
                "SELECT record FROM tasks WHERE owner = ? AND task_id = ?", (owner, task_id.lower())
            ).fetchone()
        )
        return None if row is None else TaskRecord.model_validate_json(row[0])

    async def done_anywhere(self, task_id: str) -> list[TaskRecord]:
        rows = await self._run(
            lambda db: db.execute(
                "SELECT record FROM tasks WHERE task_id = ? AND status = 'done'", (task_id.lower(),)
            ).fetchall()
        )
        return [TaskRecord.model_validate_json(r[0]) for r in rows]

    async def recent(self, owner: str = "", *, limit: int = 50, offset: int = 0) -> list[TaskRecord]:
        rows = await self._run(
            lambda db: db.execute(
                # rowid breaks ties: GPTunnel's created_at counts whole seconds.
                "SELECT record FROM tasks WHERE owner = ? "
                "ORDER BY created_at DESC, rowid DESC LIMIT ? OFFSET ?",
                (owner, limit, offset),
            ).fetchall()
        )
        return [TaskRecord.model_validate_json(r[0]) for r in rows]

    async def count(self, owner: str = "") -> int:
        row = await self._run(
            lambda db: db.execute("SELECT COUNT(*) FROM tasks WHERE owner = ?", (owner,)).fetchone()
        )
        return int(row[0])

    async def search(
        self, owner: str, search: Search, *, after: Position | None = None, limit: int
    ) -> list[TaskRecord]:
        where, params = ["owner = ?"], [owner]
        if search.text:
            where.append("instr(search_text, ?) > 0")
            params.append(searchable(search.text))
        if search.model is not None:
            # Model ids are ASCII, which SQLite's lower() folds.
            where.append("lower(model) = ?")
            params.append(search.model.lower())
        if search.status is not None:
            where.append("status = ?")
            params.append(search.status)
        if search.since is not None:
            where.append("created_at >= ?")
            params.append(_iso(search.since))
        if after is not None:
            where.append("(created_at, task_id) < (?, ?)")
            params += [_iso(after.created_at), after.task_id]
        query = f"SELECT record FROM tasks WHERE {' AND '.join(where)} "  # noqa: S608 - clauses are ours
        rows = await self._run(
            lambda db: db.execute(
                query + "ORDER BY created_at DESC, task_id DESC LIMIT ?", (*params, limit)
            ).fetchall()
        )
        return [TaskRecord.model_validate_json(r[0]) for r in rows]

    async def durations(self, model: str, *, limit: int) -> list[tuple[float | None, float]]:
        rows = await self._run(
            lambda db: db.execute(
                "SELECT finished_after, finished_by FROM tasks WHERE model = ? AND finished_by IS NOT NULL "
                "ORDER BY created_at DESC LIMIT ?",
                (model, limit),
            ).fetchall()
        )
        return [(None if r[0] is None else float(r[0]), float(r[1])) for r in rows]

    async def costs(self, model: str, *, limit: int, now: datetime) -> list[float]:
        return await self._run(lambda db: _costs(db, model, limit, now))

    async def spent(self, owner: str, *, since: datetime) -> Spent:
        row = await self._run(
            lambda db: db.execute(
                "SELECT count(*), count(cost), total(cost) FROM tasks WHERE owner = ? AND created_at > ?",
                (owner, _iso(since)),
            ).fetchone()
        )
        return Spent(tasks=int(row[0]), priced=int(row[1]), cost=float(row[2]))

    async def admit(
        self,
        owner: str,
        request_keys: Sequence[str],
        *,
        now: datetime,
        reuse_since: datetime | None,
        in_flight_since: datetime,
        caps: Sequence[Cap],
        budget: Budget | None = None,
        model: str = "",
    ) -> list[Admission]:
        def reuse(db: sqlite3.Connection, request_key: str, since: datetime) -> Admission | None:
            row = db.execute(
                """SELECT record FROM tasks WHERE owner = ? AND request_key = ?
                   AND (status = 'pending' OR (status = 'done' AND created_at >= ?))
                   ORDER BY created_at DESC, rowid DESC LIMIT 1""",
                (owner, request_key, _iso(since)),
            ).fetchone()
            earlier = None if row is None else TaskRecord.model_validate_json(row[0])
            expires = None if earlier is None else earlier.source_url_expires_at
            # A pending task whose link expired before its download is no answer to anyone.
            if earlier is not None and not (earlier.status == "pending" and expires and expires < now):
                return Admission(reuse=earlier)
            sending = db.execute(
                """SELECT 1 FROM creates WHERE owner = ? AND request_key = ? AND state = 'sending'
                   AND made_at >= ? LIMIT 1""",
                (owner, request_key, _iso(in_flight_since)),
            ).fetchone()
            return None if sending is None else Admission(in_flight=True)

        def decide(db: sqlite3.Connection) -> list[Admission]:
            since = reuse_since
            found = {key: reuse(db, key, since) for key in request_keys} if since is not None else {}
            if any(a is not None and a.in_flight for a in found.values()):
                return [Admission(in_flight=True)] * len(request_keys)
            new = [key for key in request_keys if found.get(key) is None]
            for cap in caps:
                if not new:
                    break
                made = [
                    _moment(r[0])
                    for r in db.execute(
                        "SELECT made_at FROM creates WHERE owner = ? AND made_at > ? ORDER BY made_at",
                        (owner, _iso(now - cap.span)),
                    )
                ]
                refusal = cap_refusal(cap, made, len(new))
                if refusal is not None:
                    return [refusal] * len(request_keys)
            if new and budget is not None:
                spending = _weigh(db, owner, budget, model, len(new), now, in_flight_since)
                if spending is not None:
                    return [Admission(spending=spending)] * len(request_keys)
            tickets = {key: secrets.token_hex(16) for key in new}
            db.executemany(
                """INSERT INTO creates (ticket, owner, request_key, made_at, state, model)
                   VALUES (?, ?, ?, ?, 'sending', ?)""",
                [(ticket, owner, key, _iso(now), model) for key, ticket in tickets.items()],
            )
            return [found.get(key) or Admission(ticket=tickets[key]) for key in request_keys]

        return await self._run(lambda db: _immediately(db, decide))

    async def settle(self, ticket: str, outcome: Settlement, record: TaskRecord | None = None) -> None:
        def close(db: sqlite3.Connection) -> None:
            if outcome == "refused":
                db.execute("DELETE FROM creates WHERE ticket = ?", (ticket,))
                return
            task_id = None
            if record is not None:
                _put(db, record)
                task_id = record.task_id
            db.execute(
                "UPDATE creates SET state = ?, task_id = ? WHERE ticket = ?", (outcome, task_id, ticket)
            )

        await self._run(lambda db: _immediately(db, close))

    async def claim(self, task_id: str, owner: str, holder: str, *, seconds: float) -> Claim | None:
        task_id = task_id.lower()

        def take(db: sqlite3.Connection) -> Claim | None:
            now = utcnow()
            taken = db.execute(
                """UPDATE tasks SET lease_holder = ?, lease_until = ?
                   WHERE owner = ? AND task_id = ? AND status = 'pending'
                   AND (lease_holder IS NULL OR lease_holder = ? OR lease_until < ?)""",
                (holder, _iso(now + timedelta(seconds=seconds)), owner, task_id, holder, _iso(now)),
            ).rowcount
            row = db.execute(
                "SELECT record FROM tasks WHERE owner = ? AND task_id = ?", (owner, task_id)
            ).fetchone()
            return None if row is None else Claim(TaskRecord.model_validate_json(row[0]), taken > 0)

        return await self._run(lambda db: _immediately(db, take))

    async def leases(
        self, holder: str, *, seconds: float, adopt: int, owners: Sequence[str], made_since: datetime
    ) -> list[TaskRecord]:
        def hold(db: sqlite3.Connection) -> list[TaskRecord]:
            now = utcnow()
            # Unique to this call, so the rows it leased are found by it.
            until = _iso(now + timedelta(seconds=seconds))
            db.execute(
                """UPDATE tasks SET lease_holder = :holder, lease_until = :until WHERE rowid IN (
                       SELECT rowid FROM tasks
                       WHERE status = 'pending' AND json_extract(record, '$.cancelled_at') IS NULL
                       AND created_at >= :since
                       AND (lease_holder = :holder OR (owner IN (SELECT value FROM json_each(:owners))
                            AND (lease_holder IS NULL OR lease_until < :now)))
                       ORDER BY lease_holder IS :holder DESC, created_at
                       LIMIT (SELECT count(*) FROM tasks WHERE lease_holder = :holder AND status = 'pending')
                             + :adopt)""",
                {
                    "holder": holder,
                    "until": until,
                    "since": _iso(made_since),
                    "owners": json.dumps(list(owners)),
                    "now": _iso(now),
                    "adopt": adopt,
                },
            )
            rows = db.execute(
                "SELECT record FROM tasks WHERE lease_holder = ? AND lease_until = ?", (holder, until)
            )
            return [TaskRecord.model_validate_json(r[0]) for r in rows]

        return await self._run(lambda db: _immediately(db, hold))

    async def task_rows(self, *, after: int, limit: int) -> list[tuple[int, TaskRecord]]:
        """Every owner's tasks in the order they were first stored, `limit` of them after position
        `after` (0: from the start), each with its position: what `migrate` copies."""
        rows = await self._run(
            lambda db: db.execute(
                "SELECT rowid, record FROM tasks WHERE rowid > ? ORDER BY rowid LIMIT ?", (after, limit)
            ).fetchall()
        )
        return [(int(r[0]), TaskRecord.model_validate_json(r[1])) for r in rows]

    async def ledger_rows(self, *, after: int, limit: int) -> list[tuple[int, LedgerEntry]]:
        """The ledger of creates as `task_rows` gives the tasks."""
        rows = await self._run(
            lambda db: db.execute(
                "SELECT rowid, ticket, owner, request_key, made_at, state, task_id, model FROM creates "
                "WHERE rowid > ? ORDER BY rowid LIMIT ?",
                (after, limit),
            ).fetchall()
        )
        return [(int(r[0]), LedgerEntry(r[1], r[2], r[3], _moment(r[4]), r[5], r[6], r[7])) for r in rows]

    async def has_users(self) -> bool:
        """Whether any task belongs to a user of a multi-user server (an owner other than "")."""
        row = await self._run(
            lambda db: db.execute("SELECT 1 FROM tasks WHERE owner != '' LIMIT 1").fetchone()
        )
        return row is not None

    async def server_secret(self, adopt: bytes | None = None) -> bytes:
        def read(db: sqlite3.Connection) -> bytes | None:
            row = db.execute("SELECT value FROM server_state WHERE key = 'secret'").fetchone()
            return None if row is None else bytes.fromhex(row[0])

        def make(db: sqlite3.Connection) -> bytes:
            # Under the write lock: a process that got here first has made it, and it stands.
            db.execute(
                "INSERT OR IGNORE INTO server_state (key, value) VALUES ('secret', ?)",
                ((adopt or secrets.token_bytes(32)).hex(),),
            )
            found = read(db)
            assert found is not None
            return found

        # Read first: once it is made, a start takes no write lock for it.
        found = await self._run(read)
        return found if found is not None else await self._run(lambda db: _immediately(db, make))

    async def oauth_put(self, item: OAuthItem) -> None:
        await self._run(
            lambda db: db.execute(
                "INSERT OR REPLACE INTO oauth_items (kind, id, grant_id, expires_at, body) "
                "VALUES (?, ?, ?, ?, ?)",
                (item.kind, item.id, item.grant, item.expires_at, item.body),
            )
        )

    async def oauth_get(self, kind: str, id: str, *, now: float) -> OAuthItem | None:
        return await self._run(lambda db: _oauth_item(db, kind, id, now))

    async def oauth_spend(self, kind: str, id: str, *, now: float) -> OAuthItem | None:
        def spend(db: sqlite3.Connection) -> OAuthItem | None:
            found = _oauth_item(db, kind, id, now)
            if found is not None:
                db.execute("UPDATE oauth_items SET kind = 'spent' WHERE kind = ? AND id = ?", (kind, id))
            return found

        return await self._run(lambda db: _immediately(db, spend))

    async def oauth_drop(self, grant: str, kinds: Sequence[str] | None = None) -> None:
        if kinds is None:
            await self._run(lambda db: db.execute("DELETE FROM oauth_items WHERE grant_id = ?", (grant,)))
            return
        marks = ", ".join("?" * len(kinds))
        await self._run(
            lambda db: db.execute(
                f"DELETE FROM oauth_items WHERE grant_id = ? AND kind IN ({marks})",  # noqa: S608 - marks only
                (grant, *kinds),
            )
        )

    async def oauth_sweep(self, *, now: float) -> None:
        await self._run(lambda db: db.execute("DELETE FROM oauth_items WHERE expires_at <= ?", (now,)))

    async def ping(self) -> None:
        # A read of the file, not only of SQLite's code; bounded, since the one slot may be held
        # by a write waiting up to _BUSY_SECONDS for another process's lock.
        with anyio.move_on_after(_PING_SECONDS):
            await self._run(lambda db: db.execute("SELECT 1 FROM tasks LIMIT 1").fetchall())
            return
        raise StorageError(
            f"the history database {self.path} did not answer within {_PING_SECONDS:g} s "
            "(busy: another process may hold it locked)"
        )

    async def close(self) -> None:
        await self._run(lambda db: db.close())


def _costs(db: sqlite3.Connection, model: str, limit: int, now: datetime) -> list[float]:
    rows = db.execute(
        # Finished tasks only: a figure given while it is being made is no price.
        "SELECT cost FROM tasks WHERE model = ? AND cost IS NOT NULL AND status != 'pending' "
        "AND created_at > ? ORDER BY created_at DESC LIMIT ?",
        (model, _iso(now - COST_MEMORY), limit),
    ).fetchall()
    return [float(r[0]) for r in rows]


def _weigh(
    db: sqlite3.Connection,
    owner: str,
    budget: Budget,
    model: str,
    count: int,
    now: datetime,
    in_flight_since: datetime,
) -> Spending | None:
    """`weigh` the owner's spending in the budget's span, from the history and the ledger."""
    # Tasks as `charges` counts them by status; the ledger's creates not settled as created
    # ("unknown" ones may well have cost money) as on their way, or lost past the in-flight window.
    rows = db.execute(
        """SELECT created_at, cost, model, status FROM tasks
           WHERE owner = :owner AND created_at > :since
           UNION ALL
           SELECT made_at, NULL, model,
                  CASE WHEN state = 'sending' AND made_at >= :sent_since THEN 'pending' ELSE 'lost' END
           FROM creates WHERE owner = :owner AND made_at > :since AND state != 'created'""",
        {"owner": owner, "since": _iso(now - budget.span), "sent_since": _iso(in_flight_since)},
    ).fetchall()
    wanted = {of for _, cost, of, _ in rows if cost is None} | {model}
    estimates = {of: average(_costs(db, of, budget.samples, now)) for of in wanted}
    dearest = None
    if any(status == "lost" and estimates.get(of) is None for _, _, of, status in rows):
        found_max = db.execute(
            "SELECT max(cost) FROM tasks WHERE cost IS NOT NULL AND status != 'pending' AND created_at > ?",
            (_iso(now - COST_MEMORY),),
        ).fetchone()
        dearest = None if found_max is None or found_max[0] is None else float(found_max[0])
    found = charges(
        [(_moment(at), cost, of, status) for at, cost, of, status in rows], estimates, dearest=dearest
    )
    return weigh(budget, found, each=estimates[model], count=count)


def _put(db: sqlite3.Connection, record: TaskRecord) -> None:
    db.execute(
        """INSERT INTO tasks
               (task_id, owner, status, created_at, request_key, model,
                finished_after, finished_by, search_text, cost, record)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
           ON CONFLICT (owner, task_id) DO UPDATE SET
               status = excluded.status, finished_after = excluded.finished_after,
               finished_by = excluded.finished_by, search_text = excluded.search_text, cost = excluded.cost,
               record = excluded.record
           WHERE tasks.status != 'done' OR excluded.status = 'done'""",
        (
            record.task_id,
            record.owner,
            record.status,
            _iso(record.created_at),
            record.request_key,
            record.model,
            record.finished_after,
            record.finished_by,
            searchable(record.prompt),
            record.cost,
            record.model_dump_json(),
        ),
    )


def _oauth_item(db: sqlite3.Connection, kind: str, id: str, now: float) -> OAuthItem | None:
    row = db.execute(
        "SELECT grant_id, expires_at, body FROM oauth_items WHERE kind = ? AND id = ? AND expires_at > ?",
        (kind, id, now),
    ).fetchone()
    return None if row is None else OAuthItem(kind, id, row[0], float(row[1]), row[2])


def _immediately(db: sqlite3.Connection, fn: Callable[[sqlite3.Connection], _T]) -> _T:
    with immediate_transaction(db):
        return fn(db)


def _use_wal(db: sqlite3.Connection) -> None:
    """Switch the file to WAL mode. The switch needs the file to itself, and SQLite reports
    "locked" at once rather than waiting when another connection is switching it at the same
    moment (two servers starting together on one home): wait for that here."""
    deadline = time.monotonic() + _BUSY_SECONDS
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
