"""The HTTP client library, named in one place.

The MCP SDK depends on `httpx2`, Pydantic's maintained continuation of httpx with the same
API; the server uses it too, so one HTTP stack is installed. Import it from here, inside the
function that needs it: loading it is a tenth of the server's start-up time.
"""

import httpx2 as httpx

__all__ = ["httpx"]
