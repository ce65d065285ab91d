"""No money spent twice, caps on spending, and the sandbox: over stdio and HTTP, official client."""

from __future__ import annotations

import base64
import io
import json

import anyio
import httpx
import pytest
from PIL import Image

from .standin import StandIn

from .conftest import ServerLauncher, structured, text_of

pytestmark = pytest.mark.anyio


async def test_a_retried_call_returns_the_same_task_instead_of_paying_again(
    server: ServerLauncher, standin: StandIn
) -> None:
    args = {"prompt": "a lighthouse", "aspect_ratio": "16:9", "model": "gpt-image-1-low"}
    async with server.connect() as client:
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


async def test_an_identical_create_while_pending_returns_the_pending_task(
    server: ServerLauncher, standin: StandIn
) -> None:
    standin.behaviour.generation_seconds = 3
    async with server.connect() as client:
        first = structured(await client.call_tool("create_image", {"prompt": "slow fox"}))
        # A client that cut off generate_and_wait and calls again gets the running task, and waits on it.
        again = structured(await client.call_tool("generate_and_wait", {"prompt": "slow fox"}))
    assert again["task_id"] == first["task_id"] and again["reused"]
    assert again["status"] == "done"
    assert standin.stats.create_calls == 1


async def test_reuse_window_is_configurable(server: ServerLauncher, standin: StandIn) -> None:
    async with server.connect(GPTUNNEL_REUSE_WINDOW="0") as client:
        for _ in range(2):
            await client.call_tool("generate_and_wait", {"prompt": "same"})
    assert standin.stats.create_calls == 2
    async with server.connect(GPTUNNEL_REUSE_WINDOW="1") as client:
        await client.call_tool("generate_and_wait", {"prompt": "window"})
        await anyio.sleep(1.5)
        later = structured(await client.call_tool("generate_and_wait", {"prompt": "window"}))
    assert not later["reused"]
    assert standin.stats.create_calls == 4


async def test_hourly_cap_refuses_before_any_upstream_call_and_survives_a_restart(
    server: ServerLauncher, standin: StandIn
) -> None:
    async with server.connect(GPTUNNEL_MAX_IMAGES_PER_HOUR="2") as client:
        for i in range(2):
            assert not (await client.call_tool("create_image", {"prompt": f"p{i}"})).is_error
        refused = await client.call_tool("create_image", {"prompt": "p2"})
    assert refused.is_error
    text = text_of(refused)
    assert "GPTUNNEL_MAX_IMAGES_PER_HOUR" in text and "2 made in the last hour" in text
    assert "UTC" in text and "Nothing was sent" in text
    assert standin.stats.create_calls == 2
    # Counted from the history: a new process is held to the same cap.
    async with server.connect(GPTUNNEL_MAX_IMAGES_PER_HOUR="2") as client:
        assert (await client.call_tool("generate_and_wait", {"prompt": "p3"})).is_error
    async with server.connect(GPTUNNEL_MAX_IMAGES_PER_DAY="3") as client:
        assert not (await client.call_tool("create_image", {"prompt": "p4"})).is_error
        day = await client.call_tool("create_image", {"prompt": "p5"})
    assert day.is_error and "GPTUNNEL_MAX_IMAGES_PER_DAY" in text_of(day)
    assert standin.stats.create_calls == 3


async def test_sandbox_runs_the_whole_loop_without_key_or_network(
    server: ServerLauncher, standin: StandIn
) -> None:
    env = {"GPTUNNEL_SANDBOX": "1", "GPTUNNEL_API_KEY": None, "GPTUNNEL_BASE_URL": "http://127.0.0.1:9"}
    async with server.connect(**env) as client:
        result = await client.call_tool("generate_and_wait", {"prompt": "a red fox in snow"})
        assert not result.is_error, text_of(result)
        data = structured(result)
        assert data["status"] == "done" and data["sandbox"] is True
        assert data["message"].startswith("Sandbox mode")
        assert "/sandbox/" in data["file_path"]
        with Image.open(io.BytesIO(base64.b64decode(result.content[0].data))) as preview:
            assert max(preview.size) <= 512
        balance = await client.call_tool("get_balance", {})
        assert not balance.is_error
        history = json.loads((await client.read_resource("gptunnel://images")).contents[0].text)
        assert [t["task_id"] for t in history["tasks"]] == [data["task_id"]]
    assert standin.stats.create_calls == 0  # the project's stand-in was not used: the built-in one was
    # The sandbox keeps its own history: the real one stays empty.
    async with server.connect() as client:
        history = json.loads((await client.read_resource("gptunnel://images")).contents[0].text)
        assert history["total"] == 0


async def test_sandbox_is_marked_in_healthz(standin: StandIn, home: object, tmp_path: object) -> None:
    from pathlib import Path

    launcher = ServerLauncher(standin, Path(str(home)), Path(str(tmp_path)), transport="http")
    with (Path(str(tmp_path)) / "log").open("w") as log:
        async with launcher.http_server(log, GPTUNNEL_SANDBOX="1", GPTUNNEL_API_KEY=None) as url:
            health = httpx.get(url.removesuffix("/mcp") + "/healthz").json()
    assert health["sandbox"] is True and health["status"] == "ok"
