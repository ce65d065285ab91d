"""The shared history: PostgreSQL, for several replicas of the server on one database.

psycopg 3 with its async pool: the engine is async, so calls wait on the database without
holding a thread, and the binary wheels need neither a compiler nor libpq's headers. Imported
only when GPTUNNEL_MCP_DATABASE_URL is set, so the driver is an optional dependency.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, TypeVar

import anyio
import anyio.lowlevel

from ._exceptions import ConfigError, StorageError
from ._migrations import POSTGRES_LATEST, POSTGRES_MIGRATIONS
from ._records import StoredFile, TaskRecord, TaskStatus, searchable
from ._settings import mask_password
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

try:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo
    from psycopg.rows import TupleRow
    from psycopg_pool import AsyncConnectionPool, PoolTimeout
except ImportError as exc:
    raise ConfigError(
        f"GPTUNNEL_MCP_DATABASE_URL names a PostgreSQL database, but its driver is missing ({exc}): "
        "install it with pip install 'gptunnel-mcp[postgres]'"
    ) from None

logger = logging.getLogger("gptunnel_mcp")
_T = TypeVar("_T")
Connection = psycopg.AsyncConnection[TupleRow]

#: Connections one replica keeps open at most: store calls take milliseconds, so more callers
#: than this queue briefly rather than cost the database a process each.
_POOL_SIZE = 10
#: How long to wait for the database to answer a connection, unless the URL says otherwise.
_CONNECT_SECONDS = 10
#: How long a call waits for a free connection, and a health check for its answer: store calls
#: take milliseconds, so a wait this long means the database is gone (or the replica far past
#: its capacity), and the caller is told so now rather than left hanging.
_WAIT_SECONDS = 2


def _lock_key(scope: str) -> int:
    """A key for `pg_advisory_xact_lock`: the same for `scope` on every replica, and unlikely to
    be another application's on the same database."""
    digest = hashlib.sha256(f"gptunnel-mcp:{scope}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


_MIGRATION_LOCK = _lock_key("migrate")
#: Where replicas tell each other of changed tasks.
_CHANNEL = "gptunnel_mcp_tasks"
_STATUSES: tuple[TaskStatus, ...] = ("pending", "done", "failed")
#: The longest a stop of the listener waits for its current wait to end.
_LISTEN_WAIT = 0.2


class PostgresStore:
    """`TaskStore` and `ImageShelf` on PostgreSQL. Every replica's `admit` for one owner runs
    under one advisory lock, so reuse and the caps are decided one call at a time across all of
    them."""

    def __init__(self, pool: AsyncConnectionPool[Connection], where: str) -> None:
        self._pool = pool
        self._where = where
        #: Names this store's notices, so that it does not hear its own.
        self._origin = secrets.token_hex(8)

    @classmethod
    async def open(cls, url: str) -> PostgresStore:
        """Connect, bring the schema up to date, and open the pool. Raises `StorageError` in one
        line naming the server (never the password) when it cannot be reached."""
        try:
            params = conninfo_to_dict(url)
        except psycopg.Error as exc:
            raise ConfigError(
                f"invalid GPTUNNEL_MCP_DATABASE_URL ({mask_password(url)}): {_one_line(exc)}"
            ) from None
        where, password = _describe(params), str(params.get("password") or "")
        if "connect_timeout" not in params:
            url = make_conninfo(url, connect_timeout=_CONNECT_SECONDS)
        try:
            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                await _migrate(conn, where)
        except psycopg.Error as exc:
            raise StorageError(
                f"cannot use the PostgreSQL database {where} ({_one_line(exc, password)}): check "
                "GPTUNNEL_MCP_DATABASE_URL, and that the database server is running and reachable"
            ) from None
        pool: AsyncConnectionPool[Connection] = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=_POOL_SIZE,
            open=False,
            kwargs={"autocommit": True},
            # A connection broken by a database restart is replaced before a call gets it.
            check=AsyncConnectionPool.check_connection,
            timeout=_CONNECT_SECONDS,
            name="gptunnel-mcp",
        )
        try:
            await pool.open(wait=True, timeout=_CONNECT_SECONDS)
        except psycopg.Error as exc:
            await pool.close()
            raise StorageError(
                f"cannot connect to the PostgreSQL database {where} ({_one_line(exc, password)})"
            ) from None
        return cls(pool, where)

    async def _run(self, fn: Callable[[Connection], Awaitable[_T]]) -> _T:
        try:
            async with self._pool.connection(timeout=_WAIT_SECONDS) as conn:
                return await fn(conn)
        except PoolTimeout:
            raise await self._unavailable() from None
        except psycopg.Error as exc:
            raise StorageError(f"the history database {self._where} failed: {_one_line(exc)}") from None

    async def _all(self, query: str, params: Sequence[Any] | Mapping[str, Any]) -> list[tuple[Any, ...]]:
        async def fetch(conn: Connection) -> list[tuple[Any, ...]]:
            return await (await conn.execute(query, params)).fetchall()

        return await self._run(fetch)

    async def put(self, record: TaskRecord) -> None:
        await self._run(lambda conn: _put(conn, record, self._origin))

    async def get(self, task_id: str, owner: str = "") -> TaskRecord | None:
        rows = await self._all(
            "SELECT record::text FROM tasks WHERE owner = %s AND task_id = %s",
            (_text(owner), _text(task_id.lower())),
        )
        return TaskRecord.model_validate_json(rows[0][0]) if rows else None

    async def done_anywhere(self, task_id: str) -> list[TaskRecord]:
        rows = await self._all(
            "SELECT record::text FROM tasks WHERE task_id = %s AND status = 'done'", (_text(task_id.lower()),)
        )
        return [TaskRecord.model_validate_json(r[0]) for r in rows]

    async def recent(self, owner: str = "", *, limit: int = 50, offset: int = 0) -> list[TaskRecord]:
        rows = await self._all(
            # seq breaks ties: GPTunnel's created_at counts whole seconds.
            "SELECT record::text FROM tasks WHERE owner = %s "
            "ORDER BY created_at DESC, seq DESC LIMIT %s OFFSET %s",
            (_text(owner), limit, offset),
        )
        return [TaskRecord.model_validate_json(r[0]) for r in rows]

    async def count(self, owner: str = "") -> int:
        rows = await self._all("SELECT count(*) FROM tasks WHERE owner = %s", (_text(owner),))
        return int(rows[0][0])

    async def search(
        self, owner: str, search: Search, *, after: Position | None = None, limit: int
    ) -> list[TaskRecord]:
        where: list[str] = ["owner = %s"]
        params: list[Any] = [_text(owner)]
        if search.text:
            where.append("strpos(search_text, %s) > 0")
            params.append(_text(searchable(search.text)))
        if search.model is not None:
            # Model ids are ASCII, which lower() folds in every locale.
            where.append("lower(model) = %s")
            params.append(_text(search.model.lower()))
        if search.status is not None:
            where.append("status = %s")
            params.append(search.status)
        if search.since is not None:
            where.append("created_at >= %s")
            params.append(_utc(search.since))
        if after is not None:
            where.append("(created_at, task_id) < (%s, %s)")
            params += [_utc(after.created_at), _text(after.task_id)]
        rows = await self._all(
            f"SELECT record::text FROM tasks WHERE {' AND '.join(where)} "  # noqa: S608 - clauses are ours
            "ORDER BY created_at DESC, task_id DESC LIMIT %s",
            (*params, limit),
        )
        return [TaskRecord.model_validate_json(r[0]) for r in rows]

    async def durations(self, model: str, *, limit: int) -> list[tuple[float | None, float]]:
        rows = await self._all(
            "SELECT finished_after, finished_by FROM tasks WHERE model = %s AND finished_by IS NOT NULL "
            "ORDER BY created_at DESC LIMIT %s",
            (_text(model), limit),
        )
        return [(None if r[0] is None else float(r[0]), float(r[1])) for r in rows]

    async def costs(self, model: str, *, limit: int, now: datetime) -> list[float]:
        return await self._run(lambda conn: _costs(conn, _text(model), limit, now))

    async def spent(self, owner: str, *, since: datetime) -> Spent:
        rows = await self._all(
            "SELECT count(*), count(cost), coalesce(sum(cost), 0) FROM tasks "
            "WHERE owner = %s AND created_at > %s",
            (_text(owner), _utc(since)),
        )
        return Spent(tasks=int(rows[0][0]), priced=int(rows[0][1]), cost=float(rows[0][2]))

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
        owner, keys, model = _text(owner), [_text(key) for key in request_keys], _text(model)

        async def reuse(conn: Connection, key: str, since: datetime) -> Admission | None:
            # One statement, so one snapshot: a create another replica settles meanwhile is seen
            # whole (its task and its ticket no longer sending) or not at all.
            cursor = await conn.execute(
                """SELECT
                     (SELECT record::text FROM tasks WHERE owner = %(owner)s AND request_key = %(key)s
                        AND (status = 'pending' OR (status = 'done' AND created_at >= %(since)s))
                      ORDER BY created_at DESC, seq DESC LIMIT 1),
                     EXISTS (SELECT 1 FROM creates WHERE owner = %(owner)s AND request_key = %(key)s
                        AND state = 'sending' AND made_at >= %(sent_since)s)""",
                {"owner": owner, "key": key, "since": _utc(since), "sent_since": _utc(in_flight_since)},
            )
            found, sending = await cursor.fetchone() or (None, False)
            earlier = None if found is None else TaskRecord.model_validate_json(found)
            if earlier is not None and not _lost(earlier, now):
                return Admission(reuse=earlier)
            return Admission(in_flight=True) if sending else None

        async def decide(conn: Connection) -> list[Admission]:
            async with conn.transaction():
                # Before anything is read: the owner's admits, on every replica, queue here, and
                # each statement below sees the tickets of those that went before.
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(f"admit:{owner}"),))
                found: dict[str, Admission | None] = {}
                if reuse_since is not None:
                    for key in keys:
                        found[key] = await reuse(conn, key, reuse_since)
                if any(a is not None and a.in_flight for a in found.values()):
                    return [Admission(in_flight=True)] * len(keys)
                new = [key for key in keys if found.get(key) is None]
                for cap in caps:
                    if not new:
                        break
                    cursor = await conn.execute(
                        "SELECT made_at FROM creates WHERE owner = %s AND made_at > %s ORDER BY made_at",
                        (owner, _utc(now - cap.span)),
                    )
                    made = [row[0].astimezone(timezone.utc) for row in await cursor.fetchall()]
                    refusal = cap_refusal(cap, made, len(new))
                    if refusal is not None:
                        return [refusal] * len(keys)
                if new and budget is not None:
                    spending = await _weigh(conn, owner, budget, model, len(new), now, in_flight_since)
                    if spending is not None:
                        return [Admission(spending=spending)] * len(keys)
                tickets = {key: secrets.token_hex(16) for key in new}
                async with conn.cursor() as cursor:
                    await cursor.executemany(
                        """INSERT INTO creates (ticket, owner, request_key, made_at, state, model)
                           VALUES (%s, %s, %s, %s, 'sending', %s)""",
                        [(ticket, owner, key, _utc(now), model) for key, ticket in tickets.items()],
                    )
                return [found.get(key) or Admission(ticket=tickets[key]) for key in keys]

        return await self._run(decide)

    async def settle(self, ticket: str, outcome: Settlement, record: TaskRecord | None = None) -> None:
        async def close(conn: Connection) -> None:
            async with conn.transaction():
                if outcome == "refused":
                    await conn.execute("DELETE FROM creates WHERE ticket = %s", (ticket,))
                    return
                if record is not None:
                    await _put(conn, record, self._origin)
                await conn.execute(
                    "UPDATE creates SET state = %s, task_id = %s WHERE ticket = %s",
                    (outcome, None if record is None else _text(record.task_id), ticket),
                )

        await self._run(close)

    async def claim(self, task_id: str, owner: str, holder: str, *, seconds: float) -> Claim | None:
        # One statement: the outer SELECT reads the row as it was before the UPDATE, whose
        # lease columns it does not return anyway. The database's clock, not the replicas'.
        rows = await self._all(
            """WITH took AS (
                   UPDATE tasks SET lease_holder = %(holder)s,
                          lease_until = now() + %(seconds)s * interval '1 second'
                   WHERE owner = %(owner)s AND task_id = %(task)s AND status = 'pending'
                   AND (lease_holder IS NULL OR lease_holder = %(holder)s OR lease_until < now())
                   RETURNING 1)
               SELECT record::text, EXISTS (SELECT 1 FROM took) FROM tasks
               WHERE owner = %(owner)s AND task_id = %(task)s""",
            {"holder": holder, "seconds": seconds, "owner": _text(owner), "task": _text(task_id.lower())},
        )
        return Claim(TaskRecord.model_validate_json(rows[0][0]), bool(rows[0][1])) if rows else None

    async def leases(
        self, holder: str, *, seconds: float, adopt: int, owners: Sequence[str], made_since: datetime
    ) -> list[TaskRecord]:
        # One statement: the holder's own tasks first, then as many orphans as `adopt` allows.
        # SKIP LOCKED: two replicas adopting at once split the orphans rather than queue.
        rows = await self._all(
            """UPDATE tasks SET lease_holder = %(holder)s,
                      lease_until = now() + %(seconds)s * interval '1 second'
               WHERE (owner, task_id) IN (
                   SELECT owner, task_id FROM tasks
                   WHERE status = 'pending' AND record->>'cancelled_at' IS NULL AND created_at >= %(since)s
                   AND (lease_holder = %(holder)s
                        OR (owner = ANY(%(owners)s) AND (lease_holder IS NULL OR lease_until < now())))
                   ORDER BY lease_holder IS NOT DISTINCT FROM %(holder)s DESC, created_at
                   LIMIT (SELECT count(*) FROM tasks WHERE lease_holder = %(holder)s AND status = 'pending')
                         + %(adopt)s
                   FOR UPDATE SKIP LOCKED)
               RETURNING record::text""",
            {
                "holder": holder,
                "seconds": seconds,
                "since": _utc(made_since),
                "owners": [_text(owner) for owner in owners],
                "adopt": adopt,
            },
        )
        return [TaskRecord.model_validate_json(r[0]) for r in rows]

    async def keep_key(self, owner: str, sealed: bytes) -> None:
        await self._run(
            lambda conn: conn.execute(
                """INSERT INTO sealed_keys (owner, sealed) VALUES (%s, %s)
                   ON CONFLICT (owner) DO UPDATE SET sealed = excluded.sealed, kept_at = now()""",
                (_text(owner), sealed),
            )
        )

    async def sealed_keys(self) -> dict[str, bytes]:
        rows = await self._all("SELECT owner, sealed FROM sealed_keys", ())
        return {row[0]: bytes(row[1]) for row in rows}

    async def oauth_put(self, item: OAuthItem) -> None:
        await self._run(
            lambda conn: conn.execute(
                """INSERT INTO oauth_items (kind, id, grant_id, expires_at, body) VALUES (%s, %s, %s, %s, %s)
                   ON CONFLICT (kind, id) DO UPDATE SET grant_id = excluded.grant_id,
                       expires_at = excluded.expires_at, body = excluded.body""",
                (item.kind, _text(item.id), item.grant, item.expires_at, _text(item.body)),
            )
        )

    async def oauth_get(self, kind: str, id: str, *, now: float) -> OAuthItem | None:
        rows = await self._all(
            "SELECT grant_id, expires_at, body FROM oauth_items "
            "WHERE kind = %s AND id = %s AND expires_at > %s",
            (kind, _text(id), now),
        )
        return OAuthItem(kind, id, rows[0][0], float(rows[0][1]), rows[0][2]) if rows else None

    async def oauth_spend(self, kind: str, id: str, *, now: float) -> OAuthItem | None:
        # One statement: of two replicas spending at once, the second finds the kind changed.
        rows = await self._all(
            """UPDATE oauth_items SET kind = 'spent' WHERE kind = %s AND id = %s AND expires_at > %s
               RETURNING grant_id, expires_at, body""",
            (kind, _text(id), now),
        )
        return OAuthItem(kind, id, rows[0][0], float(rows[0][1]), rows[0][2]) if rows else None

    async def oauth_drop(self, grant: str, kinds: Sequence[str] | None = None) -> None:
        if kinds is None:
            await self._run(
                lambda conn: conn.execute("DELETE FROM oauth_items WHERE grant_id = %s", (grant,))
            )
            return
        await self._run(
            lambda conn: conn.execute(
                "DELETE FROM oauth_items WHERE grant_id = %s AND kind = ANY(%s)", (grant, list(kinds))
            )
        )

    async def oauth_sweep(self, *, now: float) -> None:
        await self._run(lambda conn: conn.execute("DELETE FROM oauth_items WHERE expires_at <= %s", (now,)))

    async def listen(self, heard: Callable[[str, str, TaskStatus], Awaitable[None]]) -> None:
        url = self._pool.conninfo
        assert isinstance(url, str)  # `open` gives the pool its URL as text
        pause = 1.0
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                    with anyio.CancelScope(shield=True):
                        await conn.execute(f"LISTEN {_CHANNEL}")
                    pause = 1.0
                    while True:
                        # Shielded, as every statement here, in short waits: cancelled mid-way,
                        # psycopg gives up the connection with a warning. Cancellation is
                        # noticed between waits.
                        with anyio.CancelScope(shield=True):
                            async for notice in conn.notifies(timeout=_LISTEN_WAIT):
                                change = _change(notice.payload)
                                if change is not None and change[0] != self._origin:
                                    await heard(*change[1:])
                        await anyio.lowlevel.checkpoint()
            except psycopg.Error as exc:
                # Meanwhile waiters learn of changes by reading again, as on SQLite.
                logger.warning(
                    "not hearing other replicas' changes (%s); retrying in %.0f s", _one_line(exc), pause
                )
            await anyio.sleep(pause)
            pause = min(pause * 2, 30.0)

    async def keep_image(self, stored: StoredFile, data: bytes) -> None:
        async def keep(conn: Connection) -> None:
            # Asked first so that bytes kept already (another replica's download, a second
            # migrate) do not cross the network again just to be dropped by the insert.
            known = "SELECT 1 FROM images WHERE sha256 = %s"
            if await (await conn.execute(known, (stored.sha256,))).fetchone() is not None:
                return
            await conn.execute(
                """INSERT INTO images (sha256, mime_type, size_bytes, data) VALUES (%s, %s, %s, %s)
                   ON CONFLICT (sha256) DO NOTHING""",
                (stored.sha256, _text(stored.mime_type), len(data), data),
            )

        await self._run(keep)

    async def image_bytes(self, sha256: str) -> bytes | None:
        rows = await self._all("SELECT data FROM images WHERE sha256 = %s", (_text(sha256),))
        return bytes(rows[0][0]) if rows else None

    async def import_tasks(self, records: Sequence[TaskRecord]) -> int:
        """Take in tasks another store kept (`migrate`), as one transaction; how many were new
        or changed. A task already here is replaced only by a newer version of itself (by its
        `updated_at`), and, as `put` does, a done one only by a done one, except that a done
        version always replaces one that is not: copying twice writes nothing twice, and never
        undoes work the replicas did meanwhile."""

        async def take(conn: Connection) -> int:
            async with conn.transaction(), conn.cursor() as cursor:
                await cursor.executemany(
                    _UPSERT_TASK
                    + """(excluded.status = 'done' AND tasks.status <> 'done')
                          OR ((tasks.status <> 'done' OR excluded.status = 'done')
                              AND (excluded.record->>'updated_at')::timestamptz
                                  > (tasks.record->>'updated_at')::timestamptz)""",
                    [_row(record) for record in records],
                )
                return max(cursor.rowcount, 0)

        return await self._run(take)

    async def import_ledger(self, entries: Sequence[LedgerEntry]) -> int:
        """Take in another store's ledger of creates (`migrate`), so that the caps count them;
        how many entries were new or newly settled. An entry is known by its ticket: one copied
        while its create was on its way takes the outcome when copied again."""

        async def take(conn: Connection) -> int:
            async with conn.transaction(), conn.cursor() as cursor:
                await cursor.executemany(
                    """INSERT INTO creates (ticket, owner, request_key, made_at, state, task_id, model)
                       VALUES (%s, %s, %s, %s, %s, %s, %s)
                       ON CONFLICT (ticket) DO UPDATE SET state = excluded.state, task_id = excluded.task_id
                       WHERE creates.state = 'sending' AND excluded.state <> 'sending'""",
                    [
                        (
                            _text(entry.ticket),
                            _text(entry.owner),
                            _text(entry.request_key),
                            _utc(entry.made_at),
                            entry.state,
                            None if entry.task_id is None else _text(entry.task_id),
                            _text(entry.model),
                        )
                        for entry in entries
                    ],
                )
                return max(cursor.rowcount, 0)

        return await self._run(take)

    async def server_secret(self, adopt: bytes | None = None) -> bytes:
        async def read(conn: Connection) -> bytes | None:
            row = await (await conn.execute("SELECT value FROM server_state WHERE key = 'secret'")).fetchone()
            return None if row is None else bytes.fromhex(row[0])

        async def make(conn: Connection) -> bytes:
            # Autocommit, two statements: the insert waits for a replica inserting at the same
            # moment and then does nothing, and the select, with a snapshot of its own, sees the
            # secret that won.
            await conn.execute(
                "INSERT INTO server_state (key, value) VALUES ('secret', %s) ON CONFLICT (key) DO NOTHING",
                ((adopt or secrets.token_bytes(32)).hex(),),
            )
            found = await read(conn)
            assert found is not None
            return found

        found = await self._run(read)
        return found if found is not None else await self._run(make)

    async def ping(self) -> None:
        # Through the pool, as the work goes: a database that answers is not enough while this
        # replica's pool has no connection to it.
        try:
            with anyio.fail_after(_WAIT_SECONDS):
                async with self._pool.connection(timeout=_WAIT_SECONDS) as conn:
                    await conn.execute("SELECT 1")
        except (psycopg.Error, TimeoutError):
            raise await self._unavailable() from None

    async def _unavailable(self) -> StorageError:
        """Why no connection came in time, in the database's own words: the pool says only that
        it waited. Asked on a connection of its own, within `_WAIT_SECONDS`."""
        url = self._pool.conninfo
        assert isinstance(url, str)  # `open` gives the pool its URL as text
        password = str(conninfo_to_dict(url).get("password") or "")
        try:
            with anyio.fail_after(_WAIT_SECONDS):
                await (await psycopg.AsyncConnection.connect(url)).close()
        except psycopg.Error as exc:
            reason = _one_line(exc, password)
        except TimeoutError:
            reason = f"no answer within {_WAIT_SECONDS} s"
        else:
            return StorageError(
                f"the history database {self._where} answers, but none of this server's connections "
                f"to it was free within {_WAIT_SECONDS} s (too many calls at once, or reconnecting "
                "after an outage): try again shortly"
            )
        return StorageError(f"the history database {self._where} is unavailable ({reason})")

    async def close(self) -> None:
        await self._pool.close()


