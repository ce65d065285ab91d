"""No money spent twice, caps on spending, and the sandbox, as an agent meets them through the
official client."""

from __future__ import annotations

import base64
import functools
import io
import json
import re
from contextlib import AbstractAsyncContextManager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client
from mcp_types import TextResourceContents
from PIL import Image

from gptunnel_mcp import _engine, _sandbox

from .conftest import API_KEY, ServerLauncher, serve_http, structured, text_of
from .standin import StandIn

pytestmark = pytest.mark.anyio

#: Where no GPTunnel listens: the sandbox must need neither it nor a key.
NOWHERE = "http://127.0.0.1:9"


@pytest.fixture(autouse=True)
def _quick_tasks(standin: StandIn, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tasks that end at once unless a test says otherwise, small stand-in pictures (a full-size
    WebP takes a fifth of a second to render), and a sandbox that takes 0.2 s an image instead of
    the 3 s it imitates a real model with."""
    standin.behaviour.generation_seconds = 0
    standin.behaviour.image_size = (256, 256)
    monkeypatch.setattr(
        _sandbox, "Sandbox", functools.partial(_sandbox.Sandbox, generation_seconds=0.2, jitter=0)
    )


def sandbox(launcher: ServerLauncher) -> AbstractAsyncContextManager[Client]:
    return launcher.connect(GPTUNNEL_SANDBOX="1", GPTUNNEL_API_KEY=None, GPTUNNEL_BASE_URL=NOWHERE)


async def history(client: Client) -> dict[str, Any]:
    contents = (await client.read_resource("gptunnel://images")).contents[0]
    assert isinstance(contents, TextResourceContents), contents
    return dict(json.loads(contents.text))


# --- the same request is not paid for twice --------------------------------------------------


async def test_a_retried_call_returns_the_same_task_instead_of_paying_again(
    memory_server: ServerLauncher, standin: StandIn
) -> None:
    args = {"prompt": "a lighthouse", "aspect_ratio": "16:9", "model": "gpt-image-1-low"}
    async with memory_server.connect() as client:
        first = structured(await client.call_tool("generate_and_wait", args))
        again = structured(await client.call_tool("generate_and_wait", args))
        assert again["task_id"] == first["task_id"]
        assert again["reused"] and not first["reused"]
        assert "new_image=true" in again["message"]
        assert again["sha256"] == first["sha256"]
        assert standin.stats.create_calls == 1

        fresh = structured(await client.call_tool("generate_and_wait", {**args, "new_image": True}))
        assert fresh["task_id"] != first["task_id"] and not fresh["reused"]
        other = structured(await client.call_tool("create_image", {**args, "aspect_ratio": "1:1"}))
        assert other["task_id"] not in (first["task_id"], fresh["task_id"])
    assert standin.stats.create_calls == 3


async def test_a_cap_of_zero_refuses_every_image_with_a_clear_error(
    memory_server: ServerLauncher, standin: StandIn
) -> None:
    async with memory_server.connect(GPTUNNEL_MAX_IMAGES_PER_DAY="0") as client:
        refused = await client.call_tool("generate_and_wait", {"prompt": "anything"})
    assert refused.is_error
    assert "GPTUNNEL_MAX_IMAGES_PER_DAY=0 no image can be made" in text_of(refused)
    assert standin.stats.create_calls == 0


async def test_an_identical_create_while_pending_returns_the_pending_task(
    memory_server: ServerLauncher, standin: StandIn
) -> None:
    standin.behaviour.generation_seconds = 60
    async with memory_server.connect() as client:
        first = structured(await client.call_tool("create_image", {"prompt": "slow fox"}))
        assert first["status"] == "pending"

        async def finish_soon() -> None:
            await anyio.sleep(0.1)
            standin.finish(first["task_id"])

        # A client that cut off generate_and_wait and calls again gets the running task, and waits on it.
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(finish_soon)
            again = structured(await client.call_tool("generate_and_wait", {"prompt": "slow fox"}))
    assert again["task_id"] == first["task_id"] and again["reused"]
    assert again["status"] == "done"
    assert standin.stats.create_calls == 1


async def test_reuse_window_is_configurable(
    memory_server: ServerLauncher, standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with memory_server.connect(GPTUNNEL_REUSE_WINDOW="0") as client:
        for _ in range(2):
            assert not structured(await client.call_tool("generate_and_wait", {"prompt": "same"}))["reused"]
    assert standin.stats.create_calls == 2

    async with memory_server.connect(GPTUNNEL_REUSE_WINDOW="60") as client:
        await client.call_tool("generate_and_wait", {"prompt": "window"})
        within = structured(await client.call_tool("generate_and_wait", {"prompt": "window"}))
        # A minute later, as far as the engine can tell, without waiting one.
        later_now = datetime.now(timezone.utc) + timedelta(seconds=61)
        monkeypatch.setattr(_engine, "utcnow", lambda: later_now)
        later = structured(await client.call_tool("generate_and_wait", {"prompt": "window"}))
    assert within["reused"] and not later["reused"]
    assert later["task_id"] != within["task_id"]
    assert standin.stats.create_calls == 4


# --- caps ------------------------------------------------------------------------------------


async def test_hourly_cap_refuses_before_any_upstream_call_and_survives_a_restart(
    memory_server: ServerLauncher, standin: StandIn
) -> None:
    async with memory_server.connect(GPTUNNEL_MAX_IMAGES_PER_HOUR="2") as client:
        made = [structured(await client.call_tool("create_image", {"prompt": f"p{i}"})) for i in range(2)]
        refused = await client.call_tool("create_image", {"prompt": "p2"})
    assert refused.is_error
    text = text_of(refused)
    assert "GPTUNNEL_MAX_IMAGES_PER_HOUR" in text and "2 made in the last hour" in text
    assert "Nothing was sent" in text
    # When the next may be made: an hour after the older of the two was admitted, which is a
    # moment before it was sent (its created_at), shown to the second.
    frees = re.search(r"made at (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC", text)
    assert frees is not None, text
    oldest = min(datetime.fromisoformat(m["created_at"]) for m in made)
    early = oldest + timedelta(hours=1) - datetime.fromisoformat(frees[1]).replace(tzinfo=timezone.utc)
    assert timedelta(0) <= early < timedelta(seconds=2), early
    assert standin.stats.create_calls == 2
    # Counted from the history: a new server is held to the same cap.
    async with memory_server.connect(GPTUNNEL_MAX_IMAGES_PER_HOUR="2") as client:
        assert (await client.call_tool("generate_and_wait", {"prompt": "p3"})).is_error
    async with memory_server.connect(GPTUNNEL_MAX_IMAGES_PER_DAY="3") as client:
        assert not (await client.call_tool("create_image", {"prompt": "p4"})).is_error
        day = await client.call_tool("create_image", {"prompt": "p5"})
    assert day.is_error
    assert "GPTUNNEL_MAX_IMAGES_PER_DAY" in text_of(day) and "3 made in the last day" in text_of(day)
    assert standin.stats.create_calls == 3


# --- the sandbox -----------------------------------------------------------------------------


async def test_sandbox_runs_the_whole_loop_without_key_or_network(
    memory_server: ServerLauncher, standin: StandIn, home: Path
) -> None:
    async with sandbox(memory_server) as client:
        result = await client.call_tool(
            "generate_and_wait", {"prompt": "a red fox in snow", "aspect_ratio": "16:9"}
        )
        assert not result.is_error, text_of(result)
        data = structured(result)
        assert data["status"] == "done" and data["sandbox"] is True
        assert data["message"].startswith("Sandbox mode")
        assert (data["width"], data["height"], data["mime_type"]) == (1344, 756, "image/png")
        stored = Path(data["file_path"])
        assert stored.is_relative_to(home / "sandbox")
        with Image.open(stored) as image:
            assert (image.format, image.size) == ("PNG", (1344, 756))
        assert result.content[0].type == "image"
        with Image.open(io.BytesIO(base64.b64decode(result.content[0].data))) as preview:
            assert max(preview.size) <= 512
        balance = await client.call_tool("get_balance", {})
        assert not balance.is_error, text_of(balance)
        assert [t["task_id"] for t in (await history(client))["tasks"]] == [data["task_id"]]
    assert standin.stats.create_calls == 0  # the project's stand-in was not used: the built-in one was
    assert standin.stats.auth_headers == []
    # The sandbox keeps its own history: the real one stays empty.
    async with memory_server.connect() as client:
        assert (await history(client))["total"] == 0


async def test_a_sandbox_task_made_before_a_restart_finishes_after_it(
    memory_server: ServerLauncher, home: Path
) -> None:
    async with sandbox(memory_server) as client:
        started = structured(
            await client.call_tool("create_image", {"prompt": "a slow fox", "aspect_ratio": "9:16"})
        )
    assert started["status"] == "pending"

    async with sandbox(memory_server) as client:
        with anyio.fail_after(5):
            while True:
                result = await client.call_tool("get_result", {"task_id": started["task_id"]})
                assert not result.is_error, text_of(result)
                data = structured(result)
                if data["status"] == "done":
                    break
                await anyio.sleep(0.05)
    assert (data["width"], data["height"]) == (756, 1344)
    assert Path(data["file_path"]).is_relative_to(home / "sandbox")
    assert data["prompt"] == "a slow fox" and data["sandbox"] is True


async def test_sandbox_is_marked_in_healthz(memory_server: ServerLauncher) -> None:
    """A sandbox by mistake in production would be noticed: it makes no real images."""
    async with (
        serve_http(
            memory_server.settings(GPTUNNEL_SANDBOX="1", GPTUNNEL_API_KEY=None, GPTUNNEL_BASE_URL=NOWHERE)
        ) as url,
        httpx2.AsyncClient() as http,
    ):
        health = (await http.get(url.removesuffix("/mcp") + "/healthz")).json()
    assert health["sandbox"] is True and health["status"] == "ok"
    assert API_KEY not in json.dumps(health)
