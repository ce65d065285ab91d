"""The images folder: a file is stored whole and checked, or not at all."""

from __future__ import annotations

import hashlib
import io
import stat
from pathlib import Path

import pytest
from PIL import Image

from gptunnel_mcp import DownloadError, StorageError
from gptunnel_mcp._files import ImageFolder
from gptunnel_mcp._images import make_preview, pixel_size, sniff_mime


def png(size: tuple[int, int] = (300, 200), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, "red").save(buffer, format="PNG")
    return buffer.getvalue()


def test_commit_stores_the_bytes_under_the_task_id_with_their_facts(tmp_path: Path) -> None:
    folder = ImageFolder(tmp_path)
    data = png()
    with folder.open_temporary("a" * 24) as partial:
        for i in range(0, len(data), 100):
            partial.write(data[i : i + 100])
        stored = partial.commit()
    assert stored.file_name == "a" * 24 + ".png"
    assert folder.path(stored).read_bytes() == data
    assert (stored.mime_type, stored.width, stored.height) == ("image/png", 300, 200)
    assert stored.sha256 == hashlib.sha256(data).hexdigest() and stored.size_bytes == len(data)
    assert folder.exists(stored)
    assert [p.name for p in tmp_path.iterdir()] == [stored.file_name]


def test_restore_puts_the_recorded_image_back_privately_and_refuses_other_bytes(tmp_path: Path) -> None:
    # Made under one folder (a user's, on a multi-user server), restored into another one.
    data = png()
    with ImageFolder(tmp_path / "made").open_temporary("f" * 24, owner="alice") as partial:
        partial.write(data)
        stored = partial.commit()
    folder = ImageFolder(tmp_path / "cache")
    damaged = data[:-1] + bytes([data[-1] ^ 1])
    with pytest.raises(StorageError, match=f"copy of the image alice/{'f' * 24}.png is damaged"):
        folder.restore(stored, damaged)
    assert not (tmp_path / "cache").exists()

    folder.restore(stored, data)
    assert folder.read_bytes(stored) == data and folder.path(stored).parent == tmp_path / "cache" / "alice"
    assert stat.S_IMODE(folder.path(stored).stat().st_mode) == 0o600
    assert [p.name for p in folder.path(stored).parent.iterdir()] == [stored.name]


@pytest.mark.parametrize("data", [b"", b"<html>expired</html>", b"\x89PNG\r\n\x1a\n" + b"\0" * 64])
def test_what_is_not_a_whole_image_is_refused_and_leaves_nothing(tmp_path: Path, data: bytes) -> None:
    folder = ImageFolder(tmp_path)
    with pytest.raises(DownloadError), folder.open_temporary("b" * 24) as partial:
        partial.write(data)
        partial.commit()
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_download_leaves_no_file_and_strays_are_cleaned(tmp_path: Path) -> None:
    folder = ImageFolder(tmp_path)
    with pytest.raises(RuntimeError), folder.open_temporary("c" * 24) as partial:
        partial.write(png()[:50])
        raise RuntimeError("connection lost")
    assert list(tmp_path.iterdir()) == []
    # A process killed mid-download cannot clean up; the next start does.
    (tmp_path / f".{'d' * 24}.1234.part").write_bytes(b"half")
    kept = tmp_path / "e.png"
    kept.write_bytes(png())
    assert folder.remove_stray_temporaries() == 1
    assert list(tmp_path.iterdir()) == [kept]


@pytest.mark.parametrize(
    ("head", "mime"),
    [
        (b"\x89PNG\r\n\x1a\n....", "image/png"),
        (b"\xff\xd8\xff\xe0....", "image/jpeg"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "image/webp"),
        (b"GIF89a......", "image/gif"),
        (b"<html><body>", None),
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", None),
    ],
)
def test_sniff_by_magic_bytes(head: bytes, mime: str | None) -> None:
    assert sniff_mime(head) == mime


def test_preview_is_bounded_and_keeps_transparency(tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    big.write_bytes(png((2000, 1000)))
    preview = make_preview(big, 512, 40_000_000)
    assert (preview.width, preview.height, preview.mime_type) == (512, 256, "image/jpeg")
    clear = tmp_path / "clear.png"
    clear.write_bytes(png((100, 400), mode="RGBA"))
    small = make_preview(clear, 512, 40_000_000)
    assert (small.width, small.height, small.mime_type) == (100, 400, "image/png")


@pytest.mark.parametrize(
    ("fmt", "options", "mode"),
    [
        ("WEBP", {}, "RGB"),
        ("WEBP", {}, "RGBA"),
        ("WEBP", {"lossless": True}, "RGB"),
        ("PNG", {}, "RGBA"),
        ("GIF", {}, "RGB"),
        ("JPEG", {}, "RGB"),
    ],
)
def test_pixel_size_of_every_served_format(
    tmp_path: Path, fmt: str, options: dict[str, bool], mode: str
) -> None:
    path = tmp_path / "image"
    Image.new(mode, (1234, 567), "red").save(path, format=fmt, **options)
    assert pixel_size(path) == (1234, 567)
