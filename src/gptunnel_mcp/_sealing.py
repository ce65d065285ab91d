"""Users' GPTunnel keys sealed for the shared database, so that any replica can finish a task
of a user whose key only a replica that died had seen (multi-user servers on PostgreSQL).

AES-GCM under a key derived (HKDF-SHA256) from the server secret, with the owner's fingerprint
as associated data: a sealed key opens only as the key of the user it was sealed for. The
secret is in the same database, so this keeps keys out of dumps and logs of the table, not
from whoever can read the whole database: guard the database as the keys themselves.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_NONCE_BYTES = 12


def _cipher(secret: bytes) -> AESGCM:
    key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"gptunnel-mcp: sealed user keys"
    ).derive(secret)
    return AESGCM(key)


def seal(secret: bytes, owner: str, api_key: str) -> bytes:
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + _cipher(secret).encrypt(nonce, api_key.encode(), owner.encode())


def unseal(secret: bytes, owner: str, sealed: bytes) -> str | None:
    """The key, or None for anything that was not sealed for `owner` under `secret`."""
    nonce, body = sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:]
    try:
        return _cipher(secret).decrypt(nonce, body, owner.encode()).decode()
    except (InvalidTag, ValueError, UnicodeDecodeError):
        return None
