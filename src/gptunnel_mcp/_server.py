"""The MCP server: an `MCPServer` whose lifespan owns the engine, with the tools and resources on it."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from mcp.server import MCPServer
from mcp.server.lowlevel.server import NotificationOptions

from . import __version__
from ._accounts import load_server_secret
from ._engine import Engine, open_engine
from ._listeners import AccountListeners
from ._prompts import register_prompts
from ._resources import register_resources
from ._settings import Settings
from ._tasks import TasksExtension
from ._tools import register_tools

INSTRUCTIONS = """\
Generates images with GPTunnel (gpt-image-1, Imagen, Flux and more).
Use generate_and_wait for an image in one call; it returns a preview, the local file path and a
resource link. If it comes back 'pending', call get_result with its task_id later rather than
generating again: every create is billed. Past images stay available in the resource
gptunnel://images, also after GPTunnel's own links expire."""


class EngineSlot:
    """Where code outside MCP requests (the HTTP authentication layer) finds the running engine."""

    engine: Engine | None = None

    def get(self) -> Engine:
        if self.engine is None:
            raise RuntimeError("the server is not running")
        return self.engine


def build_server(settings: Settings, slot: EngineSlot | None = None) -> MCPServer[Engine]:
    slot = slot or EngineSlot()

    @asynccontextmanager
    async def lifespan(_: MCPServer[Engine]) -> AsyncIterator[Engine]:
        async with open_engine(settings) as engine:
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
        extensions=[TasksExtension(load_server_secret(settings.home))],
    )
    listeners = AccountListeners()
    listeners.install(server)
    register_tools(server, settings, listeners)
    register_resources(server)
    register_prompts(server)
    _advertise_resource_list_changes(server)
    return server


def _advertise_resource_list_changes(server: MCPServer[Engine]) -> None:
    """2025-11-25 clients only listen for list changes the server advertises, and MCPServer
    advertises none; the SDK has no public switch, so the options factory is given one."""
    low = server._lowlevel_server  # the SDK offers no public hook for these handlers
    low.create_initialization_options = functools.partial(  # type: ignore[method-assign]
        low.create_initialization_options, NotificationOptions(resources_changed=True)
    )
