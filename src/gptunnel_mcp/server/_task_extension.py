"""The MCP tasks extension (`io.modelcontextprotocol/tasks`, 2026-07-28) for generate_and_wait.

A client that declares the extension on its request gets a task handle at once instead of a
result after the wait, and follows it with `tasks/get` (and may `tasks/cancel`). Any other
client gets the synchronous call, unchanged.

Each MCP task is a GPTunnel task of the history, so a restart forgets nothing, and any replica
sharing the history can answer for it (its handle is keyed with the server secret the history
holds). The server keeps no job running for it: a `tasks/get` moves the task on by at most one
upstream poll, when the poll plan says one is due, and its `pollIntervalMs` tells the client
when to ask next.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import datetime
from typing import Any

from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.extension import Extension, MethodBinding
from mcp.shared.exceptions import MCPError
from mcp_types import INTERNAL_ERROR, INVALID_PARAMS, CallToolRequestParams, RequestParams
from pydantic import ConfigDict, Field

from .._accounts import Account
from .._engine import Engine
from .._exceptions import GPTunnelMCPError, TaskNotFoundError
from .._records import TaskRecord, is_task_id
from ._arguments import ImageArguments, parse
from ._presentation import describe, error_result, error_text, tool_result
from ._sdk import declared_extensions, is_modern, request_headers

EXTENSION = "io.modelcontextprotocol/tasks"
TASK_TOOLS = frozenset({"generate_and_wait"})
RequestContext = ServerRequestContext[Engine, Any]


class TaskIdParams(RequestParams):
    model_config = ConfigDict(populate_by_name=True, extra="allow")

    task_id: str = Field(alias="taskId")


class TasksExtension(Extension):
    identifier = EXTENSION

    def methods(self) -> list[MethodBinding]:
        return [
            MethodBinding("tasks/get", TaskIdParams, self._get),
            MethodBinding("tasks/update", TaskIdParams, self._update),
            MethodBinding("tasks/cancel", TaskIdParams, self._cancel),
        ]

    async def intercept_tool_call(
        self, params: CallToolRequestParams, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        if params.name not in TASK_TOOLS or not _declares_tasks(ctx):
            return await call_next(ctx)
        engine: Engine = ctx.lifespan_context
        try:
            account = engine.accounts.for_headers(request_headers(ctx))
            args = parse(ImageArguments, params.arguments or {})
            if args.count != 1:
                # A task handle is one GPTunnel task: several images are answered in the call.
                return await call_next(ctx)
            request = args.request(engine.settings.default_model)
            # Created before answering: the spec wants the task to exist when its handle is given.
            outcome = await engine.create(request, account, new_image=args.new_image)
        except GPTunnelMCPError as exc:
            return error_result(exc)
        return {"resultType": "task", **_task(engine, outcome.record, poll_in=1.0)}

    async def _get(self, ctx: RequestContext, params: TaskIdParams) -> dict[str, Any]:
        engine = ctx.lifespan_context
        try:
            record, poll_in = await engine.advance(_gptunnel_id(engine, params.task_id), self._account(ctx))
        except TaskNotFoundError:
            raise _not_found() from None
        except GPTunnelMCPError as exc:
            # A failure of this poll, not of the task: the task stays working.
            raise MCPError(code=INTERNAL_ERROR, message=error_text(exc)) from None
        body = _task(engine, record, poll_in=poll_in)
        if body["status"] == "completed":
            result = await tool_result(engine, record)
            body["result"] = result.model_dump(by_alias=True, mode="json", exclude_none=True)
        return {"resultType": "complete", **body}

    async def _update(self, ctx: RequestContext, params: TaskIdParams) -> dict[str, Any]:
        # generate_and_wait never asks the client for input; the ack is all the spec requires.
        await self._find(ctx, params)
        return {"resultType": "complete"}

    async def _cancel(self, ctx: RequestContext, params: TaskIdParams) -> dict[str, Any]:
        engine = ctx.lifespan_context
        try:
            await engine.cancel(_gptunnel_id(engine, params.task_id), self._account(ctx))
        except GPTunnelMCPError:
            raise _not_found() from None
        return {"resultType": "complete"}

    async def _find(self, ctx: RequestContext, params: TaskIdParams) -> TaskRecord:
        engine = ctx.lifespan_context
        try:
            return await engine.lookup(_gptunnel_id(engine, params.task_id), self._account(ctx).owner)
        except GPTunnelMCPError:
            raise _not_found() from None

    def _account(self, ctx: RequestContext) -> Account:
        try:
            return ctx.lifespan_context.accounts.for_headers(request_headers(ctx))
        except GPTunnelMCPError:
            raise _not_found() from None


# --- handles -------------------------------------------------------------------------------


def task_handle(secret: bytes, gptunnel_id: str) -> str:
    """The MCP task id for a GPTunnel task: keyed with the server secret, because GPTunnel ids are
    sequential and a handle must not be guessable."""
    tag = hmac.new(secret, b"mcp-task:" + gptunnel_id.encode(), hashlib.sha256).hexdigest()[:32]
    return f"{gptunnel_id}-{tag}"


def _gptunnel_id(engine: Engine, handle: str) -> str:
    gptunnel_id = handle.partition("-")[0].lower()
    if not is_task_id(gptunnel_id) or not hmac.compare_digest(
        handle, task_handle(engine.accounts.secret, gptunnel_id)
    ):
        raise _not_found()
    return gptunnel_id


def _task(engine: Engine, record: TaskRecord, *, poll_in: float) -> dict[str, Any]:
    status, message = _status(engine, record)
    task: dict[str, Any] = {
        "taskId": task_handle(engine.accounts.secret, record.task_id),
        "status": status,
        "statusMessage": message,
        "createdAt": _iso(record.created_at),
        "lastUpdatedAt": _iso(record.updated_at),
        # The history keeps every task; nothing expires on our side.
        "ttlMs": None,
    }
    if status == "working":
        task["pollIntervalMs"] = max(250, round(poll_in * 1000))
    return task


def _status(engine: Engine, record: TaskRecord) -> tuple[str, str]:
    if record.cancelled_at is not None:
        return "cancelled", "cancelled; the image may still be made: get_result can fetch it"
    # A failed generation is a tool result with isError, and so a completed task (spec).
    return ("working" if record.status == "pending" else "completed"), describe(engine, record).message


def _declares_tasks(ctx: ServerRequestContext[Any, Any]) -> bool:
    # The extension belongs to 2026-07-28: a 2025-11-25 connection cannot carry a task result,
    # whatever its client declared at the handshake.
    return is_modern(ctx) and EXTENSION in declared_extensions(ctx)


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def _not_found() -> MCPError:
    return MCPError(code=INVALID_PARAMS, message="Failed to retrieve task: Task not found")
