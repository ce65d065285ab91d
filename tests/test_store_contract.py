"""The `TaskStore` contract, held by both backends alike: SQLite on a file, and PostgreSQL (a real
server, a fresh database per test). Two store objects on one database are two replicas. Then the
PostgreSQL backend as a server uses it, and what it says when it cannot be used."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
from mcp import Client
from mcp_types import CallToolResult

from gptunnel_mcp import load_settings
from gptunnel_mcp._exceptions import ConfigError, StorageError
from gptunnel_mcp._migrations import POSTGRES_LATEST, POSTGRES_MIGRATIONS
from gptunnel_mcp._postgres import PostgresStore
from gptunnel_mcp._records import TaskRecord
from gptunnel_mcp._sqlite import SQLiteStore
from gptunnel_mcp._store import (
    Admission,
    Budget,
    Cap,
    OAuthItem,
    OAuthRecords,
    Position,
    Search,
    Spending,
    Spent,
    TaskStore,
)
from gptunnel_mcp._wiring import open_store

from .conftest import API_KEY, ServerLauncher, environment, structured, text_of
from .processes import free_port
from .standin import StandIn

pytestmark = pytest.mark.anyio

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
HOUR = Cap(limit=3, span=timedelta(hours=1), unit="hour", setting="GPTUNNEL_MAX_IMAGES_PER_HOUR")
DAY = Cap(limit=4, span=timedelta(days=1), unit="day", setting="GPTUNNEL_MAX_IMAGES_PER_DAY")
#: 10 roubles a day; a model's estimate is the average of its newest 3 recorded costs.
BUDGET = Budget(limit=10.0, span=timedelta(days=1), setting="GPTUNNEL_MAX_SPEND_PER_DAY", samples=3)


class Backend:
    """Opens stores on one database: each `open()` is another replica."""

    def __init__(self, name: str, make: Callable[[], Awaitable[TaskStore]]) -> None:
        self.name = name
        self._make = make

    @asynccontextmanager
    async def open(self) -> AsyncIterator[TaskStore]:
        store = await self._make()
        try:
            yield store
        finally:
            await store.close()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":

        async def sqlite() -> TaskStore:
            return SQLiteStore(tmp_path / "history.sqlite3")

        return Backend("sqlite", sqlite)
    url: str = request.getfixturevalue("postgres_url")
    return Backend("postgres", lambda: PostgresStore.open(url))


def task(n: int, **fields: Any) -> TaskRecord:
    values: dict[str, Any] = {
        "task_id": f"{n:024x}",
        "model": "gpt-image-1-low",
        "prompt": f"prompt {n}",
        "created_at": T0,
        "updated_at": T0,
        **fields,
    }
    return TaskRecord(**values)


async def admit_all(
    store: TaskStore,
    keys: list[str],
    *,
    owner: str = "",
    now: datetime = T0,
    reuse_window: timedelta | None = timedelta(minutes=10),
    in_flight_for: timedelta = timedelta(minutes=2),
    caps: tuple[Cap, ...] = (),
    budget: Budget | None = None,
    model: str = "gpt-image-1-low",
) -> list[Admission]:
    return await store.admit(
        owner,
        keys,
        now=now,
        reuse_since=None if reuse_window is None else now - reuse_window,
        in_flight_since=now - in_flight_for,
        caps=caps,
        budget=budget,
        model=model,
    )


async def admit(store: TaskStore, key: str = "k", **options: Any) -> Admission:
    """One create's admission, as a call for one image asks."""
    (admission,) = await admit_all(store, [key], **options)
    return admission


async def created(store: TaskStore, record: TaskRecord, *, now: datetime | None = None) -> None:
    """`record`'s request admitted at `now` and its create settled: the way a task enters."""
    admission = await admit(store, record.request_key, owner=record.owner, now=now or record.created_at)
    assert admission.ticket is not None, admission
    await store.settle(admission.ticket, "created", record)


# --- history ----------------------------------------------------------------------------------


async def test_put_and_get_are_scoped_by_owner(backend: Backend) -> None:
    async with backend.open() as store:
        await store.put(task(1, prompt="mine"))
        await store.put(task(1, owner="alice", prompt="alice's"))
        mine, hers = await store.get(f"{1:024X}"), await store.get(f"{1:024x}", "alice")
        assert mine is not None and mine.prompt == "mine" and mine.owner == ""
        assert hers is not None and hers.prompt == "alice's"
        assert await store.get(f"{1:024x}", "bob") is None
        assert await store.get(f"{2:024x}") is None
    async with backend.open() as reopened:
        assert await reopened.get(f"{1:024x}", "alice") == hers


async def test_recent_is_newest_first_in_pages_and_count_is_per_owner(backend: Backend) -> None:
    async with backend.open() as store:
        # 2 and 3 in the same second: the later written comes first.
        for n, second in ((1, 0), (2, 5), (3, 5), (4, 9)):
            await store.put(task(n, created_at=T0 + timedelta(seconds=second)))
        await store.put(task(9, owner="alice", created_at=T0 + timedelta(hours=1)))
        assert [r.task_id[-1] for r in await store.recent()] == ["4", "3", "2", "1"]
        assert [r.task_id[-1] for r in await store.recent(limit=2, offset=1)] == ["3", "2"]
        assert await store.recent(offset=4) == []
        # An update keeps a task's place.
        await store.put(task(2, created_at=T0 + timedelta(seconds=5), status="done"))
        assert [r.task_id[-1] for r in await store.recent()] == ["4", "3", "2", "1"]
        assert (await store.count(), await store.count("alice"), await store.count("bob")) == (4, 1, 0)
        assert [r.task_id[-1] for r in await store.recent("alice")] == ["9"]


