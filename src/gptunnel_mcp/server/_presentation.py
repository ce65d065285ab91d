"""How the MCP front end speaks to agents: the result models of tools and resources, the
sentence in each result that says what to do next, and the advice added to each error.

Shared by the tools, the tasks extension and the resources, so an agent reads the same words
whichever way it reached a task.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from datetime import datetime, timezone

from mcp_types import CallToolResult, ContentBlock, ImageContent, ResourceLink, TextContent
from pydantic import BaseModel, ConfigDict, Field, RootModel

from .._catalog import MODELS, find_model
from .._engine import Engine, Outcome
from .._exceptions import (
    AuthenticationError,
    BudgetExceededError,
    DownloadError,
    GPTunnelMCPError,
    ImageNotReadyError,
    InputError,
    MissingKeyError,
    StorageError,
    TaskNotFoundError,
)
from .._export import Written
from .._records import IMAGES_URI, TaskRecord, TaskStatus
from .._search import SearchPage
from .._store import Search

HISTORY_URI = IMAGES_URI
MODELS_URI = "gptunnel://models"
#: Characters of the prompt a tool result echoes; the task's record resource has all of it. Prompts
#: may be 32,000 characters, and an agent's context pays for every echo.
RESULT_PROMPT_CHARS = 1000
#: Characters of each prompt in a search_images row: enough to tell tasks apart.
SEARCH_PROMPT_CHARS = 80


def task_uri(task_id: str) -> str:
    return f"{HISTORY_URI}/{task_id}"


def file_uri(task_id: str) -> str:
    return f"{HISTORY_URI}/{task_id}/file"


class ImageResult(BaseModel):
    """The structured result of every image tool, and the JSON of `gptunnel://images/{task_id}`."""

    task_id: str = Field(description="GPTunnel task id (24 hex characters).")
    status: TaskStatus = Field(description="pending, done or failed.")
    upstream_status: str = Field(description="GPTunnel's own status text, as it last reported it.")
    model: str
    prompt: str = Field(
        description=f"The prompt; a tool result keeps its first {RESULT_PROMPT_CHARS} characters "
        "(see prompt_truncated), the task's record resource all of it."
    )
    prompt_truncated: bool = Field(
        default=False,
        description="True when `prompt` is cut short here; gptunnel://images/{task_id} has the full text.",
    )
    aspect_ratio: str | None = None
    images: list[str] = Field(
        default_factory=list,
        description="Reference images of the task, as asked: URLs, and your own earlier images as "
        "gptunnel://images/<task_id>.",
    )
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
    cost: float | None = Field(
        default=None,
        description="What GPTunnel charged for this image, in roubles, when it reported it; null: not "
        "reported (yet). A reused task was paid for once, by the call that made it.",
    )
    sandbox: bool = Field(
        default=False, description="True when the server runs in sandbox mode (no real image)."
    )
    reused: bool = Field(
        default=False,
        description="True when this call returned an earlier identical task instead of paying for a new one.",
    )
    model_note: str | None = Field(
        default=None,
        description="Set when the model is not one this server knows: it went to GPTunnel unchecked. "
        "Names the known ones.",
    )


class ImageFailure(BaseModel):
    image: int = Field(description="Which image of the call failed to start, counting from 1.")
    error: str = Field(description="Why, and what to do about it.")


class BatchResult(BaseModel):
    """The structured result of create_image and generate_and_wait with count above 1."""

    message: str = Field(description="What happened to the images, and what to do next.")
    images: list[ImageResult] = Field(description="One entry per image started (or reused), in order.")
    failures: list[ImageFailure] = Field(
        default_factory=list, description="The images that could not be started, each with why."
    )


class ToolImageResult(RootModel[ImageResult | BatchResult]):
    """What an image tool returns: one image's result, or for count above 1, the batch."""

    # An output schema's root must be an object for clients; both shapes are.
    model_config = ConfigDict(json_schema_extra={"type": "object"})


class HistoryEntry(BaseModel):
    task_id: str
    status: TaskStatus
    model: str
    prompt: str
    prompt_truncated: bool = False
    created_at: datetime
    cost: float | None = Field(default=None, description="What GPTunnel charged, in roubles, if it said.")
    resource_uri: str
    file_uri: str | None = None


