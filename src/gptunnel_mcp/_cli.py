"""The `gptunnel-mcp` command: configuration from flags and environment, then a transport."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Sequence

from . import __version__
from ._exceptions import ConfigError
from ._settings import Settings, load_settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptunnel-mcp",
        description="MCP server for GPTunnel image generation. Every flag has an environment variable "
        "(shown in brackets); flags win.",
    )
    parser.add_argument("--version", action="version", version=f"gptunnel-mcp {__version__}")
    parser.add_argument(
        "--transport", choices=["stdio", "http"], help="how clients connect [GPTUNNEL_MCP_TRANSPORT] (stdio)"
    )
    parser.add_argument("--host", help="HTTP bind address [GPTUNNEL_MCP_HOST] (127.0.0.1)")
    parser.add_argument("--port", help="HTTP port [GPTUNNEL_MCP_PORT] (8000)")
    parser.add_argument("--base-url", help="GPTunnel API base URL [GPTUNNEL_BASE_URL]")
    parser.add_argument("--home", help="folder for history and images [GPTUNNEL_MCP_HOME]")
    parser.add_argument("--default-model", help="model used when a call names none [GPTUNNEL_DEFAULT_MODEL]")
    parser.add_argument(
        "--wait-timeout", help="longest generate_and_wait waits, seconds [GPTUNNEL_WAIT_TIMEOUT]"
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="stderr log level"
    )
    return parser


def _configure_logging(level: str) -> None:
    # stdout belongs to the protocol in stdio mode: everything we log goes to stderr.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request line at INFO; our own log says what matters.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLevelName(level)))


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        settings: Settings = load_settings(
            base_url=args.base_url,
            home=args.home,
            default_model=args.default_model,
            wait_timeout=args.wait_timeout,
            transport=args.transport,
            host=args.host,
            port=args.port,
        )
    except ConfigError as exc:
        print(f"gptunnel-mcp: {exc}", file=sys.stderr)
        raise SystemExit(2) from None

    _configure_logging(args.log_level)
    log = logging.getLogger("gptunnel_mcp")
    if settings.api_key is None and not settings.multi_user:
        log.warning("GPTUNNEL_API_KEY is not set: tools will ask for it; stored images stay readable")
    with contextlib.suppress(KeyboardInterrupt):
        if settings.transport == "http":
            _serve_http(settings, args.log_level)
        else:
            from ._server import build_server

            build_server(settings).run("stdio")


def _serve_http(settings: Settings, log_level: str) -> None:
    import uvicorn

    from ._http import MCP_PATH, build_http_app

    app = build_http_app(settings)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    logging.getLogger("gptunnel_mcp").info(
        "serving MCP at http://%s:%d%s (health: /healthz)", host, settings.port, MCP_PATH
    )
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=log_level.lower(), log_config=None)
