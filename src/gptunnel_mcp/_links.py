"""Signed links to stored images, for GPTunnel to fetch one of a caller's own images as a reference
after GPTunnel's own link to it expired.

A link names the task and the image's SHA-256, and when it expires, signed with the server secret
(HMAC-SHA256, its own prefix, so it can stand in for no other keyed value), so every replica on the
history accepts the links any of them made. It names neither the owner nor any key: whoever
holds it can fetch exactly that image, until it expires, and nothing else.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
from datetime import datetime, timedelta

from ._records import StoredFile

#: Where the HTTP server serves the images links name.
LINK_PATH = "/reference-images"
#: How long a link works: GPTunnel fetches reference images soon after the create.
LINK_LIFETIME = timedelta(hours=1)

_SHA256 = re.compile("[0-9a-f]{64}")
#: As a link spells them: the ids in their stored, lower-case form; a time in seconds, bounded.
_TASK_ID = re.compile("[0-9a-f]{24}")
_EXPIRES = re.compile("[0-9]{1,12}")
#: The signature's length in hex digits: 128 bits, far beyond guessing.
_SIGNATURE_HEX = 32


def signed_link(secret: bytes, base: str, task_id: str, stored: StoredFile, now: datetime) -> str:
    """A link under `base` (this server's public address) to the image `stored` of `task_id`,
    working until `LINK_LIFETIME` from `now`. The file's extension is there for fetchers that
    judge a link by its name; the answer's type is the stored image's."""
    expires = math.ceil((now + LINK_LIFETIME).timestamp())
    signature = _signature(secret, task_id, stored.sha256, expires)
    extension = stored.name.rpartition(".")[2]
    return f"{base}{LINK_PATH}/{task_id}/{stored.sha256}.{extension}?expires={expires}&signature={signature}"


def check_link(secret: bytes, task_id: str, sha256: str, expires: str, signature: str, now: datetime) -> bool:
    """Whether the link's parts are those of a link `signed_link` made that still works."""
    if not (_TASK_ID.fullmatch(task_id) and _SHA256.fullmatch(sha256) and _EXPIRES.fullmatch(expires)):
        return False
    expected = _signature(secret, task_id, sha256, int(expires))
    # compare_digest: the time taken must not tell how much of a forged signature was right.
    return hmac.compare_digest(signature.encode(), expected.encode()) and int(expires) > now.timestamp()


def _signature(secret: bytes, task_id: str, sha256: str, expires: int) -> str:
    message = f"reference-image:{task_id}:{sha256}:{expires}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()[:_SIGNATURE_HEX]
