"""The HTTP client library, named in one place.

The MCP SDK depends on `httpx2`, Pydantic's maintained continuation of httpx with the same
API; the server uses it too, so one HTTP stack is installed. Import it from here, inside the
function that needs it: loading it is a tenth of the server's start-up time.
"""

from __future__ import annotations

import functools
import ssl

import httpx2 as httpx

__all__ = ["httpx", "ssl_context"]


@functools.cache
def ssl_context() -> ssl.SSLContext:
    """One TLS context for every client of the process: loading the CA bundle takes ~65 ms, and
    each engine has two clients (GPTunnel's API, and its storage links)."""
    return httpx.create_ssl_context()
