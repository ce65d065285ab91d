"""The folders a client lets save_image write into: its MCP roots, asked for with roots/list.

A 2026-07-28 client is asked through the SDK's resolvers (the question rides the call's
InputRequiredResult, and the client answers by calling again); a 2025-11-25 client by a request
on its connection, waited for a few seconds at most. A client that declares no roots, fails to
answer or answers too late has none, and the operator's export folders apply instead.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import url2pathname

import anyio
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.resolve import ListRoots
from mcp.shared.exceptions import MCPError
from mcp.shared.message import ServerMessageMetadata
from mcp_types import ListRootsRequest, ListRootsResult
from pydantic import ValidationError

from .._engine import Engine
from ._sdk import is_modern

logger = logging.getLogger("gptunnel_mcp")

#: Longest a 2025-11-25 client is waited for to list its roots, in seconds.
ROOTS_WAIT = 5.0


async def client_roots(ctx: Context[Engine, Any]) -> ListRootsResult | ListRoots | None:
    """The client's roots, or None when it has none to give."""
    settings = ctx.request_context.lifespan_context.settings
    if settings.multi_user or (settings.transport == "http" and not settings.is_loopback):
        # A remote client's folders are on its own machine, not on the server's disk: its roots
        # would let it write wherever this process may.
        return None
    capabilities = ctx.client_capabilities
    if capabilities is None or capabilities.roots is None:
        return None
    if is_modern(ctx.request_context):
        return ListRoots()
    with anyio.move_on_after(ROOTS_WAIT):
        try:
            roots: ListRootsResult = await ctx.session.send_request(
                ListRootsRequest(),
                ListRootsResult,
                metadata=ServerMessageMetadata(related_request_id=ctx.request_id),
            )
            return roots
        except (MCPError, ValidationError) as exc:
            logger.info("the client did not list its roots (%s); taking it as having none", exc)
            return None
    logger.info("the client did not list its roots within %.0f s; taking it as having none", ROOTS_WAIT)
    return None


def root_folders(roots: ListRootsResult | None) -> list[Path]:
    """The local folders among `roots`, in the client's order. Roots on another host, or that
    are not file URIs, name no folder here."""
    folders: list[Path] = []
    for root in roots.roots if roots is not None else []:
        parts = urlsplit(str(root.uri))
        if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
            continue
        path = Path(url2pathname(parts.path))
        # A whole file system as the workspace is no limit at all: it is not taken as one.
        if path.is_absolute() and "\0" not in str(path) and path.parent != path:
            folders.append(path)
    return folders
