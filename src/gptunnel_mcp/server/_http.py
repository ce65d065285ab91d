"""Streamable HTTP: the MCP endpoint at /mcp, a health check, and who may call.

Security is layered outside the SDK's app so it covers every route the same way:
- DNS-rebinding guard (Host and Origin allow-lists), on by default, by the SDK's transport;
- bearer authentication: a shared token (`GPTUNNEL_MCP_AUTH_TOKEN`), or in multi-user mode each
  caller's own GPTunnel key, checked once with GPTunnel and then remembered by fingerprint.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections import OrderedDict
from collections.abc import Callable

from mcp.server.transport_security import TransportSecuritySettings
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._accounts import bearer_token
from .._engine import Engine
from .._exceptions import AuthenticationError, GPTunnelMCPError
from .._schedule import Backoff, PollSchedule
from .._settings import Settings
from .._version import __version__
from ._build import EngineSlot, build_server

logger = logging.getLogger("gptunnel_mcp")
MCP_PATH = "/mcp"


def transport_security(settings: Settings) -> TransportSecuritySettings:
    """Loopback names always; the bind address when it is another; plus what the deployment adds."""
    hosts = ["127.0.0.1:*", "localhost:*", "[::1]:*", "127.0.0.1", "localhost", "[::1]"]
    origins = ["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"]
    if not settings.is_loopback and settings.host not in ("0.0.0.0", "::"):  # noqa: S104 - compared, not bound
        hosts += [f"{settings.host}:*", settings.host]
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=hosts + settings.allowed_hosts,
        allowed_origins=origins + settings.allowed_origins,
    )


class BearerAuth:
    """Refuses any request to the MCP endpoint that does not carry an accepted bearer token.

    In multi-user mode it also ties each 2025-11-25 session to the user who opened it: a
    session id is no capability, and another user's requests on it are answered as if the
    session did not exist (its notices would otherwise reach them).
    """

    _SESSION_HEADER = "mcp-session-id"
    _MAX_SESSIONS = 10_000

    def __init__(self, app: ASGIApp, settings: Settings, engine: Callable[[], Engine]) -> None:
        self._app = app
        self._token = settings.auth_token.get_secret_value() if settings.auth_token else None
        self._engine = engine
        self._multi_user = settings.multi_user
        self._session_owners: OrderedDict[str, str] = OrderedDict()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        open_paths = scope["type"] != "http" or scope["path"] == "/healthz"
        if open_paths or (self._token is None and not self._multi_user):
            await self._app(scope, receive, send)
            return
        headers = Request(scope).headers
        token = bearer_token(headers)
        if token is None:
            what = "your GPTunnel key" if self._multi_user else "the server's token"
            await _unauthorized(f"send {what} as 'Authorization: Bearer <token>'", "invalid_request")(
                scope, receive, send
            )
            return
        if self._token is not None:
            refusal = self._check_token(token)
        else:
            refusal, owner = await self._check_key(token)
            if refusal is None and owner is not None:
                session = headers.get(self._SESSION_HEADER)
                if session is not None and self._session_owners.get(session, owner) != owner:
                    refusal = JSONResponse({"error": "session not found"}, status_code=404)
                else:
                    send = self._remembering_sessions(send, owner)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self._app(scope, receive, send)

    def _check_token(self, token: str) -> Response | None:
        # compare_digest: the time taken must not tell how much of a guess was right.
        if hmac.compare_digest(token.encode(), (self._token or "").encode()):
            return None
        return _unauthorized("the bearer token is not this server's token", "invalid_token")

    async def _check_key(self, token: str) -> tuple[Response | None, str | None]:
        try:
            account = await self._engine().authenticate(token)
        except AuthenticationError:
            return _unauthorized("GPTunnel does not accept this key", "invalid_token"), None
        except GPTunnelMCPError as exc:
            logger.warning("could not check a caller's key with GPTunnel: %s", exc)
            unavailable = JSONResponse(
                {
                    "error": "temporarily_unavailable",
                    "error_description": "cannot check the key with GPTunnel now",
                },
                status_code=503,
                headers={"Retry-After": "5"},
            )
            return unavailable, None
        return None, account.owner

    def _remembering_sessions(self, send: Send, owner: str) -> Send:
        """Wraps `send` to note which user a newly opened session belongs to."""

        async def remembering(message: Message) -> None:
            if message["type"] == "http.response.start":
                for name, value in message.get("headers", []):
                    if name.decode("latin-1").lower() == self._SESSION_HEADER:
                        self._session_owners[value.decode("latin-1")] = owner
                        while len(self._session_owners) > self._MAX_SESSIONS:
                            self._session_owners.popitem(last=False)
            await send(message)

        return remembering


def _unauthorized(description: str, error: str) -> Response:
    challenge = f'Bearer realm="gptunnel-mcp", error="{error}", error_description="{description}"'
    body = json.dumps({"error": error, "error_description": description})
    return Response(
        body, status_code=401, media_type="application/json", headers={"WWW-Authenticate": challenge}
    )


async def healthz(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    return JSONResponse(
        {
            "status": "ok",
            "name": "gptunnel-mcp",
            "version": __version__,
            "multi_user": settings.multi_user,
            "auth": settings.has_http_auth,
            "sandbox": settings.sandbox,
        }
    )


def build_http_app(
    settings: Settings, *, schedule: PollSchedule | None = None, backoff: Backoff | None = None
) -> Starlette:
    """The whole HTTP service. The SDK's app runs the server's lifespan, which opens the engine;
    the authentication layer reaches the engine through the server once it is open."""
    slot = EngineSlot()
    server = build_server(settings, slot, schedule=schedule, backoff=backoff)
    server.custom_route("/healthz", methods=["GET"])(healthz)
    app = server.streamable_http_app(
        streamable_http_path=MCP_PATH, transport_security=transport_security(settings), host=settings.host
    )
    app.state.settings = settings
    app.add_middleware(BearerAuth, settings=settings, engine=slot.get)
    return app
