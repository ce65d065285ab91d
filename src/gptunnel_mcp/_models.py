"""Pydantic models at the package's boundaries: GPTunnel's JSON, tool inputs, stored records, tool output."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timedelta, timezone
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ._exceptions import InputError

AspectRatio = Literal["1:1", "16:9", "9:16", "4:3", "3:4", "21:9", "9:21"]
ASPECT_RATIOS: tuple[str, ...] = get_args(AspectRatio)
TaskStatus = Literal["pending", "done", "failed"]

TASK_ID_PATTERN = r"^[0-9a-fA-F]{24}$"
_TASK_ID_RE = re.compile(TASK_ID_PATTERN)
#: How long GPTunnel keeps a finished image at its URL.
SOURCE_URL_LIFETIME = timedelta(hours=48)
_FAILED_STATUSES = frozenset({"failed", "error", "cancelled", "canceled"})


def is_task_id(value: str) -> bool:
    return bool(_TASK_ID_RE.fullmatch(value))


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


# --- GPTunnel's side -------------------------------------------------------------------------


class UpstreamTask(BaseModel):
    """A task as GPTunnel's create and result calls describe it (`code` already checked)."""

    model_config = ConfigDict(extra="allow")

    id: str
    model: str | None = None
    prompt: str | None = None
    created_at: float | None = None
    status: str = "idle"
    url: str | None = None
    error: Any = None

    @property
    def outcome(self) -> TaskStatus:
        status = self.status.lower()
        if status == "done":
            return "done"
        if status in _FAILED_STATUSES:
            return "failed"
        return "pending"


class CreatePayload(BaseModel):
    """The body of `POST /v1/media/create`."""

    model: str
    prompt: str
    images: list[str] | None = None
    ar: str | None = None


# --- Tool input ------------------------------------------------------------------------------


class ImageRequest(BaseModel):
    """What an agent asks for. Validated in full before anything is sent upstream."""

    prompt: str = Field(min_length=1, max_length=32_000)
    model: str = Field(min_length=1, max_length=200)
    aspect_ratio: AspectRatio | None = None
    images: list[str] = Field(default_factory=list, max_length=16)

    @field_validator("prompt", "model")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value.strip()

    @field_validator("images")
    @classmethod
    def _public_urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not re.match(r"^https?://[^\s/]+\S*$", url):
                raise ValueError(
                    f"{url[:80]!r} is not a public http(s) URL; GPTunnel takes reference images "
                    "by URL only, not as uploads or base64"
                )
        return urls

    def key(self) -> str:
        """Identity of what was asked for: equal requests are the same image to pay for."""
        canonical = json.dumps(
            [self.prompt, self.model.lower(), self.aspect_ratio, sorted(self.images)], ensure_ascii=False
        )
        return hashlib.sha256(canonical.encode()).hexdigest()

    def payload(self) -> CreatePayload:
        return CreatePayload(
            model=self.model, prompt=self.prompt, images=self.images or None, ar=self.aspect_ratio
        )


def parse_image_request(
    default_model: str, prompt: str, model: str | None, aspect_ratio: str | None, images: list[str] | None
) -> ImageRequest:
    """An `ImageRequest` from a front end's raw arguments; `InputError` says which one is wrong."""
    try:
        return ImageRequest.model_validate(
            {
                "prompt": prompt,
                "model": model or default_model,
                "aspect_ratio": aspect_ratio,
                "images": images or [],
            }
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "arguments"
        message = err["msg"].removeprefix("Value error, ")
        raise InputError(f"invalid {field}: {message}. Nothing was sent to GPTunnel.") from None


# --- What the history keeps ------------------------------------------------------------------


class StoredFile(BaseModel):
    """An image downloaded into the images folder."""

    file_name: str
    mime_type: str
    size_bytes: int
    sha256: str
    width: int
    height: int


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

    @property
    def source_url_expires_at(self) -> datetime | None:
        if self.source_url is None or self.completed_at is None:
            return None
        return self.completed_at + SOURCE_URL_LIFETIME


# --- Tool output -----------------------------------------------------------------------------


class ImageResult(BaseModel):
    """The structured result of every image tool, and the JSON of `gptunnel://images/{task_id}`."""

    task_id: str = Field(description="GPTunnel task id (24 hex characters).")
    status: TaskStatus = Field(description="pending, done or failed.")
    upstream_status: str = Field(description="GPTunnel's own status text, as it last reported it.")
    model: str
    prompt: str
    aspect_ratio: str | None = None
    images: list[str] = Field(default_factory=list, description="Reference image URLs sent with the task.")
    created_at: datetime
    completed_at: datetime | None = None
    message: str = Field(description="One sentence for the agent: what happened and what to do next.")
    file_path: str | None = Field(default=None, description="Absolute path of the stored image (when done).")
    resource_uri: str | None = Field(default=None, description="MCP resource of the full image (when done).")
    mime_type: str | None = None
    size_bytes: int | None = None
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    source_url: str | None = Field(default=None, description="GPTunnel's download link; expires after 48 h.")
    source_url_expires_at: datetime | None = None
    error: str | None = Field(default=None, description="Why the task failed (when failed).")
    sandbox: bool = Field(
        default=False, description="True when the server runs in sandbox mode (no real image)."
    )
    reused: bool = Field(
        default=False,
        description="True when this call returned an earlier identical task instead of paying for a new one.",
    )


class HistoryEntry(BaseModel):
    task_id: str
    status: TaskStatus
    model: str
    prompt: str
    created_at: datetime
    resource_uri: str
    file_uri: str | None = None


class HistoryPage(BaseModel):
    """The JSON of `gptunnel://images`."""

    total: int
    shown: int
    tasks: list[HistoryEntry]
    note: str | None = None


# --- Resource addresses ----------------------------------------------------------------------

HISTORY_URI = "gptunnel://images"
MODELS_URI = "gptunnel://models"


def task_uri(task_id: str) -> str:
    return f"{HISTORY_URI}/{task_id}"


def file_uri(task_id: str) -> str:
    return f"{HISTORY_URI}/{task_id}/file"
