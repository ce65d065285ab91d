"""The server as clients use it: a real stdio subprocess, the official MCP client, a stand-in GPTunnel.

Each test drives both protocol eras where the behaviour differs by era.
"""

from __future__ import annotations

import base64
import hashlib
import io
import itertools
import json
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp_types import ResourceListChangedNotification
from PIL import Image

from .standin import StandIn

from .conftest import ServerLauncher, structured, text_of

pytestmark = pytest.mark.anyio

MODES = ["auto", "legacy"]  # 2026-07-28 (discovered) and the 2025-11-25 handshake


async def test_tools_are_listed_with_schemas_and_truthful_annotations(server: ServerLauncher) -> None:
    async with server.connect() as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == {"create_image", "get_result", "generate_and_wait", "get_balance"}
    for name in ("create_image", "generate_and_wait"):
        schema = tools[name].input_schema
        assert schema["required"] == ["prompt"]
        assert set(schema["properties"]) == {"prompt", "model", "aspect_ratio", "images", "new_image"}
        annotations = tools[name].annotations
        assert annotations is not None
        assert annotations.read_only_hint is False and annotations.idempotent_hint is False
    assert tools["get_result"].annotations is not None and tools["get_result"].annotations.read_only_hint
    assert "21:9" in json.dumps(tools["create_image"].input_schema["properties"]["aspect_ratio"])
    for tool in (tools[name] for name in ("create_image", "get_result", "generate_and_wait")):
        assert tool.output_schema is not None
        assert {"task_id", "status", "file_path", "resource_uri", "sha256"} <= set(
            tool.output_schema["properties"]
        )