async def _costs(conn: Connection, model: str, limit: int, now: datetime) -> list[float]:
    cursor = await conn.execute(
        # Finished tasks only: a figure given while it is being made is no price.
        "SELECT cost FROM tasks WHERE model = %s AND cost IS NOT NULL AND status <> 'pending' "
        "AND created_at > %s ORDER BY created_at DESC LIMIT %s",
        (model, _utc(now - COST_MEMORY), limit),
    )
    return [float(r[0]) for r in await cursor.fetchall()]


async def _weigh(
    conn: Connection,
    owner: str,
    budget: Budget,
    model: str,
    count: int,
    now: datetime,
    in_flight_since: datetime,
) -> Spending | None:
    """`weigh` the owner's spending in the budget's span, from the history and the ledger."""
    # Tasks as `charges` counts them by status; the ledger's creates not settled as created
    # ("unknown" ones may well have cost money) as on their way, or lost past the in-flight
    # window. One statement, so one snapshot: a create settled meanwhile is seen as its task or
    # its ticket, never as neither.
    cursor = await conn.execute(
        """SELECT created_at, cost, model, status FROM tasks
           WHERE owner = %(owner)s AND created_at > %(since)s
           UNION ALL
           SELECT made_at, NULL, model,
                  CASE WHEN state = 'sending' AND made_at >= %(sent_since)s THEN 'pending' ELSE 'lost' END
           FROM creates WHERE owner = %(owner)s AND made_at > %(since)s AND state <> 'created'""",
        {"owner": owner, "since": _utc(now - budget.span), "sent_since": _utc(in_flight_since)},
    )
    rows = await cursor.fetchall()
    wanted = {of for _, cost, of, _ in rows if cost is None} | {model}
    estimates = {of: average(await _costs(conn, of, budget.samples, now)) for of in wanted}
    dearest = None
    if any(status == "lost" and estimates.get(of) is None for _, _, of, status in rows):
        found_max = await (
            await conn.execute(
                "SELECT max(cost) FROM tasks "
                "WHERE cost IS NOT NULL AND status <> 'pending' AND created_at > %s",
                (_utc(now - COST_MEMORY),),
            )
        ).fetchone()
        dearest = None if found_max is None or found_max[0] is None else float(found_max[0])
    found = charges(
        [(_utc(at), cost, of, status) for at, cost, of, status in rows], estimates, dearest=dearest
    )
    return weigh(budget, found, each=estimates[model], count=count)


