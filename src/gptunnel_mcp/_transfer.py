"""Bringing an embedded history into a shared one: every owner's tasks and the ledger of creates,
from a SQLite file into PostgreSQL (`gptunnel-mcp migrate`).

The copy can be repeated at will: a task is written only when the target lacks it or holds an
older version of it (and a done one is never replaced by one that is not), a ledger entry only
when it is new or has been settled since. So a copy that stopped half-way is finished by running
it again, and a second run writes nothing. The server secret goes too, as the users' owners
and the task handles are keyed by it, and the images of the done tasks, so that every replica
serves them (each replica's home is then only a cache of them).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import anyio

from ._exceptions import ConfigError
from ._records import TaskRecord

if TYPE_CHECKING:
    from ._files import ImageFolder
    from ._postgres import PostgresStore
    from ._sqlite import SQLiteStore

#: Rows read and written per round trip: large enough that round trips do not dominate, small
#: enough that a history of any size is never held in memory at once.
_BATCH = 500
_Row = TypeVar("_Row")


@dataclass(frozen=True)
class Transfer:
    """What a copy did: rows `read` from the source, and of those, how many it `copied` (the
    rest the target held already, in that version or a newer one). Of the done tasks' images,
    `images_kept` are on the target now (copied, or there already), `images_missing` were not in
    the images folder as recorded (deleted, or damaged)."""

    tasks_read: int = 0
    tasks_copied: int = 0
    ledger_read: int = 0
    ledger_copied: int = 0
    images_kept: int = 0
    images_missing: int = 0


async def copy_history(
    source: SQLiteStore, target: PostgresStore, images: ImageFolder, *, legacy_secret: bytes | None = None
) -> Transfer:
    """Copy every task, of every owner, and every entry of the ledger from `source` to `target`,
    and the image of every done task from `images`. Tasks go in the order they were first
    stored, so tasks created in the same second keep their order in listings.

    First the server secret: `target` takes `source`'s (which takes `legacy_secret`, the file an
    earlier build kept, if it has none), unless it holds one already. Then the users' tasks
    would be filed under owners no key leads to: `ConfigError`, before anything is copied."""
    secret = await source.server_secret(legacy_secret)
    if await target.server_secret(secret) != secret and await source.has_users():
        raise ConfigError(
            "the PostgreSQL database already holds a server secret of its own (a server started on "
            "it before the copy made one), and the users' tasks here are filed under this history's "
            "secret: on the database their keys would not find them. Nothing was copied: copy into a "
            "database no server has used yet, before starting the replicas on it"
        )
    kept = missing = 0

    async def import_tasks(records: list[TaskRecord]) -> int:
        # A page's images before its tasks: a replica that finds a copied task done finds its image.
        nonlocal kept, missing
        for stored in (record.file for record in records if record.status == "done" and record.file):
            data = await anyio.to_thread.run_sync(images.read_bytes, stored)
            if data is None:
                missing += 1
                continue
            await target.keep_image(stored, data)
            kept += 1
        return await target.import_tasks(records)

    tasks_read, tasks_copied = await _copy(source.task_rows, import_tasks)
    ledger_read, ledger_copied = await _copy(source.ledger_rows, target.import_ledger)
    return Transfer(tasks_read, tasks_copied, ledger_read, ledger_copied, kept, missing)


async def _copy(
    read: Callable[..., Awaitable[list[tuple[int, _Row]]]], write: Callable[[list[_Row]], Awaitable[int]]
) -> tuple[int, int]:
    """Page through the source's rows in order of their position (`after` the last one read), and
    write each page: how many rows were read, and how many of them written."""
    read_count = written = after = 0
    while rows := await read(after=after, limit=_BATCH):
        written += await write([row for _, row in rows])
        read_count += len(rows)
        after = rows[-1][0]
    return read_count, written
