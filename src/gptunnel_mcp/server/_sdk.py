"""Every place this server leans on the MCP SDK beyond its documented surface, in one module.

The high-level `MCPServer` cannot yet serve each stored image with its own mime type, scope
list-changed notices per user, or tell 2025-11-25 clients that the resource list changes, so a
few handlers are registered on the low-level server it wraps. `check_sdk` runs when the server
is built and fails loudly, naming the installed version, if any of these parts moved; the
package pins `mcp` to the minor line it was tested with.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Collection, Mapping
from importlib.metadata import version
from typing import Any

from mcp.server import MCPServer
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import NotificationOptions, Server
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import BaseModel

TESTED_LINE = "2.3"


def check_sdk(server: MCPServer[Any]) -> None:
    """Raise `RuntimeError` if the installed SDK lacks what this module reaches for."""
    low = getattr(server, "_lowlevel_server", None)
    checks = {
        "MCPServer._lowlevel_server": isinstance(low, Server),
        "Server.add_request_handler": callable(getattr(low, "add_request_handler", None)),
        "Server.create_initialization_options": callable(getattr(low, "create_initialization_options", None)),
        "NotificationOptions(resources_changed=...)": "resources_changed"
        in inspect.signature(NotificationOptions).parameters,
        "ServerRequestContext.request": "request"
        in getattr(ServerRequestContext, "__dataclass_fields__", {}),
    }
    missing = [name for name, present in checks.items() if not present]
    if missing:
        raise RuntimeError(
            f"gptunnel-mcp was tested with mcp {TESTED_LINE}.x, and the installed mcp {version('mcp')} "
            f"lacks {', '.join(missing)}; install mcp~={TESTED_LINE}.0"
        )


def lowlevel(server: MCPServer[Any]) -> Server[Any]:
    return server._lowlevel_server


def add_request_handler(
    server: MCPServer[Any],
    method: str,
    params_type: type[BaseModel],
    handler: Callable[[ServerRequestContext[Any, Any], Any], Awaitable[Any]],
) -> None:
    """Serve `method` with `handler`, replacing what MCPServer registered for it."""
    lowlevel(server).add_request_handler(method, params_type, handler)


def advertise_resource_list_changes(server: MCPServer[Any]) -> None:
    """2025-11-25 clients only listen for list changes the server advertises, and MCPServer
    advertises none; the SDK has no public switch, so the options factory is given one."""
    low = lowlevel(server)
    low.create_initialization_options = functools.partial(  # type: ignore[method-assign]
        low.create_initialization_options, NotificationOptions(resources_changed=True)
    )


def request_headers(ctx: ServerRequestContext[Any, Any]) -> Mapping[str, str] | None:
    """The HTTP headers of the request being served; None on stdio and in process."""
    return getattr(ctx.request, "headers", None)


def is_modern(ctx: ServerRequestContext[Any, Any]) -> bool:
    """Whether the request came on a 2026-07-28 connection."""
    return ctx.protocol_version in MODERN_PROTOCOL_VERSIONS


def declared_extensions(ctx: ServerRequestContext[Any, Any]) -> Collection[str]:
    capabilities = ctx.session.client_capabilities
    return getattr(capabilities, "extensions", None) or {}
