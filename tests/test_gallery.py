"""The gallery (MCP Apps) as a host meets it, below the browser: the view resource, the tools
bound to it, and the app-only tools the view calls for pictures and to follow a task."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.client.extension import ClientExtension
from PIL import Image

from .conftest import MULTI_USER, ServerLauncher, mcp_client, serve_http, structured, text_of
from .standin import Behaviour, StandIn

pytestmark = [pytest.mark.anyio, pytest.mark.standin(generation_seconds=0.05, image_size=(640, 400))]

GALLERY = "ui://gptunnel/gallery.html"
KEY_A = "sk-user-A-gallery-5b1e7c9d2f"
KEY_B = "sk-user-B-gallery-8a3c6e0f4d"


class AppsHost(ClientExtension):
    """What a host that draws MCP Apps views says about itself."""

    identifier = "io.modelcontextprotocol/ui"

    def settings(self) -> dict[str, Any]:
        return {"mimeTypes": ["text/html;profile=mcp-app"]}


async def tools_by_name(client: Client) -> dict[str, Any]:
    return {tool.name: tool for tool in (await client.list_tools()).tools}


async def made(client: Client, prompt: str) -> str:
    result = await client.call_tool("generate_and_wait", {"prompt": prompt})
    assert structured(result)["status"] == "done", text_of(result)
    return str(structured(result)["task_id"])


def picture(result: Any) -> Image.Image:
    [block] = [b for b in result.content if b.type == "image"]
    return Image.open(io.BytesIO(base64.b64decode(block.data)))


async def test_the_view_is_served_as_an_app_and_the_image_tools_are_bound_to_it(
    server: ServerLauncher,
) -> None:
    async with server.connect(extensions=[AppsHost()]) as client:
        tools = await tools_by_name(client)
        for name in ("generate_and_wait", "get_result", "show_gallery"):
            meta = tools[name].meta or {}
            assert meta["ui"]["resourceUri"] == GALLERY, name
            assert meta["ui/resourceUri"] == GALLERY, name
            assert "visibility" not in meta["ui"], name
        for name in ("gallery_image", "gallery_wait"):
            assert (tools[name].meta or {})["ui"]["visibility"] == ["app"], name
        # Tools the view does not show stay unbound: an agent's create_image opens no view.
        assert "ui" not in (tools["create_image"].meta or {})

        read = await client.read_resource(GALLERY)
        [content] = read.contents
        assert content.mime_type == "text/html;profile=mcp-app"
        html = getattr(content, "text", "")
        assert html.startswith("<!doctype html>") and "ui/initialize" in html
        # Self-contained: hosts' sandboxes load nothing from elsewhere.
        assert 'src="http' not in html and 'href="http' not in html and "@import" not in html
        assert len(html.encode()) < 200_000


async def test_hosts_without_apps_see_only_the_tools_an_agent_uses(server: ServerLauncher) -> None:
    async with server.connect() as client:
        tools = await tools_by_name(client)
        assert "gallery_image" not in tools and "gallery_wait" not in tools
        assert "show_gallery" in tools and "generate_and_wait" in tools


async def test_the_view_gets_pictures_of_the_callers_own_images_and_not_of_others(home: Path) -> None:
    behaviour = Behaviour(generation_seconds=0.05, image_size=(640, 400))
    with StandIn(api_key=None, behaviour=behaviour) as standin:  # any key: the users' own
        settings = ServerLauncher(standin, home, transport="http").settings(**MULTI_USER)
        async with (
            serve_http(settings) as url,
            mcp_client(url, KEY_A) as alice,
            mcp_client(url, KEY_B) as bob,
        ):
            task_id = await made(alice, "a lighthouse at dusk " + "with a long story " * 80)
            thumb = await alice.call_tool("gallery_image", {"task_id": task_id})
            assert not thumb.is_error, text_of(thumb)
            assert max(picture(thumb).size) <= 384
            record = structured(thumb)
            # The whole prompt, as regenerate must send it, not the tool result's shortened one.
            assert len(record["prompt"]) > 1000 and not record["prompt_truncated"]
            large = await alice.call_tool("gallery_image", {"task_id": task_id, "size": "large"})
            assert picture(large).size == (640, 400)

            for name, arguments in (
                ("gallery_image", {"task_id": task_id}),
                ("gallery_wait", {"task_id": task_id}),
            ):
                refused = await bob.call_tool(name, arguments)
                assert refused.is_error and f"No task {task_id}" in text_of(refused), name
                assert not [b for b in refused.content if b.type == "image"]


async def test_a_pending_task_is_followed_call_after_call_until_its_image_is_kept(
    memory_server: ServerLauncher, standin: StandIn
) -> None:
    standin.behaviour.generation_seconds = 600.0
    async with memory_server.connect(GPTUNNEL_WAIT_TIMEOUT="1") as client:
        started = await client.call_tool("create_image", {"prompt": "a slow sunrise"})
        task_id = structured(started)["task_id"]
        waited = await client.call_tool("gallery_wait", {"task_id": task_id})
        state = structured(waited)
        assert state["image"]["status"] == "pending" and state["elapsed_seconds"] is not None
        assert state["message"]

        # Without a picture while pending: the view shows progress instead.
        pending = await client.call_tool("gallery_image", {"task_id": task_id})
        assert not pending.is_error and not [b for b in pending.content if b.type == "image"]

        standin.finish(task_id)
        done = structured(await client.call_tool("gallery_wait", {"task_id": task_id}))
        assert done["image"]["status"] == "done" and done["image"]["width"] == 640
        assert picture(await client.call_tool("gallery_image", {"task_id": task_id})).size[0] <= 384


async def test_show_gallery_lists_the_history_for_hosts_with_and_without_apps(
    memory_server: ServerLauncher,
) -> None:
    async with memory_server.connect() as client:
        fox = await made(client, "a red fox in snow")
        await made(client, "a grey wolf")
        everything = await client.call_tool("show_gallery", {})
        prompts = [row["prompt"] for row in structured(everything)["tasks"]]
        assert prompts == ["a grey wolf", "a red fox in snow"]
        # A host that draws no view still shows the model what is there.
        assert "a red fox in snow" in text_of(everything) and fox in text_of(everything)
        foxes = structured(await client.call_tool("show_gallery", {"query": "FOX"}))
        assert [row["task_id"] for row in foxes["tasks"]] == [fox]
        # No pictures in the model's context: tiles come through gallery_image.
        assert [b.type for b in everything.content] == ["text"]


async def test_many_views_following_one_task_share_its_polls_and_each_wait_ends(
    memory_server: ServerLauncher, standin: StandIn
) -> None:
    standin.behaviour.generation_seconds = 600.0
    standin.behaviour.result_delay = 0.2
    async with memory_server.connect(GPTUNNEL_WAIT_TIMEOUT="1") as client:
        task_id = structured(await client.call_tool("create_image", {"prompt": "a slow sunrise"}))["task_id"]
        states: list[str] = []

        async def follow() -> None:
            waited = await client.call_tool("gallery_wait", {"task_id": task_id})
            states.append(structured(waited)["image"]["status"])

        async with anyio.create_task_group() as group:
            for _ in range(40):
                group.start_soon(follow)
        # Every wait came back (within the server's wait timeout), and GPTunnel was never asked
        # about the task twice at once however many views follow it.
        assert states == ["pending"] * 40
        assert standin.stats.max_concurrent_result_calls_by_task[task_id] == 1
