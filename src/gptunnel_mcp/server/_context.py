"""What every tool handler starts from: its context, the engine and the caller's account in it,
and the annotations that tell hosts what a tool does."""

from __future__ import annotations

from typing import Any

from mcp.server.mcpserver import Context
from mcp_types import ToolAnnotations

from .._accounts import Account
from .._engine import Engine

ToolContext = Context[Engine, Any]

SPENDS_MONEY = ToolAnnotations(
    read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=True
)
READS = ToolAnnotations(
    read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=True
)
#: Reads this server's own history, and nothing else.
READS_HISTORY = ToolAnnotations(
    read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False
)
#: It writes only the user's own files, and replaces one only when told to.
SAVES = ToolAnnotations(
    read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=False
)


def engine_of(ctx: ToolContext) -> Engine:
    return ctx.request_context.lifespan_context


def account_of(ctx: ToolContext) -> Account:
    return engine_of(ctx).accounts.for_headers(ctx.headers)