#: Insert a task, or update it where the condition appended after WHERE allows.
_UPSERT_TASK = """INSERT INTO tasks
       (task_id, owner, status, created_at, request_key, model, finished_after, finished_by,
        search_text, cost, record)
   VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb)
   ON CONFLICT (owner, task_id) DO UPDATE SET
       status = excluded.status, finished_after = excluded.finished_after,
       finished_by = excluded.finished_by, search_text = excluded.search_text, cost = excluded.cost,
       record = excluded.record
   WHERE """


#: A done task is replaced only by a done one, so that two processes finishing one task in a
#: different order cannot undo each other's work.
_PUT_TASK = (
    "WITH written AS ("  # noqa: S608 - this module's own constants, no input
    + _UPSERT_TASK
    + "tasks.status <> 'done' OR excluded.status = 'done' RETURNING 1) SELECT pg_notify(%s, %s) FROM written"
)


async def _put(conn: Connection, record: TaskRecord, origin: str) -> None:
    """Store `record` and tell the other replicas, in one statement: the notice goes out only if
    the row was written, and only when the transaction commits."""
    notice = json.dumps([origin, record.owner, record.task_id, record.status])
    await conn.execute(_PUT_TASK, (*_row(record), _CHANNEL, notice))


def _row(record: TaskRecord) -> tuple[Any, ...]:
    """`record` as the columns of `tasks`, in their order there."""
    return (
        _text(record.task_id),
        _text(record.owner),
        record.status,
        _utc(record.created_at),
        _text(record.request_key),
        _text(record.model),
        record.finished_after,
        record.finished_by,
        _text(searchable(record.prompt)),
        record.cost,
        _json(record),
    )


