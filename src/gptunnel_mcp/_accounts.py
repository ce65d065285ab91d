"""Who is calling: the account whose GPTunnel key pays for a call and whose history it sees.

A single-user server has one account, owner "", with the configured key. A multi-user server
has one per key; its owner is a keyed fingerprint (HMAC-SHA256 under the server secret, kept in
the history so that every replica on it tells users apart alike), so the history can be scoped
per user without ever storing a key or a plain hash of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ._exceptions import AuthenticationError, ConfigError

SECRET_FILE = "server.secret"  # noqa: S105 - a file name, not a secret


@dataclass(frozen=True)
class Account:
    owner: str
    api_key: str | None = field(default=None, repr=False)


def legacy_server_secret(home: Path) -> bytes | None:
    """The secret earlier builds kept in the home folder (`server.secret`), if there is one: the
    store adopts it when it has none yet, so the fingerprints and task handles made under it
    stay valid. The file is left as it was, and never written again."""
    path = home / SECRET_FILE
    try:
        secret = path.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read {path} ({exc.strerror}); check GPTUNNEL_MCP_HOME") from None
    if len(secret) == 64:
        with contextlib.suppress(ValueError):
            return bytes.fromhex(secret)
    raise ConfigError(
        f"{path} is damaged, so it cannot be taken as the server secret: delete it "
        "(users' tasks and task handles made under it are then not found)"
    )


def account_for_key(secret: bytes, api_key: str) -> Account:
    owner = hmac.new(secret, b"user-key:" + api_key.encode(), hashlib.sha256).hexdigest()[:32]
    return Account(owner=owner, api_key=api_key)


def bearer_token(headers: Mapping[str, str] | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, if there is one."""
    if not headers:
        return None
    value = headers.get("authorization") or headers.get("Authorization") or ""
    scheme, _, token = value.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class Accounts:
    """Maps a request to its account, and remembers which keys GPTunnel accepted or refused.

    The memory holds fingerprints only, never keys. An accepted key is forgotten after `ttl`
    seconds, so a revoked key stops working within that time; a refused one after `refusal_ttl`,
    so a key sent again and again costs one question to GPTunnel, not one per request, and a
    key that was just paid up is not kept out for long.
    """

    def __init__(
        self,
        default: Account,
        secret: bytes,
        *,
        multi_user: bool,
        ttl: float = 300.0,
        refusal_ttl: float = 60.0,
        size: int = 4096,
    ) -> None:
        self.default = default
        #: The server secret: keys the users' fingerprints here, the MCP task handles, and the
        #: links to stored images (`_links`), each with its own prefix, so none can stand in for another.
        self.secret = secret
        self._multi_user = multi_user
        self._ttl = ttl
        self._refusal_ttl = refusal_ttl
        self._size = size
        self._accepted: OrderedDict[str, float] = OrderedDict()
        self._refused: OrderedDict[str, float] = OrderedDict()

    @property
    def multi_user(self) -> bool:
        return self._multi_user

    def for_headers(self, headers: Mapping[str, str] | None) -> Account:
        """The account a request acts for. In multi-user mode the HTTP layer has already refused
        requests without a key it accepted, so a missing key here is a wiring error."""
        if not self._multi_user:
            return self.default
        key = bearer_token(headers)
        if key is None:
            raise AuthenticationError("this server needs your GPTunnel key as 'Authorization: Bearer <key>'")
        return self.for_key(key)

    def for_key(self, api_key: str) -> Account:
        if not self._multi_user:
            raise ConfigError("per-user keys are only taken in multi-user mode (GPTUNNEL_MCP_MULTI_USER=1)")
        return account_for_key(self.secret, api_key)

    def is_known(self, account: Account) -> bool:
        return _holds(self._accepted, account.owner)

    def remember(self, account: Account) -> None:
        self._refused.pop(account.owner, None)
        self._note(self._accepted, account.owner, self._ttl)

    def is_refused(self, account: Account) -> bool:
        return _holds(self._refused, account.owner)

    def refuse(self, account: Account) -> None:
        self._accepted.pop(account.owner, None)
        self._note(self._refused, account.owner, self._refusal_ttl)

    def _note(self, memory: OrderedDict[str, float], owner: str, ttl: float) -> None:
        memory[owner] = time.monotonic() + ttl
        memory.move_to_end(owner)
        while len(memory) > self._size:
            memory.popitem(last=False)


def _holds(memory: OrderedDict[str, float], owner: str) -> bool:
    expires = memory.get(owner)
    return expires is not None and expires > time.monotonic()
