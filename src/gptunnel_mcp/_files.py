"""The images folder: where finished images live, and how a file gets there whole or not at all.

A download is written to a temporary file in the same folder and renamed into place only once
it is complete and checked; a rename within one folder is atomic, so a reader (or a process
that starts after a crash) sees either no image or the whole image, never part of one.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import logging
import os
import re
import secrets
from pathlib import Path
from typing import BinaryIO

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

from ._exceptions import DownloadError, StorageError
from ._images import (
    EXTENSIONS,
    SNIFF_BYTES,
    ImageTooLargeError,
    Preview,
    check_pixels,
    header_size,
    pixel_size,
    sniff_mime,
)
from ._records import StoredFile
from ._settings import Settings

logger = logging.getLogger("gptunnel_mcp")

_TEMP_SUFFIX = ".part"
#: Beside the images folder (which holds images only): previews made once, so that no later
#: result decodes an image again.
_PREVIEWS = "previews"
#: Bytes read at a time into the base64 encoder: a multiple of 3, so the pieces join seamlessly.
_READ_CHUNK = 3 * 256 * 1024
#: One name within the images folder (an owner's folder, or a file in it): no separators and no
#: leading dot, so neither ".." nor the name of a temporary file.
_NAME = re.compile(r"[0-9A-Za-z_-][0-9A-Za-z._-]{0,127}")


class ImageFolder:
    def __init__(
        self, root: Path, *, max_pixels: int = Settings.model_fields["max_image_pixels"].default
    ) -> None:
        self.root = root
        #: Images with more pixels are refused before anything decodes them (GPTUNNEL_MAX_IMAGE_PIXELS).
        self.max_pixels = max_pixels
        self._previews = root.parent / _PREVIEWS

    def path(self, stored: StoredFile) -> Path:
        return self.locate(stored.file_name)

    def locate(self, file_name: str) -> Path:
        """Where a stored file lives: `<id>.<ext>`, or `<owner>/<id>.<ext>` on a multi-user server.
        The names come from the history and, through task ids, from GPTunnel: a name that could
        lead out of the folder is refused."""
        parts = file_name.split("/")
        if len(parts) > 2 or not all(_NAME.fullmatch(part) for part in parts):
            raise StorageError(f"{file_name[:80]!r} is not the name of an image in {self.root}")
        return self.root.joinpath(*parts)

    def exists(self, stored: StoredFile) -> bool:
        path = self.path(stored)
        return path.is_file() and path.stat().st_size == stored.size_bytes

    def read_base64(self, stored: StoredFile) -> str:
        """The stored image as base64 text, read in chunks straight into the encoder: the whole
        file is never held twice."""
        pieces: list[str] = []
        try:
            with self.path(stored).open("rb") as file:
                while chunk := file.read(_READ_CHUNK):
                    pieces.append(base64.b64encode(chunk).decode("ascii"))
        except OSError as exc:
            raise StorageError(f"cannot read the stored image {stored.file_name}: {exc.strerror}") from None
        return "".join(pieces)

    def _preview_path(self, stored: StoredFile, max_px: int, max_bytes: int) -> Path:
        # The hash ties a preview to the exact image, the sizes to the budget it was made for.
        image = self.path(stored).relative_to(self.root)
        return self._previews / image.with_name(f"{image.stem}-{stored.sha256[:16]}-{max_px}px-{max_bytes}b")

    def read_preview(self, stored: StoredFile, max_px: int, max_bytes: int) -> Preview | None:
        """The preview kept for this image and budget, or None if there is none (yet)."""
        try:
            data = self._preview_path(stored, max_px, max_bytes).read_bytes()
        except OSError:
            return None
        mime, size = sniff_mime(data[:SNIFF_BYTES]), header_size(io.BytesIO(data))
        if mime is None or size is None:
            return None
        return Preview(data, mime, *size)

    def keep_preview(self, stored: StoredFile, max_px: int, max_bytes: int, preview: Preview) -> None:
        """Keep a preview for later results, whole or not at all. It can always be made again, so a
        disk that refuses it costs only time."""
        path = self._preview_path(stored, max_px, max_bytes)
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}{_TEMP_SUFFIX}")
        try:
            for each in (self._previews, path.parent):
                each.mkdir(mode=0o700, parents=True, exist_ok=True)
            with _create_private(temporary) as file:
                _lock(file)
                file.write(preview.data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except OSError as exc:
            logger.warning("could not keep the preview of %s: %s", stored.file_name, exc)
            with contextlib.suppress(OSError):
                temporary.unlink()

    def remove_stray_temporaries(self) -> int:
        """Delete what interrupted downloads (and previews) left behind. Call at start, before serving.

        Another process sharing the folder may be downloading right now: its temporary file is
        locked (see `PartialFile`) and stays. A killed process's lock dies with it.
        """
        removed = 0
        strays = (path for top in (self.root, self._previews) for path in top.rglob(f".*{_TEMP_SUFFIX}"))
        for path in strays:
            with contextlib.suppress(OSError):
                if _in_use(path):
                    continue
                path.unlink()
                removed += 1
        return removed

    def open_temporary(self, task_id: str, owner: str = "") -> PartialFile:
        """A new download of `owner`'s image of `task_id`. Each owner of a multi-user server has a
        folder of their own: two users' tasks may have the same id, and one must never replace
        the other's image. Owner "" (a single user) keeps the images folder itself."""
        if not _NAME.fullmatch(task_id) or (owner and not _NAME.fullmatch(owner)):
            raise StorageError(f"{task_id[:80]!r} cannot name an image in {self.root}")
        return self._partial(f"{owner}/{task_id}" if owner else task_id)

    def _partial(self, stem: str) -> PartialFile:
        """A new temporary file beside where the image `stem` (its name without extension) goes."""
        place = self.locate(stem)
        try:
            # Private whatever the umask: images are their user's alone.
            for each in (self.root, place.parent):
                each.mkdir(mode=0o700, parents=True, exist_ok=True)
            return PartialFile(
                self, stem, place.with_name(f".{place.name}.{secrets.token_hex(4)}{_TEMP_SUFFIX}")
            )
        except OSError as exc:
            raise StorageError(_cannot_write(place.parent, exc)) from None

    def read_bytes(self, stored: StoredFile) -> bytes | None:
        """The stored image's bytes, or None when the folder has no file that is the recorded image
        (never downloaded into this folder, deleted, or damaged)."""
        try:
            data = self.path(stored).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read the stored image {stored.file_name}: {exc.strerror}") from None
        return data if _is_recorded(stored, data) else None

    def restore(self, stored: StoredFile, data: bytes) -> None:
        """Put the shared database's copy of an image where its record names it, whole or not at
        all, as a download is put there: the folder is a cache in front of the database. Bytes
        that are not the recorded image (by size and SHA-256) are refused with `StorageError`,
        and nothing is written."""
        path = self.path(stored)
        if not _is_recorded(stored, data):
            raise StorageError(
                f"the database's copy of the image {stored.file_name} is damaged (its size or SHA-256 "
                "is not the one recorded at its download), so it is not served; deleting its row from "
                "the table images has it downloaded again, while GPTunnel's link lasts"
            )
        with self._partial(path.relative_to(self.root).with_suffix("").as_posix()) as partial:
            partial.write(data)
            partial.place(path)


