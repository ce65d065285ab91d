"""Streamable HTTP: the MCP endpoint at /mcp, a health check, who may call, and for how long.

Every request meets the cheap checks before any that costs, outside the SDK's app so they cover
every route the same way:
1. the connection: at most `max_connections` open, request headers and bodies within their
   timeouts (`GuardedH11Protocol`), whatever the app is doing;
2. the DNS-rebinding guard (Host and Origin allow-lists, by the SDK's own check) and the
   declared body size;
3. bearer authentication: a shared token (`GPTUNNEL_MCP_AUTH_TOKEN`), or in multi-user mode each
   caller's own GPTunnel key, checked once with GPTunnel and then remembered by fingerprint (a
   refusal too, for a minute). Refused credentials are counted per client address, and key
   checks run a few at a time, so a flood of bad keys costs a few upstream calls and never the
   connections that jobs poll and download through;
4. in multi-user mode, 2025-11-25 sessions: each belongs to the user who opened it, and one user
   may hold only so many, so no user can use up the SDK's limit on sessions for everyone.

Two routes skip steps 2 to 4: /healthz, which load balancers probe by IP address, and the signed
links to stored images under /reference-images, which GPTunnel fetches with no credentials and
under whatever name the server's public address has: the signature is their only credential.

With OAuth sign-in on (`_authorization`), its routes skip step 3 (they are how a caller gets
credentials), and a bearer that is one of its access tokens is taken for the key it was issued
for: past the gate, the request carries that key as a user's own key would, so everything after
the gate knows one kind of caller.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import anyio
import h11
import uvicorn
from mcp.server.auth.routes import AUTHORIZATION_PATH
from mcp.server.streamable_http_manager import DEFAULT_MAX_SESSIONS
from mcp.server.transport_security import (
    DEFAULT_MAX_REQUEST_BODY_SIZE,
    TransportSecurityMiddleware,
    TransportSecuritySettings,
)
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from .._accounts import bearer_token
from .._engine import Engine
from .._exceptions import StorageError
from .._links import LINK_PATH
from .._oauth import ACCESS_PREFIX
from .._schedule import Backoff, PollSchedule
from .._settings import Settings
from .._version import __version__
from ._authorization import SIGN_IN_PATH, OAuthUrls, Provider, authorizations, oauth_routes, oauth_urls
from ._build import EngineSlot, build_server
from ._key_checks import FAILURE_WINDOW, FailedAttempts, KeyChecks, Refused
from ._sign_in import ShownRefusals, SignIn

logger = logging.getLogger("gptunnel_mcp")
MCP_PATH = "/mcp"
HEALTH_PATH = "/healthz"
#: The largest request body, for the early check and the SDK's own alike.
MAX_BODY = DEFAULT_MAX_REQUEST_BODY_SIZE
#: How long /healthz reuses its last look at the database.
HEALTH_MAX_AGE = 1.0

_SESSION_HEADER = "mcp-session-id"
_KEY_REFUSED = "GPTunnel does not accept this key"
#: Set on a /healthz request's state by `Gate` when the caller may see more than "ok".
_HEALTH_DETAILS = "gptunnel_health_details"


def transport_security(settings: Settings) -> TransportSecuritySettings:
    """Loopback names always; the bind address when it is another; plus what the deployment adds."""
    hosts = ["127.0.0.1:*", "localhost:*", "[::1]:*", "127.0.0.1", "localhost", "[::1]"]
    origins = ["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"]
    if not settings.is_loopback and settings.host not in ("0.0.0.0", "::"):  # noqa: S104 - compared, not bound
        hosts += [f"{settings.host}:*", settings.host]
    if settings.public_base is not None:
        # The name clients reach the server by, and the origin of its own sign-in page.
        public = urlsplit(settings.public_base)
        hosts.append(public.netloc)
        origins.append(f"{public.scheme}://{public.netloc}")
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=hosts + settings.allowed_hosts,
        allowed_origins=origins + settings.allowed_origins,
    )


class Gate:
    """Runs the checks of the module's list, cheapest first, before the SDK's app sees a request."""

    def __init__(
        self,
        app: ASGIApp,
        settings: Settings,
        engine: Callable[[], Engine],
        keys: KeyChecks,
        oauth: OAuthUrls | None = None,
        open_paths: frozenset[str] = frozenset(),
    ) -> None:
        self._app = app
        self._guard = TransportSecurityMiddleware(transport_security(settings))
        self._token = settings.auth_token.get_secret_value() if settings.auth_token else None
        self._multi_user = settings.multi_user
        self._engine = engine
        self._keys = keys
        self._oauth = oauth
        self._open_paths = open_paths
        self._sessions = (
            UserSessions(settings.max_sessions_per_user, settings.session_idle_timeout)
            if settings.multi_user
            else None
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        request = Request(scope)
        if scope["path"] == HEALTH_PATH:
            scope.setdefault("state", {})[_HEALTH_DETAILS] = await self._may_see_details(request)
            await self._app(scope, receive, send)
            return
        if scope["path"].startswith(LINK_PATH + "/"):
            await self._app(scope, receive, send)
            return
        if scope["path"] in self._open_paths:
            await self._serve_open(request, scope, receive, send)
            return
        refusal = await self._guard.validate_request(request, is_post=request.method == "POST")
        caller: str | Response = refusal or _too_large(request) or ""
        if caller == "" and (self._token is not None or self._multi_user):
            caller = await self._authorize(request)
        if isinstance(caller, Response):
            await caller(scope, receive, send)
        elif self._sessions is not None:
            await self._sessions.serve(self._app, caller, scope, receive, send)
        else:
            await self._app(scope, receive, send)

    async def _serve_open(self, request: Request, scope: Scope, receive: Receive, send: Send) -> None:
        """OAuth's routes, from a host name this server answers to. Browser-based clients call the
        token endpoints from their own origin (the SDK allows any, by CORS), so only the sign-in
        page, which takes a browser's form, checks the origin too."""
        checked = request if scope["path"] == SIGN_IN_PATH else Request(_without_origin(scope))
        refusal = await self._guard.validate_request(checked) or _too_large(request)
        if refusal is not None:
            await refusal(scope, receive, send)
        else:
            await self._app(scope, receive, send)

    async def _may_see_details(self, request: Request) -> bool:
        """A load balancer probes by IP address, with no credentials: it learns that the server is
        up and nothing else. The version and the mode are for those who may use the server."""
        authenticated = self._token is not None or self._multi_user
        if authenticated and bearer_token(request.headers) is None:
            return False
        if await self._guard.validate_request(request) is not None:
            return False
        return not authenticated or not isinstance(await self._authorize(request), Response)

    async def _authorize(self, request: Request) -> str | Response:
        """The caller's owner ("" for the shared token), or the response refusing them."""
        token = bearer_token(request.headers)
        if token is None:
            what = "your GPTunnel key" if self._multi_user else "the server's token"
            how = "sign in (OAuth), or " if self._oauth else ""
            return self._unauthorized(
                f"{how}send {what} as 'Authorization: Bearer <token>'", "invalid_request", credentials=False
            )
        client = request.client.host if request.client else ""
        if self._oauth is not None and token.startswith(ACCESS_PREFIX):
            return await self._check_access_token(request, token, client)
        if self._token is None:
            return await self._check_key(token, client)
        # compare_digest: the time taken must not tell how much of a guess was right.
        if hmac.compare_digest(token.encode(), self._token.encode()):
            return ""
        return self._refuse(client, "the bearer token is not this server's token")

    async def _check_access_token(self, request: Request, token: str, client: str) -> str | Response:
        state = authorizations(self._engine())
        try:
            account = await state.account(token)
        except StorageError as exc:
            logger.warning("could not look up an access token: %s", exc.reason)
            return _unavailable("cannot check the access token now")
        if account is None or account.api_key is None:
            # Not counted as a refused credential: nobody guesses 256 random bits, and an expired
            # token is routine for every client (this answer is what makes it refresh).
            return self._unauthorized(
                "the access token has expired or was revoked: refresh it, or sign in again", "invalid_token"
            )
        _carry_key(request.scope, account.api_key)
        checked = await self._check_key(account.api_key, client)
        if isinstance(checked, Response) and self._engine().accounts.is_refused(account):
            # No refresh mends a key GPTunnel refuses, only a new sign-in; ending the grant makes
            # the host's next refresh fail (invalid_grant), which is what makes it ask for one.
            try:
                await state.end(token)
            except StorageError as exc:
                logger.warning("could not end a sign-in whose key GPTunnel refused: %s", exc.reason)
        return checked

    async def _check_key(self, token: str, client: str) -> str | Response:
        checked = await self._keys.check(token, client)
        return self._refused(checked) if isinstance(checked, Refused) else checked.owner

    def _refuse(self, client: str, description: str) -> Response:
        return self._refused(self._keys.refuse(client), description)

    def _refused(self, refused: Refused, description: str = _KEY_REFUSED) -> Response:
        if refused.wait:
            return _too_many_attempts(refused.wait)
        if refused.unreachable:
            return _unavailable("cannot check the key with GPTunnel now")
        return self._unauthorized(description, "invalid_token")

    def _unauthorized(self, description: str, error: str, *, credentials: bool = True) -> Response:
        metadata = self._oauth.resource_metadata if self._oauth else None
        return _unauthorized(description, error, metadata, credentials=credentials)


