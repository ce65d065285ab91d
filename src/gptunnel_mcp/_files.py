"""The images folder: where finished images live, and how a file gets there whole or not at all.

A download is written to a temporary file in the same folder and renamed into place only once
it is complete and checked; a rename within one folder is atomic, so a reader (or a process
that starts after a crash) sees either no image or the whole image, never part of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from pathlib import Path
from typing import BinaryIO

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

from ._exceptions import DownloadError, StorageError
from ._images import EXTENSIONS, SNIFF_BYTES, pixel_size, sniff_mime
from ._records import StoredFile

_TEMP_SUFFIX = ".part"


class ImageFolder:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, stored: StoredFile) -> Path:
        return self.root / stored.file_name

    def exists(self, stored: StoredFile) -> bool:
        path = self.path(stored)
        return path.is_file() and path.stat().st_size == stored.size_bytes

    def read(self, stored: StoredFile) -> bytes:
        try:
            return self.path(stored).read_bytes()
        except OSError as exc:
            raise StorageError(f"cannot read the stored image {stored.file_name}: {exc.strerror}") from None

    def remove_stray_temporaries(self) -> int:
        """Delete what interrupted downloads left behind. Call at start, before serving.

        Another process sharing the folder may be downloading right now: its temporary file is
        locked (see `PartialFile`) and stays. A killed process's lock dies with it.
        """
        removed = 0
        for path in self.root.glob(f".*{_TEMP_SUFFIX}"):
            with contextlib.suppress(OSError):
                if _in_use(path):
                    continue
                path.unlink()
                removed += 1
        return removed

    def open_temporary(self, task_id: str) -> PartialFile:
        name = f".{task_id}.{secrets.token_hex(4)}{_TEMP_SUFFIX}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            return PartialFile(self, task_id, self.root / name)
        except OSError as exc:
            raise StorageError(_cannot_write(self.root, exc)) from None


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

    def __init__(self, folder: ImageFolder, task_id: str, path: Path) -> None:
        self._folder = folder
        self._task_id = task_id
        self._path = path
        self._file: BinaryIO = path.open("xb")
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
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            width, height = pixel_size(self._path)
        except ValueError as exc:
            raise DownloadError(f"GPTunnel's link returned a damaged image ({exc}).") from None
        except OSError as exc:
            raise StorageError(_cannot_write(self._folder.root, exc)) from None
        final_name = f"{self._task_id}{EXTENSIONS[mime]}"
        try:
            os.replace(self._path, self._folder.root / final_name)
        except OSError as exc:
            raise StorageError(_cannot_write(self._folder.root, exc)) from None
        return StoredFile(
            file_name=final_name,
            mime_type=mime,
            size_bytes=self.size,
            sha256=self._sha.hexdigest(),
            width=width,
            height=height,
        )