async def test_done_is_never_overwritten_by_a_not_done_write(backend: Backend) -> None:
    async with backend.open() as store:
        await store.put(task(1, upstream_status="processing"))
        await store.put(task(1, upstream_status="queued"))
        assert (await store.get(f"{1:024x}")).upstream_status == "queued"  # type: ignore[union-attr]
        await store.put(task(1, status="done", source_url="https://x.test/1.png"))
        await store.put(task(1, status="pending", upstream_status="processing"))
        await store.put(task(1, status="failed", error="late"))
        kept = await store.get(f"{1:024x}")
        assert kept is not None and kept.status == "done" and kept.source_url == "https://x.test/1.png"
        await store.put(task(1, status="done", source_url="https://x.test/again.png"))
        assert (await store.get(f"{1:024x}")).source_url == "https://x.test/again.png"  # type: ignore[union-attr]


async def test_durations_are_the_models_newest_of_any_owner(backend: Backend) -> None:
    async with backend.open() as store:
        await store.put(task(1, finished_after=None, finished_by=10.0))
        await store.put(task(2, owner="alice", created_at=T0 + timedelta(minutes=1), finished_by=12.5))
        await store.put(task(3, created_at=T0 + timedelta(minutes=2), finished_after=8.0, finished_by=9.0))
        await store.put(task(4, created_at=T0 + timedelta(minutes=3)))  # not finished
        await store.put(task(5, model="flux", created_at=T0 + timedelta(minutes=4), finished_by=3.0))
        assert await store.durations("gpt-image-1-low", limit=10) == [(8.0, 9.0), (None, 12.5), (None, 10.0)]
        assert await store.durations("gpt-image-1-low", limit=1) == [(8.0, 9.0)]
        assert await store.durations("flux", limit=10) == [(None, 3.0)]
        assert await store.durations("nobody's", limit=10) == []


async def test_text_with_nul_characters_is_stored(backend: Backend) -> None:
    # PostgreSQL's text cannot hold NUL: it keeps U+FFFD in its place; SQLite keeps the NUL.
    async with backend.open() as store:
        await store.put(task(1, prompt="a\x00b", model="m\x00", error='\\u0000 and "\x00"'))
        kept = await store.get(f"{1:024x}")
        assert kept is not None
        nul = "\x00" if backend.name == "sqlite" else "\ufffd"
        assert (kept.prompt, kept.model, kept.error) == (f"a{nul}b", f"m{nul}", f'\\u0000 and "{nul}"')


async def found(store: TaskStore, owner: str = "", *, limit: int = 50, **search: Any) -> list[int]:
    """The numbers (as `task` gives them) of the tasks a search finds, in its order."""
    return [int(r.task_id, 16) for r in await store.search(owner, Search(**search), limit=limit)]


async def test_search_finds_text_in_any_case_and_script_newest_first(backend: Backend) -> None:
    prompts = ["лиса в снегу", "ЛИСА на траве", "A red Fox", "ёлка в лесу", "Straße", "wolf"]
    async with backend.open() as store:
        for n, prompt in enumerate(prompts, start=1):
            await store.put(task(n, prompt=prompt, created_at=T0 + timedelta(minutes=n)))
        await store.put(task(9, owner="alice", prompt="лиса alice", created_at=T0 + timedelta(hours=1)))
        assert await found(store, text="Лиса") == [2, 1]
        assert await found(store, text="лИСА НА") == [2]
        assert await found(store, text="fox") == await found(store, text="FOX") == [3]
        # Russian writers use е for ё, and the other way round.
        assert await found(store, text="елка") == await found(store, text="Ёлка") == [4]
        assert await found(store, text="STRASSE") == [5]
        assert await found(store, text="лиса в снегу!") == []
        assert await found(store) == [6, 5, 4, 3, 2, 1]
        # Another owner's tasks are never found, whatever the search.
        assert await found(store, "alice", text="лиса") == [9]
        assert await found(store, "bob") == []


async def test_search_takes_wildcards_and_escapes_literally(backend: Backend) -> None:
    prompts = ["100% cotton", "100 percent", "snake_case", "snakeXcase", r"C:\path", "a'b\"c"]
    async with backend.open() as store:
        for n, prompt in enumerate(prompts, start=1):
            await store.put(task(n, prompt=prompt, created_at=T0 + timedelta(minutes=n)))
        assert await found(store, text="%") == [1]
        assert await found(store, text="0%") == [1]
        assert await found(store, text="_") == [3]
        assert await found(store, text="e_c") == [3]
        assert await found(store, text="\\") == [5]
        assert await found(store, text="'b\"") == [6]


async def test_search_filters_by_model_status_and_time(backend: Backend) -> None:
    async with backend.open() as store:
        await store.put(task(1, model="flux-dev", status="done", created_at=T0))
        await store.put(task(2, model="FLUX-DEV", status="failed", created_at=T0 + timedelta(hours=1)))
        await store.put(task(3, model="gpt-image-1-low", status="done", created_at=T0 + timedelta(hours=2)))
        await store.put(task(4, model="flux-dev", prompt="flux fox", created_at=T0 + timedelta(hours=3)))
        assert await found(store, model="Flux-Dev") == [4, 2, 1]
        assert await found(store, status="done") == [3, 1]
        assert await found(store, model="flux-dev", status="pending") == [4]
        # `since` includes its own moment, in whatever zone it is given.
        at_one = (T0 + timedelta(hours=1)).astimezone(timezone(timedelta(hours=3)))
        assert await found(store, since=at_one) == [4, 3, 2]
        assert await found(store, since=at_one, model="flux-dev", text="FOX") == [4]
        assert await found(store, model="flux") == []


