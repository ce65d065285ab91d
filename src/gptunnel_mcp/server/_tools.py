"""The MCP tools: thin wrappers that hand validated arguments to the engine and its records to
the presentation."""

from __future__ import annotations

import functools
from typing import Annotated

import anyio
from mcp.server import MCPServer
from mcp.server.mcpserver.resolve import Resolve
from mcp_types import CallToolResult, ListRootsResult, TextContent
from pydantic import BaseModel, Field

from .._engine import Engine, JobEvents
from .._exceptions import GPTunnelMCPError
from .._export import check_destination
from .._records import TaskRecord
from .._settings import Settings
from ._arguments import (
    SEARCH_LIMIT,
    ImageArguments,
    NoArguments,
    SaveArguments,
    SearchArguments,
    TaskArguments,
    takes,
)
from ._context import READS, READS_HISTORY, SAVES, SPENDS_MONEY, ToolContext, account_of, engine_of
from ._gallery import GALLERY_TOOL_META
from ._presentation import (
    SavedImage,
    SearchResult,
    ToolImageResult,
    batch_result,
    error_result,
    nowhere_to_save,
    saved,
    search_result,
    tool_result,
)
from ._roots import client_roots, root_folders

ToolResult = Annotated[CallToolResult, ToolImageResult]


class BalanceResult(BaseModel):
    balance: float = Field(description="Money on the account, in roubles.")
    credit_limit: float = Field(description="How far the account may go below zero, in roubles.")
    currency: str = "RUB"
    spent_last_24h: float = Field(
        description="What GPTunnel reported your images made in the last 24 hours cost, in roubles "
        "(from this server's history)."
    )
    images_last_24h: int = Field(description="Images (tasks) made in the last 24 hours.")
    images_without_cost: int = Field(
        description="Of those, how many GPTunnel has reported no cost for (yet): not in spent_last_24h."
    )
    daily_budget: float | None = Field(
        description="The server's budget per 24 hours in roubles (GPTUNNEL_MAX_SPEND_PER_DAY); null: none."
    )
    message: str


class _ToolEvents(JobEvents):
    """Progress notifications and list-changed notices for the tool call that runs the job."""

    def __init__(self, ctx: ToolContext) -> None:
        self._ctx = ctx
        self._sent = -1.0

    async def progress(self, progress: float, total: float | None, message: str) -> None:
        # Sent in tenths: two reports within a tenth would repeat a value, and the protocol
        # wants each notice's progress above the last.
        shown = round(progress, 1)
        if shown <= self._sent:
            return
        self._sent = shown
        await self._ctx.report_progress(shown, None if total is None else round(total, 1), message)

    async def image_stored(self, record: TaskRecord) -> None:
        # A 2025-11-25 client hears it on its session (the SDK drops the session notice on
        # 2026-07-28 connections, whose subscriptions/listen streams the engine's hook tells).
        await self._ctx.session.send_resource_list_changed()