async def _migrate(conn: Connection, where: str) -> None:
    """Bring the schema to `POSTGRES_LATEST`, all pending migrations in one transaction, under an
    advisory lock: of several replicas starting together, one migrates and the others then find
    nothing left to do."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_version (
                   version    integer PRIMARY KEY,
                   applied_at timestamptz NOT NULL DEFAULT now()
               )"""
        )
        row = await (await conn.execute("SELECT max(version) FROM schema_version")).fetchone()
        stored = int(row[0]) if row and row[0] is not None else 0
        if stored > POSTGRES_LATEST:
            raise StorageError(
                f"the history in the PostgreSQL database {where} was written by a newer gptunnel-mcp "
                f"(schema {stored}; this version reads up to {POSTGRES_LATEST}): upgrade gptunnel-mcp"
            )
        for version, steps in enumerate(POSTGRES_MIGRATIONS[stored:], start=stored + 1):
            for step in steps:
                if isinstance(step, str):
                    await conn.execute(step)
                else:
                    await step(conn)
            await conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))


def _change(payload: str) -> tuple[str, str, str, TaskStatus] | None:
    """A notice `_put` sent: (origin, owner, task id, status). Anyone who may connect can NOTIFY
    on the channel, so anything else is ignored."""
    try:
        origin, owner, task_id, status = json.loads(payload)
    except (ValueError, TypeError):
        return None
    if not all(isinstance(value, str) for value in (origin, owner, task_id)) or status not in _STATUSES:
        return None
    return origin, owner, task_id, status