async def test_search_pages_stay_put_while_tasks_arrive(backend: Backend) -> None:
    async with backend.open() as store:
        # 3, 4 and 5 in one moment (GPTunnel's whole seconds): the task id orders them.
        for n, minute in ((1, 0), (2, 1), (3, 2), (4, 2), (5, 2), (6, 3)):
            await store.put(task(n, created_at=T0 + timedelta(minutes=minute)))
        first = await store.search("", Search(), limit=2)
        assert [int(r.task_id, 16) for r in first] == [6, 5]
        # Newer tasks, one in the very moment the page ended at, and one in the past.
        await store.put(task(7, created_at=T0 + timedelta(minutes=9)))
        await store.put(task(8, created_at=T0 + timedelta(minutes=2)))
        pages, after = [], Position(first[-1].created_at, first[-1].task_id)
        while page := await store.search("", Search(), after=after, limit=2):
            pages.append([int(r.task_id, 16) for r in page])
            after = Position(page[-1].created_at, page[-1].task_id)
        # Nothing shown twice, nothing skipped: 8 sorts before 5 (the same moment, a larger id),
        # where the pages have passed already, so they go on with 4; a search from the newest
        # finds it in its place.
        assert pages == [[4, 3], [2, 1]]
        assert [int(r.task_id, 16) for r in await store.search("", Search(), limit=3)] == [7, 6, 8]


async def test_a_done_task_is_found_by_its_id_whoever_owns_it(backend: Backend) -> None:
    async with backend.open() as store:
        await store.put(task(1, status="done"))
        await store.put(task(1, owner="alice", status="done", prompt="alice's"))
        await store.put(task(2, owner="alice"))  # pending
        await store.put(task(3, owner="bob", status="failed"))
        found = await store.done_anywhere(f"{1:024X}")
        assert sorted((r.owner, r.prompt) for r in found) == [("", "prompt 1"), ("alice", "alice's")]
        assert await store.done_anywhere(f"{2:024x}") == []
        assert await store.done_anywhere(f"{3:024x}") == []
        assert await store.done_anywhere(f"{4:024x}") == []


# --- admission --------------------------------------------------------------------------------


async def test_an_identical_pending_or_recently_done_request_is_reused(backend: Backend) -> None:
    async with backend.open() as store:
        await created(store, task(1, request_key="pending"))
        await created(store, task(2, request_key="done", status="done"))
        later = T0 + timedelta(minutes=5)
        reused = await admit(store, "pending", now=later)
        assert reused.reuse is not None and reused.reuse.task_id == f"{1:024x}"
        assert (await admit(store, "done", now=later)).reuse == await store.get(f"{2:024x}")
        # Done longer ago than the reuse window: a new image. Pending: reused however old.
        much_later = T0 + timedelta(minutes=11)
        assert (await admit(store, "done", now=much_later)).ticket is not None
        assert (await admit(store, "pending", now=much_later)).reuse is not None
        # Another owner's identical request is theirs to pay for.
        assert (await admit(store, "pending", owner="alice", now=later)).ticket is not None


async def test_new_image_never_reuses(backend: Backend) -> None:
    async with backend.open() as store:
        await created(store, task(1, request_key="k"))
        fresh = await admit(store, "k", now=T0 + timedelta(seconds=1), reuse_window=None)
        assert fresh.ticket is not None and fresh.reuse is None


async def test_a_pending_task_whose_link_expired_is_not_reused(backend: Backend) -> None:
    async with backend.open() as store:
        stale = task(1, request_key="k", completed_at=T0, source_url="https://x.test/1.png")
        await created(store, stale)
        assert (await admit(store, "k", now=T0 + timedelta(hours=47))).reuse is not None
        assert (await admit(store, "k", now=T0 + timedelta(hours=49))).ticket is not None


async def test_an_identical_create_on_its_way_is_waited_for(backend: Backend) -> None:
    async with backend.open() as store:
        first = await admit(store, "k")
        assert first.ticket is not None
        assert (await admit(store, "k", now=T0 + timedelta(seconds=1))) == Admission(in_flight=True)
        # One whose sender died long ago is waited for no more.
        gone = await admit(store, "k", now=T0 + timedelta(minutes=3))
        assert gone.ticket is not None
        # A settled create is no longer on its way: its task is the answer.
        await store.settle(first.ticket, "created", task(1, request_key="k"))
        assert (await admit(store, "k", now=T0 + timedelta(minutes=4))).reuse is not None


async def test_caps_refuse_with_the_moment_a_slot_frees(backend: Backend) -> None:
    async with backend.open() as store:
        for minute in range(3):
            assert (await admit(store, f"k{minute}", now=T0 + timedelta(minutes=minute), caps=(HOUR,))).ticket
        full = await admit(store, "k3", now=T0 + timedelta(minutes=30), caps=(HOUR, DAY))
        assert (full.cap, full.made, full.frees_at) == (HOUR, 3, T0 + timedelta(hours=1))
        # Caps count per owner.
        assert (await admit(store, "k3", owner="alice", now=T0, caps=(HOUR,))).ticket is not None
        # The oldest leaves the hour: a slot is free.
        assert (await admit(store, "k4", now=T0 + timedelta(hours=1, seconds=1), caps=(HOUR,))).ticket
        # Later the hour is all but empty, and the day is full.
        by_day = await admit(store, "k5", now=T0 + timedelta(hours=3), caps=(HOUR, DAY))
        assert (by_day.cap, by_day.made, by_day.frees_at) == (DAY, 4, T0 + timedelta(days=1))


async def test_a_cap_of_zero_refuses_everything(backend: Backend) -> None:
    none = Cap(limit=0, span=timedelta(hours=1), unit="hour", setting="GPTUNNEL_MAX_IMAGES_PER_HOUR")
    async with backend.open() as store:
        assert (await admit(store, "a", caps=(none,))) == Admission(cap=none, made=0, frees_at=None)
        await admit(store, "a")
        assert (await admit(store, "b", caps=(none,))) == Admission(cap=none, made=1, frees_at=None)


