"""The MCP tools: argument declarations, and the engine's records turned into tool results."""

from __future__ import annotations

import base64
from typing import Annotated, Any

from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp_types import CallToolResult, ContentBlock, ImageContent, ResourceLink, TextContent, ToolAnnotations
from pydantic import BaseModel, Field, WithJsonSchema

from ._accounts import Account
from ._engine import Engine, JobEvents
from ._exceptions import GPTunnelMCPError
from ._listeners import AccountListeners
from ._models import ASPECT_RATIOS, TASK_ID_PATTERN, ImageResult, TaskRecord, file_uri, parse_image_request
from ._settings import Settings

ToolContext = Context[Engine, Any]
# Enums, patterns and lengths are declared in the schema for clients but checked by our own models,
# whose messages say what to do; the SDK's pydantic messages for them are long and technical.
ToolResult = Annotated[CallToolResult, ImageResult]

Prompt = Annotated[
    str,
    Field(
        description="What the image should show. Be concrete: subject, setting, style, lighting, "
        "composition.",
        json_schema_extra={"minLength": 1},
    ),
]
Model = Annotated[
    str | None,
    Field(
        description="GPTunnel model id, e.g. gpt-image-1-low, gpt-image-1-medium, gpt-image-1-high, "
        "google-imagen-3, flux-dev, seedream-3, yandex-art. Omit for the server's default.",
    ),
]
AspectRatioArg = Annotated[
    Annotated[str, WithJsonSchema({"type": "string", "enum": list(ASPECT_RATIOS)})] | None,
    Field(description="Aspect ratio of the image. Omit for the model's default (usually 1:1)."),
]
Images = Annotated[
    list[str] | None,
    Field(
        description="Public http(s) URLs of reference images to edit or draw from. "
        "GPTunnel fetches them itself: no uploads, no base64, no local paths.",
    ),
]
NewImage = Annotated[
    bool,
    Field(
        description="Pay for a fresh image even if an identical request is still running or finished "
        "in the last few minutes (by default that earlier task is returned instead).",
    ),
]
TaskId = Annotated[
    str,
    Field(
        description="The task_id returned by create_image or generate_and_wait (24 hex characters).",
        json_schema_extra={"pattern": TASK_ID_PATTERN},
    ),
]

_SPENDS_MONEY = ToolAnnotations(
    read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=True
)


class _ToolEvents(JobEvents):
    """Progress notifications and list-changed notices for the tool call that runs the job."""

    def __init__(self, ctx: ToolContext, listeners: AccountListeners) -> None:
        self._ctx = ctx
        self._listeners = listeners

    async def progress(self, progress: float, total: float | None, message: str) -> None:
        await self._ctx.report_progress(
            round(progress, 1), None if total is None else round(total, 1), message
        )

    async def image_stored(self, record: TaskRecord) -> None:
        # 2026-07-28 clients hear it on their subscriptions/listen stream; 2025-11-25 clients on
        # their session (the SDK drops the session notice on 2026-07-28 connections).
        await self._listeners.resources_changed(record.owner)
        await self._ctx.session.send_resource_list_changed()


