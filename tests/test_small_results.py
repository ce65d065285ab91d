"""Results that stay small: however long the prompts and however many the tasks, the history and
the tool results fit an agent's context; each task's own record keeps the whole prompt."""

from __future__ import annotations

import json

import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError

from .conftest import ServerLauncher, structured, text_of

pytestmark = [pytest.mark.anyio, pytest.mark.standin(generation_seconds=60, image_size=(64, 64))]

#: The longest prompt a tool takes.
LONG = 32_000


def long_prompt(n: int) -> str:
    """A prompt of the longest length a tool takes."""
    text = f"prompt {n}: " + "a lighthouse on a cliff at dusk, " * (LONG // 32)
    return text[: LONG - 1].rstrip() + "."


async def read_text(client: Client, uri: str) -> str:
    (contents,) = (await client.read_resource(uri)).contents
    return contents.text  # type: ignore[union-attr]


async def create(client: Client, prompts: list[str]) -> list[str]:
    ids = []
    for prompt in prompts:
        result = await client.call_tool("create_image", {"prompt": prompt})
        assert not result.is_error, text_of(result)
        ids.append(structured(result)["task_id"])
    return ids


async def test_the_history_of_long_prompts_stays_small_and_each_record_keeps_its_prompt(
    memory_server: ServerLauncher,
) -> None:
    prompts = [long_prompt(n) for n in range(21)]
    async with memory_server.connect() as client:
        ids = await create(client, prompts)
        history = await read_text(client, "gptunnel://images")
        records = [json.loads(await read_text(client, f"gptunnel://images/{i}")) for i in ids]
    assert len(history) < 30_000, len(history)
    page = json.loads(history)
    assert page["total"] == 21 and len(page["tasks"]) == 21 and page["next_page"] is None
    assert all(t["prompt_truncated"] and len(t["prompt"]) <= 200 for t in page["tasks"])
    assert "full text" in page["note"]
    assert [r["prompt"] for r in records] == prompts
    assert not any(r["prompt_truncated"] for r in records)


async def test_the_history_comes_in_pages(memory_server: ServerLauncher) -> None:
    async with memory_server.connect() as client:
        ids = await create(client, [f"page test {n}" for n in range(53)])
        first = json.loads(await read_text(client, "gptunnel://images"))
        second = json.loads(await read_text(client, first["next_page"]))
        bad: list[str] = []
        for page in ("0", "x", "²", "99999999999999999999"):
            with pytest.raises(MCPError) as refused:
                await client.read_resource(f"gptunnel://images?page={page}")
            bad.append(refused.value.error.message)
    assert (first["total"], first["page"], first["pages"], len(first["tasks"])) == (53, 1, 2, 50)
    assert first["next_page"] == "gptunnel://images?page=2" and "page=2" in first["note"]
    assert (second["page"], second["next_page"], len(second["tasks"])) == (2, None, 3)
    newest_first = ids[::-1]
    assert [t["task_id"] for t in first["tasks"] + second["tasks"]] == newest_first
    assert all("pages are numbered from 1" in message for message in bad), bad


@pytest.mark.standin(generation_seconds=0.05, image_size=(64, 64))
async def test_a_tool_result_echoes_a_bounded_prompt(memory_server: ServerLauncher) -> None:
    prompt = long_prompt(0)
    async with memory_server.connect() as client:
        result = await client.call_tool("generate_and_wait", {"prompt": prompt})
        data = structured(result)
        record = json.loads(await read_text(client, f"gptunnel://images/{data['task_id']}"))
    assert data["status"] == "done", text_of(result)
    # Everything but the preview's pixels, which have their own budget.
    words = [block for block in result.model_dump(mode="json")["content"] if block["type"] != "image"]
    size = len(json.dumps(words)) + len(json.dumps(data))
    assert size < 5_000, size
    assert data["prompt_truncated"] and data["prompt"] == prompt[:999] + "…"
    assert record["prompt"] == prompt and not record["prompt_truncated"]