async def test_a_call_for_several_images_is_admitted_whole_or_not_at_all(backend: Backend) -> None:
    async with backend.open() as store:
        assert (await admit(store, "k0", caps=(HOUR,))).ticket is not None
        # Room for 2 more of 3: a call for three is refused whole, and takes no slot.
        refused = await admit_all(store, ["a0", "a1", "a2"], now=T0 + timedelta(minutes=1), caps=(HOUR,))
        assert all(a.cap == HOUR and a.made == 1 for a in refused)
        assert refused[0].frees_at == T0 + timedelta(hours=1)
        two = await admit_all(store, ["b0", "b1"], now=T0 + timedelta(minutes=2), caps=(HOUR,))
        assert all(a.ticket for a in two) and len({a.ticket for a in two}) == 2
        # More than the cap allows at all: never, said so.
        (too_many, *_) = await admit_all(
            store, ["c0", "c1", "c2", "c3"], now=T0 + timedelta(hours=5), caps=(HOUR,)
        )
        assert too_many.cap == HOUR and too_many.frees_at is None


async def test_each_image_of_a_call_is_reused_on_its_own(backend: Backend) -> None:
    async with backend.open() as store:
        await created(store, task(1, request_key="p0"))
        # The first image is the earlier one; only the second needs a create, and the cap
        # counts only that one.
        first, second = await admit_all(store, ["p0", "p1"], now=T0 + timedelta(seconds=5), caps=(HOUR,))
        assert first.reuse is not None and first.reuse.task_id == f"{1:024x}"
        assert second.ticket is not None
        # An identical create on its way holds the whole call back, to be asked again.
        assert (
            await admit_all(store, ["p1", "p2"], now=T0 + timedelta(seconds=6))
            == [Admission(in_flight=True)] * 2
        )


async def test_settling_frees_a_refused_slot_and_keeps_the_others(backend: Backend) -> None:
    one = Cap(limit=1, span=timedelta(hours=1), unit="hour", setting="GPTUNNEL_MAX_IMAGES_PER_HOUR")
    async with backend.open() as store:
        refused = await admit(store, "a", caps=(one,))
        assert refused.ticket is not None and (await admit(store, "b", caps=(one,))).cap == one
        await store.settle(refused.ticket, "refused")
        unknown = await admit(store, "b", caps=(one,))
        assert unknown.ticket is not None
        await store.settle(unknown.ticket, "unknown")
        assert (await admit(store, "c", caps=(one,))).cap == one
        # An unknown outcome is not on its way any more, nor an answer: the identical request
        # is made anew when the caps allow.
        assert (await admit(store, "b")).ticket is not None
        made = await admit(store, "d", owner="alice", caps=(one,))
        assert made.ticket is not None
        await store.settle(made.ticket, "created", task(7, owner="alice", request_key="d"))
        assert await store.get(f"{7:024x}", "alice") is not None
        assert (await admit(store, "e", owner="alice", caps=(one,))).cap == one


async def test_parallel_admits_on_two_replicas_take_exactly_the_cap(backend: Backend) -> None:
    async with backend.open() as first, backend.open() as second:
        outcomes: list[Admission] = []

        async def one(store: TaskStore, n: int) -> None:
            outcomes.append(await admit(store, f"request {n}", caps=(HOUR,)))

        async with anyio.create_task_group() as tasks:
            for n in range(10):
                tasks.start_soon(one, (first, second)[n % 2], n)
    assert sum(o.ticket is not None for o in outcomes) == 3
    assert sum(o.cap == HOUR for o in outcomes) == 7


async def test_identical_admits_on_two_replicas_create_once(backend: Backend) -> None:
    async with backend.open() as first, backend.open() as second:
        outcomes: list[Admission] = []

        async def one(store: TaskStore) -> None:
            outcomes.append(await admit(store, "the same"))

        async with anyio.create_task_group() as tasks:
            for n in range(10):
                tasks.start_soon(one, (first, second)[n % 2])
    assert sum(o.ticket is not None for o in outcomes) == 1
    assert sum(o.in_flight for o in outcomes) == 9


# --- costs and the budget ---------------------------------------------------------------------


async def test_costs_are_the_models_newest_recorded_ones_of_any_owner(backend: Backend) -> None:
    now = T0 + timedelta(hours=1)
    async with backend.open() as store:
        await store.put(task(1, status="done", cost=2.0))
        await store.put(task(2, owner="alice", status="done", created_at=T0 + timedelta(minutes=1), cost=4.5))
        await store.put(task(3, created_at=T0 + timedelta(minutes=2)))  # no cost reported
        await store.put(
            task(4, model="flux-dev", status="done", created_at=T0 + timedelta(minutes=3), cost=9.0)
        )
        # Still being made: a figure given meanwhile is no price.
        await store.put(task(5, created_at=T0 + timedelta(minutes=4), cost=0.0))
        # Made before the memory of prices.
        await store.put(task(6, status="done", created_at=T0 - timedelta(days=8), cost=50.0))
        assert await store.costs("gpt-image-1-low", limit=10, now=now) == [4.5, 2.0]
        assert await store.costs("gpt-image-1-low", limit=1, now=now) == [4.5]
        assert await store.costs("flux-dev", limit=10, now=now) == [9.0]
        assert await store.costs("nobody's", limit=10, now=now) == []
        # A cost reported later is kept with the task.
        await store.put(task(3, created_at=T0 + timedelta(minutes=2), status="done", cost=1.25))
        assert await store.costs("gpt-image-1-low", limit=10, now=now) == [1.25, 4.5, 2.0]


async def test_spent_is_the_owners_since_a_moment(backend: Backend) -> None:
    async with backend.open() as store:
        await store.put(task(1, created_at=T0 - timedelta(hours=2), cost=100.0))  # before the window
        await store.put(task(2, cost=2.5))
        await store.put(task(3, created_at=T0 + timedelta(minutes=1), cost=0.75))
        await store.put(task(4, created_at=T0 + timedelta(minutes=2)))  # no cost reported
        await store.put(task(5, owner="alice", cost=40.0))
        since = T0 - timedelta(hours=1)
        assert await store.spent("", since=since) == Spent(tasks=3, priced=2, cost=3.25)
        assert await store.spent("alice", since=since) == Spent(tasks=1, priced=1, cost=40.0)
        assert await store.spent("bob", since=since) == Spent(tasks=0, priced=0, cost=0.0)


