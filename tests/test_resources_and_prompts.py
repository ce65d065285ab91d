"""What agents get besides the image tools' results: the image history and files as resources, the
model catalogue and its checks, the image-brief prompt, task id completion and the balance. With
the official client and a stand-in GPTunnel; over both transports only where the handshake era
(2025-11-25 vs 2026-07-28) shapes the answers.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from mcp import Client
from mcp_types import BlobResourceContents, ResourceTemplateReference, TextResourceContents

from .conftest import ServerLauncher, structured, text_of
from .standin import StandIn

# Images are ready at the first poll and small enough to render in a few milliseconds.
pytestmark = [pytest.mark.anyio, pytest.mark.standin(generation_seconds=0.05, image_size=(320, 200))]

MODES = ["auto", "legacy"]  # 2026-07-28 (discovered) and the 2025-11-25 handshake


async def read_json(client: Client, uri: str) -> Any:
    (contents,) = (await client.read_resource(uri)).contents
    assert isinstance(contents, TextResourceContents)
    assert contents.mime_type == "application/json"
    return json.loads(contents.text)


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

        history = await read_json(client, "gptunnel://images")
        assert [t["task_id"] for t in history["tasks"]] == [second["task_id"], first["task_id"]]
        assert history["tasks"][0]["resource_uri"] == f"gptunnel://images/{second['task_id']}"

        record = await read_json(client, f"gptunnel://images/{first['task_id']}")
        assert record["sha256"] == first["sha256"]

        (blob,) = (await client.read_resource(first["resource_uri"])).contents
        assert isinstance(blob, BlobResourceContents)
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


async def test_get_balance_reports_the_account(memory_server: ServerLauncher, standin: StandIn) -> None:
    standin.behaviour.balance = 123.45
    standin.behaviour.credit_limit = 10
    async with memory_server.connect() as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert tools["get_balance"].annotations is not None
        assert tools["get_balance"].annotations.read_only_hint
        result = await client.call_tool("get_balance", {})
    assert not result.is_error, text_of(result)
    assert structured(result)["balance"] == 123.45
    assert structured(result)["credit_limit"] == 10
    assert "123.45" in text_of(result)
    assert standin.stats.balance_calls == 1


async def test_models_resource_lists_what_each_model_takes(memory_server: ServerLauncher) -> None:
    async with memory_server.connect() as client:
        listed = {r.uri for r in (await client.list_resources()).resources}
        assert "gptunnel://models" in listed
        data = await read_json(client, "gptunnel://models")
    models = {m["id"]: m for m in data["models"]}
    assert {
        "gpt-image-1-low",
        "gpt-image-1-medium",
        "gpt-image-1-high",
        "google-imagen-3",
        "flux-dev",
        "seedream-3",
        "yandex-art",
    } <= set(models)
    assert "21:9" in models["flux-dev"]["aspect_ratios"]
    assert models["yandex-art"]["aspect_ratios"] == [] and not models["yandex-art"]["reference_images"]
    assert models["gpt-image-1-high"]["reference_images"]
    assert data["default_model"] in models


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ({"model": "yandex-art", "aspect_ratio": "16:9"}, "takes no aspect_ratio"),
        ({"model": "gpt-image-1-low", "aspect_ratio": "21:9"}, "1:1, 16:9"),
        ({"model": "flux-dev", "images": ["https://example.com/a.png"]}, "takes no reference images"),
    ],
)
async def test_an_option_a_known_model_does_not_take_costs_nothing(
    memory_server: ServerLauncher, standin: StandIn, args: dict[str, object], words: str
) -> None:
    async with memory_server.connect() as client:
        result = await client.call_tool("create_image", {"prompt": "x", **args})
    assert result.is_error
    assert words in text_of(result)
    assert "Nothing was sent" in text_of(result)
    assert standin.stats.create_calls == 0


async def test_known_options_and_unknown_models_pass(memory_server: ServerLauncher, standin: StandIn) -> None:
    async with memory_server.connect() as client:
        for args in (
            {"model": "flux-dev", "aspect_ratio": "21:9"},
            # Public addresses spelled out: reference hosts are looked up, and tests run offline.
            {"model": "gpt-image-1-low", "images": ["https://1.1.1.1/ref.png"]},
            {
                "model": "brand-new-model-2027",
                "aspect_ratio": "9:21",
                "images": ["https://8.8.8.8/r.png"],
            },
        ):
            result = await client.call_tool("create_image", {"prompt": "x", **args})
            assert not result.is_error, text_of(result)
            assert structured(result)["model"] == args["model"]
    assert standin.stats.create_calls == 3


async def test_image_brief_prompt(memory_server: ServerLauncher) -> None:
    async with memory_server.connect() as client:
        prompts = {p.name: p for p in (await client.list_prompts()).prompts}
        brief = prompts["image-brief"]
        names = [a.name for a in brief.arguments or []]
        assert names[0] == "idea"
        assert {
            "subject",
            "position",
            "photo_type",
            "wardrobe",
            "lens",
            "environment",
            "lighting",
            "time_of_day",
            "textures",
            "atmosphere",
            "aesthetic",
            "film_stock",
        } <= set(names)
        assert [a.name for a in brief.arguments or [] if a.required] == ["idea"]
        result = await client.get_prompt("image-brief", {"idea": "a red fox in snow", "lens": "85mm f/1.8"})
    text = result.messages[0].content.text  # type: ignore[union-attr]
    assert "a red fox in snow" in text
    assert "- Lens: 85mm f/1.8" in text
    assert "- Lighting: (choose:" in text
    assert "generate_and_wait" in text


async def test_task_id_completion_offers_recent_ids_first(memory_server: ServerLauncher) -> None:
    async with memory_server.connect() as client:
        ids = [
            structured(await client.call_tool("create_image", {"prompt": f"p{i}"}))["task_id"]
            for i in range(3)
        ]
        ref = ResourceTemplateReference(uri="gptunnel://images/{task_id}/file")
        everything = await client.complete(ref, {"name": "task_id", "value": ""})
        assert everything.completion.values == list(reversed(ids))
        one = await client.complete(ref, {"name": "task_id", "value": ids[1][:20]})
        assert one.completion.values == [ids[1]]
        none = await client.complete(ref, {"name": "task_id", "value": "zzz"})
        assert none.completion.values == []
