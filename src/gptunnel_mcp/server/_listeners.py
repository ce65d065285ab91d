"""List-changed notices, told only to the account whose list changed.

2026-07-28 clients hear of changes on `subscriptions/listen` streams. The SDK's listen handler
fans every event out to every stream; a multi-user server must not tell user A that user B
has a new image, so each account gets its own bus and handler, chosen by who opens the stream.
"""

from __future__ import annotations

from typing import Any

from mcp.server import MCPServer
from mcp.server.context import ServerRequestContext
from mcp.server.subscriptions import InMemorySubscriptionBus, ListenHandler
from mcp.shared.subscriptions import ResourcesListChanged
from mcp_types import SubscriptionsListenRequestParams, SubscriptionsListenResult

from .._engine import Engine
from ._sdk import add_request_handler, request_headers


class AccountListeners:
    def __init__(self) -> None:
        self._by_owner: dict[str, tuple[InMemorySubscriptionBus, ListenHandler]] = {}

    def install(self, server: MCPServer[Engine]) -> None:
        # Replaces the SDK's handler, which tells every stream of every user.
        add_request_handler(server, "subscriptions/listen", SubscriptionsListenRequestParams, self._listen)

    async def resources_changed(self, owner: str) -> None:
        entry = self._by_owner.get(owner)
        if entry is not None:
            await entry[0].publish(ResourcesListChanged())

    async def _listen(
        self, ctx: ServerRequestContext[Engine, Any], params: SubscriptionsListenRequestParams
    ) -> SubscriptionsListenResult:
        owner = ctx.lifespan_context.accounts.for_headers(request_headers(ctx)).owner
        if owner not in self._by_owner:
            bus = InMemorySubscriptionBus()
            self._by_owner[owner] = (bus, ListenHandler(bus))
        return await self._by_owner[owner][1](ctx, params)
