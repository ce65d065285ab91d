"""Client ID metadata documents: an OAuth client whose client_id is an https URL publishes its
registration there, and the authorization server fetches it (draft-ietf-oauth-client-id-
metadata-document, in the MCP authorization spec of 2025-11-25).

The URL is the client's word, so whoever starts a sign-in chooses what this server fetches:
https only, on a public address (judged by what the name resolves to, and connected to as
judged: `_netguard`), no redirects, no credentials, within `MAX_BYTES` and `TIMEOUT` seconds.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import anyio

from . import _netguard

#: The largest document read; registrations are a few hundred bytes.
MAX_BYTES = 16 * 1024
TIMEOUT = 5.0


class DocumentError(Exception):
    """Why a document was not fetched, in a few words (never with a response body)."""


def is_document_url(client_id: str) -> bool:
    """Whether a client_id names a document: an https URL with a path."""
    parts = urlsplit(client_id)
    return parts.scheme == "https" and bool(parts.netloc) and parts.path not in ("", "/")


async def fetch_document(url: str) -> bytes:
    """The document at `url`. Raises `DocumentError`."""
    from ._httpx import httpx, pinned_get, ssl_context

    try:
        target = httpx.URL(url)
    except httpx.InvalidURL:
        raise DocumentError("not a valid URL") from None
    if target.scheme != "https" or target.userinfo or target.fragment:
        raise DocumentError("only https URLs without a user name or fragment are fetched")
    host = target.raw_host.decode("ascii")
    try:
        addresses = await _netguard.resolve(host, target.port or 443)
    except _netguard.UnresolvableError as exc:
        raise DocumentError(f"cannot resolve {host[:100]} ({exc})") from None
    for address in addresses:
        if not _netguard.is_public(address):
            raise DocumentError(f"{host[:100]} is {_netguard.describe(address)}")
    transport = httpx.AsyncHTTPTransport(
        verify=ssl_context(), limits=httpx.Limits(max_keepalive_connections=0)
    )
    timeout = httpx.Timeout(TIMEOUT).as_dict()
    try:
        with anyio.fail_after(TIMEOUT):
            response = await pinned_get(transport, target, addresses, timeout, {"Accept": "application/json"})
            try:
                if response.status_code != 200:
                    raise DocumentError(f"HTTP {response.status_code}")
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > MAX_BYTES:
                        raise DocumentError(f"larger than {MAX_BYTES} bytes")
                return bytes(data)
            finally:
                await response.aclose()
    except TimeoutError:
        raise DocumentError(f"no answer within {TIMEOUT:g} s") from None
    except httpx.HTTPError as exc:
        raise DocumentError(f"cannot be fetched ({type(exc).__name__})") from None
    finally:
        await transport.aclose()