def history_entry(record: TaskRecord, prompt_chars: int) -> HistoryEntry:
    """A task as the history lists it, its prompt cut to `prompt_chars`."""
    return HistoryEntry(
        task_id=record.task_id,
        status=record.status,
        model=record.model,
        prompt=shorten(record.prompt, prompt_chars),
        prompt_truncated=len(record.prompt) > prompt_chars,
        created_at=record.created_at,
        cost=record.cost,
        resource_uri=task_uri(record.task_id),
        file_uri=file_uri(record.task_id) if record.status == "done" else None,
    )


class SearchResult(BaseModel):
    """The structured result of search_images."""

    tasks: list[HistoryEntry] = Field(
        description=f"Newest first; prompts cut to {SEARCH_PROMPT_CHARS} characters (each task's "
        "resource_uri has its record, with the whole prompt)."
    )
    next_cursor: str | None = Field(
        default=None,
        description="Pass it as cursor, with the other arguments unchanged, for the next (older) "
        "matches; null when there are no more.",
    )
    message: str


class HistoryPage(BaseModel):
    """The JSON of `gptunnel://images`."""

    total: int
    shown: int
    page: int
    pages: int
    next_page: str | None = Field(default=None, description="The URI of the next (older) page, if any.")
    tasks: list[HistoryEntry]
    note: str | None = None


class SavedImage(BaseModel):
    """The structured result of save_image."""

    task_id: str
    path: str = Field(description="Absolute path of the file written.")
    mime_type: str = Field(description="The file's format.")
    size_bytes: int
    converted: bool = Field(description="True when it was re-encoded into the format its name asks for.")
    message: str


def saved(task_id: str, written: Written) -> CallToolResult:
    how = f", converted to {_FORMAT_NAMES[written.mime_type]}" if written.converted else ""
    result = SavedImage(
        task_id=task_id,
        path=str(written.path),
        mime_type=written.mime_type,
        size_bytes=written.size_bytes,
        converted=written.converted,
        message=f"Saved the image of task {task_id} as {written.path}{how}.",
    )
    return CallToolResult(
        content=[TextContent(text=result.message)], structured_content=result.model_dump(mode="json")
    )


def nowhere_to_save(*, multi_user: bool) -> CallToolResult:
    if multi_user:
        text = (
            "This server serves many users, so it writes only into folders its operator allows, and "
            "it allows none: the operator sets GPTUNNEL_EXPORT_DIRS to absolute folders, separated by "
            "commas. The image stays available as its resource link."
        )
    else:
        text = (
            "There is no folder to save into: this client shares no roots (the MCP roots of its "
            "workspace) and the server allows no export folder. Set GPTUNNEL_EXPORT_DIRS to absolute "
            "folders, separated by commas, in the MCP server's environment (your client's server "
            "config) and restart the server, or use a client that shares its workspace as roots."
        )
    return CallToolResult(content=[TextContent(text=text)], is_error=True)


_FORMAT_NAMES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WebP", "image/gif": "GIF"}


