"""The server as its own OAuth authorization server, for hosts that add it by URL (claude.ai,
ChatGPT, Claude Desktop's connectors): the SDK's routes (metadata, /authorize, /token,
/register, /revoke) over a provider of ours, which keeps everything in the store (`_oauth`)
and sends the user to our sign-in page (`_sign_in`) for their GPTunnel key.

On when a multi-user server knows its public URL (`GPTUNNEL_MCP_PUBLIC_URL`): that URL is the
issuer, and its /mcp the protected resource.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit

from mcp.server.auth.handlers.metadata import MetadataHandler
from mcp.server.auth.handlers.register import RegistrationHandler
from mcp.server.auth.handlers.revoke import RevocationHandler
from mcp.server.auth.middleware.client_auth import ClientAuthenticator
from mcp.server.auth.provider import (
    AccessToken,
    AuthorizationCode,
    AuthorizationParams,
    AuthorizeError,
    OAuthAuthorizationServerProvider,
    RefreshToken,
    RegistrationError,
    TokenError,
)
from mcp.server.auth.routes import (
    REGISTRATION_PATH,
    REVOCATION_PATH,
    build_metadata,
    build_resource_metadata_url,
    cors_middleware,
    create_auth_routes,
    create_protected_resource_routes,
)
from mcp.server.auth.settings import ClientRegistrationOptions, RevocationOptions
from mcp.server.transport_security import DEFAULT_MAX_REQUEST_BODY_SIZE, RequestBodyLimitMiddleware
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken
from mcp.shared.inbound import MCP_PROTOCOL_VERSION_HEADER
from pydantic import AnyHttpUrl, AnyUrl, ConfigDict, TypeAdapter
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request as StarletteRequest
from starlette.responses import Response
from starlette.routing import Route, request_response
from starlette.types import ASGIApp, Message

from .. import _client_documents
from .._client_documents import DocumentError, is_document_url
from .._engine import Engine
from .._oauth import Authorizations, Issued, Request, Tokens
from .._sealing import seal, unseal
from .._settings import Settings
from .._store import OAuthRecords

logger = logging.getLogger("gptunnel_mcp")

SIGN_IN_PATH = "/oauth/sign-in"
#: The largest registration kept (as JSON), so that nobody can store much by registering.
MAX_REGISTRATION_BYTES = 8192
#: Schemes a browser would run rather than open; a redirect there is never a client's.
_REFUSED_SCHEMES = frozenset({"javascript", "data", "file", "vbscript", "about", "blob", "ftp"})
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})
#: URLs as the SDK's metadata renders them: a bare origin stays without a trailing slash, so the
#: issuer compares equal, as a string, wherever it appears (RFC 8414 3.3, RFC 9207).
_URL = TypeAdapter(AnyHttpUrl, config=ConfigDict(url_preserve_empty_path=True))


@dataclass(frozen=True)
class OAuthUrls:
    issuer: str
    resource: str
    sign_in: str
    resource_metadata: str


def oauth_urls(settings: Settings) -> OAuthUrls | None:
    """Where OAuth lives, or None when it is off: it needs a multi-user server and a public URL,
    https unless on loopback (RFC 8414 issuers are https)."""
    base = settings.public_base
    if not settings.multi_user or base is None:
        return None
    parts = urlsplit(base)
    if parts.scheme != "https" and parts.hostname not in _LOOPBACK:
        return None
    resource = f"{base}/mcp"
    return OAuthUrls(
        issuer=str(_URL.validate_python(base)),
        resource=resource,
        sign_in=f"{base}{SIGN_IN_PATH}",
        resource_metadata=str(build_resource_metadata_url(_URL.validate_python(resource))),
    )


class GrantedCode(AuthorizationCode):
    grant_id: str


class GrantedRefreshToken(RefreshToken):
    grant_id: str


class GrantedAccessToken(AccessToken):
    grant_id: str


_Token = TypeVar("_Token", GrantedRefreshToken, GrantedAccessToken)


def authorizations(engine: Engine) -> Authorizations:
    store = engine.store
    assert isinstance(store, OAuthRecords), "both stores keep OAuth state"
    return Authorizations(store, engine.accounts.secret)


class Provider(OAuthAuthorizationServerProvider[GrantedCode, GrantedRefreshToken, GrantedAccessToken]):
    """The SDK's provider interface over `Authorizations`."""

    def __init__(self, engine: Callable[[], Engine], urls: OAuthUrls) -> None:
        self._engine = engine
        self._urls = urls

    def _state(self) -> Authorizations:
        return authorizations(self._engine())

    # --- clients -----------------------------------------------------------------------------

    async def get_client(self, client_id: str) -> OAuthClientInformationFull | None:
        if is_document_url(client_id):
            return await self._published_client(client_id)
        document = await self._state().client(client_id)
        if document is None:
            return None
        fields = json.loads(document)
        sealed = fields.pop("sealed_secret", None)
        if sealed is not None:
            fields["client_secret"] = unseal(
                self._secret(), _client_owner(client_id), base64.b64decode(sealed)
            )
        return OAuthClientInformationFull.model_validate(fields)

    async def register_client(self, client_info: OAuthClientInformationFull) -> None:
        _check_registration(client_info)
        fields = client_info.model_dump(mode="json", exclude_none=True, exclude={"client_secret"})
        if client_info.client_secret is not None:
            sealed = seal(self._secret(), _client_owner(client_info.client_id), client_info.client_secret)
            fields["sealed_secret"] = base64.b64encode(sealed).decode()
        await self._state().keep_client(client_info.client_id, json.dumps(fields))

    async def _published_client(self, url: str) -> OAuthClientInformationFull | None:
        """The client whose client_id is the URL of its metadata document: fetched, checked, and
        kept for a while (`DOCUMENT_SECONDS`)."""
        state = self._state()
        kept = await state.document(url)
        if kept is not None:
            return OAuthClientInformationFull.model_validate_json(kept)
        try:
            client = _published(url, await _client_documents.fetch_document(url))
        except (DocumentError, RegistrationError) as exc:
            reason = exc.error_description if isinstance(exc, RegistrationError) else str(exc)
            logger.info("refused the client metadata document at %r: %s", url[:200], reason)
            return None
        await state.keep_document(url, client.model_dump_json(exclude_none=True))
        return client

    def _secret(self) -> bytes:
        return self._engine().accounts.secret

    # --- authorization -----------------------------------------------------------------------

    async def authorize(self, client: OAuthClientInformationFull, params: AuthorizationParams) -> str:
        if not params.state:
            raise AuthorizeError("invalid_request", "state is required")
        if params.resource is not None and params.resource.rstrip("/") != self._urls.resource:
            raise AuthorizeError(
                "invalid_target", f"this server issues tokens for {self._urls.resource} only"
            )
        handle = await self._state().begin(
            Request(
                client_id=client.client_id,
                redirect_uri=str(params.redirect_uri),
                redirect_uri_explicit=params.redirect_uri_provided_explicitly,
                code_challenge=params.code_challenge,
                state=params.state,
                scopes=params.scopes or [],
                resource=params.resource,
            )
        )
        return f"{self._urls.sign_in}?request={handle}"

    async def load_authorization_code(
        self, client: OAuthClientInformationFull, authorization_code: str
    ) -> GrantedCode | None:
        code = await self._state().code(authorization_code)
        if code is None or code.grant.client_id != client.client_id:
            return None
        return GrantedCode(
            code=authorization_code,
            scopes=code.grant.scopes,
            expires_at=code.expires_at,
            client_id=code.grant.client_id,
            code_challenge=code.request.code_challenge,
            redirect_uri=AnyUrl(code.request.redirect_uri),
            redirect_uri_provided_explicitly=code.request.redirect_uri_explicit,
            resource=code.grant.resource,
            subject=code.grant.owner,
            grant_id=code.grant.id,
        )

    async def exchange_authorization_code(
        self, client: OAuthClientInformationFull, authorization_code: GrantedCode
    ) -> OAuthToken:
        tokens = await self._state().redeem(authorization_code.code)
        if tokens is None:
            raise TokenError("invalid_grant", "authorization code was already used")
        return _token_response(tokens)

    # --- tokens ------------------------------------------------------------------------------

    async def load_refresh_token(
        self, client: OAuthClientInformationFull, refresh_token: str
    ) -> GrantedRefreshToken | None:
        return _granted(GrantedRefreshToken, refresh_token, await self._state().refresh(refresh_token))

    async def exchange_refresh_token(
        self, client: OAuthClientInformationFull, refresh_token: GrantedRefreshToken, scopes: list[str]
    ) -> OAuthToken:
        tokens = await self._state().rotate(refresh_token.token)
        if tokens is None:
            raise TokenError("invalid_grant", "refresh token was already used")
        return _token_response(tokens)

    async def load_access_token(self, token: str) -> GrantedAccessToken | None:
        return _granted(GrantedAccessToken, token, await self._state().access(token))

    async def revoke_token(self, token: GrantedAccessToken | GrantedRefreshToken) -> None:
        await self._state().revoke(token.grant_id)


