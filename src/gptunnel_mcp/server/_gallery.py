"""The in-chat gallery (MCP Apps, `io.modelcontextprotocol/ui`): the view, the `show_gallery`
tool, and the tools only the view calls, for pictures and for following a task to its image.

The image tools are bound to the view by `_meta` alone, so a host without Apps gets the same
results as before. The view's pictures come through tools visible to the app only: thumbnails
never fill the model's context.
"""

from __future__ import annotations

import base64
import time
from importlib import resources
from typing import Annotated, Any

from mcp.server import MCPServer
from mcp.server.apps import Apps, ResourceCsp, ResourcePermissions, client_supports_apps
from mcp.server.context import ServerRequestContext
from mcp_types import (
    CallToolResult,
    ContentBlock,
    ImageContent,
    ListToolsResult,
    TextContent,
    Tool,
    ToolAnnotations,
)
from pydantic import BaseModel, Field

from .._engine import JobEvents
from .._exceptions import GPTunnelMCPError
from .._records import TaskRecord
from ._arguments import GalleryArguments, PictureArguments, SearchArguments, TaskArguments, takes
from ._context import READS_HISTORY, ToolContext, account_of, engine_of
from ._presentation import ImageResult, SearchResult, describe, error_result, search_result
from ._sdk import add_request_handler, lowlevel

GALLERY_URI = "ui://gptunnel/gallery.html"
#: `_meta` of a tool whose results the gallery shows. Hosts of the first Apps drafts read the
#: flat key; the official TypeScript helper writes both, and so do we.
GALLERY_TOOL_META: dict[str, Any] = {"ui": {"resourceUri": GALLERY_URI}, "ui/resourceUri": GALLERY_URI}

#: Long side (px) and most bytes of a tile in the grid, and of an image opened large.
PICTURE_SIZES = {"thumb": (384, 60_000), "large": (1600, 1_500_000)}
#: The longest one gallery_wait call waits: well within hosts' tool-call timeouts, so a task
#: that takes minutes is followed by the view, call after call, not by one call that times out.
WAIT_SECONDS = 20.0
#: Tiles on the gallery's first page (the view asks for more as the user scrolls).
GALLERY_PAGE = 24

_VIEW_ONLY = ToolAnnotations(
    read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False
)


class Following(BaseModel):
    """The structured result of gallery_wait."""

    image: ImageResult
    elapsed_seconds: float | None = Field(description="How long the task has been running.")
    expected_seconds: float | None = Field(
        description="How long such a task usually takes here, when the server has learned it."
    )
    message: str


class _Watch(JobEvents):
    """Keeps the last progress report of a wait, for the view's progress bar."""

    def __init__(self) -> None:
        self.elapsed: float | None = None
        self.expected: float | None = None
        self.message = ""

    async def progress(self, progress: float, total: float | None, message: str) -> None:
        self.elapsed, self.expected, self.message = progress, total, message

    async def image_stored(self, record: TaskRecord) -> None:
        pass


def hide_view_tools(server: MCPServer[Any]) -> None:
    """List the tools only the view calls to clients that render views: an agent in a host
    without Apps would see tools it has no use for."""
    listing = lowlevel(server).get_request_handler("tools/list")
    assert listing is not None

    async def list_tools(ctx: ServerRequestContext[Any, Any], params: Any) -> Any:
        result = await listing.handler(ctx, params)
        if not isinstance(result, ListToolsResult) or client_supports_apps(ctx):
            return result
        shown = [tool for tool in result.tools if "model" in _visibility(tool)]
        return result.model_copy(update={"tools": shown})

    add_request_handler(server, "tools/list", listing.params_type, list_tools)


def _visibility(tool: Tool) -> list[str]:
    ui = (tool.meta or {}).get("ui")
    visibility = ui.get("visibility") if isinstance(ui, dict) else None
    return visibility if isinstance(visibility, list) else ["model", "app"]


def gallery_view() -> str:
    """The view: one self-contained HTML document (no network, as hosts' sandboxes demand)."""
    return resources.files(__package__).joinpath("gallery.html").read_text(encoding="utf-8")