def describe(
    engine: Engine, record: TaskRecord, *, reused: bool = False, full_prompt: bool = False
) -> ImageResult:
    """The agent-facing view of a record, with a sentence telling the agent what to do next.
    The prompt is cut to `RESULT_PROMPT_CHARS` unless `full_prompt` (the task's own record)."""
    prompt = record.prompt if full_prompt else shorten(record.prompt, RESULT_PROMPT_CHARS)
    result = ImageResult(
        task_id=record.task_id,
        status=record.status,
        upstream_status=record.upstream_status,
        model=record.model,
        prompt=prompt,
        prompt_truncated=prompt != record.prompt,
        aspect_ratio=record.aspect_ratio,
        images=record.images,
        created_at=record.created_at,
        completed_at=record.completed_at,
        source_url=record.source_url,
        source_url_expires_at=record.source_url_expires_at,
        error=record.error,
        cost=record.cost,
        message="",
        sandbox=engine.settings.sandbox,
    )
    if record.status == "done" and record.file is not None:
        path = engine.folder.path(record.file).resolve()
        result.file_path = str(path)
        result.resource_uri = file_uri(record.task_id)
        result.mime_type = record.file.mime_type
        result.size_bytes = record.file.size_bytes
        result.sha256 = record.file.sha256
        result.width = record.file.width
        result.height = record.file.height
        result.message = f"The image is ready: {record.file.width}x{record.file.height}, stored at {path}."
        if record.cost is not None:
            result.message += f" GPTunnel charged {record.cost:.2f} RUB for it."
    elif record.status == "failed" and record.source_url is not None:
        # GPTunnel made it; getting it here failed for good.
        result.message = (
            f"GPTunnel made this image, but it could not be fetched: {record.error}. Generate it again "
            "(with new_image=true if an identical request would be reused)."
        )
    elif record.status == "failed":
        result.message = (
            f"GPTunnel could not make this image: {record.error}. Change the prompt or the model "
            "and try again."
        )
    else:
        result.message = (
            f"Task {record.task_id} is not finished yet (GPTunnel says '{record.upstream_status}'). "
            f"Call get_result with task_id {record.task_id} in a little while to fetch the image."
        )
    if record.model and find_model(record.model) is None:
        result.model_note = (
            f"{record.model} is not a model this server knows, so it went to GPTunnel as given. "
            f"Known models: {', '.join(m.id for m in MODELS)} (details: {MODELS_URI})."
        )
    if engine.settings.sandbox:
        result.message = "Sandbox mode: made locally, nothing was charged. " + result.message
    if reused:
        result.reused = True
        result.message = (
            f"An identical request made at {record.created_at:%H:%M:%S} UTC was answered with this "
            "task instead of paying for a new image (pass new_image=true to get a fresh one). "
            + result.message
        )
    return result


async def tool_result(engine: Engine, record: TaskRecord, *, reused: bool = False) -> CallToolResult:
    result = describe(engine, record, reused=reused)
    text = f"{result.message} (task_id {result.task_id}, status {result.status})"
    if result.model_note is not None:
        text += f" {result.model_note}"
    content, note = await _image_content(engine, record, share=1)
    content.append(TextContent(text=text + note))
    return CallToolResult(
        content=content, structured_content=result.model_dump(mode="json"), is_error=record.status == "failed"
    )


async def batch_result(engine: Engine, outcomes: Sequence[Outcome | GPTunnelMCPError]) -> CallToolResult:
    """Several images of one call: each image's preview (together within one preview's budget)
    and link, one line each in the text, and which failed and why. An error only if all did."""
    started = [(n, o) for n, o in enumerate(outcomes, start=1) if isinstance(o, Outcome)]
    failures = [
        ImageFailure(image=n, error=error_text(o))
        for n, o in enumerate(outcomes, start=1)
        if not isinstance(o, Outcome)
    ]
    results = [describe(engine, o.record, reused=o.reused) for _, o in started]
    content: list[ContentBlock] = []
    lines: list[str] = []
    for (n, outcome), result in zip(started, results, strict=True):
        blocks, note = await _image_content(engine, outcome.record, share=len(outcomes))
        content += blocks
        lines.append(f"Image {n} (task_id {result.task_id}, status {result.status}): {result.message}{note}")
    lines += [f"Image {f.image} was not started: {f.error}" for f in failures]
    statuses = [r.status for r in results]
    told = [f"{statuses.count('done')} of {len(outcomes)} images are ready"]
    if "pending" in statuses:
        told.append(
            f"{statuses.count('pending')} still being made (call get_result with their task_id later)"
        )
    if failures or "failed" in statuses:
        told.append(f"{len(failures) + statuses.count('failed')} failed")
    message = ", ".join(told) + "."
    content.append(TextContent(text="\n".join([message, *lines])))
    batch = BatchResult(message=message, images=results, failures=failures)
    return CallToolResult(
        content=content,
        structured_content=batch.model_dump(mode="json"),
        # Failed only if no image came of it; otherwise the others are the answer.
        is_error=all(status == "failed" for status in statuses),
    )