def _granted(kind: type[_Token], token: str, issued: Issued | None) -> _Token | None:
    """The SDK's view of a live token (None: not live)."""
    if issued is None:
        return None
    grant = issued.grant
    return kind(
        token=token,
        client_id=grant.client_id,
        scopes=grant.scopes,
        expires_at=int(issued.expires_at),
        resource=grant.resource,
        subject=grant.owner,
        grant_id=grant.id,
    )


def _client_owner(client_id: str) -> str:
    """What a client's sealed secret is bound to: it opens for that client only."""
    return f"oauth-client:{client_id}"


def _token_response(tokens: Tokens) -> OAuthToken:
    return OAuthToken(
        access_token=tokens.access_token,
        expires_in=tokens.expires_in,
        scope=" ".join(tokens.grant.scopes) or None,
        refresh_token=tokens.refresh_token,
    )


def _published(url: str, data: bytes) -> OAuthClientInformationFull:
    """The registration in a client's metadata document. Raises `RegistrationError`."""
    try:
        fields = json.loads(data)
    except ValueError:
        raise RegistrationError("invalid_client_metadata", "not JSON") from None
    if not isinstance(fields, dict) or fields.get("client_id") != url:
        raise RegistrationError("invalid_client_metadata", "its client_id is not the URL it was fetched from")
    # A published document is public: it can hold no secret, so the client is a public one.
    if any(name.startswith("client_secret") for name in fields):
        raise RegistrationError("invalid_client_metadata", "it names a client secret")
    if fields.get("token_endpoint_auth_method", "none") != "none" or not fields.get("redirect_uris"):
        raise RegistrationError("invalid_client_metadata", "it needs redirect_uris and no token auth method")
    try:
        client = OAuthClientInformationFull.model_validate({**fields, "token_endpoint_auth_method": "none"})
    except ValueError as exc:
        raise RegistrationError("invalid_client_metadata", str(exc).splitlines()[0]) from None
    _check_registration(client)
    return client


