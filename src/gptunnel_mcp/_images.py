"""What an image file is, how large, and a small preview of it.

Pillow is imported inside the functions that need it: it is the heaviest import of the
server and a `tools/list` should not wait for it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    from PIL import Image

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
#: A preview that fits the budget at no quality shrinks by at least this much a round.
_SHRINK = 0.8
# JPEG frame headers (SOF0-SOF15) carry the size; C4, C8 and CC are other segments in that range.
_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers that stand alone, without a length: TEM and the restart markers.
_JPEG_BARE = frozenset({0x01, *range(0xD0, 0xD8)})


class ImageTooLargeError(ValueError):
    """The image has more pixels than the limit: decoding it could take gigabytes."""

    def __init__(self, width: int, height: int, limit: int) -> None:
        self.width, self.height, self.limit = width, height, limit
        super().__init__(
            f"the image is {width}x{height} pixels ({_megapixels(width * height)}), more than the limit of "
            f"{_megapixels(limit)}; raise GPTUNNEL_MAX_IMAGE_PIXELS to accept it"
        )


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} megapixels"


def sniff_mime(head: bytes) -> str | None:
    """The image type from the file's first bytes, or None if it is no image we serve."""
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    for offset, magic, mime in _MAGIC:
        if head[offset : offset + len(magic)] == magic:
            return mime
    return None


def pixel_size(path: Path) -> tuple[int, int]:
    """Width and height, from the file's header: nothing is decoded. Raises ValueError for a file
    whose header does not say them.

    A file of a few hundred KB can unpack into gigabytes, so its size must be known before any
    decoder sees it (Pillow's WebP reader even decodes the whole image to open it).
    """
    with path.open("rb") as file:
        size = header_size(file)
    if size is None or 0 in size:
        raise ValueError("its header does not state a valid size")
    return size


def check_pixels(size: tuple[int, int], limit: int) -> None:
    """Raise `ImageTooLargeError` when `size` has more than `limit` pixels."""
    width, height = size
    if width * height > limit:
        raise ImageTooLargeError(width, height, limit)


def header_size(file: BinaryIO) -> tuple[int, int] | None:
    """Width and height as a PNG, GIF, WebP or JPEG header states them, or None."""
    head = file.read(32)
    if head.startswith(b"\xff\xd8"):
        file.seek(2)
        return _jpeg_size(file)
    if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR" and len(head) >= 24:
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        return int.from_bytes(head[6:8], "little"), int.from_bytes(head[8:10], "little")
    if head[:4] != b"RIFF" or head[8:12] != b"WEBP" or len(head) < 30:
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


def _jpeg_size(file: BinaryIO) -> tuple[int, int] | None:
    """Walk the segments after SOI up to the frame header, skipping each by its length."""
    while True:
        if file.read(1) != b"\xff":
            return None
        marker = b"\xff"
        while marker == b"\xff":  # fill bytes may pad a marker
            marker = file.read(1)
        if not marker or marker[0] in (0xD9, 0xDA):  # end of image, or scan data before a frame
            return None
        if marker[0] in _JPEG_BARE:
            continue
        length = int.from_bytes(file.read(2), "big")
        if length < 2:
            return None
        if marker[0] in _JPEG_FRAMES:
            frame = file.read(5)  # precision, height, width
            if len(frame) < 5:
                return None
            return int.from_bytes(frame[3:5], "big"), int.from_bytes(frame[1:3], "big")
        file.seek(length - 2, io.SEEK_CUR)


@dataclass(frozen=True)
class Preview:
    data: bytes
    mime_type: str
    width: int
    height: int


def make_preview(path: Path, max_px: int, max_pixels: int, max_bytes: int = PREVIEW_MAX_BYTES) -> Preview:
    """A scaled-down copy no larger than `max_px` on its long side and `max_bytes` in size:
    JPEG, or for a transparent image PNG or else WebP (both keep the alpha channel).

    Raises `ImageTooLargeError` for an image of more than `max_pixels`, checked before anything is
    decoded, and ValueError for one that cannot be decoded.
    """
    from PIL import Image

    check_pixels(pixel_size(path), max_pixels)
    try:
        with Image.open(path) as image:
            image.draft("RGB", (max_px, max_px))  # lets JPEG decode at reduced size: much faster
            image.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
            transparent = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
            small = image.convert("RGBA" if transparent else "RGB")
    # A bomb error here means a header that lied about the size; OSError, ValueError and
    # SyntaxError are how Pillow's decoders report damaged data.
    except (Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
        raise ValueError(f"the file is damaged or incomplete ({type(exc).__name__})") from None
    return _fit(small, transparent, max_bytes)


def _fit(image: Image.Image, transparent: bool, max_bytes: int) -> Preview:
    """The first encoding within the byte budget, shrinking the image until one is."""
    from PIL import Image

    while True:
        for preview in _encodings(image, transparent):
            if len(preview.data) <= max_bytes:
                return preview
        # Bytes grow with the area: aim straight at the budget from the smallest attempt.
        scale = min(_SHRINK, 0.95 * math.sqrt(max_bytes / len(preview.data)))
        size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)


def _encodings(image: Image.Image, transparent: bool) -> Iterator[Preview]:
    """Candidates, best first; made one at a time, as the first that fits ends the search."""
    if transparent:
        yield _encode(image, "PNG", "image/png", optimize=True)
        # Lossy WebP keeps the alpha channel at a fraction of PNG's size for noisy images.
        yield _encode(image, "WEBP", "image/webp", quality=80)
        return
    for quality in (85, 70, 55, 40):
        yield _encode(image, "JPEG", "image/jpeg", quality=quality, optimize=True)


def _encode(image: Image.Image, fmt: str, mime: str, **options: int | bool) -> Preview:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return Preview(buffer.getvalue(), mime, image.width, image.height)