async def _image_content(engine: Engine, record: TaskRecord, *, share: int) -> tuple[list[ContentBlock], str]:
    """A done task's preview and resource link, and a note for the text if the preview failed."""
    if record.status != "done" or record.file is None:
        return [], ""
    content: list[ContentBlock] = []
    note = ""
    try:
        preview = await engine.preview(record.file, share=share)
        content.append(
            ImageContent(data=base64.b64encode(preview.data).decode("ascii"), mime_type=preview.mime_type)
        )
    except StorageError as exc:
        # The image is stored and its path and link stand: a missing preview is no failure.
        note = f" {error_text(exc)}."
    content.append(
        ResourceLink(
            uri=file_uri(record.task_id),
            name=record.file.name,
            title=shorten(record.prompt, 80),
            description=f"Full image, {record.file.width}x{record.file.height}",
            mime_type=record.file.mime_type,
            size=record.file.size_bytes,
        )
    )
    return content, note


def search_result(page: SearchPage, search: Search, *, continued: bool) -> CallToolResult:
    """A page of search_images: one line per task in the text, every field in the structure.
    `continued` when the page was asked for with a cursor."""
    criteria = _criteria(search)
    which = f" {criteria}" if criteria else ""
    more = "more " if continued else ""
    rows = [history_entry(record, SEARCH_PROMPT_CHARS) for record in page.records]
    if not rows:
        message = f"No {more}tasks{which}." if which or continued else "No tasks yet."
    else:
        message = (
            f"{len(rows)} {more}task{'s' if len(rows) > 1 else ''}{which}, newest first. A task's record "
            f"is {HISTORY_URI}/<task_id>; get_result with its task_id shows the image."
        )
        if page.cursor:
            message += (
                f' More match: call search_images again with the same arguments and cursor "{page.cursor}".'
            )
    lines = [
        f"{row.created_at:%Y-%m-%d %H:%M} UTC  {row.status:<7}  {row.task_id}  {row.model}  {row.prompt}"
        for row in rows
    ]
    result = SearchResult(tasks=rows, next_cursor=page.cursor, message=message)
    return CallToolResult(
        content=[TextContent(text="\n".join([*lines, message]))],
        structured_content=result.model_dump(mode="json"),
    )


def _criteria(search: Search) -> str:
    """What a search asked for, in words: 'matching "fox", of model flux-dev, that are done'."""
    parts = []
    if search.text:
        parts.append(f'matching "{shorten(search.text, SEARCH_PROMPT_CHARS)}"')
    if search.model is not None:
        parts.append(f"of model {search.model}")
    if search.status is not None:
        parts.append(f"that are {search.status}")
    if search.since is not None:
        parts.append(f"made since {search.since.astimezone(timezone.utc):%Y-%m-%d %H:%M} UTC")
    return ", ".join(parts)


def error_text(exc: GPTunnelMCPError) -> str:
    """The core's account of what happened, and what an agent can do about it."""
    text = str(exc)
    if isinstance(exc, InputError):
        if exc.argument is not None and exc.argument != "task_id":
            text = f"invalid {exc.argument}: {text}"
        if exc.model is not None:
            text += f" The models and what each takes: resource {MODELS_URI}."
        elif exc.argument == "task_id":
            text += ", as returned by create_image or generate_and_wait."
    elif isinstance(exc, TaskNotFoundError):
        text += f". List known tasks with the resource {HISTORY_URI}."
    elif isinstance(exc, ImageNotReadyError) and exc.failed is None:
        text += f": call get_result with task_id {exc.task_id} first."
    elif isinstance(exc, ImageNotReadyError):
        text += ". Generate the image again (with new_image=true if an identical request would be reused)."
    elif isinstance(exc, DownloadError) and exc.task_id is not None:
        text += f" The task is kept: call get_result with task_id {exc.task_id} to try the download again."
    elif isinstance(exc, StorageError) and exc.task_id is not None:
        text += (
            f". GPTunnel's task is kept in the history: once the data folder is fixed, call get_result "
            f"with task_id {exc.task_id} to fetch the image."
        )
    elif isinstance(exc, BudgetExceededError):
        if exc.unknown:
            text += " Call get_result on the tasks still being made to finish them."
        text += " get_balance shows what was spent in the last 24 hours; tell the user the budget is reached."
    elif isinstance(exc, MissingKeyError):
        text += " in the MCP server's environment (your client's server config), then restart the server."
    elif isinstance(exc, AuthenticationError):
        text += " Then restart the MCP server."
    return text[:1].upper() + text[1:]


def error_result(exc: GPTunnelMCPError) -> CallToolResult:
    return CallToolResult(content=[TextContent(text=error_text(exc))], is_error=True)


def shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