def register_tools(server: MCPServer[Engine], settings: Settings, listeners: AccountListeners) -> None:
    def engine_of(ctx: ToolContext) -> Engine:
        return ctx.request_context.lifespan_context

    def account_of(ctx: ToolContext) -> Account:
        return engine_of(ctx).accounts.for_headers(ctx.headers)

    @server.tool(
        title="Start an image (returns at once)",
        description="Start generating an image with GPTunnel and return its task_id at once, without "
        "waiting. Then call get_result with the task_id until status is 'done'. Prefer generate_and_wait "
        "unless you want to do other work meanwhile. A new image is billed; an identical request still "
        "running or made minutes ago is answered with that task instead (new_image=true for a fresh one).",
        annotations=_SPENDS_MONEY,
    )
    async def create_image(
        ctx: ToolContext,
        prompt: Prompt,
        model: Model = None,
        aspect_ratio: AspectRatioArg = None,
        images: Images = None,
        new_image: NewImage = False,
    ) -> ToolResult:
        engine = engine_of(ctx)
        try:
            request = parse_image_request(settings.default_model, prompt, model, aspect_ratio, images)
            started = await engine.create(request, account_of(ctx), new_image=new_image)
            return await tool_result(engine, started.record, reused=started.reused)
        except GPTunnelMCPError as exc:
            return error_result(exc)

    @server.tool(
        title="Check an image task",
        description="Get the current state of an image task. When it is done, the image is downloaded once "
        "and kept: the result carries a preview, the file path and a resource link to the full image. "
        "Finished tasks are answered from the local history, even after GPTunnel's 48-hour link expired.",
        annotations=ToolAnnotations(
            read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=True
        ),
    )
    async def get_result(ctx: ToolContext, task_id: TaskId) -> ToolResult:
        engine = engine_of(ctx)
        try:
            record = await engine.refresh(task_id, account_of(ctx), _ToolEvents(ctx, listeners))
            return await tool_result(engine, record)
        except GPTunnelMCPError as exc:
            return error_result(exc)

    @server.tool(
        title="Generate an image and wait for it",
        description="Generate an image with GPTunnel and wait for it in one call: returns a preview, the "
        "stored file's path and a resource link to the full image. If the image takes longer than "
        f"the server's wait limit (about {settings.wait_timeout:.0f} s), the result is status 'pending' "
        "with a task_id: call get_result with it later instead of generating again. A new image is "
        "billed; an identical request still running or made minutes ago is answered with that task "
        "instead (new_image=true for a fresh one).",
        annotations=_SPENDS_MONEY,
    )
    async def generate_and_wait(
        ctx: ToolContext,
        prompt: Prompt,
        model: Model = None,
        aspect_ratio: AspectRatioArg = None,
        images: Images = None,
        new_image: NewImage = False,
    ) -> ToolResult:
        engine = engine_of(ctx)
        try:
            request = parse_image_request(settings.default_model, prompt, model, aspect_ratio, images)
            events = _ToolEvents(ctx, listeners)
            started = await engine.generate(request, account_of(ctx), events, new_image=new_image)
            return await tool_result(engine, started.record, reused=started.reused)
        except GPTunnelMCPError as exc:
            return error_result(exc)

    @server.tool(
        title="GPTunnel balance",
        description="The GPTunnel account's balance and credit limit (roubles), to check before spending.",
        annotations=ToolAnnotations(
            read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=True
        ),
    )
    async def get_balance(ctx: ToolContext) -> Annotated[CallToolResult, BalanceResult]:
        try:
            balance = await engine_of(ctx).balance(account_of(ctx))
        except GPTunnelMCPError as exc:
            return error_result(exc)
        result = BalanceResult(
            balance=balance.balance,
            credit_limit=balance.credit_limit,
            message=f"Balance {balance.balance:.2f} RUB, credit limit {balance.credit_limit:.2f} RUB.",
        )
        return CallToolResult(
            content=[TextContent(text=result.message)], structured_content=result.model_dump(mode="json")
        )


class BalanceResult(BaseModel):
    balance: float = Field(description="Money on the account, in roubles.")
    credit_limit: float = Field(description="How far the account may go below zero, in roubles.")
    currency: str = "RUB"
    message: str


async def tool_result(engine: Engine, record: TaskRecord, *, reused: bool = False) -> CallToolResult:
    result = engine.describe(record, reused=reused)
    content: list[ContentBlock] = []
    if record.status == "done" and record.file is not None:
        preview = await engine.preview(record.file)
        content.append(
            ImageContent(data=base64.b64encode(preview.data).decode("ascii"), mime_type=preview.mime_type)
        )
        content.append(
            ResourceLink(
                uri=file_uri(record.task_id),
                name=record.file.file_name,
                title=_short(record.prompt),
                description=f"Full image, {record.file.width}x{record.file.height}",
                mime_type=record.file.mime_type,
                size=record.file.size_bytes,
            )
        )
    content.append(TextContent(text=f"{result.message} (task_id {result.task_id}, status {result.status})"))
    return CallToolResult(
        content=content, structured_content=result.model_dump(mode="json"), is_error=record.status == "failed"
    )


def error_result(exc: GPTunnelMCPError) -> CallToolResult:
    text = str(exc)
    return CallToolResult(content=[TextContent(text=text[:1].upper() + text[1:])], is_error=True)


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