def _lost(record: TaskRecord, now: datetime) -> bool:
    """A pending task whose link expired before its download is no answer to anyone."""
    expires = record.source_url_expires_at
    return record.status == "pending" and expires is not None and expires < now


def _describe(params: dict[str, Any]) -> str:
    """The database as a person would name it: its name and where it is, without credentials."""
    hosts = str(params.get("host") or os.environ.get("PGHOST") or "localhost").split(",")
    ports = str(params.get("port") or os.environ.get("PGPORT") or "5432").split(",")
    ports += ports[-1:] * (len(hosts) - len(ports))
    places = ", ".join(
        f"{host}" if host.startswith("/") else f"{host}:{port}"
        for host, port in zip(hosts, ports, strict=False)
    )
    name = params.get("dbname") or params.get("user") or os.environ.get("PGDATABASE") or "postgres"
    return f"{name!r} at {places}"


def _one_line(exc: Exception, password: str = "") -> str:
    """The driver's message on one line, without the password were it ever quoted."""
    text = " ".join(str(exc).split())
    if password:
        text = text.replace(password, "***")
    return text[:500]


def _utc(moment: datetime) -> datetime:
    # A naive time is local, as `_sqlite` takes it.
    return moment.astimezone(timezone.utc)


def _text(value: str) -> str:
    """PostgreSQL text cannot hold NUL: a NUL a caller or GPTunnel sent is kept as U+FFFD."""
    return value.replace("\x00", "\ufffd")


#: `\u0000` in JSON text, not preceded by an escaped backslash (which would make it plain text).
_JSON_NUL = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")


def _json(record: TaskRecord) -> str:
    # jsonb refuses the escape `\u0000` for the same reason.
    return _JSON_NUL.sub(r"\1\\ufffd", record.model_dump_json())