def register_tools(server: MCPServer[Engine], settings: Settings) -> None:

    @server.tool(
        title="Start an image (returns at once)",
        description="Start generating an image with GPTunnel and return its task_id at once, without "
        "waiting. Then call get_result with the task_id until status is 'done'. Prefer generate_and_wait "
        "unless you want to do other work meanwhile. A new image is billed; an identical request still "
        "running or made minutes ago is answered with that task instead (new_image=true for a fresh one). "
        "count=2..4 starts that many images of the request at once (options to choose from). To change an "
        "image made earlier, pass its task_id in images with a prompt saying what to change.",
        annotations=SPENDS_MONEY,
    )
    @takes(ImageArguments, ToolContext)
    async def create_image(ctx: ToolContext, args: ImageArguments) -> ToolResult:
        engine = engine_of(ctx)
        try:
            request = args.request(engine.settings.default_model)
            if args.count != 1:
                started = await engine.create_many(
                    request, account_of(ctx), count=args.count, new_image=args.new_image
                )
                return await batch_result(engine, started)
            outcome = await engine.create(request, account_of(ctx), new_image=args.new_image)
            return await tool_result(engine, outcome.record, reused=outcome.reused)
        except GPTunnelMCPError as exc:
            return error_result(exc)

    @server.tool(
        title="Check an image task",
        description="Get the current state of an image task. When it is done, the image is downloaded once "
        "and kept: the result carries a preview, the file path and a resource link to the full image. "
        "Finished tasks are answered from the local history, even after GPTunnel's 48-hour link expired.",
        annotations=READS,
        meta=GALLERY_TOOL_META,
    )
    @takes(TaskArguments, ToolContext)
    async def get_result(ctx: ToolContext, args: TaskArguments) -> ToolResult:
        engine = engine_of(ctx)
        try:
            record = await engine.refresh(args.task_id, account_of(ctx), _ToolEvents(ctx))
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
        "instead (new_image=true for a fresh one). For options to choose from, count=2..4 makes that many "
        "in one call. To change an image made earlier, pass its task_id in images with a prompt saying what "
        "to change.",
        annotations=SPENDS_MONEY,
        meta=GALLERY_TOOL_META,
    )
    @takes(ImageArguments, ToolContext)
    async def generate_and_wait(ctx: ToolContext, args: ImageArguments) -> ToolResult:
        engine = engine_of(ctx)
        try:
            request = args.request(engine.settings.default_model)
            events = _ToolEvents(ctx)
            if args.count != 1:
                made = await engine.generate_many(
                    request, account_of(ctx), events, count=args.count, new_image=args.new_image
                )
                return await batch_result(engine, made)
            outcome = await engine.generate(request, account_of(ctx), events, new_image=args.new_image)
            return await tool_result(engine, outcome.record, reused=outcome.reused)
        except GPTunnelMCPError as exc:
            return error_result(exc)

    @server.tool(
        title="Search earlier images",
        description="Find images made earlier on this server (the caller's own): by text in the prompt "
        "(any case, Russian too), model, status and date, newest first, a page of short rows with each "
        "task_id and its record's resource URI, no image data. Use it when the user refers to an earlier "
        "image ('the fox from last week') instead of generating it again, then get_result with the "
        f"task_id to show it. Up to {SEARCH_LIMIT} rows a page; next_cursor continues.",
        annotations=READS_HISTORY,
    )
    @takes(SearchArguments, ToolContext)
    async def search_images(
        ctx: ToolContext, args: SearchArguments
    ) -> Annotated[CallToolResult, SearchResult]:
        engine = engine_of(ctx)
        try:
            search, limit = args.search()
            page = await engine.search(account_of(ctx).owner, search, limit=limit, cursor=args.cursor)
        except GPTunnelMCPError as exc:
            return error_result(exc)
        return search_result(page, search, continued=args.cursor is not None)

    @server.tool(
        title="Save an image into the user's files",
        description="Copy a finished image (by task_id) into the user's files, such as their project's "
        "assets folder: use it when the user wants the image as a file where they work. destination is "
        "a folder or a file path; a name ending in .png, .jpg, .jpeg or .webp is written in that format "
        "(converted if needed). Relative paths start in the client's first root (its workspace); "
        "anything outside the client's roots, or the server's export folders for clients without "
        "roots, is refused. An existing file is replaced only with overwrite=true.",
        annotations=SAVES,
    )
    @takes(SaveArguments, ToolContext, roots=Annotated[ListRootsResult | None, Resolve(client_roots)])
    async def save_image(
        ctx: ToolContext, args: SaveArguments, *, roots: ListRootsResult | None = None
    ) -> Annotated[CallToolResult, SavedImage]:
        engine = engine_of(ctx)
        settings = engine.settings
        folders = root_folders(roots) or settings.export_dirs
        if not folders:
            return nowhere_to_save(multi_user=engine.accounts.multi_user)
        # The history and the images: an image saved over them would destroy them. (The sandbox
        # keeps its own inside the real data folder.)
        data_folder = settings.home.parent if settings.sandbox else settings.home
        try:
            destination = await anyio.to_thread.run_sync(
                functools.partial(check_destination, args.destination, folders, data_folder=data_folder)
            )
            account = account_of(ctx)
            written = await engine.export(args.task_id, account, destination, overwrite=args.overwrite)
        except GPTunnelMCPError as exc:
            return error_result(exc)
        return saved(args.task_id, written)

    @server.tool(
        title="GPTunnel balance",
        description="The GPTunnel account's balance and credit limit (roubles), and what your images of the "
        "last 24 hours cost and the server's daily budget, to check before spending.",
        annotations=READS,
    )
    @takes(NoArguments, ToolContext)
    async def get_balance(ctx: ToolContext, args: NoArguments) -> Annotated[CallToolResult, BalanceResult]:
        engine, account = engine_of(ctx), account_of(ctx)
        try:
            balance = await engine.balance(account)
            spent = await engine.spent(account.owner)
        except GPTunnelMCPError as exc:
            return error_result(exc)
        budget = engine.settings.max_spend_per_day
        told = [
            f"Balance {balance.balance:.2f} RUB, credit limit {balance.credit_limit:.2f} RUB.",
            f"In the last 24 hours: {spent.tasks} image{'' if spent.tasks == 1 else 's'}, "
            f"{spent.cost:.2f} RUB as GPTunnel reported",
        ]
        if spent.tasks > spent.priced:
            told[-1] += f" ({spent.tasks - spent.priced} without a reported cost)"
        told[-1] += "." if budget is None else f", of a daily budget of {budget:.2f} RUB."
        result = BalanceResult(
            balance=balance.balance,
            credit_limit=balance.credit_limit,
            spent_last_24h=round(spent.cost, 6),
            images_last_24h=spent.tasks,
            images_without_cost=spent.tasks - spent.priced,
            daily_budget=budget,
            message=" ".join(told),
        )
        return CallToolResult(
            content=[TextContent(text=result.message)], structured_content=result.model_dump(mode="json")
        )
