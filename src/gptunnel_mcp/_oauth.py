"""OAuth sign-in's state: the clients that registered, the sign-ins under way, and what each
finished sign-in was given.

A grant is one user's sign-in through one client. It starts as a pending request (the client's
parameters, waiting for the user to give their key), becomes a code once the key is checked, and
the code becomes an access and a refresh token. Every item of it carries the grant's id, so a
grant ends whole: when the user revokes any of its tokens, when GPTunnel refuses its key (no
refresh would mend that), and when a code or a refresh token is presented a second time (stolen,
or replayed: RFC 9700 4.14), which ends what was issued for it too. A refresh token is spent by
its use, and the new pair replaces the grant's old one.

Codes and tokens are 256 random bits, kept only as their SHA-256, so a copy of the store holds
none that works. The user's GPTunnel key is kept sealed (`_sealing`, bound to the owner's
fingerprint) in the grant's items: any replica can act for the user, and the key goes when the
grant does.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from dataclasses import asdict, dataclass

from ._accounts import Account
from ._sealing import seal, unseal
from ._store import OAuthItem, OAuthRecords

ACCESS_PREFIX = "gmcp_at_"
REFRESH_PREFIX = "gmcp_rt_"
CODE_PREFIX = "gmcp_ac_"

#: Seconds a pending sign-in waits for the user.
REQUEST_SECONDS = 600
#: Seconds a code lives: the client exchanges it at once (RFC 6749 4.1.2 asks for minutes at most).
CODE_SECONDS = 120
ACCESS_SECONDS = 3600
#: Seconds a refresh token lives; each refresh gives a new one for as long again.
REFRESH_SECONDS = 30 * 86400
#: Seconds a registered client is kept after its last sign-in or refresh.
CLIENT_SECONDS = 90 * 86400
#: Seconds a client is kept that nobody has signed in through: registration is open to anyone.
UNUSED_CLIENT_SECONDS = 86400
#: Seconds a client's metadata document (a client_id that is a URL) is used before it is fetched again.
DOCUMENT_SECONDS = 3600


def now() -> float:
    """The clock every expiry here is counted on (seconds since the epoch, as the SDK counts)."""
    return time.time()


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Request:
    """What a client asked for when it sent the user to sign in."""

    client_id: str
    redirect_uri: str
    redirect_uri_explicit: bool
    code_challenge: str
    state: str | None
    scopes: list[str]
    resource: str | None


@dataclass(frozen=True)
class Grant:
    """A finished sign-in: who, through which client, for what."""

    id: str
    client_id: str
    owner: str
    scopes: list[str]
    resource: str | None
    sealed_key: str  # base64


@dataclass(frozen=True)
class Code:
    grant: Grant
    request: Request
    expires_at: float


@dataclass(frozen=True)
class Tokens:
    access_token: str
    refresh_token: str
    expires_in: int
    grant: Grant


@dataclass(frozen=True)
class Issued:
    """A live access or refresh token."""

    grant: Grant
    expires_at: float


class Authorizations:
    """OAuth state on `store`; `secret` is the server secret, which seals users' keys."""

    def __init__(self, store: OAuthRecords, secret: bytes) -> None:
        self._store = store
        self._secret = secret

    # --- clients ---------------------------------------------------------------------------

    async def keep_client(
        self, client_id: str, document: str, seconds: float = UNUSED_CLIENT_SECONDS
    ) -> None:
        """Keep a client's registration (`document`, JSON) for `seconds` from now."""
        await self._store.oauth_put(OAuthItem("client", client_id, "", now() + seconds, document))

    async def client(self, client_id: str) -> str | None:
        item = await self._store.oauth_get("client", client_id, now=now())
        return None if item is None else item.body

    async def keep_document(self, url: str, document: str) -> None:
        """Keep the registration a client published at `url` (its client_id) for a while."""
        await self._store.oauth_put(OAuthItem("document", url, "", now() + DOCUMENT_SECONDS, document))

    async def document(self, url: str) -> str | None:
        item = await self._store.oauth_get("document", url, now=now())
        return None if item is None else item.body

    async def _renew_client(self, client_id: str) -> None:
        document = await self.client(client_id)
        if document is not None:
            await self.keep_client(client_id, document, CLIENT_SECONDS)

    # --- signing in ------------------------------------------------------------------------

    async def begin(self, request: Request) -> str:
        """Keep `request` until the user signs in; the handle that names it. Expired items of
        every kind are swept here, where new ones are made."""
        moment = now()
        await self._store.oauth_sweep(now=moment)
        handle = secrets.token_urlsafe(32)
        body = json.dumps(asdict(request))
        await self._store.oauth_put(
            OAuthItem("request", digest(handle), secrets.token_hex(16), moment + REQUEST_SECONDS, body)
        )
        return handle

    async def request(self, handle: str) -> Request | None:
        item = await self._store.oauth_get("request", digest(handle), now=now())
        return None if item is None else Request(**json.loads(item.body))

    async def approve(self, handle: str, account: Account) -> tuple[str, Request] | None:
        """The user behind `account` signed in for the pending request: its code, once (None
        when the request is gone: used, expired, or never made)."""
        assert account.api_key is not None
        moment = now()
        item = await self._store.oauth_spend("request", digest(handle), now=moment)
        if item is None:
            return None
        request = Request(**json.loads(item.body))
        sealed = seal(self._secret, account.owner, account.api_key)
        grant = Grant(
            id=item.grant,
            client_id=request.client_id,
            owner=account.owner,
            scopes=request.scopes,
            resource=request.resource,
            sealed_key=base64.b64encode(sealed).decode(),
        )
        code = CODE_PREFIX + secrets.token_urlsafe(32)
        body = json.dumps({"grant": asdict(grant), "request": asdict(request)})
        await self._store.oauth_put(OAuthItem("code", digest(code), grant.id, moment + CODE_SECONDS, body))
        return code, request

    async def code(self, code: str) -> Code | None:
        """The live code; a code presented again ends its grant."""
        item = await self._live_or_end("code", code)
        if item is None:
            return None
        body = json.loads(item.body)
        return Code(Grant(**body["grant"]), Request(**body["request"]), item.expires_at)

    async def redeem(self, code: str) -> Tokens | None:
        """Spend the code for the grant's first tokens (None: somebody else spent it first)."""
        item = await self._spend("code", code)
        if item is None:
            return None
        grant = Grant(**json.loads(item.body)["grant"])
        return await self._issue(grant, code)

    # --- tokens ----------------------------------------------------------------------------

    async def access(self, token: str) -> Issued | None:
        return await self._issued("access", token)

    async def refresh(self, token: str) -> Issued | None:
        """The live refresh token; one presented again after it was spent ends its grant."""
        item = await self._live_or_end("refresh", token)
        return None if item is None else Issued(Grant(**json.loads(item.body)), item.expires_at)

    async def rotate(self, token: str) -> Tokens | None:
        """Spend the refresh token for a new pair; the grant's old access token ends with it."""
        item = await self._spend("refresh", token)
        if item is None:
            return None
        await self._store.oauth_drop(item.grant, ("access",))
        return await self._issue(Grant(**json.loads(item.body)), token)

    async def account(self, access_token: str) -> Account | None:
        """The account an access token acts for, with its key; None for a token that is not live
        (or whose key no longer opens: the server secret changed)."""
        issued = await self.access(access_token)
        if issued is None:
            return None
        grant = issued.grant
        key = unseal(self._secret, grant.owner, base64.b64decode(grant.sealed_key))
        return None if key is None else Account(owner=grant.owner, api_key=key)

    async def end(self, access_token: str) -> None:
        """End the grant `access_token` was issued under, if it is live."""
        issued = await self.access(access_token)
        if issued is not None:
            await self.revoke(issued.grant.id)

    async def revoke(self, grant_id: str) -> None:
        """End the grant, and every code and token issued under it."""
        await self._store.oauth_drop(grant_id)

    async def _issue(self, grant: Grant, spent: str) -> Tokens | None:
        """New tokens for the grant, in return for the `spent` code or refresh token; None when
        the grant ended while they were made (a parallel request presented `spent` again)."""
        moment = now()
        access = ACCESS_PREFIX + secrets.token_urlsafe(32)
        refresh = REFRESH_PREFIX + secrets.token_urlsafe(32)
        body = json.dumps(asdict(grant))
        await self._store.oauth_put(
            OAuthItem("access", digest(access), grant.id, moment + ACCESS_SECONDS, body)
        )
        await self._store.oauth_put(
            OAuthItem("refresh", digest(refresh), grant.id, moment + REFRESH_SECONDS, body)
        )
        if await self._store.oauth_get("spent", digest(spent), now=moment) is None:
            await self._store.oauth_drop(grant.id)
            return None
        await self._renew_client(grant.client_id)
        return Tokens(access, refresh, ACCESS_SECONDS, grant)

    async def _issued(self, kind: str, token: str) -> Issued | None:
        item = await self._store.oauth_get(kind, digest(token), now=now())
        return None if item is None else Issued(Grant(**json.loads(item.body)), item.expires_at)

    async def _live_or_end(self, kind: str, token: str) -> OAuthItem | None:
        item = await self._store.oauth_get(kind, digest(token), now=now())
        if item is None:
            await self._end_if_spent(token)
        return item

    async def _spend(self, kind: str, token: str) -> OAuthItem | None:
        """Spend a token that was live when its request began. None when a request in parallel
        spent it first: that is a second presentation too, so it ends the grant, and whichever
        request was the thief's holds nothing."""
        item = await self._store.oauth_spend(kind, digest(token), now=now())
        if item is None:
            await self._end_if_spent(token)
        return item

    async def _end_if_spent(self, token: str) -> None:
        spent = await self._store.oauth_get("spent", digest(token), now=now())
        if spent is not None:
            await self._store.oauth_drop(spent.grant)