def _is_recorded(stored: StoredFile, data: bytes) -> bool:
    return len(data) == stored.size_bytes and hashlib.sha256(data).hexdigest() == stored.sha256


def _create_private(path: Path) -> BinaryIO:
    """A new file that only this user may read (0600), from its first byte, whatever the umask."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    return os.fdopen(os.open(path, flags, 0o600), "wb")


def _lock(file: BinaryIO) -> None:
    """Mark a temporary file as being written. Where there is no fcntl (Windows), an open file
    cannot be deleted anyway, which protects it the same way."""
    if fcntl is not None:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def _in_use(path: Path) -> bool:
    if fcntl is None:
        return False
    with path.open("rb") as probe:
        try:
            fcntl.flock(probe.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(probe.fileno(), fcntl.LOCK_UN)
        return False


def _cannot_write(where: Path, exc: OSError) -> str:
    return (
        f"cannot write the image into {where} ({exc.strerror}). Free some disk space or set "
        "GPTUNNEL_MCP_HOME to a writable folder"
    )


class PartialFile:
    """A download in progress. Use as a context manager: leaving it without `commit` deletes it."""

    def __init__(self, folder: ImageFolder, stem: str, path: Path) -> None:
        self._folder = folder
        #: The stored file's name without its extension, which only the bytes can tell.
        self._stem = stem
        self._path = path
        self._file: BinaryIO = _create_private(path)
        _lock(self._file)
        self._sha = hashlib.sha256()
        self._head = b""
        self.size = 0

    def __enter__(self) -> PartialFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()

    def write(self, chunk: bytes) -> None:
        if len(self._head) < SNIFF_BYTES:
            self._head += chunk[: SNIFF_BYTES - len(self._head)]
        try:
            self._file.write(chunk)
        except OSError as exc:
            raise StorageError(_cannot_write(self._folder.root, exc)) from None
        self._sha.update(chunk)
        self.size += len(chunk)

    def commit(self) -> StoredFile:
        """Check the bytes are an image, make them durable and move them into place."""
        mime = sniff_mime(self._head)
        if self.size == 0 or mime is None:
            raise DownloadError(
                "GPTunnel's link did not return an image (the file is empty or of an unknown type); "
                "try again later, or create the image anew if this persists."
            )
        try:
            self._seal()
            size = pixel_size(self._path)
            check_pixels(size, self._folder.max_pixels)
        except ImageTooLargeError as exc:
            raise DownloadError(f"GPTunnel's link returned an image too large to keep: {exc}.") from None
        except ValueError as exc:
            raise DownloadError(f"GPTunnel's link returned a damaged image ({exc}).") from None
        except OSError as exc:
            raise StorageError(_cannot_write(self._folder.root, exc)) from None
        final_name = f"{self._stem}{EXTENSIONS[mime]}"
        self._move(self._folder.locate(final_name))
        return StoredFile(
            file_name=final_name,
            mime_type=mime,
            size_bytes=self.size,
            sha256=self._sha.hexdigest(),
            width=size[0],
            height=size[1],
        )

    def place(self, path: Path) -> None:
        """Make the bytes durable and move them to `path` as they are: for bytes checked already."""
        try:
            self._seal()
        except OSError as exc:
            raise StorageError(_cannot_write(self._folder.root, exc)) from None
        self._move(path)

    def _seal(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def _move(self, path: Path) -> None:
        try:
            os.replace(self._path, path)
        except OSError as exc:
            raise StorageError(_cannot_write(self._folder.root, exc)) from None