async def test_the_budget_counts_recorded_costs_estimates_and_the_call(backend: Backend) -> None:
    async with backend.open() as store:
        # Recorded: 2 and 4 roubles. The model's estimate is their median, 3.
        await created(store, task(1, request_key="a", status="done", cost=2.0))
        await created(
            store, task(2, request_key="b", status="done", created_at=T0 + timedelta(minutes=1), cost=4.0)
        )
        # Counted at the estimate: a task still being made, and one done that GPTunnel reported no
        # cost for. At nothing: one failed.
        await created(store, task(3, request_key="c", created_at=T0 + timedelta(minutes=2)))
        await created(store, task(4, request_key="d", status="failed", created_at=T0 + timedelta(minutes=3)))
        await created(store, task(5, request_key="e", status="done", created_at=T0 + timedelta(minutes=4)))
        now = T0 + timedelta(hours=1)
        # 6 spent + 6 estimated + 3 asked > 10: refused, until the first two tasks' 6 leave the window.
        refused = await admit(store, "f", now=now, budget=BUDGET)
        assert refused == Admission(
            spending=Spending(
                spent=6.0,
                estimated=6.0,
                unknown=0,
                each=3.0,
                count=1,
                frees_at=T0 + timedelta(days=1, minutes=1),
            )
        )
        # Caps come first, and the budget does not touch reuse.
        assert (await admit(store, "f", now=now, budget=BUDGET, caps=(HOUR,))).cap == HOUR
        assert (await admit(store, "c", now=now, budget=BUDGET)).reuse is not None
        # Another owner's spending is theirs. Their create on its way counts at the estimate.
        theirs = await admit(store, "g", owner="alice", now=now, budget=BUDGET)
        assert theirs.ticket is not None
        (over, *_) = await admit_all(store, ["h0", "h1", "h2"], owner="alice", now=now, budget=BUDGET)
        assert over.spending == Spending(
            spent=0.0, estimated=3.0, unknown=0, each=3.0, count=3, frees_at=now + timedelta(days=1)
        )
        # The window moves on: everything made a day ago is out of it.
        later = T0 + timedelta(days=1, minutes=5)
        assert all(a.ticket for a in await admit_all(store, ["i0", "i1", "i2"], now=later, budget=BUDGET))


async def test_a_call_is_weighed_whole_and_a_refused_one_takes_nothing(backend: Backend) -> None:
    async with backend.open() as store:
        await created(store, task(1, owner="bob", request_key="a", status="done", cost=3.0))  # sets 3
        four = await admit_all(store, ["k0", "k1", "k2", "k3"], budget=BUDGET)
        assert all(a.spending is not None and a.spending.count == 4 for a in four)
        assert four[0].spending is not None and four[0].spending.frees_at is None  # 12 > 10: never
        three = await admit_all(store, ["k0", "k1", "k2"], now=T0 + timedelta(seconds=1), budget=BUDGET)
        assert all(a.ticket for a in three)
        # The three unsettled creates hold 9: one more is refused, until one is settled as refused.
        assert (await admit(store, "k3", now=T0 + timedelta(seconds=2), budget=BUDGET)).spending is not None
        assert three[0].ticket is not None
        await store.settle(three[0].ticket, "refused")
        assert (await admit(store, "k3", now=T0 + timedelta(seconds=3), budget=BUDGET)).ticket is not None


async def test_an_image_of_a_model_with_no_recorded_cost_is_made_alone(backend: Backend) -> None:
    async with backend.open() as store:
        new: dict[str, Any] = {"model": "new-model", "budget": BUDGET}
        (two, _) = await admit_all(store, ["n0", "n1"], **new)
        assert two.spending == Spending(
            spent=0.0, estimated=0.0, unknown=0, each=None, count=2, frees_at=None
        )
        alone = await admit(store, "n0", **new)
        assert alone.ticket is not None
        # While it is being made it is counted as taking what is left: nothing else is made.
        later = T0 + timedelta(minutes=1)
        await created(store, task(9, owner="bob", request_key="x", status="done", cost=1.0))
        waiting = await admit(store, "k", now=later, budget=BUDGET)
        assert waiting.spending == Spending(
            spent=0.0, estimated=0.0, unknown=1, each=1.0, count=1, frees_at=T0 + timedelta(days=1)
        )
        # Its cost reported, the model is known: 6 recorded, one more at 6 would pass 10.
        await store.settle(
            alone.ticket, "created", task(1, model="new-model", request_key="n0", status="done", cost=6.0)
        )
        assert (await admit(store, "k", now=later, budget=BUDGET)).ticket is not None
        refused = await admit(store, "n1", now=later, **new)
        assert refused.spending is not None and refused.spending.each == 6.0
        # Another model of unknown cost is made only while the rest leaves room: 7 of 10 do.
        assert (await admit(store, "o", now=later, model="other-model", budget=BUDGET)).ticket is not None


async def test_a_lost_create_of_unknown_price_holds_the_budget_only_while_it_may_be_on_its_way(
    backend: Backend,
) -> None:
    async with backend.open() as store:
        new: dict[str, Any] = {"model": "new-model", "budget": BUDGET}
        # A create left sending by a process that died on the way.
        assert (await admit(store, "n0", **new)).ticket is not None
        # While it may still be on its way it takes all that is left...
        soon = await admit(store, "n1", now=T0 + timedelta(minutes=1), **new)
        assert soon.spending is not None and soon.spending.unknown == 1
        # ... and once it cannot be, the dearest price known (none yet: nothing), not a day's lock.
        later = T0 + timedelta(minutes=3)
        assert (await admit(store, "n1", now=later, **new)).ticket is not None


