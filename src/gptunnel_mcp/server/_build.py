"""The MCP server: an `MCPServer` whose lifespan owns the engine, with the tools, resources,
prompts and the tasks extension on it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from mcp.server import MCPServer

from .._engine import Engine
from .._schedule import Backoff, PollSchedule
from .._settings import Settings
from .._version import __version__
from .._wiring import open_engine
from ._gallery import build_gallery, hide_view_tools
from ._listeners import AccountListeners
from ._prompts import register_prompts
from ._resources import register_resources
from ._sdk import advertise_resource_list_changes, check_sdk
from ._task_extension import TasksExtension
from ._tools import register_tools

INSTRUCTIONS = """\
Generates images with GPTunnel (gpt-image-1, Imagen, Flux and more).
Use generate_and_wait for an image in one call; it returns a preview, the local file path and a
resource link. If it comes back 'pending', call get_result with its task_id later rather than
generating again: every create is billed. Find earlier images with search_images (by words
in the prompt, model, status or date); they stay available, also after GPTunnel's own links
expire, in the resource gptunnel://images. To put an image into the user's files (their project), call
save_image with its task_id and a destination. show_gallery shows the user their images in the
conversation, where the host can display it."""


class EngineSlot:
    """Where code outside MCP requests (the HTTP authentication layer) finds the running engine."""

    engine: Engine | None = None

    def get(self) -> Engine:
        if self.engine is None:
            raise RuntimeError("the server is not running")
        return self.engine


def build_server(
    settings: Settings,
    slot: EngineSlot | None = None,
    *,
    schedule: PollSchedule | None = None,
    backoff: Backoff | None = None,
) -> MCPServer[Engine]:
    """The server for `settings`; `schedule` and `backoff` replace the built-in poll timing."""
    slot = slot or EngineSlot()

    @asynccontextmanager
    async def lifespan(_: MCPServer[Engine]) -> AsyncIterator[Engine]:
        async with open_engine(settings, follow=True, schedule=schedule, backoff=backoff) as engine:
            # Images kept by any process on the store, on 2026-07-28 clients' listen streams.
            engine.on_image_stored(listeners.resources_changed)
            slot.engine = engine
            try:
                yield engine
            finally:
                slot.engine = None

    server: MCPServer[Engine] = MCPServer(
        "gptunnel-mcp",
        title="GPTunnel images",
        description="Image generation through the GPTunnel media API, with a local cache and history.",
        version=__version__,
        instructions=INSTRUCTIONS,
        website_url="https://github.com/gptunnel-mcp/gptunnel-mcp",
        lifespan=lifespan,
        extensions=[TasksExtension(), build_gallery()],
    )
    check_sdk(server)
    listeners = AccountListeners()
    listeners.install(server)
    register_tools(server, settings)
    hide_view_tools(server)
    register_resources(server)
    register_prompts(server)
    advertise_resource_list_changes(server)
    return server
