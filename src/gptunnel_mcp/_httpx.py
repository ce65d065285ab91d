"""The HTTP client library, named in one place.

The MCP SDK depends on `httpx2`, Pydantic's maintained continuation of httpx with the same
API; the server uses it too, so one HTTP stack is installed. Import it from here, inside the
function that needs it: loading it is a tenth of the server's start-up time.
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import Sequence

import httpx2 as httpx

from ._netguard import IPAddress

__all__ = ["httpx", "pinned_get", "ssl_context"]


@functools.cache
def ssl_context() -> ssl.SSLContext:
    """One TLS context for every client of the process: loading the CA bundle takes ~65 ms, and
    each engine has two clients (GPTunnel's API, and its storage links)."""
    return httpx.create_ssl_context()


async def pinned_get(
    transport: httpx.AsyncBaseTransport,
    url: httpx.URL,
    addresses: Sequence[IPAddress],
    timeout: dict[str, float | None],
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """GET `url` from the first of `addresses` (each already judged for its name) that answers:
    the address in the URL, so the name is not looked up again and re-pointed in between; the
    name in Host and in TLS (SNI and certificate)."""
    host = url.raw_host.decode("ascii")
    last: httpx.HTTPError | None = None
    for address in addresses:
        request = httpx.Request(
            "GET",
            url.copy_with(host=str(address)),
            headers={**(headers or {}), "Host": url.netloc.decode("ascii")},
            extensions={"timeout": timeout, "sni_hostname": host},
        )
        try:
            return await transport.handle_async_request(request)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            last = exc
    assert last is not None, "no address to connect to"
    raise last