@dataclass
class _Session:
    owner: str
    in_flight: int = 1
    idle_since: float = 0.0


class UserSessions:
    """The open 2025-11-25 sessions of a multi-user server: who opened each (a session id is no
    capability, so another user's requests on it are answered as if it did not exist), and at
    most `per_user` for each user.

    A session is forgotten when the SDK forgets it: when it is deleted, answered 404, or idle (no
    request in flight) for `idle_timeout`, the same timeout the SDK is given. This side sees each
    request end after the SDK does, so it never forgets a session the SDK still holds.
    """

    def __init__(self, per_user: int, idle_timeout: float, *, sweep_over: int = DEFAULT_MAX_SESSIONS) -> None:
        self._per_user = per_user
        self._idle_timeout = idle_timeout
        self._sweep_over = sweep_over
        self._sessions: dict[str, _Session] = {}
        self._by_owner: dict[str, set[str]] = {}
        self._opening: Counter[str] = Counter()

    async def serve(self, app: ASGIApp, owner: str, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope)
        session_id = headers.get(_SESSION_HEADER)
        if session_id is None:
            version = headers.get("mcp-protocol-version")
            if version is None or version in HANDSHAKE_PROTOCOL_VERSIONS:
                await self._open(app, owner, scope, receive, send)
            else:  # a 2026-07-28 request, which needs no session
                await app(scope, receive, send)
            return
        session = self._sessions.get(session_id)
        if session is None:  # the SDK answers for sessions it never opened or has ended
            await app(scope, receive, send)
            return
        if session.owner != owner:
            await _jsonrpc_error("Session not found", 404)(scope, receive, send)
            return
        session.in_flight += 1
        method = scope["method"]

        async def watching(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = message["status"]
                if status == 404 or (method == "DELETE" and status < 400):
                    self._forget(session_id)
            await send(message)

        try:
            await app(scope, receive, watching)
        finally:
            self._settle(session_id)

    async def _open(self, app: ASGIApp, owner: str, scope: Scope, receive: Receive, send: Send) -> None:
        self._expire(owner)
        held = len(self._by_owner.get(owner, ())) + self._opening[owner]
        if held >= self._per_user:
            await self._too_many(owner)(scope, receive, send)
            return
        self._opening[owner] += 1
        opening = True
        opened: str | None = None

        def end_opening() -> None:
            nonlocal opening
            if opening:
                opening = False
                self._opening[owner] -= 1
                if not self._opening[owner]:
                    del self._opening[owner]

        async def noting(message: Message) -> None:
            nonlocal opened
            if message["type"] == "http.response.start":
                # As the SDK decides: an opening request answered below 400 established its session.
                if message["status"] < 400:
                    opened = Headers(raw=message.get("headers", [])).get(_SESSION_HEADER)
                    if opened is not None:
                        self._sessions[opened] = _Session(owner)
                        self._by_owner.setdefault(owner, set()).add(opened)
                # Now rather than when the app returns, which may be after the client has its
                # answer and has sent the next request.
                end_opening()
            await send(message)

        try:
            await app(scope, receive, noting)
        finally:
            end_opening()
            if opened is not None:
                self._settle(opened)
            if len(self._sessions) > self._sweep_over:
                # Users who never came back: their idle sessions are only looked at here.
                for user in list(self._by_owner):
                    self._expire(user)

    def _settle(self, session_id: str) -> None:
        session = self._sessions.get(session_id)
        if session is not None:
            session.in_flight -= 1
            session.idle_since = time.monotonic()

    def _expire(self, owner: str) -> None:
        now = time.monotonic()
        for session_id in list(self._by_owner.get(owner, ())):
            session = self._sessions[session_id]
            if not session.in_flight and now - session.idle_since >= self._idle_timeout:
                self._forget(session_id)

    def _forget(self, session_id: str) -> None:
        session = self._sessions.pop(session_id, None)
        if session is None:
            return
        owned = self._by_owner[session.owner]
        owned.discard(session_id)
        if not owned:
            del self._by_owner[session.owner]

    def _too_many(self, owner: str) -> Response:
        now = time.monotonic()
        sessions = [self._sessions[s] for s in self._by_owner.get(owner, ())]
        idle = [s.idle_since + self._idle_timeout - now for s in sessions if not s.in_flight]
        minutes = f"{self._idle_timeout / 60:g}"
        message = (
            f"this key already has {self._per_user} open MCP sessions, the most one user may have; "
            f"end sessions no longer used (HTTP DELETE, as clients do on close), or wait: a session ends "
            f"after {minutes} min without requests"
        )
        retry = math.ceil(min(idle, default=self._idle_timeout))
        return _jsonrpc_error(message, 429, {"Retry-After": str(max(retry, 1))})


def _too_large(request: Request) -> Response | None:
    try:
        declared = int(request.headers.get("content-length", "0"))
    except ValueError:
        return None  # h11 refuses a malformed length before this is reached
    return Response("Request body too large", status_code=413) if declared > MAX_BODY else None


def _unauthorized(
    description: str, error: str, resource_metadata: str | None, *, credentials: bool = True
) -> Response:
    """A 401. `credentials`: whether the request carried any; a request without is told where to
    get some, and no error, in its challenge (RFC 6750 3.1): the body still says what to send."""
    challenge = 'Bearer realm="gptunnel-mcp"'
    if credentials:
        challenge += f', error="{error}", error_description="{description}"'
    if resource_metadata is not None:
        # Where an OAuth client starts (RFC 9728 5.1).
        challenge += f', resource_metadata="{resource_metadata}"'
    body = json.dumps({"error": error, "error_description": description})
    return Response(
        body, status_code=401, media_type="application/json", headers={"WWW-Authenticate": challenge}
    )


def _unavailable(description: str) -> Response:
    return JSONResponse(
        {"error": "temporarily_unavailable", "error_description": description},
        status_code=503,
        headers={"Retry-After": "5"},
    )


def _without_origin(scope: Scope) -> Scope:
    return {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"origin"]}


