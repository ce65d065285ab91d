"""Searching the history: the page an answer comes in, the cursor that continues it, and the
search's own arguments as a front end receives them (text)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from ._exceptions import InputError
from ._records import TaskRecord, is_task_id, searchable
from ._store import Position, Search

#: Longer than any cursor `next_cursor` makes; anything longer is refused before it is decoded.
_MAX_CURSOR_CHARS = 200
_CURSOR_VERSION = 1
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class SearchPage:
    """Newest first; `cursor` continues after the last of them, None when no more match."""

    records: list[TaskRecord]
    cursor: str | None


def parse_since(text: str) -> datetime:
    """An ISO 8601 date or date and time, as UTC unless it names its offset ("Z" too, which
    Python reads only from 3.11 on). `InputError` naming `since` for anything else."""
    given = text.strip()
    try:
        moment = datetime.fromisoformat(given[:-1] + "+00:00" if given.endswith(("Z", "z")) else given)
        # In UTC now: a moment at the calendar's edge (year 1 or 9999) that has none fails here.
        return (moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)).astimezone(
            timezone.utc
        )
    except (ValueError, OverflowError):
        raise InputError(
            f"{text[:40]!r} is not an ISO date or date and time between the years 1 and 9999; write it "
            "as 2026-03-01, 2026-03-01T09:30 (UTC) or 2026-03-01T09:30+03:00",
            argument="since",
        ) from None


def scope(owner: str, search: Search) -> str:
    """What a cursor belongs to: one owner's one search. Equal searches (in any case) share it."""
    since = None if search.since is None else search.since.astimezone(timezone.utc).isoformat()
    model = None if search.model is None else search.model.lower()
    what = json.dumps([owner, searchable(search.text), model, search.status, since], ensure_ascii=False)
    return hashlib.sha256(what.encode()).hexdigest()[:16]


def next_cursor(last: TaskRecord, scope: str) -> str:
    """The cursor of the page after the one `last` ends, for the search `scope` names."""
    # The time in whole microseconds, as both stores keep it: a position is exact or useless.
    micros = (last.created_at - _EPOCH) // timedelta(microseconds=1)
    body = json.dumps([_CURSOR_VERSION, micros, last.task_id, scope], separators=(",", ":"))
    return base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")


def read_cursor(cursor: str, scope: str) -> Position:
    """Where the page `cursor` asks for begins. `InputError` naming `cursor` for one this server
    did not make, and for one of another search (or another user's): a position means nothing
    in a list it was not taken from."""
    try:
        if len(cursor) > _MAX_CURSOR_CHARS:
            raise ValueError("too long")
        padded = cursor + "=" * (-len(cursor) % 4)
        version, micros, task_id, made_for = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
        if version != _CURSOR_VERSION or type(micros) is not int or not is_task_id(task_id):
            raise ValueError("not ours")
        moment = _EPOCH + timedelta(microseconds=micros)
    except (ValueError, TypeError, UnicodeError, binascii.Error, OverflowError):
        raise InputError(
            f"{cursor[:40]!r} is not a cursor this server gave; pass a next_cursor exactly as a "
            "previous page returned it, or leave cursor out to start from the newest",
            argument="cursor",
        ) from None
    if made_for != scope:
        raise InputError(
            "this cursor belongs to another search: it continues only the search that returned it, "
            "with the same query, model, status and since. Repeat that search, or leave cursor out to "
            "start this one from the newest",
            argument="cursor",
        )
    return Position(moment, task_id)
