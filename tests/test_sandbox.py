"""The sandbox's fake GPTunnel, driven through its ASGI transport as the server will drive it."""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from PIL import Image, ImageDraw, ImageFont

from gptunnel_mcp._sandbox import ASPECT_SIZES, FONT_PATH, Sandbox, render_image

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    # Here as well as in conftest.py, so that this module stands on its own.
    return "asyncio"


@contextlib.asynccontextmanager
async def connect(sandbox: Sandbox) -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(
        transport=sandbox.transport(), base_url=sandbox.base_url, headers={"Authorization": "any-key"}
    ) as client:
        yield client


async def create(client: httpx2.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await client.post("/v1/media/create", json={"model": "gpt-image-1-low", **body})
    assert response.status_code == 200
    answer: dict[str, Any] = response.json()
    assert answer["code"] == 0, answer
    return answer


async def result(client: httpx2.AsyncClient, task_id: str) -> dict[str, Any]:
    response = await client.post("/v1/media/result", json={"task_id": task_id})
    assert response.status_code == 200
    answer: dict[str, Any] = response.json()
    return answer


async def wait_done(client: httpx2.AsyncClient, task_id: str) -> dict[str, Any]:
    with anyio.fail_after(3):
        while True:
            answer = await result(client, task_id)
            if answer["status"] == "done":
                return answer
            await anyio.sleep(0.02)


async def download(client: httpx2.AsyncClient, url: str) -> Image.Image:
    response = await client.get(url)
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert int(response.headers["content-length"]) == len(response.content)
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return image


async def test_task_goes_idle_then_processing_then_done_with_a_file_on_the_same_origin(
    tmp_path: Path,
) -> None:
    sandbox = Sandbox(tmp_path, generation_seconds=0.4, jitter=0)
    async with connect(sandbox) as client:
        started = time.time()
        task = await create(client, prompt="a red fox in the snow", ar="16:9")
        assert len(task["id"]) == 24 and int(task["id"], 16) >= 0 and task["id"] == task["id"].lower()
        assert task["status"] == "idle" and task["url"] is None
        assert task["model"] == "gpt-image-1-low" and task["prompt"] == "a red fox in the snow"
        assert isinstance(task["created_at"], int) and abs(task["created_at"] - started) <= 1
        assert (await result(client, task["id"]))["status"] == "idle"

        await anyio.sleep(0.2)
        response = await client.get("/v1/media/result", params={"task_id": task["id"]})
        assert response.json()["status"] == "processing" and response.json()["url"] is None
        early = await client.get(f"/files/{task['id']}.png")
        assert early.status_code == 404

        done = await wait_done(client, task["id"])
        assert time.time() - started >= 0.4
        assert done["url"].startswith(f"{sandbox.base_url}/files/")
        image = await download(client, done["url"])
        assert image.format == "PNG"
        assert image.width / image.height == pytest.approx(16 / 9, rel=0.01)


@pytest.mark.parametrize("ar", [*ASPECT_SIZES, None])
async def test_picture_has_the_requested_aspect_ratio(tmp_path: Path, ar: str | None) -> None:
    sandbox = Sandbox(tmp_path, generation_seconds=0, jitter=0)
    async with connect(sandbox) as client:
        task = await create(client, prompt="a lighthouse", **({"ar": ar} if ar else {}))
        image = await download(client, (await wait_done(client, task["id"]))["url"])
    across, down = (int(part) for part in (ar or "1:1").split(":"))
    assert image.width / image.height == pytest.approx(across / down, rel=0.01)
    assert image.width * image.height >= 640_000


async def test_task_made_before_a_restart_finishes_on_the_clock_after_it(tmp_path: Path) -> None:
    async with connect(Sandbox(tmp_path, generation_seconds=0.3, jitter=0)) as client:
        task = await create(client, prompt="рыжая лиса в снегу", ar="9:16")

    # A new instance, as after a server restart, with a different setting for new tasks.
    restarted = Sandbox(tmp_path, generation_seconds=60, jitter=0)
    async with connect(restarted) as client:
        pending = await result(client, task["id"])
        assert pending["code"] == 0 and pending["status"] in ("idle", "processing")
        assert pending["prompt"] == "рыжая лиса в снегу" and pending["created_at"] == task["created_at"]
        done = await wait_done(client, task["id"])
        image = await download(client, done["url"])
    assert image.width / image.height == pytest.approx(9 / 16, rel=0.01)


async def test_unknown_task_is_code_4(tmp_path: Path) -> None:
    async with connect(Sandbox(tmp_path)) as client:
        assert await result(client, "0123456789abcdef01234567") == {"code": 4, "error": "record not found"}
        response = await client.get("/v1/media/result", params={"task_id": "0123456789abcdef01234567"})
        assert response.status_code == 200 and response.json()["code"] == 4
        assert (await client.get("/files/0123456789abcdef01234567.png")).status_code == 404


async def test_path_traversal_in_a_task_id_is_refused(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    # A finished task where "../decoy" would lead if the id were used as a path unchecked.
    decoy = {"id": "../decoy", "model": "m", "prompt": "p", "ar": None, "created": 0.0, "duration": 0.0}
    (tmp_path / "decoy.json").write_text(json.dumps(decoy))
    async with connect(Sandbox(state_dir)) as client:
        for task_id in ("../decoy", "../../etc/passwd", "/etc/passwd", "0123456789abcdef0123456/"):
            assert (await result(client, task_id))["code"] == 4
        for name in ("..%2Fdecoy.json", "..%2F..%2Fetc%2Fpasswd", "decoy.png"):
            assert (await client.get(f"/files/{name}")).status_code == 404
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoy.json", "state"]


@pytest.mark.parametrize(
    "body",
    [
        {"model": "gpt-image-1-low"},
        {"model": "", "prompt": "a cat"},
        {"model": "gpt-image-1-low", "prompt": 42},
        {"model": "gpt-image-1-low", "prompt": "a cat", "ar": "5:4"},
        {"model": "gpt-image-1-low", "prompt": "a cat", "images": ["data:image/png;base64,AAAA"]},
        ["not", "an", "object"],
    ],
)
async def test_invalid_create_is_code_3_with_issues(tmp_path: Path, body: Any) -> None:
    async with connect(Sandbox(tmp_path)) as client:
        response = await client.post("/v1/media/create", json=body)
    assert response.status_code == 200
    assert response.json()["code"] == 3 and response.json()["issues"]
    assert list(tmp_path.iterdir()) == []


async def test_result_without_a_task_id_and_a_body_that_is_not_json_are_code_3(tmp_path: Path) -> None:
    async with connect(Sandbox(tmp_path)) as client:
        assert (await client.post("/v1/media/result", json={})).json()["code"] == 3
        assert (await client.get("/v1/media/result")).json()["code"] == 3
        assert (await client.post("/v1/media/create", content=b"{not json")).json()["code"] == 3


async def test_balance_and_unknown_methods(tmp_path: Path) -> None:
    async with connect(Sandbox(tmp_path)) as client:
        balance = await client.get("/v1/balance")
        unknown = await client.post("/v1/media/delete", json={})
    assert balance.json() == {
        "object": "balance",
        "balance": 100.0,
        "creditLimit": 0.0,
        "orgId": "org-sandbox",
    }
    assert unknown.status_code == 200 and unknown.json()["code"] == 99


def text_box(png: bytes) -> Image.Image:
    """The white box the prompt is written in, cut out of the picture."""
    image = Image.open(io.BytesIO(png)).convert("L")
    box = image.point(lambda v: 255 if v == 255 else 0).getbbox()
    assert box is not None
    return image.crop(box)


def test_cyrillic_prompts_are_drawn_as_their_own_letters() -> None:
    # Same word lengths: in a font without Cyrillic both would be the same row of "no glyph" boxes.
    first = text_box(render_image("рыжая лиса в снегу", ASPECT_SIZES["16:9"]))
    second = text_box(render_image("белая сова в тайге", ASPECT_SIZES["16:9"]))
    assert first.size == second.size
    assert first.tobytes() != second.tobytes()
    assert first.point(lambda v: 255 if v < 64 else 0).getbbox() is not None  # dark text in the box


def test_vendored_font_has_glyphs_for_russian_and_is_small() -> None:
    font = ImageFont.truetype(FONT_PATH, 48)

    def drawn(char: str) -> bytes:
        canvas = Image.new("L", (64, 64))
        ImageDraw.Draw(canvas).text((8, 0), char, font=font, fill=255)
        return canvas.tobytes()

    missing = drawn("\u4e00")  # a CJK character, left out of the subset: the "no glyph" box
    for char in "жЖёЁщЩъ№€«»…–":
        assert font.getmask(char).getbbox() is not None
        assert drawn(char) != missing, char
    assert FONT_PATH.stat().st_size < 150_000
    assert "Bitstream" in (FONT_PATH.parent / "LICENSE-DejaVu.txt").read_text()
