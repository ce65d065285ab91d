"""The `gptunnel-mcp` command line: flags and environment into settings, then the MCP server (the
default) or one of the terminal commands. Only what the chosen path needs is imported, so
`--version` and `--help` answer at once."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from ._version import __version__


def _common() -> argparse.ArgumentParser:
    # SUPPRESS: these flags may come before or after the command; a default here would let the
    # command's parser overwrite a value given before it.
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    common.add_argument("--base-url", help="GPTunnel API base URL [GPTUNNEL_BASE_URL]")
    common.add_argument("--home", help="folder for history and images [GPTUNNEL_MCP_HOME]")
    common.add_argument(
        "--sandbox",
        action="store_true",
        help="use a built-in stand-in GPTunnel: no key, no network, no cost [GPTUNNEL_SANDBOX]",
    )
    common.add_argument(
        "--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="stderr log level (INFO)"
    )
    return common


def _parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="gptunnel-mcp",
        parents=[common],
        description="MCP server for GPTunnel image generation. Without a command it serves MCP. Every "
        "flag has an environment variable (in brackets); flags win.",
    )
    parser.add_argument("--version", action="version", version=f"gptunnel-mcp {__version__}")
    parser.add_argument(
        "--transport", choices=["stdio", "http"], help="how clients connect [GPTUNNEL_MCP_TRANSPORT] (stdio)"
    )
    parser.add_argument("--host", help="HTTP bind address [GPTUNNEL_MCP_HOST] (127.0.0.1)")
    parser.add_argument("--port", help="HTTP port [GPTUNNEL_MCP_PORT] (8000)")
    parser.add_argument("--default-model", help="model used when a call names none [GPTUNNEL_DEFAULT_MODEL]")
    parser.add_argument(
        "--wait-timeout", help="longest generate_and_wait waits, seconds [GPTUNNEL_WAIT_TIMEOUT]"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    generate = commands.add_parser(
        "generate",
        parents=[common],
        help="make one image and print where it is stored",
        description="Make one image, wait for it with a progress line on stderr, and print the stored "
        "file's path. Exit codes: 0 done, 1 failed, 2 bad usage or configuration, 3 still "
        "pending when the wait ended (finish it later with the printed task id).",
    )
    generate.add_argument("prompt", help="what the image should show")
    generate.add_argument("--model", help="GPTunnel model id (default: GPTUNNEL_DEFAULT_MODEL)")
    generate.add_argument("--aspect-ratio", help="1:1, 16:9, 9:16, 4:3, 3:4, 21:9 or 9:21")
    generate.add_argument("--image", action="append", default=[], metavar="URL", help="reference image URL")
    generate.add_argument("--out", type=Path, help="also copy the image to this path")
    generate.add_argument(
        "--new", action="store_true", help="make a fresh image even if an identical one was just made"
    )
    generate.add_argument("--wait-timeout", default="600", help="longest wait, seconds (600)")

    result = commands.add_parser(
        "result",
        parents=[common],
        help="wait for a task made earlier and print where its image is stored",
        description="Fetch a task's image (waiting for it if needed) and print the stored file's path. "
        "Exit codes as for generate.",
    )
    result.add_argument("task_id", help="the task id, as printed by generate or listed by history")
    result.add_argument("--out", type=Path, help="also copy the image to this path")
    result.add_argument("--wait-timeout", default="600", help="longest wait, seconds (600)")

    history = commands.add_parser(
        "history", parents=[common], help="list recent tasks", description="List recent tasks, newest first."
    )
    history.add_argument("--limit", type=int, default=20, help="how many (20)")
    history.add_argument("--json", action="store_true", help="print JSON instead of a table")

    commands.add_parser(
        "doctor",
        parents=[common],
        help="check the configuration",
        description="Check the key, the balance, the data folder and GPTunnel's reachability; one line "
        "per check, OK or what to fix. Exit code 0 when all pass.",
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
    logging.getLogger("httpx2").setLevel(max(logging.WARNING, logging.getLevelName(level)))


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    log_level = getattr(args, "log_level", "INFO")
    overrides = {
        "base_url": getattr(args, "base_url", None),
        "home": getattr(args, "home", None),
        "sandbox": getattr(args, "sandbox", None),
        "default_model": getattr(args, "default_model", None),
        "wait_timeout": getattr(args, "wait_timeout", None),
        "transport": getattr(args, "transport", None),
        "host": getattr(args, "host", None),
        "port": getattr(args, "port", None),
    }
    from ._exceptions import ConfigError
    from ._settings import load_settings

    try:
        settings = load_settings(**overrides)
    except ConfigError as exc:
        _fail(str(exc))
    if args.command is None:
        _configure_logging(log_level)
        from .server import serve

        serve(settings, log_level)
        return
    # Terminal commands talk to people: only warnings go to the log, the rest is their output.
    _configure_logging("WARNING" if log_level == "INFO" else log_level)
    from ._terminal import run

    raise SystemExit(run(settings, args))


def _fail(message: str, code: int = 2) -> None:
    print(f"gptunnel-mcp: {message}", file=sys.stderr)
    raise SystemExit(code)
