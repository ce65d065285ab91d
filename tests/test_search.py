"""search_images as agents use it, with the official client: text in any case and script, filters,
pages that continue with a cursor while new images arrive, arguments an agent gets wrong, and
users of one server who never find each other's tasks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from .conftest import MULTI_USER, ServerLauncher, mcp_client, serve_http, structured, text_of
from .standin import Behaviour, StandIn

pytestmark = [pytest.mark.anyio, pytest.mark.standin(generation_seconds=0.05, image_size=(320, 200))]

#: Long enough that only `standin.finish` ends a task within a test.
FOREVER = 600.0
KEY_A = "sk-user-A-search-7c1e5b9f3a"
KEY_B = "sk-user-B-search-2d8a4f6c0e"


async def create(client: Client, prompt: str, **arguments: Any) -> str:
    result = await client.call_tool("create_image", {"prompt": prompt, **arguments})
    assert not result.is_error, text_of(result)
    return str(structured(result)["task_id"])


async def search(client: Client, **arguments: Any) -> dict[str, Any]:
    result = await client.call_tool("search_images", arguments)
    assert not result.is_error, text_of(result)
    # Rows only: no image, no link to one, whatever the tasks are.
    assert [block.type for block in result.content] == ["text"]
    return structured(result)


def ids(page: dict[str, Any]) -> list[str]:
    return [row["task_id"] for row in page["tasks"]]


async def test_pages_continue_with_the_cursor_while_new_images_arrive(
    server: ServerLauncher, standin: StandIn
) -> None:
    standin.behaviour.generation_seconds = FOREVER
    async with server.connect() as client:
        foxes = [await create(client, f"Лиса в снегу, вариант {n}") for n in range(1, 6)]
        await create(client, "a grey wolf")
        first = await search(client, query="лиса", limit=2)
        assert ids(first) == [foxes[4], foxes[3]]
        assert first["next_cursor"]
        row = first["tasks"][0]
        assert row["status"] == "pending" and row["model"] == "gpt-image-1-medium"
        assert row["prompt"] == "Лиса в снегу, вариант 5" and row["created_at"]
        assert row["resource_uri"] == f"gptunnel://images/{foxes[4]}"
        assert "search_images" in first["message"] and first["next_cursor"] in first["message"]

        # A new fox between pages: the pages go on where they were, and it heads a new search.
        newest = await create(client, "ЛИСА на траве")
        second = await search(client, query="лиса", limit=2, cursor=first["next_cursor"])
        assert ids(second) == [foxes[2], foxes[1]]
        third = await search(client, query="лиса", limit=2, cursor=second["next_cursor"])
        assert ids(third) == [foxes[0]] and third["next_cursor"] is None
        assert ids(await search(client, query="ЛиСа", limit=2)) == [newest, foxes[4]]


async def test_filters_narrow_the_search_and_rows_stay_short(
    memory_server: ServerLauncher, standin: StandIn
) -> None:
    long_prompt = "A red fox " + "in deep snow, " * 40
    async with memory_server.connect() as client:
        done = structured(await client.call_tool("generate_and_wait", {"prompt": long_prompt}))
        assert done["status"] == "done"
        standin.behaviour.generation_seconds = FOREVER
        flux = await create(client, "a fox in flux", model="flux-dev")
        found = await search(client, query="FOX")
        assert ids(found) == [flux, done["task_id"]] and found["next_cursor"] is None
        long_row = found["tasks"][1]
        assert len(long_row["prompt"]) == 80 and long_row["prompt_truncated"]
        assert long_row["file_uri"] == done["resource_uri"]
        assert ids(await search(client, query="fox", status="done")) == [done["task_id"]]
        assert ids(await search(client, model="FLUX-DEV")) == [flux]
        assert ids(await search(client, status="PENDING", model="flux-dev")) == [flux]
        assert ids(await search(client, since="2000-01-01")) == [flux, done["task_id"]]
        later = await search(client, since="2999-01-01T00:00:00Z", query="fox")
        assert later["tasks"] == [] and later["next_cursor"] is None
        assert 'No tasks matching "fox", made since 2999-01-01 00:00 UTC' in later["message"]
        # Wildcards are text like any other.
        assert ids(await search(client, query="%")) == []
        assert ids(await search(client, query="in_flux")) == []


async def test_arguments_an_agent_gets_wrong_are_named(memory_server: ServerLauncher) -> None:
    async with memory_server.connect() as client:
        for n in range(3):
            await create(client, f"a lighthouse {n}")
        page = await search(client, query="lighthouse", limit=1)
        cursor = page["next_cursor"]
        wrong: list[tuple[dict[str, Any], str]] = [
            ({"cursor": "not-a-cursor"}, "Invalid cursor: 'not-a-cursor' is not a cursor this server gave"),
            ({"cursor": "50"}, "Invalid cursor"),  # a resources/list cursor
            ({"cursor": cursor[:-3]}, "Invalid cursor"),
            ({"cursor": cursor}, "belongs to another search"),  # without its query
            ({"query": "LIGHTHOUSE 1", "cursor": cursor}, "belongs to another search"),
            ({"status": "finished"}, "Invalid status: 'finished' is not a status; use one of pending, done"),
            ({"limit": 0}, "Invalid limit"),
            ({"limit": 51}, "ask for 1 to 50"),
            ({"since": "last week"}, "Invalid since: 'last week' is not an ISO date"),
            # At the calendar's edges, with an offset that takes it past them in UTC.
            ({"since": "0001-01-01T00:00+05:00"}, "between the years 1 and 9999"),
            ({"since": "9999-12-31T23:59:59-05:00"}, "between the years 1 and 9999"),
        ]
        for arguments, said in wrong:
            result = await client.call_tool("search_images", arguments)
            assert result.is_error, arguments
            assert said in text_of(result), (arguments, text_of(result))
            assert "Traceback" not in text_of(result)
        # The cursor still continues its own search.
        rest = await search(client, query="lighthouse", limit=1, cursor=cursor)
        assert [row["prompt"] for row in rest["tasks"]] == ["a lighthouse 1"]


@pytest.fixture
def open_standin() -> Iterator[StandIn]:
    """Accepts any key: the users of a multi-user server."""
    with StandIn(api_key=None, behaviour=Behaviour(generation_seconds=FOREVER)) as standin:
        yield standin


async def test_users_never_find_each_others_tasks(open_standin: StandIn, home: Path) -> None:
    settings = ServerLauncher(open_standin, home, transport="http").settings(**MULTI_USER)
    async with (
        serve_http(settings) as url,
        mcp_client(url, KEY_A) as alice,
        mcp_client(url, KEY_B) as bob,
    ):
        alices = [await create(alice, f"лиса Алисы {n}") for n in range(2)]
        bobs = await create(bob, "лиса Боба")
        assert ids(await search(bob, query="лиса")) == [bobs]
        assert ids(await search(bob, query="Алисы")) == []
        assert ids(await search(bob)) == [bobs]
        assert ids(await search(alice, query="лиса")) == alices[::-1]
        # Alice's cursor, with her very arguments, shows Bob nothing of hers.
        cursor = (await search(alice, query="лиса", limit=1))["next_cursor"]
        theirs = await bob.call_tool("search_images", {"query": "лиса", "limit": 1, "cursor": cursor})
        assert theirs.is_error and "belongs to another search" in text_of(theirs)
        assert alices[0] not in text_of(theirs)