def _carry_key(scope: Scope, api_key: str) -> None:
    """Make the request carry `api_key` as its bearer, in place of the access token."""
    headers = [(k, v) for k, v in scope["headers"] if k != b"authorization"]
    scope["headers"] = [*headers, (b"authorization", f"Bearer {api_key}".encode())]


def _too_many_attempts(wait: float) -> Response:
    seconds = max(math.ceil(wait), 1)
    return JSONResponse(
        {
            "error": "too_many_attempts",
            "error_description": f"too many refused credentials from this address; try again in {seconds} s",
        },
        status_code=429,
        headers={"Retry-After": str(seconds)},
    )


def _jsonrpc_error(message: str, status: int, headers: dict[str, str] | None = None) -> Response:
    """An HTTP refusal in the body the SDK gives its own (a JSON-RPC error without an id)."""
    body = {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


class DatabaseHealth:
    """Whether the history can be used, for /healthz: asked of the store at most once per
    `max_age` seconds, by one probe while the others wait for its answer, so a storm of probes
    costs the database one round trip a second."""

    def __init__(self, engine: Callable[[], Engine], max_age: float = HEALTH_MAX_AGE) -> None:
        self._engine = engine
        self._max_age = max_age
        self._lock = anyio.Lock()
        self._checked = -math.inf
        self._error: str | None = None

    async def error(self) -> str | None:
        """None when the database answered, else why it did not."""
        async with self._lock:
            if time.monotonic() - self._checked >= self._max_age:
                try:
                    await self._engine().store.ping()
                    self._error = None
                except StorageError as exc:
                    self._error = exc.reason
                self._checked = time.monotonic()
            return self._error


async def healthz(request: Request) -> Response:
    """200 while this server can take work; 503 when its database cannot be used, so that a
    load balancer sends the work to another replica. Only callers who may use the server learn
    more than the status."""
    settings: Settings = request.app.state.settings
    health: DatabaseHealth = request.app.state.database
    error = await health.error()
    status, code = ("ok", 200) if error is None else ("unavailable", 503)
    if not getattr(request.state, _HEALTH_DETAILS, False):
        return JSONResponse({"status": status}, status_code=code)
    database: dict[str, Any] = {
        "backend": "sqlite" if settings.database_url is None else "postgresql",
        "ok": error is None,
    }
    if error is not None:
        database["error"] = error
    return JSONResponse(
        {
            "status": status,
            "name": "gptunnel-mcp",
            "version": __version__,
            "multi_user": settings.multi_user,
            "auth": settings.has_http_auth,
            "sandbox": settings.sandbox,
            "database": database,
        },
        status_code=code,
    )


async def linked_image(request: Request) -> Response:
    """The stored image a signed link names (see `_links`), to whoever holds the link. A link that
    is expired, forged or names an image no longer here gets the same answer, which says no more."""
    engine: Engine = request.app.state.engine()
    sha256, _, _ = request.path_params["name"].partition(".")
    query = request.query_params
    try:
        found = await engine.linked_image(
            request.path_params["task_id"], sha256, query.get("expires", ""), query.get("signature", "")
        )
    except StorageError as exc:
        logger.warning("could not serve a linked image: %s", exc.reason)
        return PlainTextResponse("temporarily unavailable", status_code=503, headers={"Retry-After": "5"})
    if found is None:
        return PlainTextResponse("expired or invalid link", status_code=404)
    stored, data = found
    return Response(data, media_type=stored.mime_type, headers={"Cache-Control": "private, no-store"})


def build_http_app(
    settings: Settings, *, schedule: PollSchedule | None = None, backoff: Backoff | None = None
) -> Starlette:
    """The whole HTTP service. The SDK's app runs the server's lifespan, which opens the engine;
    the gate reaches the engine through the server once it is open."""
    slot = EngineSlot()
    server = build_server(settings, slot, schedule=schedule, backoff=backoff)
    server.custom_route(HEALTH_PATH, methods=["GET"])(healthz)
    server.custom_route(LINK_PATH + "/{task_id}/{name}", methods=["GET"])(linked_image)
    app = server.streamable_http_app(
        streamable_http_path=MCP_PATH,
        transport_security=transport_security(settings),
        host=settings.host,
        max_request_body_size=MAX_BODY,
        session_idle_timeout=settings.session_idle_timeout,
    )
    app.state.settings = settings
    app.state.engine = slot.get
    app.state.database = DatabaseHealth(slot.get)
    keys = KeyChecks(slot.get, FailedAttempts(settings.auth_failures_per_minute, FAILURE_WINDOW))
    urls = oauth_urls(settings)
    open_paths: frozenset[str] = frozenset()
    if urls is not None:
        provider = Provider(slot.get, urls)
        sign_in = SignIn(slot.get, urls, provider.get_client, keys)
        routes = [
            Route(route.path, ShownRefusals(route.app, urls.sign_in), methods=route.methods)
            if route.path == AUTHORIZATION_PATH
            else route
            for route in oauth_routes(provider, urls)
        ]
        routes.append(Route(SIGN_IN_PATH, endpoint=sign_in.handle, methods=["GET", "POST"]))
        app.router.routes.extend(routes)
        open_paths = frozenset(route.path for route in routes)
        logger.info("OAuth sign-in is on: issuer %s", urls.issuer)
    elif settings.multi_user and settings.public_url is not None:
        logger.warning("OAuth sign-in is off: GPTUNNEL_MCP_PUBLIC_URL must be https (or a loopback address)")
    app.add_middleware(Gate, settings=settings, engine=slot.get, keys=keys, oauth=urls, open_paths=open_paths)
    return app


# --- connections ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int
    header_timeout: float
    body_timeout: float


class _Config(uvicorn.Config):
    def __init__(self, app: ASGIApp, limits: ConnectionLimits, **options: Any) -> None:
        super().__init__(app, http=GuardedH11Protocol, **options)
        self.limits = limits


def http_server(settings: Settings, app: ASGIApp, **options: Any) -> uvicorn.Server:
    """A uvicorn server for `app` with this module's connection limits; `options` are uvicorn's."""
    limits = ConnectionLimits(settings.max_connections, settings.header_timeout, settings.body_timeout)
    return uvicorn.Server(_Config(app, limits, **options))


_BUSY_BODY = b"too many open connections; try again shortly"
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: %d\r\nconnection: close\r\nretry-after: 1\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, with a limit on open connections and a clock on what the client
    owes: uvicorn times out idle keep-alive connections only, so a client that connects and sends
    nothing, or half a request, would hold its connection (and a file descriptor) for ever."""

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        assert isinstance(config, _Config)
        self._limits = config.limits
        self._owed: str | None = None  # "headers" or "body": what the clock runs for
        self._clock: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self._limits.max_connections:
            logger.info("refused a connection: %d are open", self._limits.max_connections)
            transport.write(_BUSY)
            transport.close()
            return
        self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_clock()
        super().connection_lost(exc)

    def _watch(self) -> None:
        """Start, keep or stop the clock, by what the client still has to send."""
        state = self.conn.their_state
        owed = "headers" if state is h11.IDLE else "body" if state is h11.SEND_BODY else None
        if self.transport.is_closing():
            owed = None
        if owed != self._owed:
            self._stop_clock()
            self._owed = owed
            if owed is not None:
                self._start_clock()

    def _start_clock(self) -> None:
        timeout = self._limits.header_timeout if self._owed == "headers" else self._limits.body_timeout
        self._clock = self.loop.call_later(timeout, self._time_out, timeout)

    def _stop_clock(self) -> None:
        if self._clock is not None:
            self._clock.cancel()
            self._clock = None

    def _time_out(self, timeout: float) -> None:
        self._clock = None
        waiting_for_us = self.flow.read_paused or (
            self.cycle is not None and self.cycle.waiting_for_100_continue
        )
        if self._owed == "body" and waiting_for_us:
            # The app has not asked for the body so far (reading paused, or no "100 Continue"
            # sent yet): not the client's delay.
            self._start_clock()
            return
        who = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        logger.info(
            "closed the connection of %s: no complete request %s within %g s", who, self._owed, timeout
        )
        self._owed = None
        self.transport.close()