def build_gallery() -> Apps:
    """The Apps extension with the view and its tools, for `MCPServer(extensions=[...])`."""
    apps = Apps()
    apps.add_html_resource(
        GALLERY_URI,
        gallery_view(),
        name="gallery",
        title="Image gallery",
        description="Shows generated images in the conversation: progress, results and the history.",
        # Everything is inline and every picture arrives through a tool: no domain is needed.
        csp=ResourceCsp(),
        permissions=ResourcePermissions(clipboard_write={}),
        prefers_border=True,
    )
    legacy = {"ui/resourceUri": GALLERY_URI}

    @apps.tool(
        resource_uri=GALLERY_URI,
        meta=legacy,
        title="Show the image gallery",
        description="Show the user's earlier images as a gallery in the conversation (hosts that "
        "display MCP Apps draw it; others get the list as text), optionally only those whose prompt "
        "has `query`. The user can open, search, regenerate, vary, edit and save images from it. "
        "Use it when the user wants to see or browse what was made; search_images is for finding a "
        "task_id yourself.",
        annotations=READS_HISTORY,
    )
    @takes(GalleryArguments, ToolContext)
    async def show_gallery(
        ctx: ToolContext, args: GalleryArguments
    ) -> Annotated[CallToolResult, SearchResult]:
        engine = engine_of(ctx)
        try:
            search, limit = SearchArguments(query=args.query, limit=GALLERY_PAGE).search()
            page = await engine.search(account_of(ctx).owner, search, limit=limit)
        except GPTunnelMCPError as exc:
            return error_result(exc)
        return search_result(page, search, continued=False)

    @apps.tool(
        resource_uri=GALLERY_URI,
        visibility=["app"],
        meta=legacy,
        title="Gallery: an image",
        description="For the gallery view: one image's record and picture (a tile or a large copy).",
        annotations=_VIEW_ONLY,
    )
    @takes(PictureArguments, ToolContext)
    async def gallery_image(
        ctx: ToolContext, args: PictureArguments
    ) -> Annotated[CallToolResult, ImageResult]:
        engine = engine_of(ctx)
        try:
            record = await engine.refresh(args.task_id, account_of(ctx))
            result = describe(engine, record, full_prompt=True)
            content: list[ContentBlock] = []
            if record.status == "done" and record.file is not None:
                picture = await engine.scaled(record.file, *PICTURE_SIZES[args.size])
                data = base64.b64encode(picture.data).decode("ascii")
                content.append(ImageContent(data=data, mime_type=picture.mime_type))
        except GPTunnelMCPError as exc:
            return error_result(exc)
        content.append(TextContent(text=result.message))
        return CallToolResult(content=content, structured_content=result.model_dump(mode="json"))

    @apps.tool(
        resource_uri=GALLERY_URI,
        visibility=["app"],
        meta=legacy,
        title="Gallery: follow a task",
        description=f"For the gallery view: wait up to {WAIT_SECONDS:.0f} s for a task to finish (its "
        "image downloaded and kept), then say where it stands.",
        annotations=_VIEW_ONLY,
    )
    @takes(TaskArguments, ToolContext)
    async def gallery_wait(ctx: ToolContext, args: TaskArguments) -> Annotated[CallToolResult, Following]:
        engine = engine_of(ctx)
        watch = _Watch()
        deadline = time.monotonic() + min(engine.settings.wait_timeout, WAIT_SECONDS)
        try:
            record = await engine.wait(args.task_id, account_of(ctx), watch, deadline=deadline)
        except GPTunnelMCPError as exc:
            return error_result(exc)
        result = describe(engine, record, full_prompt=True)
        following = Following(
            image=result,
            elapsed_seconds=watch.elapsed,
            expected_seconds=watch.expected,
            message=watch.message or result.message,
        )
        structured = following.model_dump(mode="json")
        return CallToolResult(content=[TextContent(text=following.message)], structured_content=structured)

    return apps
