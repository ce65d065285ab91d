"""The MCP front end: tools, resources, prompts and the tasks extension over the engine, served
on stdio or streamable HTTP."""

from ._build import build_server
from ._serve import serve

__all__ = ["build_server", "serve"]
