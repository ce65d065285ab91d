"""Copies of stored images outside the images folder, where a person or an agent wants them:
which destinations are allowed, and how the copy gets there whole, in the format its name says.

Shared by the terminal (`--out`) and the MCP tool `save_image`. The terminal may write anywhere
its user can; the tool only inside the folders it is given (the client's roots, or the ones the
operator allows). Those are checked on real paths, so neither `..` nor a symbolic link leads
out, and the copy is made through folder handles opened without following links, so a folder
swapped for a link between the check and the write is refused rather than written through.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from ._exceptions import InputError, StorageError
from ._records import StoredFile

#: The formats a copy can be written in, by file name suffix.
FORMATS = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
_PILLOW_FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}
#: Image modes each format stores as they are; others are converted to RGB(A) first.
_PILLOW_MODES = {"PNG": ("1", "L", "LA", "P", "RGB", "RGBA"), "JPEG": ("L", "RGB"), "WEBP": ("RGB", "RGBA")}
_ARGUMENT = "destination"
_SEPARATORS = tuple(s for s in (os.sep, os.altsep) if s)
_O_BINARY = getattr(os, "O_BINARY", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
#: Whether folders can be held open and walked without following links (not on Windows, where
#: the paths are checked just before the write instead).
_PINNED = bool(_O_NOFOLLOW and _O_DIRECTORY) and os.open in os.supports_dir_fd


@dataclass(frozen=True)
class Destination:
    """Where a copy goes: into `folder` (a real path) under `name`, or under the stored file's
    name when `name` is None, as `mime_type` (None: as stored). `anchor` is the allowed folder
    `folder` lies in (`folder` itself when any is allowed): the write walks from it."""

    folder: Path
    anchor: Path
    name: str | None = None
    mime_type: str | None = None


def check_destination(
    text: str, allowed: Sequence[Path] | None = None, *, data_folder: Path | None = None
) -> Destination:
    """Where `text` (a folder, or a file whose suffix names the format) puts a copy. With
    `allowed`, it must lie inside one of those folders and not inside `data_folder` (the
    server's history and images), and a relative path is taken from the first of them; without,
    anywhere, from the working folder.

    Raises `InputError` (argument "destination") saying what is wrong.
    """
    if not text.strip() or "\0" in text:
        raise InputError("give a folder or a file name", argument=_ARGUMENT)
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = (allowed[0] if allowed else Path.cwd()) / path
    is_folder = text.endswith(_SEPARATORS) or path.is_dir()
    folder = path if is_folder else path.parent
    real = folder.resolve()
    anchor = real if allowed is None else _anchor(text, folder, real, allowed, data_folder)
    if is_folder:
        if not real.is_dir():
            raise InputError(f"there is no folder {path}; create it first", argument=_ARGUMENT)
        return Destination(real, anchor)
    if not real.is_dir():
        raise InputError(
            f"there is no folder {folder} to write {path.name} into; create it first", argument=_ARGUMENT
        )
    mime_type = FORMATS.get(path.suffix.lower())
    if mime_type is None:
        raise InputError(
            f"{path.name}: the name must end in .png, .jpg, .jpeg or .webp (the format to write), "
            "or name a folder",
            argument=_ARGUMENT,
        )
    return Destination(real, anchor, path.name, mime_type)


def _anchor(text: str, folder: Path, real: Path, allowed: Sequence[Path], data_folder: Path | None) -> Path:
    """The allowed folder `real` lies in; `InputError` when it lies in none, or in the data folder."""
    if data_folder is not None and real.is_relative_to(data_folder.resolve()):
        raise InputError(
            f"{text} is inside this server's own data folder, which must not be written to",
            argument=_ARGUMENT,
        )
    for each in allowed:
        if real.is_relative_to(root := each.resolve()):
            return root
    shown = ", ".join(str(each) for each in allowed)
    looks_inside = any(Path(os.path.normpath(folder)).is_relative_to(each) for each in allowed)
    how = " through a symbolic link" if looks_inside else ""
    raise InputError(
        f"{text} leads outside the folders images may be saved in{how}; save inside {shown}",
        argument=_ARGUMENT,
    )


@dataclass(frozen=True)
class Written:
    """A copy made: where, in which format, and how large."""

    path: Path
    mime_type: str
    size_bytes: int
    converted: bool


def write_image(source: Path, stored: StoredFile, destination: Destination, *, overwrite: bool) -> Written:
    """Copy the stored image at `source` to `destination`, converted when its name asks for
    another format. The copy appears whole or not at all, never through a symbolic link, and
    replaces an existing file only if `overwrite`.

    Raises `InputError` when the name is taken (by a link, a folder, or a file and not
    `overwrite`) or a folder on the way changed since it was checked; `StorageError` when the
    copy cannot be written.
    """
    name = destination.name or PurePosixPath(stored.file_name).name
    target = destination.folder / name
    mime_type = destination.mime_type or stored.mime_type
    with _opened(destination) as folder:
        _check_name(folder, name, target, overwrite=overwrite)
        temporary = f".{name}.{secrets.token_hex(4)}.part"
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY
            with os.fdopen(os.open(folder.at(temporary), flags, 0o666, dir_fd=folder.fd), "wb") as file:
                if mime_type == stored.mime_type:
                    with source.open("rb") as original:
                        shutil.copyfileobj(original, file)
                else:
                    _convert(source, file, _PILLOW_FORMATS[mime_type])
                file.flush()
                os.fsync(file.fileno())
                size = os.fstat(file.fileno()).st_size
            _place(folder, temporary, name, target, overwrite=overwrite)
        except InputError:
            folder.remove(temporary)
            raise
        except (OSError, ValueError, SyntaxError) as exc:
            folder.remove(temporary)
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise StorageError(f"cannot write {target} ({reason}); the image is stored at {source}") from None
    return Written(target, mime_type, size, converted=mime_type != stored.mime_type)


@dataclass(frozen=True)
class _Folder:
    """The destination folder: an open handle (`fd`) that names are taken relative to, or, where
    folders cannot be held open, its path (`fd` None)."""

    path: Path
    fd: int | None

    def at(self, name: str) -> str:
        return name if self.fd is not None else str(self.path / name)

    def remove(self, name: str) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.at(name), dir_fd=self.fd)


@contextlib.contextmanager
def _opened(destination: Destination) -> Iterator[_Folder]:
    if not _PINNED:
        yield _Folder(destination.folder, None)
        return
    # Each step below the anchor refuses a link, so the handle is of a real folder inside it
    # whatever was swapped since the check.
    parts = destination.folder.relative_to(destination.anchor).parts
    fd: int | None = None
    try:
        fd = os.open(destination.anchor, os.O_RDONLY | _O_DIRECTORY)
        for part in parts:
            inner = os.open(part, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = inner
    except OSError as exc:
        if fd is not None:
            os.close(fd)
        raise InputError(
            f"the folder {destination.folder} changed while saving ({exc.strerror}): a folder on the "
            "way is gone or became a symbolic link; nothing was written",
            argument=_ARGUMENT,
        ) from None
    try:
        yield _Folder(destination.folder, fd)
    finally:
        os.close(fd)


def _check_name(folder: _Folder, name: str, target: Path, *, overwrite: bool) -> None:
    try:
        found = os.stat(folder.at(name), dir_fd=folder.fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StorageError(f"cannot look at {target} ({exc.strerror})") from None
    if not stat.S_ISREG(found.st_mode):
        raise InputError(
            f"{target} exists and is not a plain file (a symbolic link or a folder); choose another name",
            argument=_ARGUMENT,
        )
    if not overwrite:
        raise _taken(target)


def _place(folder: _Folder, temporary: str, name: str, target: Path, *, overwrite: bool) -> None:
    """Give the finished temporary file its name: a rename, which replaces the name itself and
    never follows a link there; without `overwrite`, a hard link, which fails if the name is
    taken, even by a file that appeared since it was checked."""
    src, dst = folder.at(temporary), folder.at(name)
    if overwrite:
        os.replace(src, dst, src_dir_fd=folder.fd, dst_dir_fd=folder.fd)
        return
    try:
        os.link(src, dst, src_dir_fd=folder.fd, dst_dir_fd=folder.fd)
    except FileExistsError:
        raise _taken(target) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            raise
        # A file system without hard links (FAT, some network shares): check, then rename.
        _check_name(folder, name, target, overwrite=False)
        os.replace(src, dst, src_dir_fd=folder.fd, dst_dir_fd=folder.fd)
        return
    folder.remove(temporary)


def _taken(target: Path) -> InputError:
    return InputError(
        f"{target} already exists; pass overwrite=true to replace it, or choose another name",
        argument=_ARGUMENT,
    )


def _convert(source: Path, file: BinaryIO, fmt: str) -> None:
    from PIL import Image

    with Image.open(source) as image:
        converted = image
        if image.mode not in _PILLOW_MODES[fmt]:
            alpha = "A" in image.mode or "transparency" in image.info
            converted = image.convert("RGBA" if alpha and "RGBA" in _PILLOW_MODES[fmt] else "RGB")
        options = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
        converted.save(file, format=fmt, **options)