async def test_a_budget_of_zero_refuses_everything_that_costs(backend: Backend) -> None:
    nothing = Budget(limit=0.0, span=timedelta(days=1), setting="GPTUNNEL_MAX_SPEND_PER_DAY")
    async with backend.open() as store:
        assert (await admit(store, "a", budget=nothing)).spending is not None
        await created(store, task(1, owner="bob", request_key="x", status="done", cost=2.0))
        refused = await admit(store, "a", budget=nothing)
        assert refused.spending is not None and refused.spending.frees_at is None


async def test_parallel_admits_on_two_replicas_never_pass_the_budget(backend: Backend) -> None:
    async with backend.open() as first, backend.open() as second:
        await created(first, task(1, owner="bob", request_key="x", status="done", cost=2.0))
        outcomes: list[Admission] = []

        async def one(store: TaskStore, n: int) -> None:
            keys = [f"request {n}.{i}" for i in range(2)]
            admitted = await admit_all(store, keys, budget=BUDGET)
            outcomes.extend(admitted)
            # Settled at once, while others are being weighed: a create turning into its task
            # must be counted as one or the other, whenever it happens.
            for i, admission in enumerate(admitted):
                if admission.ticket is not None:
                    await store.settle(
                        admission.ticket, "created", task(10 * n + i + 10, request_key=keys[i])
                    )

        async with anyio.create_task_group() as tasks:
            for n in range(16):
                tasks.start_soon(one, (first, second)[n % 2], n)
    # Two images of 2 roubles a call: two calls fit in 10, a third would pass it.
    assert sum(o.ticket is not None for o in outcomes) == 4
    assert sum(o.spending is not None for o in outcomes) == 28


# --- the server secret ------------------------------------------------------------------------


async def test_the_server_secret_is_made_once_and_kept(backend: Backend) -> None:
    async with backend.open() as store:
        secret = await store.server_secret()
        assert len(secret) == 32
        assert await store.server_secret() == secret
        # Once there is one, a secret to adopt changes nothing.
        assert await store.server_secret(b"\x01" * 32) == secret
    async with backend.open() as reopened:
        assert await reopened.server_secret() == secret


async def test_a_secret_to_adopt_becomes_the_secret_when_there_is_none(backend: Backend) -> None:
    earlier = bytes(range(32))
    async with backend.open() as store:
        assert await store.server_secret(earlier) == earlier
    async with backend.open() as other:
        assert await other.server_secret() == earlier


async def test_replicas_asking_first_at_once_share_one_secret(backend: Backend) -> None:
    async with backend.open() as first, backend.open() as second:
        seen: list[bytes] = []

        async def ask(store: TaskStore, n: int) -> None:
            # Each proposes a secret of its own: one wins, and every caller reads that one.
            seen.append(await store.server_secret(bytes([n]) * 32))

        async with anyio.create_task_group() as tasks:
            for n in range(12):
                tasks.start_soon(ask, (first, second)[n % 2], n)
    assert len(seen) == 12 and len(set(seen)) == 1


# --- PostgreSQL: schema, settings, failures ---------------------------------------------------


# --- leases -----------------------------------------------------------------------------------


async def test_a_lease_is_one_holders_until_it_runs_out(backend: Backend) -> None:
    async with backend.open() as one, backend.open() as two:
        await one.put(task(1, created_at=datetime.now(timezone.utc)))
        first = await one.claim(f"{1:024x}", "", "a", seconds=60)
        assert first is not None and first.held and first.record.task_id == f"{1:024x}"
        # Another holder, on another replica, is refused while it lasts; the holder renews it.
        refused = await two.claim(f"{1:024x}", "", "b", seconds=60)
        assert refused is not None and not refused.held and refused.record == first.record
        renewed = await two.claim(f"{1:024x}", "", "a", seconds=0)
        assert renewed is not None and renewed.held
        # Run out (renewed for no time at all): anyone may take it.
        taken = await two.claim(f"{1:024x}", "", "b", seconds=60)
        assert taken is not None and taken.held
        assert await one.claim(f"{2:024x}", "", "a", seconds=60) is None
        assert await one.claim(f"{1:024x}", "alice", "a", seconds=60) is None


async def test_a_finished_task_is_never_leased(backend: Backend) -> None:
    async with backend.open() as store:
        await store.put(task(1, status="failed", created_at=datetime.now(timezone.utc)))
        claim = await store.claim(f"{1:024x}", "", "a", seconds=60)
        assert claim is not None and not claim.held and claim.record.status == "failed"


async def test_leases_renew_the_holders_and_adopt_the_dead_ones_orphans(backend: Backend) -> None:
    now = datetime.now(timezone.utc)
    recent = {"created_at": now - timedelta(minutes=5)}
    async with backend.open() as store:
        await store.put(task(1, **recent))  # held by "a"
        await store.put(task(2, **recent))  # held by "dead", run out
        await store.put(task(3, **recent))  # held by "alive"
        await store.put(task(4, **recent))  # never held
        await store.put(task(5, owner="alice", **recent))  # a user whose key "a" does not have
        await store.put(task(6, **recent, cancelled_at=now))
        await store.put(task(7, created_at=now - timedelta(days=3)))  # past any link's life
        await store.put(task(8, status="failed", **recent))
        for n, holder, seconds in ((1, "a", 60), (2, "dead", 0), (3, "alive", 60), (5, "dead", 0)):
            assert (
                await store.claim(f"{n:024x}", "alice" if n == 5 else "", holder, seconds=seconds)
            ) is not None
        since = now - timedelta(days=2)
        held = await store.leases("a", seconds=60, adopt=10, owners=[""], made_since=since)
        assert sorted(int(r.task_id, 16) for r in held) == [1, 2, 4]
        # Adopted tasks are held now: "alive" cannot take them, "a" keeps them.
        stolen = await store.claim(f"{2:024x}", "", "alive", seconds=60)
        assert stolen is not None and not stolen.held
        # At most `adopt` orphans at a time, the held ones always.
        assert [
            int(r.task_id, 16)
            for r in await store.leases("b", seconds=60, adopt=0, owners=[""], made_since=since)
        ] == []
        again = await store.leases("a", seconds=60, adopt=0, owners=["", "alice"], made_since=since)
        assert sorted(int(r.task_id, 16) for r in again) == [1, 2, 4]
        with_alice = await store.leases("a", seconds=60, adopt=1, owners=["", "alice"], made_since=since)
        assert sorted(int(r.task_id, 16) for r in with_alice) == [1, 2, 4, 5]


