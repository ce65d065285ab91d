"""What the history keeps: one record per GPTunnel task, and the facts every layer shares about
task ids and time."""

from __future__ import annotations

import re
import unicodedata
from datetime import datetime, timedelta, timezone
from typing import Literal

from pydantic import BaseModel, Field

from ._exceptions import InputError

TaskStatus = Literal["pending", "done", "failed"]

TASK_ID_HEX = "[0-9a-fA-F]{24}"
TASK_ID_PATTERN = rf"^{TASK_ID_HEX}$"
_TASK_ID_RE = re.compile(TASK_ID_PATTERN)
#: How long GPTunnel keeps a finished image at its URL.
SOURCE_URL_LIFETIME = timedelta(hours=48)
#: Where the history's tasks are named: `gptunnel://images/<task_id>` is one task, and with
#: `/file` its image (the MCP resources; `images` takes them to name one's own earlier image).
IMAGES_URI = "gptunnel://images"


def is_task_id(value: str) -> bool:
    return bool(_TASK_ID_RE.fullmatch(value))


def check_task_id(task_id: str) -> str:
    """The id in its stored (lower-case) form; `InputError` for anything that is not one."""
    if not is_task_id(task_id):
        raise InputError(
            f"{task_id[:40]!r} is not a GPTunnel task id: a task id is 24 hexadecimal characters",
            argument="task_id",
        )
    return task_id.lower()


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def searchable(text: str) -> str:
    """`text` in the form prompts are searched in: folded to one case in every script, here
    rather than in SQL, whose lower() folds only ASCII in SQLite and follows the database's
    locale in PostgreSQL (none in a "C" database), while many prompts are Russian; and with "ё"
    as "е", which Russian writers use interchangeably."""
    return unicodedata.normalize("NFKC", text.casefold()).replace("ё", "е")


# --- What the history keeps ------------------------------------------------------------------


class StoredFile(BaseModel):
    """An image downloaded into the images folder."""

    #: Relative to the images folder: `<id>.<ext>`, or `<owner>/<id>.<ext>` on a multi-user server.
    file_name: str
    mime_type: str
    size_bytes: int
    sha256: str
    width: int
    height: int

    @property
    def name(self) -> str:
        """The file's own name, without the owner's folder it is kept in."""
        return self.file_name.rpartition("/")[2]


class TaskRecord(BaseModel):
    """One row of the history: everything known about one GPTunnel task."""

    task_id: str
    owner: str = ""
    status: TaskStatus = "pending"
    upstream_status: str = "idle"
    model: str
    prompt: str
    aspect_ratio: str | None = None
    images: list[str] = Field(default_factory=list)
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None = None
    source_url: str | None = None
    error: str | None = None
    file: StoredFile | None = None
    #: `ImageRequest.key()` of the request that made it ("" for tasks adopted from elsewhere).
    request_key: str = ""
    #: Local clock when the create request was sent (None for tasks adopted from elsewhere).
    submitted_at: datetime | None = None
    last_polled_at: datetime | None = None
    #: When GPTunnel finished it, in seconds after submission, as polling can tell: after the
    #: last poll that saw it pending (None: none did) and by the first that saw it done.
    finished_after: float | None = None
    finished_by: float | None = None
    #: When a follower (an MCP task) was cancelled; the GPTunnel task itself runs on.
    cancelled_at: datetime | None = None
    #: Downloads of the image that failed (see `_engine.MAX_DOWNLOAD_FAILURES`).
    download_failures: int = 0
    #: What GPTunnel charged for the task, in roubles, once it said (None: it has not, or never does).
    cost: float | None = None

    @property
    def source_url_expires_at(self) -> datetime | None:
        if self.source_url is None or self.completed_at is None:
            return None
        return self.completed_at + SOURCE_URL_LIFETIME