@pytest.mark.parametrize("mode", MODES)
async def test_generate_and_wait_returns_preview_link_and_the_stored_file(
    server: ServerLauncher, standin: StandIn, mode: str
) -> None:
    progress: list[tuple[float, float | None, str | None]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((value, total, message))

    async with server.connect(mode) as client:
        result = await client.call_tool(
            "generate_and_wait",
            {"prompt": "a red fox in snow", "aspect_ratio": "16:9", "model": "gpt-image-1-low"},
            progress_callback=on_progress,
        )
    assert not result.is_error, text_of(result)
    data = structured(result)
    assert data["status"] == "done" and data["upstream_status"] == "done"
    assert data["model"] == "gpt-image-1-low" and data["aspect_ratio"] == "16:9"
    assert data["prompt"] == "a red fox in snow"
    task_id = data["task_id"]

    # The stored file is exactly what GPTunnel served, and described truthfully.
    served = standin.image_bytes(task_id)
    stored = Path(data["file_path"])
    assert stored.is_absolute() and stored.read_bytes() == served
    assert data["sha256"] == hashlib.sha256(served).hexdigest()
    assert data["size_bytes"] == len(served)
    assert (data["width"], data["height"]) == (1200, 800)
    assert data["mime_type"] == "image/webp"
    assert data["resource_uri"] == f"gptunnel://images/{task_id}/file"
    assert data["source_url"].startswith(standin.url) and data["source_url_expires_at"]

    # The preview: an image block small enough for every client; no base64 in structured content.
    kinds = [block.type for block in result.content]
    assert kinds == ["image", "resource_link", "text"]
    preview = result.content[0]
    raw = base64.b64decode(preview.data)
    assert len(preview.data) < 1_000_000
    with Image.open(io.BytesIO(raw)) as image:
        assert max(image.size) == 512 and image.size[0] > image.size[1]
    assert preview.data not in json.dumps(data)
    assert result.content[1].uri == data["resource_uri"]
    assert str(stored) in result.content[2].text

    # Progress came while it waited, saying the status and the time.
    assert progress, "no progress notification arrived"
    assert all(b[0] >= a[0] for a, b in itertools.pairwise(progress))
    assert any("elapsed" in (m or "") for _, _, m in progress)
    assert standin.stats.create_calls == 1


async def test_create_then_get_result_downloads_once_and_serves_from_the_store(
    server: ServerLauncher, standin: StandIn
) -> None:
    async with server.connect() as client:
        started = structured(await client.call_tool("create_image", {"prompt": "a lighthouse at dusk"}))
        assert started["status"] == "pending" and started["file_path"] is None
        task_id = started["task_id"]
        assert len(task_id) == 24

        deadline = anyio.current_time() + 15
        while True:
            result = await client.call_tool("get_result", {"task_id": task_id})
            data = structured(result)
            if data["status"] != "pending" or anyio.current_time() > deadline:
                break
            await anyio.sleep(0.2)
        assert data["status"] == "done", data
        assert [b.type for b in result.content] == ["image", "resource_link", "text"]
        assert standin.stats.download_calls == 1

        # Finished: answered from the store, also after GPTunnel's link has expired.
        calls = standin.stats.result_calls
        standin.expire_files()
        again = await client.call_tool("get_result", {"task_id": task_id.upper()})
        assert structured(again)["sha256"] == data["sha256"]
        assert standin.stats.result_calls == calls
        assert standin.stats.download_calls == 1


async def test_wait_timeout_returns_pending_with_advice_not_an_error(
    server: ServerLauncher, standin: StandIn
) -> None:
    standin.behaviour.generation_seconds = 3
    async with server.connect(GPTUNNEL_WAIT_TIMEOUT="1.5") as client:
        result = await client.call_tool("generate_and_wait", {"prompt": "slow"})
        assert not result.is_error
        data = structured(result)
        assert data["status"] == "pending"
        assert "get_result" in data["message"] and data["task_id"] in data["message"]
        # The task was kept and can be finished later without a new create.
        await anyio.sleep(3.5)
        done = structured(await client.call_tool("get_result", {"task_id": data["task_id"]}))
    assert done["status"] == "done"
    assert standin.stats.create_calls == 1


async def test_cancelled_wait_stops_polling_and_the_task_stays_resumable(
    server: ServerLauncher, standin: StandIn
) -> None:
    standin.behaviour.generation_seconds = 3
    async with server.connect() as client:
        with anyio.move_on_after(1.2):
            await client.call_tool("generate_and_wait", {"prompt": "cancel me"})
        (task_id,) = standin.task_ids()
        await anyio.sleep(0.5)
        polls = standin.stats.result_calls
        await anyio.sleep(1.5)
        assert standin.stats.result_calls == polls, "polling went on after the call was cancelled"
        history = json.loads((await client.read_resource("gptunnel://images")).contents[0].text)
        assert [t["task_id"] for t in history["tasks"]] == [task_id]
        await anyio.sleep(1)
        done = structured(await client.call_tool("get_result", {"task_id": task_id}))
    assert done["status"] == "done"
    assert standin.stats.create_calls == 1


@pytest.mark.parametrize("mode", MODES)
async def test_resources_history_record_and_file(server: ServerLauncher, standin: StandIn, mode: str) -> None:
    async with server.connect(mode) as client:
        first = structured(await client.call_tool("generate_and_wait", {"prompt": "first"}))
        second = structured(
            await client.call_tool("generate_and_wait", {"prompt": "second", "model": "flux-dev"})
        )

        listed = {r.uri: r for r in (await client.list_resources()).resources}
        assert "gptunnel://images" in listed
        for data in (first, second):
            entry = listed[data["resource_uri"]]
            assert entry.mime_type == "image/webp" and entry.size == data["size_bytes"]

        history = json.loads((await client.read_resource("gptunnel://images")).contents[0].text)
        assert [t["task_id"] for t in history["tasks"]] == [second["task_id"], first["task_id"]]
        assert history["tasks"][0]["resource_uri"] == f"gptunnel://images/{second['task_id']}"

        record = await client.read_resource(f"gptunnel://images/{first['task_id']}")
        assert record.contents[0].mime_type == "application/json"
        assert json.loads(record.contents[0].text)["sha256"] == first["sha256"]

        blob = (await client.read_resource(first["resource_uri"])).contents[0]
        assert blob.mime_type == "image/webp"
        assert base64.b64decode(blob.blob) == standin.image_bytes(first["task_id"])

        templates = {t.uri_template for t in (await client.list_resource_templates()).resource_templates}
        assert templates == {"gptunnel://images/{task_id}", "gptunnel://images/{task_id}/file"}

        for bad in (
            "gptunnel://images/0123456789abcdef01234567",
            "gptunnel://images/nope/file",
            "gptunnel://x",
        ):
            with pytest.raises(Exception, match="not found") as info:
                await client.read_resource(bad)
            assert getattr(info.value, "code", None) == -32602


async def test_list_changed_reaches_2025_clients(server: ServerLauncher) -> None:
    seen: list[Any] = []

    async def on_message(message: Any) -> None:
        seen.append(message)

    async with server.connect("legacy") as client:
        assert client.server_capabilities.resources is not None
        assert client.server_capabilities.resources.list_changed
        client.session._message_handler = on_message  # type: ignore[attr-defined]
        await client.call_tool("generate_and_wait", {"prompt": "notify me"})
        await anyio.sleep(0.3)
    assert any(isinstance(m, ResourceListChangedNotification) for m in seen), seen


async def test_list_changed_reaches_2026_subscribers(server: ServerLauncher) -> None:
    async with server.connect() as client:
        assert client.protocol_version == "2026-07-28"
        async with client.listen(resources_list_changed=True) as subscription:
            await client.call_tool("generate_and_wait", {"prompt": "notify me too"})
            with anyio.fail_after(5):
                event = await subscription.__anext__()
    assert "resources" in type(event).__name__.lower() or "list_changed" in str(event)


async def test_history_and_files_survive_a_restart_and_a_pending_task_finishes_after_it(
    server: ServerLauncher, standin: StandIn
) -> None:
    async with server.connect() as client:
        done = structured(await client.call_tool("generate_and_wait", {"prompt": "kept"}))
        standin.behaviour.generation_seconds = 1.5
        pending = structured(await client.call_tool("create_image", {"prompt": "finished later"}))
    await anyio.sleep(1.6)
    async with server.connect() as client:
        history = json.loads((await client.read_resource("gptunnel://images")).contents[0].text)
        assert {t["task_id"] for t in history["tasks"]} == {done["task_id"], pending["task_id"]}
        blob = (await client.read_resource(done["resource_uri"])).contents[0]
        assert hashlib.sha256(base64.b64decode(blob.blob)).hexdigest() == done["sha256"]
        finished = structured(await client.call_tool("get_result", {"task_id": pending["task_id"]}))
    assert finished["status"] == "done"
    assert Path(finished["file_path"]).read_bytes() == standin.image_bytes(pending["task_id"])
    # One create per image, one download per image: the restart cost nothing extra.
    assert standin.stats.create_calls == 2
    assert standin.stats.download_calls == 2
