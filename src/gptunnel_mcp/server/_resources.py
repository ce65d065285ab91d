"""The MCP resources: the history, each task's record, and each stored image file.

Handled at the protocol level rather than with `@server.resource`, because every stored image
is served with its own mime type and is listed in `resources/list`, which the high-level
decorators cannot express. Resources registered the high-level way (the gallery's `ui://` view,
by the Apps extension) are listed and read through MCPServer as it would.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

from mcp.server import MCPServer
from mcp.server.context import ServerRequestContext
from mcp.server.mcpserver.exceptions import ResourceError
from mcp.shared.exceptions import MCPError
from mcp_types import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    BlobResourceContents,
    CompleteRequestParams,
    CompleteResult,
    Completion,
    InputRequiredResult,
    ListResourcesResult,
    ListResourceTemplatesResult,
    PaginatedRequestParams,
    ReadResourceRequestParams,
    ReadResourceResult,
    Resource,
    ResourceTemplate,
    ResourceTemplateReference,
    TextResourceContents,
)

from .._catalog import MODELS
from .._engine import Engine
from .._exceptions import GPTunnelMCPError
from .._records import TaskRecord
from ._presentation import (
    HISTORY_URI,
    MODELS_URI,
    HistoryPage,
    describe,
    error_text,
    file_uri,
    history_entry,
    shorten,
)
from ._sdk import add_request_handler, request_headers

RequestContext = ServerRequestContext[Engine]

#: Images listed per `resources/list` page, and tasks per page of the history resource.
PAGE_SIZE = 50
#: Task ids offered by argument completion.
COMPLETION_LIMIT = 100
#: Characters of each prompt in the history: a page stays a few thousand tokens however long the
#: prompts (up to 32,000 characters each); each task's record keeps the whole text.
LIST_PROMPT_CHARS = 200
#: Pages beyond any real history are refused before they reach the database as an offset.
_MAX_PAGE_DIGITS = 7
_URI = re.compile(r"^gptunnel://images/(?P<id>[^/]+)(?P<file>/file)?$")
_HISTORY_PAGE = re.compile(rf"^{re.escape(HISTORY_URI)}\?page=(?P<page>.*)$")

_TEMPLATES = [
    ResourceTemplate(
        uri_template=f"{HISTORY_URI}/{{task_id}}",
        name="task",
        title="Image task record",
        description="One task's record as JSON: status, model, prompt, times, file details.",
        mime_type="application/json",
    ),
    ResourceTemplate(
        uri_template=f"{HISTORY_URI}/{{task_id}}/file",
        name="image",
        title="Stored image file",
        description="The full image a finished task produced, as stored locally.",
    ),
]


def register_resources(server: MCPServer[Engine]) -> None:
    list_resources = functools.partial(_list_resources, server)
    read_resource = functools.partial(_read_resource, server)
    add_request_handler(server, "resources/list", PaginatedRequestParams, list_resources)
    add_request_handler(server, "resources/templates/list", PaginatedRequestParams, _list_templates)
    add_request_handler(server, "resources/read", ReadResourceRequestParams, read_resource)
    add_request_handler(server, "completion/complete", CompleteRequestParams, _complete)


async def _complete(ctx: RequestContext, params: CompleteRequestParams) -> CompleteResult:
    """Task ids for the resource templates, newest first, that start with what was typed."""
    ref = params.ref
    is_ours = isinstance(ref, ResourceTemplateReference) and ref.uri in {t.uri_template for t in _TEMPLATES}
    if not is_ours or params.argument.name != "task_id":
        return CompleteResult(completion=Completion(values=[], total=0, has_more=False))
    typed = params.argument.value.lower()
    records = await ctx.lifespan_context.history(_owner(ctx), limit=COMPLETION_LIMIT)
    ids = [r.task_id for r in records if r.task_id.startswith(typed)]
    # The protocol caps a completion at 100 values.
    return CompleteResult(completion=Completion(values=ids[:100], total=len(ids), has_more=len(ids) > 100))


async def _list_resources(
    server: MCPServer[Engine], ctx: RequestContext, params: PaginatedRequestParams
) -> ListResourcesResult:
    engine = ctx.lifespan_context
    offset = _offset(params.cursor)
    records = await engine.history(_owner(ctx), limit=PAGE_SIZE + 1, offset=offset)
    resources = [_history_resource(), _MODELS_RESOURCE, *await server.list_resources()] if offset == 0 else []
    resources += [_file_resource(r) for r in records[:PAGE_SIZE] if r.status == "done" and r.file]
    more = len(records) > PAGE_SIZE
    return ListResourcesResult(resources=resources, next_cursor=str(offset + PAGE_SIZE) if more else None)


async def _list_templates(ctx: RequestContext, params: PaginatedRequestParams) -> ListResourceTemplatesResult:
    return ListResourceTemplatesResult(resource_templates=_TEMPLATES)


async def _read_resource(
    server: MCPServer[Engine], ctx: RequestContext, params: ReadResourceRequestParams
) -> ReadResourceResult:
    engine = ctx.lifespan_context
    uri = str(params.uri)
    if uri.startswith("ui://"):
        return await _registered(server, uri)
    if uri == HISTORY_URI:
        return _json(uri, await _history(engine, _owner(ctx), 1))
    if paged := _HISTORY_PAGE.match(uri):
        return _json(uri, await _history(engine, _owner(ctx), _page(uri, paged["page"])))
    if uri == MODELS_URI:
        return _json(uri, await _models(engine))
    match = _URI.match(uri)
    if match is None:
        raise _not_found(
            uri, "unknown resource; the server has gptunnel://images, its task records, and gptunnel://models"
        )
    try:
        record = await engine.lookup(match["id"], _owner(ctx))
        if match["file"] is None:
            return _json(uri, describe(engine, record, full_prompt=True).model_dump(mode="json"))
        data = await engine.image_base64(record)
    except GPTunnelMCPError as exc:
        raise _not_found(uri, error_text(exc)) from None
    assert record.file is not None
    return ReadResourceResult(
        contents=[BlobResourceContents(uri=uri, mime_type=record.file.mime_type, blob=data)]
    )


def _page(uri: str, given: str) -> int:
    if not (given.isascii() and given.isdigit() and len(given) <= _MAX_PAGE_DIGITS and int(given) >= 1):
        raise _not_found(
            uri, f"invalid page {given[:20]!r}; pages are numbered from 1, as in {HISTORY_URI}?page=2"
        )
    return int(given)


async def _history(engine: Engine, owner: str, page: int) -> dict[str, Any]:
    total = await engine.count(owner)
    records = await engine.history(owner, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
    pages = max(1, -(-total // PAGE_SIZE))
    entries = [history_entry(r, LIST_PROMPT_CHARS) for r in records]
    notes = []
    if any(e.prompt_truncated for e in entries):
        notes.append(
            f"Prompts are cut to {LIST_PROMPT_CHARS} characters here (prompt_truncated); "
            "each task's resource_uri has the full text."
        )
    next_page = f"{HISTORY_URI}?page={page + 1}" if page < pages else None
    if next_page is not None:
        notes.append(f"Page {page} of {pages}, newest first; older tasks: {next_page}.")
    elif page > pages:
        notes.append(f"Past the last page ({pages}).")
    history = HistoryPage(
        total=total,
        shown=len(entries),
        page=page,
        pages=pages,
        next_page=next_page,
        tasks=entries,
        note=" ".join(notes) or None,
    )
    return history.model_dump(mode="json")


def _owner(ctx: RequestContext) -> str:
    try:
        return ctx.lifespan_context.accounts.for_headers(request_headers(ctx)).owner
    except GPTunnelMCPError as exc:
        raise MCPError(code=INVALID_REQUEST, message=error_text(exc)) from None


async def _models(engine: Engine) -> dict[str, Any]:
    return {
        "default_model": engine.settings.default_model,
        "note": "Ids are matched in any case and sent as listed here. Other GPTunnel model ids are "
        "accepted too and passed on unchecked. `observed` is what this server has seen of each model "
        "lately, from its history: the average cost GPTunnel reported (roubles) and the average time "
        "to a finished image (seconds).",
        "models": [
            {**m.model_dump(), "observed": (await engine.observed(m.id)).model_dump()} for m in MODELS
        ],
    }


_MODELS_RESOURCE = Resource(
    uri=MODELS_URI,
    name="models",
    title="Image models",
    description="The image models this server knows, with the aspect ratios and reference-image "
    "support of each, and the average cost and time of each as this server has seen them.",
    mime_type="application/json",
)


def _history_resource() -> Resource:
    return Resource(
        uri=HISTORY_URI,
        name="history",
        title="Image history",
        description=f"All image tasks, newest first, {PAGE_SIZE} a page (gptunnel://images?page=2 and on), "
        f"prompts cut to {LIST_PROMPT_CHARS} characters, as JSON.",
        mime_type="application/json",
    )


def _file_resource(record: TaskRecord) -> Resource:
    assert record.file is not None
    prompt = shorten(record.prompt, 60)
    return Resource(
        uri=file_uri(record.task_id),
        name=record.file.name,
        title=prompt,
        description=(
            f"{record.model}, {record.file.width}x{record.file.height}, "
            f"{record.created_at:%Y-%m-%d %H:%M} UTC"
        ),
        mime_type=record.file.mime_type,
        size=record.file.size_bytes,
    )


async def _registered(server: MCPServer[Engine], uri: str) -> ReadResourceResult:
    """A resource registered with MCPServer itself: the views, which are text."""
    try:
        items = await server.read_resource(uri)
    except ResourceError:
        raise _not_found(uri, "unknown view; the server has ui://gptunnel/gallery.html") from None
    assert not isinstance(items, InputRequiredResult)
    return ReadResourceResult(
        contents=[
            TextResourceContents(uri=uri, text=str(item.content), mime_type=item.mime_type, _meta=item.meta)
            for item in items
        ]
    )


def _json(uri: str, value: dict[str, Any]) -> ReadResourceResult:
    text = json.dumps(value, ensure_ascii=False, indent=2)
    return ReadResourceResult(
        contents=[TextResourceContents(uri=uri, mime_type="application/json", text=text)]
    )


def _offset(cursor: str | None) -> int:
    if cursor is None:
        return 0
    # ASCII digits only: str.isdigit() also takes "²" and other scripts' digits, which int()
    # refuses or reads; and a bound far beyond any history, as SQLite takes no offset past 64 bits.
    if not (cursor.isascii() and cursor.isdigit() and len(cursor) <= 10 and int(cursor) <= 10**9):
        raise MCPError(
            code=INVALID_PARAMS, message=f"invalid cursor {cursor[:20]!r}; pass a nextCursor as given"
        )
    return int(cursor)


def _not_found(uri: str, why: str) -> MCPError:
    # -32602 is what the spec and the SDK use for a missing resource, on both protocol versions.
    return MCPError(code=INVALID_PARAMS, message=f"Resource not found: {why}", data={"uri": uri})
