"""Images and memory: a small file cannot unpack into gigabytes, a preview is made once and fits
one byte budget whatever its format, and parallel reads of a large image queue."""

from __future__ import annotations

import base64
import functools
import io
import random
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import anyio
import pytest
from PIL import Image

from gptunnel_mcp import DownloadError, _engine, _images
from gptunnel_mcp._files import ImageFolder
from gptunnel_mcp._images import PREVIEW_MAX_BYTES, make_preview, pixel_size

from .conftest import ServerLauncher, structured, text_of
from .standin import StandIn

pytestmark = pytest.mark.standin(generation_seconds=0.05, image_size=(64, 64))

HUGE = (20000, 20000)  # 400 megapixels, ten times the default limit


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@functools.cache
def bomb_png(width: int = HUGE[0], height: int = HUGE[1]) -> bytes:
    """A valid black 1-bit PNG: tens of KB on the wire, gigabytes once decoded to 8 bits a pixel."""
    row = bytes(1 + (width + 7) // 8)  # filter byte, then the row's bits
    compressor = zlib.compressobj(9)
    rows_per_block = 1000
    idat = b"".join(compressor.compress(row * rows_per_block) for _ in range(height // rows_per_block))
    idat += compressor.compress(row * (height % rows_per_block)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def jpeg_claiming(size: tuple[int, int]) -> bytes:
    """A small JPEG whose frame header says `size`."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 8), "red").save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    frame = data.index(b"\xff\xc0")  # baseline frame header: marker, length, precision, height, width
    data[frame + 5 : frame + 9] = struct.pack(">HH", size[1], size[0])
    return bytes(data)


def noise(mode: str, size: tuple[int, int]) -> Image.Image:
    channels = len(mode)
    return Image.frombytes(mode, size, random.Random(9).randbytes(size[0] * size[1] * channels))


# --- small files with huge pixel counts ----------------------------------------------------------


@pytest.mark.anyio
async def test_a_small_file_of_huge_pixel_count_is_refused_before_decoding(
    memory_server: ServerLauncher, standin: StandIn, home: Path
) -> None:
    standin.behaviour.download_bytes_override = bomb_png()
    assert len(bomb_png()) < 1_000_000
    async with memory_server.connect() as client:
        result = await client.call_tool("generate_and_wait", {"prompt": "a pixel bomb"})
    text = text_of(result)
    assert result.is_error, text
    assert "20000x20000" in text and "GPTUNNEL_MAX_IMAGE_PIXELS" in text and "40.0 megapixels" in text
    assert "Error executing tool" not in text and "DecompressionBomb" not in text
    assert not [p for p in (home / "images").glob("*") if p.is_file()], "the bomb was stored"


def test_a_jpeg_size_is_read_from_its_frame_header_and_checked_before_decoding(tmp_path: Path) -> None:
    # 60000x60000 is past Pillow's own bomb limit: opening it with Pillow raises its own error.
    huge = jpeg_claiming((60000, 60000))
    path = tmp_path / "huge.jpg"
    path.write_bytes(huge)
    assert pixel_size(path) == (60000, 60000)
    folder = ImageFolder(tmp_path / "images", max_pixels=40_000_000)
    with (
        pytest.raises(DownloadError, match=r"60000x60000.*GPTUNNEL_MAX_IMAGE_PIXELS"),
        folder.open_temporary("f" * 24) as partial,
    ):
        partial.write(huge)
        partial.commit()
    assert list((tmp_path / "images").iterdir()) == []


@pytest.mark.anyio
async def test_a_stored_image_over_the_limit_is_shown_without_a_preview(
    memory_server: ServerLauncher, standin: StandIn
) -> None:
    """An image that got in under a higher limit: the task stays done and usable, nothing decodes it."""
    standin.behaviour.download_bytes_override = bomb_png()
    async with memory_server.connect(GPTUNNEL_MAX_IMAGE_PIXELS="500000000") as client:
        stored = await client.call_tool("generate_and_wait", {"prompt": "let in under a higher limit"})
    assert not stored.is_error, text_of(stored)
    task_id = structured(stored)["task_id"]
    async with memory_server.connect() as client:
        result = await client.call_tool("get_result", {"task_id": task_id})
    text = text_of(result)
    assert not result.is_error and structured(result)["status"] == "done", text
    assert [block.type for block in result.content] == ["resource_link", "text"]
    assert "cannot be previewed" in text and "GPTUNNEL_MAX_IMAGE_PIXELS" in text
    assert structured(result)["file_path"] in text


def test_a_preview_refuses_an_image_over_its_pixel_limit_without_decoding(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png())
    started = time.perf_counter()
    with pytest.raises(ValueError, match="20000x20000 pixels"):
        make_preview(path, 512, 40_000_000)
    assert time.perf_counter() - started < 0.5


# --- previews: made once, within one byte budget -------------------------------------------------


@pytest.mark.anyio
async def test_a_preview_is_made_once_and_kept_beside_the_image(
    memory_server: ServerLauncher, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[Path] = []
    real = _images.make_preview

    def counting(path: Path, *args: Any) -> Any:
        made.append(path)
        return real(path, *args)

    monkeypatch.setattr(_engine, "make_preview", counting)
    async with memory_server.connect() as client:
        first = await client.call_tool("generate_and_wait", {"prompt": "a preview made once"})
        task_id = structured(first)["task_id"]
        again = [await client.call_tool("get_result", {"task_id": task_id}) for _ in range(2)]
        listed = (await client.list_resources()).resources
    # A new server on the same home (its start-up tidies the folder) finds the kept preview too.
    async with memory_server.connect() as client:
        later = await client.call_tool("get_result", {"task_id": task_id})
        relisted = (await client.list_resources()).resources
    assert len(made) == 1, made
    previews = {r.content[0].data for r in (first, *again, later)}  # type: ignore[union-attr]
    assert len(previews) == 1
    assert [r.uri for r in relisted] == [r.uri for r in listed]
    assert sum(str(r.uri).endswith("/file") for r in listed) == 1


def test_a_noisy_transparent_preview_fits_the_byte_budget_and_keeps_alpha(tmp_path: Path) -> None:
    path = tmp_path / "noise.png"
    noise("RGBA", (1024, 1024)).save(path, format="PNG")
    preview = make_preview(path, 512, 40_000_000)
    assert len(preview.data) <= PREVIEW_MAX_BYTES
    with Image.open(io.BytesIO(preview.data)) as image:
        assert image.mode in ("RGBA", "LA", "PA") and max(image.size) <= 512
        assert image.format == preview.mime_type.split("/")[1].upper()


def test_a_large_noisy_photo_preview_fits_the_byte_budget(tmp_path: Path) -> None:
    # At GPTUNNEL_PREVIEW_MAX_PX's top (2048), even JPEG at its lowest quality is over budget.
    path = tmp_path / "noise.png"
    noise("RGB", (1600, 1600)).save(path, format="PNG", compress_level=0)
    preview = make_preview(path, 2048, 40_000_000)
    assert len(preview.data) <= PREVIEW_MAX_BYTES and preview.mime_type == "image/jpeg"


# --- parallel reads of a stored image -------------------------------------------------------------


@pytest.mark.anyio
async def test_parallel_reads_of_a_stored_image_return_its_bytes_and_queue(
    memory_server: ServerLauncher, standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    in_flight, most = 0, 0
    lock = threading.Lock()
    real = ImageFolder.read_base64

    def slow_read(self: ImageFolder, stored: Any) -> str:
        nonlocal in_flight, most
        with lock:
            in_flight += 1
            most = max(most, in_flight)
        time.sleep(0.03)
        try:
            return real(self, stored)
        finally:
            with lock:
                in_flight -= 1

    # Large enough to be read in several pieces, which must join into the exact file.
    buffer = io.BytesIO()
    noise("RGB", (600, 600)).save(buffer, format="PNG", compress_level=0)
    standin.behaviour.download_bytes_override = image = buffer.getvalue()
    monkeypatch.setattr(ImageFolder, "read_base64", slow_read)
    async with memory_server.connect() as client:
        made = await client.call_tool("generate_and_wait", {"prompt": "read by many"})
        task_id = structured(made)["task_id"]
        blobs: list[bytes] = []

        async def read() -> None:
            (contents,) = (await client.read_resource(f"gptunnel://images/{task_id}/file")).contents
            blobs.append(base64.b64decode(contents.blob))  # type: ignore[union-attr]

        async with anyio.create_task_group() as tasks:
            for _ in range(6):
                tasks.start_soon(read)
    assert blobs == [image] * 6
    assert most == 2