def _check_registration(client: OAuthClientInformationFull) -> None:
    """Refuse redirect URIs a browser must never be sent to with a code, and registrations
    large enough to fill the store."""
    if len(client.model_dump_json()) > MAX_REGISTRATION_BYTES:
        raise RegistrationError(
            "invalid_client_metadata", f"registrations are kept up to {MAX_REGISTRATION_BYTES} bytes"
        )
    for uri in client.redirect_uris or []:
        if uri.scheme in _REFUSED_SCHEMES or uri.fragment is not None:
            raise RegistrationError("invalid_redirect_uri", f"{uri} cannot be a redirect URI")
        if uri.username is not None or uri.password is not None:
            # https://claude.ai@evil.example/ goes to evil.example, but reads as claude.ai on the
            # sign-in page, where the user decides whether to trust it.
            raise RegistrationError(
                "invalid_redirect_uri", f"{uri}: a redirect URI cannot hold a user name (before '@')"
            )
        if uri.scheme == "http" and uri.host not in _LOOPBACK:
            raise RegistrationError(
                "invalid_redirect_uri", f"{uri}: plain http is for loopback addresses only; use https"
            )


@dataclass(frozen=True)
class PublicRevocation:
    """The SDK's revocation endpoint, open to public clients too. RFC 7009 2.1: a public client
    names itself by client_id alone; the SDK's handler wants a client_secret field from every
    client (its model gives the field no default) and answers 400 without one. A request without
    the field gets it empty, which proves nothing: the SDK still asks a confidential client for
    its secret, so an empty one is refused as a missing one is."""

    handler: RevocationHandler

    async def handle(self, request: StarletteRequest) -> Response:
        body = await request.body()
        fields = parse_qsl(body.decode("latin-1"), keep_blank_values=True)
        if not any(name == "client_secret" for name, _ in fields):
            body = urlencode([*fields, ("client_secret", "")]).encode()

        async def receive() -> Message:
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.handler.handle(StarletteRequest(request.scope, receive))


