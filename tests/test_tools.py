"""The image tools as agents use them, with the official client and a stand-in GPTunnel: schemas,
results, progress, waits that time out or are cancelled, restarts, list-changed notices.

Tasks end on command (`standin.finish`) or after a few hundredths of a second, so no test sleeps
for a generation. Tests run over both transports only where the transport carries the behaviour
(progress and list-changed notifications, cancellation, the 2025-11-25 vs 2026-07-28 handshake).
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
from mcp import Client
from mcp_types import (
    BlobResourceContents,
    ImageContent,
    ResourceLink,
    ResourceListChangedNotification,
    TextContent,
    TextResourceContents,
)
from PIL import Image

from .conftest import TOOL_NAMES, ServerLauncher, structured, text_of
from .standin import StandIn

# Images are ready at the first poll and small enough to render in a few milliseconds.
pytestmark = [pytest.mark.anyio, pytest.mark.standin(generation_seconds=0.05, image_size=(320, 200))]

MODES = ["auto", "legacy"]  # 2026-07-28 (discovered) and the 2025-11-25 handshake
#: Long enough that only `standin.finish` ends a task within a test.
FOREVER = 600.0
#: More than two of the quick poll schedule's longest gaps (0.15 s plus 10 % jitter).
QUIET_WINDOW = 0.4


async def history_ids(client: Client) -> list[str]:
    (contents,) = (await client.read_resource("gptunnel://images")).contents
    assert isinstance(contents, TextResourceContents)
    return [t["task_id"] for t in json.loads(contents.text)["tasks"]]


async def test_tools_are_listed_with_schemas_and_truthful_annotations(memory_server: ServerLauncher) -> None:
    async with memory_server.connect() as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == TOOL_NAMES
    for name in ("create_image", "generate_and_wait"):
        schema = tools[name].input_schema
        assert schema["required"] == ["prompt"]
        arguments = {"prompt", "model", "aspect_ratio", "images", "new_image", "count"}
        assert set(schema["properties"]) == arguments
        annotations = tools[name].annotations
        assert annotations is not None
        assert annotations.read_only_hint is False and annotations.idempotent_hint is False
    assert tools["get_result"].annotations is not None and tools["get_result"].annotations.read_only_hint
    searching = tools["search_images"].annotations
    # It reads this server's history only: nothing outside is touched.
    assert searching is not None and searching.read_only_hint and searching.open_world_hint is False
    assert set(tools["search_images"].input_schema["properties"]) == {
        "query",
        "model",
        "status",
        "since",
        "limit",
        "cursor",
    }
    # The roots it asks the client for are no argument the agent gives.
    save = tools["save_image"]
    assert save.input_schema["required"] == ["task_id", "destination"]
    assert set(save.input_schema["properties"]) == {"task_id", "destination", "overwrite"}
    assert save.annotations is not None
    assert save.annotations.destructive_hint and not save.annotations.read_only_hint
    assert save.output_schema is not None
    assert {"path", "mime_type", "converted"} <= set(save.output_schema["properties"])
    assert "21:9" in json.dumps(tools["create_image"].input_schema["properties"]["aspect_ratio"])
    for tool in (tools[name] for name in ("create_image", "get_result", "generate_and_wait")):
        # One image's result, or for count above 1 the batch of them: both objects.
        output = tool.output_schema
        assert output is not None and output["type"] == "object"
        shapes = {ref["$ref"].rpartition("/")[2] for ref in output["anyOf"]}
        assert shapes == {"ImageResult", "BatchResult"}
        single, batch = output["$defs"]["ImageResult"], output["$defs"]["BatchResult"]
        assert {"task_id", "status", "file_path", "resource_uri", "sha256"} <= set(single["properties"])
        assert batch["properties"]["images"]["items"] == {"$ref": "#/$defs/ImageResult"}


@pytest.mark.parametrize("mode", MODES)
async def test_generate_and_wait_returns_preview_link_and_the_stored_file(
    server: ServerLauncher, standin: StandIn, mode: str
) -> None:
    # Long enough for a poll before the end, so progress has something to report meanwhile;
    # wider than the 512-pixel preview, so the preview is scaled down.
    standin.behaviour.generation_seconds = 0.1
    standin.behaviour.image_size = (640, 400)
    reports: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        reports.append((progress, total, message))

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
    assert (data["width"], data["height"]) == (640, 400)
    assert data["mime_type"] == "image/webp"
    assert data["resource_uri"] == f"gptunnel://images/{task_id}/file"
    assert data["source_url"].startswith(standin.url) and data["source_url_expires_at"]

    # The preview: an image block small enough for every client; no base64 in structured content.
    assert [block.type for block in result.content] == ["image", "resource_link", "text"]
    preview, link, text = result.content
    assert (
        isinstance(preview, ImageContent) and isinstance(link, ResourceLink) and isinstance(text, TextContent)
    )
    raw = base64.b64decode(preview.data)
    assert len(preview.data) < 1_000_000
    with Image.open(io.BytesIO(raw)) as image:
        assert max(image.size) == 512 and image.size[0] > image.size[1]
    assert preview.data not in json.dumps(data)
    assert link.uri == data["resource_uri"]
    assert str(stored) in text.text

    # Progress came while it waited, saying the status and the time.
    assert reports, "no progress notification arrived"
    assert all(b[0] >= a[0] for a, b in itertools.pairwise(reports))
    assert any("elapsed" in (m or "") for _, _, m in reports)
    assert standin.stats.create_calls == 1


async def test_create_then_get_result_downloads_once_and_serves_from_the_store(
    memory_server: ServerLauncher, standin: StandIn
) -> None:
    standin.behaviour.generation_seconds = FOREVER
    async with memory_server.connect() as client:
        started = structured(await client.call_tool("create_image", {"prompt": "a lighthouse at dusk"}))
        assert started["status"] == "pending" and started["file_path"] is None
        task_id = started["task_id"]
        assert len(task_id) == 24

        still = structured(await client.call_tool("get_result", {"task_id": task_id}))
        assert still["status"] == "pending" and still["file_path"] is None
        standin.finish(task_id)
        result = await client.call_tool("get_result", {"task_id": task_id})
        data = structured(result)
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
    memory_server: ServerLauncher, standin: StandIn
) -> None:
    standin.behaviour.generation_seconds = FOREVER
    async with memory_server.connect(GPTUNNEL_WAIT_TIMEOUT="0.2") as client:
        result = await client.call_tool("generate_and_wait", {"prompt": "slow"})
        assert not result.is_error
        data = structured(result)
        assert data["status"] == "pending"
        assert "get_result" in data["message"] and data["task_id"] in data["message"]
        # The task was kept and can be finished later without a new create.
        standin.finish(data["task_id"])
        done = structured(await client.call_tool("get_result", {"task_id": data["task_id"]}))
    assert done["status"] == "done"
    assert standin.stats.create_calls == 1


async def test_cancelled_wait_stops_polling_and_the_task_stays_resumable(
    server: ServerLauncher, standin: StandIn
) -> None:
    standin.behaviour.generation_seconds = FOREVER
    polled = anyio.Event()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        # The report after a poll says the time; the one at creation does not.
        if "elapsed" in (message or ""):
            polled.set()

    async def wait_for_it(client: Client) -> None:
        await client.call_tool("generate_and_wait", {"prompt": "cancel me"}, progress_callback=on_progress)

    async with server.connect() as client:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(wait_for_it, client)
            with anyio.fail_after(5):
                await polled.wait()
            tasks.cancel_scope.cancel()
        (task_id,) = standin.task_ids()
        assert standin.stats.result_calls > 0
        # The cancellation takes a moment to reach the server; once it has, no poll comes for
        # several of the schedule's gaps, while a wait still running would poll in each of them.
        quiet = False
        with anyio.move_on_after(3):
            polls = standin.stats.result_calls
            while not quiet:
                await anyio.sleep(QUIET_WINDOW)
                quiet, polls = standin.stats.result_calls == polls, standin.stats.result_calls
        assert quiet, "polling went on after the call was cancelled"
        assert await history_ids(client) == [task_id]
        assert standin.stats.result_calls == polls
        standin.finish(task_id)
        done = structured(await client.call_tool("get_result", {"task_id": task_id}))
    assert done["status"] == "done"
    assert standin.stats.create_calls == 1


async def test_list_changed_reaches_2025_clients(server: ServerLauncher) -> None:
    heard = anyio.Event()
    seen: list[Any] = []

    async def on_message(message: Any) -> None:
        seen.append(message)
        if isinstance(message, ResourceListChangedNotification):
            heard.set()

    async with server.connect("legacy") as client:
        assert client.server_capabilities.resources is not None
        assert client.server_capabilities.resources.list_changed
        client.session._message_handler = on_message
        await client.call_tool("generate_and_wait", {"prompt": "notify me"})
        with anyio.move_on_after(5):
            await heard.wait()
    assert heard.is_set(), seen


async def test_list_changed_reaches_2026_subscribers(server: ServerLauncher) -> None:
    async with server.connect() as client:
        assert client.protocol_version == "2026-07-28"
        async with client.listen(resources_list_changed=True) as subscription:
            await client.call_tool("generate_and_wait", {"prompt": "notify me too"})
            with anyio.fail_after(5):
                event = await subscription.__anext__()
    assert "resources" in type(event).__name__.lower() or "list_changed" in str(event)


async def test_history_and_files_survive_a_restart_and_a_pending_task_finishes_after_it(
    memory_server: ServerLauncher, standin: StandIn
) -> None:
    async with memory_server.connect() as client:
        done = structured(await client.call_tool("generate_and_wait", {"prompt": "kept"}))
        standin.behaviour.generation_seconds = FOREVER
        pending = structured(await client.call_tool("create_image", {"prompt": "finished later"}))
    # It ends while no server is running.
    standin.finish(pending["task_id"])
    async with memory_server.connect() as client:
        assert set(await history_ids(client)) == {done["task_id"], pending["task_id"]}
        (blob,) = (await client.read_resource(done["resource_uri"])).contents
        assert isinstance(blob, BlobResourceContents)
        assert hashlib.sha256(base64.b64decode(blob.blob)).hexdigest() == done["sha256"]
        finished = structured(await client.call_tool("get_result", {"task_id": pending["task_id"]}))
    assert finished["status"] == "done"
    assert Path(finished["file_path"]).read_bytes() == standin.image_bytes(pending["task_id"])
    # One create per image, one download per image: the restart cost nothing extra.
    assert standin.stats.create_calls == 2
    assert standin.stats.download_calls == 2
