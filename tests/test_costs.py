"""What images cost, as an agent meets it through the official client: the cost GPTunnel reports,
recorded and shown in every result, in get_balance, the history and the model catalogue; and the
daily budget in roubles, which refuses a call before anything is sent, for parallel calls too."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp_types import CallToolResult, TextResourceContents

from gptunnel_mcp import ConfigError, load_settings

from .conftest import ServerLauncher, environment, structured, text_of
from .standin import StandIn

pytestmark = [pytest.mark.anyio, pytest.mark.standin(generation_seconds=0.05, image_size=(64, 64))]

#: Long enough that only `standin.finish` ends a task within a test.
FOREVER = 600.0


async def read_json(client: Client, uri: str) -> dict[str, Any]:
    (contents,) = (await client.read_resource(uri)).contents
    assert isinstance(contents, TextResourceContents), contents
    return dict(json.loads(contents.text))


async def observed(client: Client, model: str) -> dict[str, Any]:
    catalogue = await read_json(client, "gptunnel://models")
    (entry,) = [m for m in catalogue["models"] if m["id"] == model]
    return dict(entry["observed"])


async def test_a_reported_cost_is_recorded_and_shown_wherever_the_image_is(
    server: ServerLauncher, standin: StandIn
) -> None:
    standin.behaviour.cost = "12.50"  # as text, as some answers carry it
    async with server.connect() as client:
        made = structured(await client.call_tool("generate_and_wait", {"prompt": "a priced fox"}))
        assert made["status"] == "done" and made["cost"] == 12.5
        assert "GPTunnel charged 12.50 RUB" in made["message"]
        task_id, model = made["task_id"], made["model"]
        assert structured(await client.call_tool("get_result", {"task_id": task_id}))["cost"] == 12.5
        assert (await read_json(client, f"gptunnel://images/{task_id}"))["cost"] == 12.5
        standin.behaviour.cost = 7.5
        second = structured(await client.call_tool("generate_and_wait", {"prompt": "a cheaper fox"}))
        assert second["cost"] == 7.5
        listed = await read_json(client, "gptunnel://images")
        assert [t["cost"] for t in listed["tasks"]] == [7.5, 12.5]

        balance = await client.call_tool("get_balance", {})
        spent = structured(balance)
        assert (spent["spent_last_24h"], spent["images_last_24h"], spent["images_without_cost"]) == (
            20.0,
            2,
            0,
        )
        assert spent["daily_budget"] is None
        assert "In the last 24 hours: 2 images, 20.00 RUB" in text_of(balance)

        seen = await observed(client, model)
        assert (seen["average_cost"], seen["cost_samples"], seen["duration_samples"]) == (10.0, 2, 2)
        assert 0 < seen["average_seconds"] < 10
        assert (await observed(client, "yandex-art")) == {
            "average_cost": None,
            "cost_samples": 0,
            "average_seconds": None,
            "duration_samples": 0,
        }


@pytest.mark.parametrize("cost", ["-5", "NaN", "lots", "1e3", -2.0, 10_000_000.0])
async def test_an_implausible_cost_is_ignored_and_the_image_kept(
    memory_server: ServerLauncher, standin: StandIn, cost: float | str
) -> None:
    standin.behaviour.cost = cost
    async with memory_server.connect() as client:
        made = await client.call_tool("generate_and_wait", {"prompt": "a fox of no price"})
        balance = structured(await client.call_tool("get_balance", {}))
    assert not made.is_error, text_of(made)
    assert structured(made)["status"] == "done" and structured(made)["cost"] is None
    assert (balance["spent_last_24h"], balance["images_last_24h"], balance["images_without_cost"]) == (
        0,
        1,
        1,
    )


# --- the budget ------------------------------------------------------------------------------


def frees_at(text: str) -> datetime:
    found = re.search(r"leaves the window at (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC", text)
    assert found is not None, text
    return datetime.fromisoformat(found[1]).replace(tzinfo=timezone.utc)


async def test_the_budget_refuses_before_anything_is_sent_and_says_when_it_frees(
    memory_server: ServerLauncher, standin: StandIn
) -> None:
    standin.behaviour.cost = 4
    budget: dict[str, Any] = {"GPTUNNEL_MAX_SPEND_PER_DAY": "10"}
    async with memory_server.connect(**budget) as client:
        first = structured(await client.call_tool("generate_and_wait", {"prompt": "owl one"}))
        second = structured(await client.call_tool("generate_and_wait", {"prompt": "owl two"}))
        refused = await client.call_tool("generate_and_wait", {"prompt": "owl three"})
        balance = structured(await client.call_tool("get_balance", {}))
    assert first["cost"] == second["cost"] == 4.0
    assert refused.is_error and standin.stats.create_calls == 2
    text = text_of(refused)
    assert text.startswith(
        "The budget of 10.00 RUB per day (GPTUNNEL_MAX_SPEND_PER_DAY) cannot take this call"
    )
    assert "8.00 RUB spent in the last day" in text and "estimated at 4.00 RUB" in text
    assert "Nothing was sent to GPTunnel" in text and "get_balance" in text
    # The older image's 4 roubles leave the window a day after it was made.
    made_at = datetime.fromisoformat(first["created_at"])
    assert frees_at(text) == (made_at + timedelta(days=1)).replace(microsecond=0)
    assert (balance["spent_last_24h"], balance["daily_budget"]) == (8.0, 10.0)
    # Counted from the history: a new server is held to it; the same request is still reused.
    async with memory_server.connect(**budget) as client:
        assert (await client.call_tool("create_image", {"prompt": "owl four"})).is_error
        again = structured(await client.call_tool("create_image", {"prompt": "owl one"}))
    assert again["reused"] and standin.stats.create_calls == 2
    async with memory_server.connect(GPTUNNEL_MAX_SPEND_PER_DAY="0") as client:
        nothing = await client.call_tool("create_image", {"prompt": "owl five"})
    assert "With GPTUNNEL_MAX_SPEND_PER_DAY=0 nothing that costs money can be made" in text_of(nothing)
    assert standin.stats.create_calls == 2


async def test_neither_a_figure_while_working_nor_the_model_an_answer_names_can_pass_the_budget(
    memory_server: ServerLauncher, standin: StandIn
) -> None:
    # A cheap model's price is known; then every answer names that model and says 0 while the
    # image is being made. Neither may make the dear images count as cheap or free.
    standin.behaviour.cost = 1
    budget: dict[str, Any] = {"GPTUNNEL_MAX_SPEND_PER_DAY": "10"}
    async with memory_server.connect(**budget) as client:
        await client.call_tool("generate_and_wait", {"prompt": "a cheap owl", "model": "gpt-image-1-low"})
        standin.behaviour.generation_seconds = 600
        standin.behaviour.cost_while_working = 0
        standin.behaviour.answer_model = "gpt-image-1-low"
        dear = {"model": "gpt-image-1-high"}
        first = structured(await client.call_tool("create_image", {"prompt": "a dear owl 1", **dear}))
        polled = structured(await client.call_tool("get_result", {"task_id": first["task_id"]}))
        # Nothing is known of the dear model's price: no second image of it while the first is made.
        second = await client.call_tool("create_image", {"prompt": "a dear owl 2", **dear})
    assert polled["model"] == "gpt-image-1-high" and polled["cost"] is None
    assert second.is_error and "GPTUNNEL_MAX_SPEND_PER_DAY" in text_of(second)
    assert standin.stats.create_calls == 2


async def test_an_image_of_a_model_of_unknown_cost_is_made_alone(
    memory_server: ServerLauncher, standin: StandIn
) -> None:
    standin.behaviour.generation_seconds = FOREVER
    standin.behaviour.cost = 5
    async with memory_server.connect(GPTUNNEL_MAX_SPEND_PER_DAY="100") as client:
        several = await client.call_tool("create_image", {"prompt": "two cranes", "count": 2})
        assert several.is_error and "ask for one image of gpt-image-1-medium" in text_of(several)
        assert standin.stats.create_calls == 0
        probe = structured(await client.call_tool("create_image", {"prompt": "one crane"}))
        # While it is being made, it is counted as taking what is left of the budget.
        waiting = await client.call_tool("create_image", {"prompt": "a heron", "model": "flux-dev"})
        assert waiting.is_error and standin.stats.create_calls == 1
        assert "1 more of a model whose cost is not known yet" in text_of(waiting)
        assert "Call get_result on the tasks still being made" in text_of(waiting)
        standin.finish(probe["task_id"])
        finished = structured(await client.call_tool("get_result", {"task_id": probe["task_id"]}))
        assert finished["cost"] == 5.0
        # Now its price is known: two more at 5 each fit in 100.
        two = structured(await client.call_tool("create_image", {"prompt": "two cranes", "count": 2}))
    assert len(two["images"]) == 2 and standin.stats.create_calls == 3


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_parallel_calls_on_two_servers_never_pass_the_budget(
    memory_server: ServerLauncher,
    standin: StandIn,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    backend: str,
) -> None:
    """Calls of one and two images at once, on two servers sharing one history (a SQLite file, or
    PostgreSQL with a home each): what they are let make never passes 10 roubles."""
    standin.behaviour.cost = "3"
    shared = (
        {"GPTUNNEL_MCP_DATABASE_URL": request.getfixturevalue("postgres_url")}
        if backend == "postgres"
        else {}
    )

    def replica(name: str) -> Any:
        home = tmp_path / name if shared else memory_server.home
        return memory_server.connect(
            GPTUNNEL_MCP_HOME=str(home),
            GPTUNNEL_MAX_SPEND_PER_DAY="10",
            GPTUNNEL_MCP_LEASE_SECONDS="1",
            **shared,
        )

    outcomes: list[CallToolResult] = []
    async with replica("one") as first, replica("two") as second:
        # One image first, so that the model's price (3) is known: the rest are estimated at it.
        assert (
            structured(await first.call_tool("generate_and_wait", {"prompt": "a first gull"}))["cost"] == 3.0
        )
        standin.behaviour.generation_seconds = FOREVER

        async def call(client: Client, n: int) -> None:
            args = {"prompt": f"gulls {n}", "count": 1 + n % 2}
            outcomes.append(await client.call_tool("create_image", args))

        async with anyio.create_task_group() as group:
            for n in range(12):
                group.start_soon(call, (first, second)[n % 2], n)
        admitted = [r for r in outcomes if not r.is_error]
        # 3 spent: room for two more at 3 each, whichever calls came first.
        assert standin.stats.create_calls == 3
        assert sum(len(structured(r).get("images") or [None]) for r in admitted) == 2
        assert all("GPTUNNEL_MAX_SPEND_PER_DAY" in text_of(r) for r in outcomes if r.is_error)
        standin.finish()
        # On PostgreSQL each task is polled by the replica holding its lease: ask until it is done.
        with anyio.fail_after(20):
            for task_id in standin.task_ids():
                while True:
                    polled = structured(await first.call_tool("get_result", {"task_id": task_id}))
                    if polled["status"] == "done":
                        break
                    await anyio.sleep(0.1)
        spent = structured(await second.call_tool("get_balance", {}))
    assert spent["spent_last_24h"] == 9.0 <= 10


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "lots", "1e12"])
def test_a_bad_budget_is_one_line_naming_the_setting(home: Path, value: str) -> None:
    with (
        environment({"GPTUNNEL_MCP_HOME": str(home), "GPTUNNEL_MAX_SPEND_PER_DAY": value}),
        pytest.raises(ConfigError) as caught,
    ):
        load_settings()
    assert str(caught.value).startswith("invalid GPTUNNEL_MAX_SPEND_PER_DAY: ") and repr(value) in str(
        caught.value
    )
