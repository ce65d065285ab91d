"""What an image file is, how large, and a small preview of it.

Pillow is imported inside the functions that need it: it is the heaviest import of the
server and a `tools/list` should not wait for it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

# (offset, magic, mime type); WebP needs two checks, handled in sniff_mime.
_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\x89PNG\r\n\x1a\n", "image/png"),
    (0, b"\xff\xd8\xff", "image/jpeg"),
    (0, b"GIF87a", "image/gif"),
    (0, b"GIF89a", "image/gif"),
)
EXTENSIONS = {"image/png": ".png", "image/jpeg": ".jpg", "image/gif": ".gif", "image/webp": ".webp"}
#: Enough bytes of a file's head to recognise any format above.
SNIFF_BYTES = 16
#: A preview must fit every client: Claude Desktop refuses tool results over 1 MB, and base64 adds a third.
PREVIEW_MAX_BYTES = 600_000


def sniff_mime(head: bytes) -> str | None:
    """The image type from the file's first bytes, or None if it is no image we serve."""
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    for offset, magic, mime in _MAGIC:
        if head[offset : offset + len(magic)] == magic:
            return mime
    return None


def pixel_size(path: Path) -> tuple[int, int]:
    """Width and height. Raises ValueError for a file that is no readable image.

    PNG, GIF and WebP say their size in the first bytes; reading it there spares a decoder
    (Pillow's WebP reader decodes the image to open it, the dearest step of a download).
    """
    with path.open("rb") as file:
        head = file.read(32)
    size = _size_from_header(head)
    if size is not None:
        return size
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            width, height = image.size
            return int(width), int(height)
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"not a readable image: {exc}") from None


def _size_from_header(head: bytes) -> tuple[int, int] | None:
    if len(head) < 30:
        return None
    if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return int.from_bytes(head[6:8], "little"), int.from_bytes(head[8:10], "little")
    if head[:4] != b"RIFF" or head[8:12] != b"WEBP":
        return None
    chunk = head[12:16]
    if chunk == b"VP8X":  # extended: 24-bit width-1 and height-1
        return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    if chunk == b"VP8L" and head[20] == 0x2F:  # lossless: 14-bit fields after the signature
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":  # lossy: key frame start code
        return int.from_bytes(head[26:28], "little") & 0x3FFF, int.from_bytes(head[28:30], "little") & 0x3FFF
    return None


@dataclass(frozen=True)
class Preview:
    data: bytes
    mime_type: str
    width: int
    height: int


def make_preview(path: Path, max_px: int) -> Preview:
    """A scaled-down copy no larger than `max_px` on its long side, as JPEG (PNG if transparent)."""
    from PIL import Image

    with Image.open(path) as image:
        image.draft("RGB", (max_px, max_px))  # lets JPEG decode at reduced size: much faster
        image.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
        transparent = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
        if transparent:
            return _encode(image.convert("RGBA"), "PNG", "image/png")
        rgb = image.convert("RGB")
        quality = 85
        while True:
            preview = _encode(rgb, "JPEG", "image/jpeg", quality=quality)
            if len(preview.data) <= PREVIEW_MAX_BYTES or quality <= 40:
                return preview
            quality -= 15


def _encode(image: object, fmt: str, mime: str, **options: int) -> Preview:
    from PIL import Image

    assert isinstance(image, Image.Image)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, optimize=True, **options)
    return Preview(buffer.getvalue(), mime, image.width, image.height)
