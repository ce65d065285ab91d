"""Who is calling: the account whose GPTunnel key pays for a call and whose history it sees.

A single-user server has one account, owner "", with the configured key. A multi-user server
has one per key; its owner is a keyed fingerprint (HMAC-SHA256 under a secret kept in the home
folder), so the history can be scoped per user without ever storing a key, and a stolen
database does not let anyone test guessed keys against it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from ._exceptions import ConfigError

_SECRET_FILE = "fingerprint.secret"  # noqa: S105 - a file name, not a secret


@dataclass(frozen=True)
class Account:
    owner: str
    api_key: str | None = field(default=None, repr=False)


def load_fingerprint_secret(home: Path) -> bytes:
    """The server's fingerprint secret, made once and shared by every process on this home."""
    path = home / _SECRET_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot create {path} ({exc.strerror}); check GPTUNNEL_MCP_HOME") from None
    else:
        # O_EXCL: of several processes starting together, exactly one writes the secret.
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32))
    secret = path.read_text().strip()
    if len(secret) != 64:
        raise ConfigError(f"{path} is damaged; delete it (users' histories will start anew)")
    return bytes.fromhex(secret)


def account_for_key(secret: bytes, api_key: str) -> Account:
    owner = hmac.new(secret, api_key.encode(), hashlib.sha256).hexdigest()[:32]
    return Account(owner=owner, api_key=api_key)
