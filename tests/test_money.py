"""Money: a limit that holds for one call holds for parallel calls and for several servers on one
home; identical requests are paid once however they arrive; caps go by this server's clock; a
task GPTunnel forgot is never the answer to a new request."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp_types import CallToolResult

from gptunnel_mcp import _engine

from .conftest import ServerLauncher, structured, text_of
from .standin import StandIn

# Tasks stay pending: these tests are about what is created, not what is drawn.
pytestmark = [pytest.mark.anyio, pytest.mark.standin(generation_seconds=60, image_size=(64, 64))]


async def create_all(client: Client, prompts: list[str]) -> list[CallToolResult]:
    results: list[CallToolResult] = []

    async def one(prompt: str) -> None:
        results.append(await client.call_tool("create_image", {"prompt": prompt}))

    async with anyio.create_task_group() as tasks:
        for prompt in prompts:
            tasks.start_soon(one, prompt)
    return results


@asynccontextmanager
async def two_servers(
    launcher: ServerLauncher, daily_cap: str | None = None
) -> AsyncIterator[tuple[Client, Client]]:
    """Two servers on one home, each with its own connection to the history, as two processes."""
    async with (
        launcher.connect(GPTUNNEL_MAX_IMAGES_PER_DAY=daily_cap) as first,
        launcher.connect(GPTUNNEL_MAX_IMAGES_PER_DAY=daily_cap) as second,
    ):
        yield first, second


def refusals(results: list[CallToolResult]) -> list[str]:
    return [text_of(r) for r in results if r.is_error]


async def test_a_cap_holds_for_parallel_calls(memory_server: ServerLauncher, standin: StandIn) -> None:
    async with memory_server.connect(GPTUNNEL_MAX_IMAGES_PER_HOUR="3") as client:
        results = await create_all(client, [f"parallel {i}" for i in range(10)])
    assert standin.stats.create_calls == 3
    refused = refusals(results)
    assert len(refused) == 7
    assert all("GPTUNNEL_MAX_IMAGES_PER_HOUR" in text and "Nothing was sent" in text for text in refused)


async def test_a_cap_holds_across_servers_sharing_a_home(
    memory_server: ServerLauncher, standin: StandIn
) -> None:
    outcomes: list[list[CallToolResult]] = []

    async def batch(client: Client, name: str) -> None:
        outcomes.append(await create_all(client, [f"{name} {i}" for i in range(4)]))

    async with (
        two_servers(memory_server, daily_cap="3") as (first, second),
        anyio.create_task_group() as tasks,
    ):
        tasks.start_soon(batch, first, "first")
        tasks.start_soon(batch, second, "second")
    assert standin.stats.create_calls == 3
    assert len(refusals([r for batch in outcomes for r in batch])) == 5


async def test_identical_requests_at_the_same_moment_on_two_servers_are_paid_once(
    memory_server: ServerLauncher, standin: StandIn
) -> None:
    # A slow answer keeps the first create in flight while the others arrive.
    standin.behaviour.create_delay = 0.3
    async with two_servers(memory_server) as (first, second):
        results: list[CallToolResult] = []

        async def ask(client: Client) -> None:
            results.append(await client.call_tool("create_image", {"prompt": "one fox, paid once"}))

        async with anyio.create_task_group() as tasks:
            for client in (first, second, first, second):
                tasks.start_soon(ask, client)
    assert standin.stats.create_calls == 1
    assert len({structured(r)["task_id"] for r in results}) == 1
    assert sum(structured(r)["reused"] for r in results) == 3


@pytest.mark.parametrize("days", [-2, 2], ids=["old", "future"])
async def test_caps_count_by_this_servers_clock_not_gptunnels(
    memory_server: ServerLauncher, standin: StandIn, monkeypatch: pytest.MonkeyPatch, days: int
) -> None:
    standin.behaviour.created_at_offset = days * 86400
    async with memory_server.connect(GPTUNNEL_MAX_IMAGES_PER_HOUR="1") as client:
        assert not (await client.call_tool("create_image", {"prompt": "first"})).is_error
        # An old created_at must not switch the cap off...
        assert (await client.call_tool("create_image", {"prompt": "second"})).is_error
        assert standin.stats.create_calls == 1
        # ...and a future one must not hold it shut once the hour has passed.
        later = datetime.now(timezone.utc) + timedelta(minutes=61)
        monkeypatch.setattr(_engine, "utcnow", lambda: later)
        assert not (await client.call_tool("create_image", {"prompt": "third"})).is_error, "cap stuck"
    assert standin.stats.create_calls == 2


async def test_a_task_gptunnel_forgot_ends_failed_and_an_identical_request_is_made_anew(
    memory_server: ServerLauncher, standin: StandIn
) -> None:
    async with memory_server.connect() as client:
        created = structured(await client.call_tool("create_image", {"prompt": "forgotten"}))
        standin.forget(created["task_id"])
        checked = await client.call_tool("get_result", {"task_id": created["task_id"]})
        assert checked.is_error
        data = structured(checked)
        assert data["status"] == "failed" and "code 4" in (data["error"] or "")
        again = structured(await client.call_tool("create_image", {"prompt": "forgotten"}))
    assert not again["reused"] and again["task_id"] != created["task_id"]
    assert standin.stats.create_calls == 2


async def test_an_answer_without_a_task_id_is_refused_and_kept_nowhere(
    memory_server: ServerLauncher, standin: StandIn
) -> None:
    standin.behaviour.create_id_override = "../../etc/passwd\n" + "x" * 100_000
    async with memory_server.connect() as client:
        result = await client.call_tool("generate_and_wait", {"prompt": "hostile id"})
        history = await client.read_resource("gptunnel://images")
    text = text_of(result)
    assert result.is_error and "not a task id" in text and "check your GPTunnel account" in text
    assert len(text) < 1000 and "\n" not in text.strip()
    assert '"total": 0' in history.contents[0].text  # type: ignore[union-attr]
    assert standin.stats.result_calls == 0


async def test_a_refused_create_frees_its_slot_and_a_lost_answer_keeps_it(
    memory_server: ServerLauncher, standin: StandIn
) -> None:
    async with memory_server.connect(GPTUNNEL_MAX_IMAGES_PER_HOUR="1") as client:
        standin.behaviour.create_code = 5  # refused for sure: nothing was spent
        assert (await client.call_tool("create_image", {"prompt": "no money"})).is_error
        standin.behaviour.create_code = 0
        standin.behaviour.transient_failures, standin.behaviour.transient_kind = 1, "disconnect"
        lost: Any = await client.call_tool("create_image", {"prompt": "answer lost"})
        assert lost.is_error and "check your GPTunnel account" in text_of(lost)
        # The lost create may have been paid for: it holds the hour's only slot.
        capped = await client.call_tool("create_image", {"prompt": "one more"})
    assert capped.is_error and "GPTUNNEL_MAX_IMAGES_PER_HOUR" in text_of(capped)
    assert standin.stats.create_calls == 2
