"""The MCP resources: the history, each task's record, and each stored image file.

Handled at the protocol level rather than with `@server.resource`, because every stored image
is served with its own mime type and is listed in `resources/list`, which the high-level
decorators cannot express.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any

from mcp.server import MCPServer
from mcp.server.context import ServerRequestContext
from mcp.shared.exceptions import MCPError
from mcp_types import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    BlobResourceContents,
    CompleteRequestParams,
    CompleteResult,
    Completion,
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
    HistoryEntry,
    HistoryPage,
    describe,
    error_text,
    file_uri,
    shorten,
    task_uri,
)
from ._sdk import add_request_handler, request_headers

RequestContext = ServerRequestContext[Engine]

#: Images listed per `resources/list` page, and tasks in the history resource.
PAGE_SIZE = 50
HISTORY_LIMIT = 100
_URI = re.compile(r"^gptunnel://images/(?P<id>[^/]+)(?P<file>/file)?$")

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
    add_request_handler(server, "resources/list", PaginatedRequestParams, _list_resources)
    add_request_handler(server, "resources/templates/list", PaginatedRequestParams, _list_templates)
    add_request_handler(server, "resources/read", ReadResourceRequestParams, _read_resource)
    add_request_handler(server, "completion/complete", CompleteRequestParams, _complete)


async def _complete(ctx: RequestContext, params: CompleteRequestParams) -> CompleteResult:
    """Task ids for the resource templates, newest first, that start with what was typed."""
    ref = params.ref
    is_ours = isinstance(ref, ResourceTemplateReference) and ref.uri in {t.uri_template for t in _TEMPLATES}
    if not is_ours or params.argument.name != "task_id":
        return CompleteResult(completion=Completion(values=[], total=0, has_more=False))
    typed = params.argument.value.lower()
    records = await ctx.lifespan_context.history(_owner(ctx), limit=HISTORY_LIMIT)
    ids = [r.task_id for r in records if r.task_id.startswith(typed)]
    # The protocol caps a completion at 100 values.
    return CompleteResult(completion=Completion(values=ids[:100], total=len(ids), has_more=len(ids) > 100))


async def _list_resources(ctx: RequestContext, params: PaginatedRequestParams) -> ListResourcesResult:
    engine = ctx.lifespan_context
    offset = _offset(params.cursor)
    records = await engine.history(_owner(ctx), limit=PAGE_SIZE + 1, offset=offset)
    resources = [_history_resource(), _MODELS_RESOURCE] if offset == 0 else []
    resources += [_file_resource(r) for r in records[:PAGE_SIZE] if r.status == "done" and r.file]
    more = len(records) > PAGE_SIZE
    return ListResourcesResult(resources=resources, next_cursor=str(offset + PAGE_SIZE) if more else None)


async def _list_templates(ctx: RequestContext, params: PaginatedRequestParams) -> ListResourceTemplatesResult:
    return ListResourceTemplatesResult(resource_templates=_TEMPLATES)


async def _read_resource(ctx: RequestContext, params: ReadResourceRequestParams) -> ReadResourceResult:
    engine = ctx.lifespan_context
    uri = str(params.uri)
    if uri == HISTORY_URI:
        return _json(uri, await _history(engine, _owner(ctx)))
    if uri == MODELS_URI:
        return _json(uri, _models(engine))
    match = _URI.match(uri)
    if match is None:
        raise _not_found(
            uri, "unknown resource; the server has gptunnel://images, its task records, and gptunnel://models"
        )
    try:
        record = await engine.lookup(match["id"], _owner(ctx))
        if match["file"] is None:
            return _json(uri, describe(engine, record).model_dump(mode="json"))
        data = await engine.image_bytes(record)
    except GPTunnelMCPError as exc:
        raise _not_found(uri, error_text(exc)) from None
    assert record.file is not None
    blob = BlobResourceContents(
        uri=uri, mime_type=record.file.mime_type, blob=base64.b64encode(data).decode()
    )
    return ReadResourceResult(contents=[blob])


async def _history(engine: Engine, owner: str) -> dict[str, Any]:
    total, records = await engine.count(owner), await engine.history(owner, limit=HISTORY_LIMIT)
    page = HistoryPage(
        total=total,
        shown=len(records),
        tasks=[
            HistoryEntry(
                task_id=r.task_id,
                status=r.status,
                model=r.model,
                prompt=r.prompt,
                created_at=r.created_at,
                resource_uri=task_uri(r.task_id),
                file_uri=file_uri(r.task_id) if r.status == "done" else None,
            )
            for r in records
        ],
        note=f"Only the newest {HISTORY_LIMIT} of {total} tasks are shown." if total > len(records) else None,
    )
    return page.model_dump(mode="json")


def _owner(ctx: RequestContext) -> str:
    try:
        return ctx.lifespan_context.accounts.for_headers(request_headers(ctx)).owner
    except GPTunnelMCPError as exc:
        raise MCPError(code=INVALID_REQUEST, message=error_text(exc)) from None


def _models(engine: Engine) -> dict[str, Any]:
    return {
        "default_model": engine.settings.default_model,
        "note": "Other GPTunnel model ids are accepted too and passed on unchecked.",
        "models": [m.model_dump() for m in MODELS],
    }


_MODELS_RESOURCE = Resource(
    uri=MODELS_URI,
    name="models",
    title="Image models",
    description="The image models this server knows, with the aspect ratios and reference-image "
    "support of each.",
    mime_type="application/json",
)


def _history_resource() -> Resource:
    return Resource(
        uri=HISTORY_URI,
        name="history",
        title="Image history",
        description=f"All image tasks, newest first (at most {HISTORY_LIMIT}), as JSON.",
        mime_type="application/json",
    )


def _file_resource(record: TaskRecord) -> Resource:
    assert record.file is not None
    prompt = shorten(record.prompt, 60)
    return Resource(
        uri=file_uri(record.task_id),
        name=record.file.file_name,
        title=prompt,
        description=(
            f"{record.model}, {record.file.width}x{record.file.height}, "
            f"{record.created_at:%Y-%m-%d %H:%M} UTC"
        ),
        mime_type=record.file.mime_type,
        size=record.file.size_bytes,
    )


def _json(uri: str, value: dict[str, Any]) -> ReadResourceResult:
    text = json.dumps(value, ensure_ascii=False, indent=2)
    return ReadResourceResult(
        contents=[TextResourceContents(uri=uri, mime_type="application/json", text=text)]
    )


def _offset(cursor: str | None) -> int:
    if cursor is None:
        return 0
    if not cursor.isdigit():
        raise MCPError(
            code=INVALID_PARAMS, message=f"invalid cursor {cursor[:20]!r}; pass a nextCursor as given"
        )
    return int(cursor)


def _not_found(uri: str, why: str) -> MCPError:
    # -32602 is what the spec and the SDK use for a missing resource, on both protocol versions.
    return MCPError(code=INVALID_PARAMS, message=f"Resource not found: {why}", data={"uri": uri})
