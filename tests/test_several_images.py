"""Several images in one call (`count`): made in parallel, admitted whole or not at all, reused
image by image, one progress stream, and previews that share one budget."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp_types import ImageContent, ResourceLink

from gptunnel_mcp._images import PREVIEW_MAX_BYTES

from .conftest import ServerLauncher, structured, text_of
from .standin import StandIn

pytestmark = [pytest.mark.anyio, pytest.mark.standin(generation_seconds=0.2, image_size=(1600, 1600))]


async def test_three_images_in_one_call_with_one_progress_stream_and_one_preview_budget(
    server: ServerLauncher, standin: StandIn
) -> None:
    seen: list[tuple[float, str | None]] = []

    async def progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, message))

    async with server.connect() as client:
        made = await client.call_tool(
            "generate_and_wait", {"prompt": "three foxes", "count": 3}, progress_callback=progress
        )
    assert not made.is_error, text_of(made)
    batch = structured(made)
    images = batch["images"]
    assert [image["status"] for image in images] == ["done"] * 3 and batch["failures"] == []
    assert len({image["task_id"] for image in images}) == 3 and standin.stats.create_calls == 3
    assert batch["message"].startswith("3 of 3 images are ready")
    for image in images:
        assert Path(image["file_path"]).read_bytes() == standin.image_bytes(image["task_id"])
    previews = [block for block in made.content if isinstance(block, ImageContent)]
    links = [block for block in made.content if isinstance(block, ResourceLink)]
    assert len(previews) == 3 and len(links) == 3
    assert sum(len(base64.b64decode(p.data)) for p in previews) <= PREVIEW_MAX_BYTES
    values = [value for value, _ in seen]
    assert values and values == sorted(values) and len(set(values)) == len(values)
    assert any(message and message.startswith("image 3 of 3") for _, message in seen)


async def test_a_call_for_one_keeps_the_single_image_shape(memory_server: ServerLauncher) -> None:
    async with memory_server.connect() as client:
        one = structured(await client.call_tool("generate_and_wait", {"prompt": "one fox", "count": 1}))
    assert one["status"] == "done" and "task_id" in one and one["images"] == []


async def test_the_caps_admit_all_the_images_or_none(memory_server: ServerLauncher, standin: StandIn) -> None:
    async with memory_server.connect(GPTUNNEL_MAX_IMAGES_PER_HOUR="4") as client:
        assert not (await client.call_tool("create_image", {"prompt": "a first owl"})).is_error
        # Room for three more: four are refused together, and nothing is sent.
        refused = await client.call_tool("create_image", {"prompt": "four owls", "count": 4})
        assert refused.is_error and standin.stats.create_calls == 1
        text = text_of(refused)
        assert "GPTUNNEL_MAX_IMAGES_PER_HOUR" in text and "4 more images" in text
        assert "Nothing was sent to GPTunnel" in text
        made = structured(await client.call_tool("create_image", {"prompt": "three owls", "count": 3}))
        assert len(made["images"]) == 3 and standin.stats.create_calls == 4
    async with memory_server.connect(GPTUNNEL_MAX_IMAGES_PER_HOUR="2") as client:
        beyond = await client.call_tool("create_image", {"prompt": "three hawks", "count": 3})
    assert beyond.is_error and "asks for 3 images, more than the cap allows" in text_of(beyond)


async def test_parallel_calls_for_several_images_never_pass_a_cap(
    memory_server: ServerLauncher, standin: StandIn
) -> None:
    results: list[Any] = []
    async with memory_server.connect(GPTUNNEL_MAX_IMAGES_PER_DAY="5") as client:

        async def one(n: int) -> None:
            results.append(await client.call_tool("create_image", {"prompt": f"gulls {n}", "count": 2}))

        async with anyio.create_task_group() as group:
            for n in range(5):
                group.start_soon(one, n)
    # Two calls of two fit in five; a third would need six.
    assert standin.stats.create_calls == 4
    assert sum(1 for r in results if not r.is_error) == 2


async def test_each_image_is_reused_on_its_own(memory_server: ServerLauncher, standin: StandIn) -> None:
    async with memory_server.connect() as client:
        first = structured(await client.call_tool("create_image", {"prompt": "two herons", "count": 2}))
        again = structured(await client.call_tool("create_image", {"prompt": "two herons", "count": 3}))
        single = structured(await client.call_tool("create_image", {"prompt": "two herons"}))
    ids = [image["task_id"] for image in first["images"]]
    assert [image["task_id"] for image in again["images"]][:2] == ids
    assert [image["reused"] for image in again["images"]] == [True, True, False]
    assert single["task_id"] == ids[0] and single["reused"]
    assert standin.stats.create_calls == 3


async def test_a_partial_failure_names_the_image_and_keeps_the_others(
    memory_server: ServerLauncher, standin: StandIn
) -> None:
    standin.behaviour.create_codes = [0, 3, 0]
    async with memory_server.connect() as client:
        made = await client.call_tool("generate_and_wait", {"prompt": "three cranes", "count": 3})
        listed = structured(
            await client.call_tool("generate_and_wait", {"prompt": "three cranes", "count": 3})
        )
    assert not made.is_error, text_of(made)
    batch = structured(made)
    assert len(batch["images"]) == 2 and all(image["status"] == "done" for image in batch["images"])
    (failure,) = batch["failures"]
    assert failure["image"] in (1, 2, 3) and "GPTunnel rejected the request" in failure["error"]
    assert f"Image {failure['image']} was not started" in text_of(made)
    # The same call again makes only the missing image; the two made are reused.
    assert sum(image["reused"] for image in listed["images"]) == 2 and standin.stats.create_calls == 4


@pytest.mark.parametrize("count", [0, 5, -1])
async def test_count_out_of_range_is_refused_before_anything_is_sent(
    memory_server: ServerLauncher, standin: StandIn, count: int
) -> None:
    async with memory_server.connect() as client:
        refused = await client.call_tool("create_image", {"prompt": "too many", "count": count})
    assert refused.is_error and "count" in text_of(refused) and "1 to 4" in text_of(refused)
    assert standin.stats.create_calls == 0
