"""Bringing an embedded history into a shared one: every owner's tasks and the ledger of creates,
from a SQLite file into PostgreSQL (`gptunnel-mcp migrate`).

The copy can be repeated at will: a task is written only when the target lacks it or holds an
older version of it (and a done one is never replaced by one that is not), a ledger entry only
when it is new or has been settled since. So a copy that stopped half-way is finished by running
it again, and a second run writes nothing. The server secret goes too, as the users' owners
and the task handles are keyed by it. The image files are not copied: records name them by their
place in the images folder, which stays in the home.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from ._exceptions import ConfigError

if TYPE_CHECKING:
    from ._postgres import PostgresStore
    from ._sqlite import SQLiteStore

#: Rows read and written per round trip: large enough that round trips do not dominate, small
#: enough that a history of any size is never held in memory at once.
_BATCH = 500
_Row = TypeVar("_Row")


@dataclass(frozen=True)
class Transfer:
    """What a copy did: rows `read` from the source, and of those, how many it `copied` (the
    rest the target held already, in that version or a newer one)."""

    tasks_read: int = 0
    tasks_copied: int = 0
    ledger_read: int = 0
    ledger_copied: int = 0


async def copy_history(
    source: SQLiteStore, target: PostgresStore, *, legacy_secret: bytes | None = None
) -> Transfer:
    """Copy every task, of every owner, and every entry of the ledger from `source` to `target`.
    Tasks go in the order they were first stored, so tasks created in the same second keep their
    order in listings.

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
    tasks_read, tasks_copied = await _copy(source.task_rows, target.import_tasks)
    ledger_read, ledger_copied = await _copy(source.ledger_rows, target.import_ledger)
    return Transfer(tasks_read, tasks_copied, ledger_read, ledger_copied)


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