async def test_two_replicas_adopting_at_once_share_the_orphans(backend: Backend) -> None:
    now = datetime.now(timezone.utc)
    async with backend.open() as one, backend.open() as two:
        for n in range(1, 21):
            await one.put(task(n, created_at=now))
        since = now - timedelta(days=2)
        found: dict[str, list[TaskRecord]] = {}

        async def adopt(store: TaskStore, holder: str) -> None:
            found[holder] = await store.leases(holder, seconds=60, adopt=15, owners=[""], made_since=since)

        async with anyio.create_task_group() as group:
            group.start_soon(adopt, one, "a")
            group.start_soon(adopt, two, "b")
        mine, theirs = {r.task_id for r in found["a"]}, {r.task_id for r in found["b"]}
        assert not mine & theirs and len(mine | theirs) == 20


async def test_replicas_starting_together_migrate_once(postgres_url: str) -> None:
    stores: list[TaskStore] = []

    async def start() -> None:
        stores.append(await PostgresStore.open(postgres_url))

    async with anyio.create_task_group() as tasks:
        for _ in range(4):
            tasks.start_soon(start)
    for store in stores:
        await store.close()
    async with await psycopg.AsyncConnection.connect(postgres_url) as conn:
        rows = await (await conn.execute("SELECT version FROM schema_version")).fetchall()
        kinds = await (
            await conn.execute(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_name = 'tasks' AND column_name IN ('created_at', 'record')"
            )
        ).fetchall()
    assert rows == [(version,) for version in range(1, POSTGRES_LATEST + 1)]
    assert dict(kinds) == {"created_at": "timestamp with time zone", "record": "jsonb"}


async def test_prompts_stored_before_search_are_found_in_any_case(postgres_url: str) -> None:
    """PostgreSQL's migration that folds the prompts already stored does it in Python: the test
    database's locale is "C", whose lower() leaves Cyrillic as it is."""
    fox, wolf = task(1, prompt="Лиса в СНЕГУ"), task(2, prompt="a grey wolf")
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE schema_version "
            "(version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for version, steps in enumerate(POSTGRES_MIGRATIONS[:4], start=1):
            for step in steps:
                assert isinstance(step, str)
                conn.execute(step)
            conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
        for record in (fox, wolf):
            conn.execute(
                "INSERT INTO tasks (task_id, owner, status, created_at, model, record) "
                "VALUES (%s, '', 'pending', %s, %s, %s)",
                (record.task_id, record.created_at, record.model, record.model_dump_json()),
            )
    store = await PostgresStore.open(postgres_url)
    try:
        assert [r.task_id for r in await store.search("", Search(text="снегу"), limit=5)] == [fox.task_id]
        assert [r.task_id for r in await store.search("", Search(text="ЛИСА"), limit=5)] == [fox.task_id]
        assert [r.task_id for r in await store.search("", Search(text="Wolf"), limit=5)] == [wolf.task_id]
    finally:
        await store.close()


async def test_a_database_of_a_newer_version_is_refused(postgres_url: str) -> None:
    await (await PostgresStore.open(postgres_url)).close()
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as conn:
        await conn.execute("INSERT INTO schema_version (version) VALUES (99)")
    with pytest.raises(
        StorageError, match=rf"newer gptunnel-mcp \(schema 99; this version reads up to {POSTGRES_LATEST}\)"
    ):
        await PostgresStore.open(postgres_url)


async def test_a_database_that_cannot_be_reached_is_one_line_without_the_password() -> None:
    port = free_port()
    with pytest.raises(StorageError) as caught:
        await PostgresStore.open(f"postgresql://app:hunter2secret@127.0.0.1:{port}/history")
    text = str(caught.value)
    assert f"'history' at 127.0.0.1:{port}" in text and "GPTUNNEL_MCP_DATABASE_URL" in text
    assert "hunter2secret" not in text and "\n" not in text


def test_a_server_that_cannot_reach_its_database_says_so_in_one_line(home: Path) -> None:
    port = free_port()
    env = {
        "PATH": "/usr/bin:/bin",
        "GPTUNNEL_API_KEY": API_KEY,
        "GPTUNNEL_MCP_HOME": str(home),
        "GPTUNNEL_MCP_DATABASE_URL": f"postgresql://app:hunter2secret@127.0.0.1:{port}/history",
    }
    done = subprocess.run(
        [sys.executable, "-m", "gptunnel_mcp"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gptunnel-mcp: cannot use the PostgreSQL database"), lines
    assert f"127.0.0.1:{port}" in lines[0] and "hunter2secret" not in done.stderr


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("mysql://app:hunter2secret@db/history", "mysql://app:***@db/history"),
        ("host=db password=hunter2secret", "host=db password=***"),
    ],
)
def test_the_database_url_must_be_postgresql_and_its_password_is_never_shown(url: str, shown: str) -> None:
    with environment({"GPTUNNEL_MCP_DATABASE_URL": url}), pytest.raises(ConfigError) as caught:
        load_settings()
    text = str(caught.value)
    assert text.startswith("invalid GPTUNNEL_MCP_DATABASE_URL: ") and "postgresql://" in text
    assert repr(shown) in text and "hunter2secret" not in text