@dataclass(frozen=True)
class UncachedRegistration:
    """The SDK's registration endpoint, with answers no cache keeps: a confidential client's
    holds its secret (RFC 7591 3.2.1, RFC 6749 5.1), and the SDK's handler says nothing."""

    handler: RegistrationHandler

    async def handle(self, request: StarletteRequest) -> Response:
        response = await self.handler.handle(request)
        response.headers["Cache-Control"] = "no-store"
        response.headers["Pragma"] = "no-cache"
        return response


def _posted(handler: Callable[[StarletteRequest], Awaitable[Response]]) -> ASGIApp:
    """A POST endpoint for OAuth clients, as the SDK serves its own: any origin (browser-based
    clients), bodies within the limit."""
    return CORSMiddleware(
        RequestBodyLimitMiddleware(request_response(handler), DEFAULT_MAX_REQUEST_BODY_SIZE),
        allow_origins="*",
        allow_methods=["POST", "OPTIONS"],
        allow_headers=[MCP_PROTOCOL_VERSION_HEADER],
    )


def oauth_routes(provider: Provider, urls: OAuthUrls) -> list[Route]:
    """The SDK's authorization server and protected resource routes, with metadata that also
    says the server names itself in each authorization response (RFC 9207) and takes client ID
    metadata documents."""
    issuer = _URL.validate_python(urls.issuer)
    registration = ClientRegistrationOptions(enabled=True)
    revocation = RevocationOptions(enabled=True)
    metadata = build_metadata(issuer, None, registration, revocation)
    metadata.authorization_response_iss_parameter_supported = True
    metadata.client_id_metadata_document_supported = True
    methods = ["none", "client_secret_post", "client_secret_basic"]
    metadata.token_endpoint_auth_methods_supported = methods
    metadata.revocation_endpoint_auth_methods_supported = methods
    served = MetadataHandler(metadata).handle
    revoke = PublicRevocation(RevocationHandler(provider, ClientAuthenticator(provider))).handle
    register = UncachedRegistration(RegistrationHandler(provider, registration)).handle
    replaced: dict[str, ASGIApp] = {
        "/.well-known/oauth-authorization-server": cors_middleware(served, ["GET", "OPTIONS"]),
        REVOCATION_PATH: _posted(revoke),
        REGISTRATION_PATH: _posted(register),
    }
    routes = [
        Route(route.path, endpoint=replaced[route.path], methods=route.methods)
        if route.path in replaced
        else route
        for route in create_auth_routes(provider, issuer, None, registration, revocation)
    ]
    resource = create_protected_resource_routes(
        _URL.validate_python(urls.resource), [issuer], resource_name="GPTunnel images"
    )
    return routes + resource
