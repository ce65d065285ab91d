"""Running the MCP server on the configured transport until it is stopped."""

from __future__ import annotations

import logging

from .._settings import Settings

logger = logging.getLogger("gptunnel_mcp")


def serve(settings: Settings, log_level: str) -> None:
    if settings.sandbox:
        logger.warning("sandbox mode: no real images, no cost; history in %s", settings.home)
    elif settings.api_key is None and not settings.multi_user:
        logger.warning("GPTUNNEL_API_KEY is not set: tools will ask for it; stored images stay readable")
    if settings.transport == "http":
        import uvicorn

        from ._http import MCP_PATH, build_http_app

        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        logger.info("serving MCP at http://%s:%d%s (health: /healthz)", host, settings.port, MCP_PATH)
        app = build_http_app(settings)
        uvicorn.run(app, host=settings.host, port=settings.port, log_level=log_level.lower(), log_config=None)
    else:
        from ._build import build_server

        build_server(settings).run("stdio")