async def test_sqlite_needs_no_driver_and_postgresql_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, home: Path
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)
    monkeypatch.delitem(sys.modules, "gptunnel_mcp._postgres")
    with environment({"GPTUNNEL_MCP_HOME": str(home)}):
        embedded = load_settings()
    await (await open_store(embedded)).close()
    with environment({"GPTUNNEL_MCP_HOME": str(home), "GPTUNNEL_MCP_DATABASE_URL": "postgresql://db/h"}):
        shared = load_settings()
    with pytest.raises(ConfigError, match=r"pip install 'gptunnel-mcp\[postgres\]'"):
        await open_store(shared)


# --- the server on PostgreSQL -----------------------------------------------------------------


async def test_a_server_on_postgresql_stores_and_serves_an_image(
    memory_server: ServerLauncher, standin: StandIn, postgres_url: str, home: Path
) -> None:
    standin.behaviour.generation_seconds = 0.1
    async with memory_server.connect(GPTUNNEL_MCP_DATABASE_URL=postgres_url) as client:
        made = await client.call_tool("generate_and_wait", {"prompt": "a fox on a shared database"})
    assert not made.is_error, text_of(made)
    data = structured(made)
    assert data["status"] == "done" and Path(data["file_path"]).read_bytes() == standin.image_bytes(
        data["task_id"]
    )
    # Another server on the database knows it, and answers without asking GPTunnel.
    async with memory_server.connect(GPTUNNEL_MCP_DATABASE_URL=postgres_url) as client:
        again = structured(await client.call_tool("get_result", {"task_id": data["task_id"]}))
        listed = await client.read_resource("gptunnel://images")
    assert again["status"] == "done" and again["sha256"] == data["sha256"]
    assert data["task_id"] in listed.contents[0].text  # type: ignore[union-attr]
    assert standin.stats.create_calls == 1
    assert not (home / "history.sqlite3").exists()
    async with await psycopg.AsyncConnection.connect(postgres_url) as conn:
        row = await (await conn.execute("SELECT status, record->>'prompt' FROM tasks")).fetchall()
    assert row == [("done", "a fox on a shared database")]


@pytest.mark.standin(generation_seconds=60, image_size=(64, 64))
async def test_a_cap_holds_across_servers_on_one_postgresql(
    memory_server: ServerLauncher, standin: StandIn, postgres_url: str, tmp_path: Path
) -> None:
    # Each server with a home of its own: the database is all they share.
    outcomes: list[CallToolResult] = []

    async def batch(client: Client, name: str) -> None:
        async def one(n: int) -> None:
            outcomes.append(await client.call_tool("create_image", {"prompt": f"{name} {n}"}))

        async with anyio.create_task_group() as tasks:
            for n in range(4):
                tasks.start_soon(one, n)

    def replica(name: str) -> Any:
        return memory_server.connect(
            GPTUNNEL_MCP_HOME=str(tmp_path / name),
            GPTUNNEL_MCP_DATABASE_URL=postgres_url,
            GPTUNNEL_MAX_IMAGES_PER_DAY="3",
        )

    async with (
        replica("one") as first,
        replica("two") as second,
        anyio.create_task_group() as tasks,
    ):
        tasks.start_soon(batch, first, "first")
        tasks.start_soon(batch, second, "second")
    assert standin.stats.create_calls == 3
    refused = [text_of(r) for r in outcomes if r.is_error]
    assert len(refused) == 5 and all("GPTUNNEL_MAX_IMAGES_PER_DAY" in text for text in refused)


# --- OAuth state -------------------------------------------------------------------------------------


async def test_oauth_items_are_shared_spent_once_and_swept(backend: Backend) -> None:
    async with backend.open() as one, backend.open() as two:
        assert isinstance(one, OAuthRecords) and isinstance(two, OAuthRecords)
        code = OAuthItem("code", "c" * 64, "grant-1", 1000.0, '{"n": 1}')
        await one.oauth_put(code)
        await one.oauth_put(OAuthItem("access", "a" * 64, "grant-1", 2000.0, "{}"))
        await one.oauth_put(OAuthItem("access", "b" * 64, "grant-2", 2000.0, "{}"))
        await one.oauth_put(OAuthItem("client", "client-1", "", 5000.0, '{"name": "x"}'))
        # Another replica sees it; not once it has expired; not as another kind.
        assert await two.oauth_get("code", code.id, now=999.0) == code
        assert await two.oauth_get("code", code.id, now=1000.0) is None
        assert await two.oauth_get("access", code.id, now=999.0) is None

        # Replacing keeps one item of a kind and id.
        renewed = OAuthItem("client", "client-1", "", 9000.0, '{"name": "y"}')
        await two.oauth_put(renewed)
        assert await one.oauth_get("client", "client-1", now=6000.0) == renewed

        # Of replicas spending one code at once, one gets it; then it is "spent", as it was.
        won = []
        async with anyio.create_task_group() as tasks:
            for store in (one, two, one, two):

                async def spend(store: OAuthRecords = store) -> None:
                    won.append(await store.oauth_spend("code", code.id, now=500.0))

                tasks.start_soon(spend)
        assert [w for w in won if w is not None] == [code]
        assert await one.oauth_get("code", code.id, now=500.0) is None
        spent = await two.oauth_get("spent", code.id, now=500.0)
        assert spent is not None and (spent.grant, spent.expires_at, spent.body) == (
            "grant-1",
            1000.0,
            '{"n": 1}',
        )
        assert await one.oauth_spend("code", code.id, now=500.0) is None

        # A grant's items go together (or those of some kinds); other grants' stay.
        await two.oauth_drop("grant-1", ["access"])
        assert await one.oauth_get("access", "a" * 64, now=500.0) is None
        assert await one.oauth_get("spent", code.id, now=500.0) is not None
        await two.oauth_drop("grant-1")
        assert await one.oauth_get("spent", code.id, now=500.0) is None
        assert await one.oauth_get("access", "b" * 64, now=500.0) is not None

        # Sweeping deletes what has expired, for every kind.
        await one.oauth_sweep(now=2000.0)
        assert await two.oauth_get("access", "b" * 64, now=0.0) is None
        assert await two.oauth_get("client", "client-1", now=0.0) == renewed
