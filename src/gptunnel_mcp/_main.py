"""The `gptunnel-mcp` command line: flags and environment into settings, then the MCP server (the
default) or one of the terminal commands. Only what the chosen path needs is imported, so
`--version` and `--help` answer at once."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from ._version import __version__

#: Seconds `generate` and `result` wait when no flag or GPTUNNEL_WAIT_TIMEOUT says otherwise. A
#: person at a terminal can wait longer than an agent, whose tool call has to return (50 s).
TERMINAL_WAIT_TIMEOUT = 600.0

#: The settings a flag sets, by the flag's name: a refused value is reported under the name the
#: user typed, not the environment variable's.
_FLAGS = {
    "base_url": "--base-url",
    "home": "--home",
    "default_model": "--default-model",
    "wait_timeout": "--wait-timeout",
    "transport": "--transport",
    "host": "--host",
    "port": "--port",
    "database_url": "--to",
}


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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


_COMMAND_WAIT_HELP = (
    "longest wait, seconds (default: --wait-timeout before the command, else GPTUNNEL_WAIT_TIMEOUT, "
    f"else {TERMINAL_WAIT_TIMEOUT:.0f}: a person at a terminal can wait longer than an agent)"
)


def _wait_flag(command: argparse.ArgumentParser) -> None:
    # Its own dest: the command's parser would otherwise overwrite the value given before it.
    command.add_argument("--wait-timeout", dest="command_wait_timeout", default=None, help=_COMMAND_WAIT_HELP)


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
        "--wait-timeout",
        help="longest one wait for an image lasts, seconds [GPTUNNEL_WAIT_TIMEOUT] (50 for an agent's "
        f"tool call; the terminal commands wait {TERMINAL_WAIT_TIMEOUT:.0f} unless told)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    out_help = (
        "also write the image here: a folder (keeps the stored file's name) or a file named .png, "
        ".jpg, .jpeg or .webp (converted to that format if need be)"
    )

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
    generate.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="URL",
        help="reference image: a public URL, or the task id of an image made earlier",
    )
    generate.add_argument("--out", metavar="PATH", help=out_help)
    generate.add_argument(
        "--new", action="store_true", help="make a fresh image even if an identical one was just made"
    )
    _wait_flag(generate)

    result = commands.add_parser(
        "result",
        parents=[common],
        help="wait for a task made earlier and print where its image is stored",
        description="Fetch a task's image (waiting for it if needed) and print the stored file's path. "
        "Exit codes as for generate.",
    )
    result.add_argument("task_id", help="the task id, as printed by generate or listed by history")
    result.add_argument("--out", metavar="PATH", help=out_help)
    _wait_flag(result)

    history = commands.add_parser(
        "history", parents=[common], help="list recent tasks", description="List recent tasks, newest first."
    )
    history.add_argument("--limit", type=_positive_int, default=20, help="how many (20)")
    history.add_argument(
        "--search", metavar="TEXT", help="only tasks whose prompt contains TEXT, in any case (Cyrillic too)"
    )
    history.add_argument("--json", action="store_true", help="print JSON instead of a table")

    commands.add_parser(
        "doctor",
        parents=[common],
        help="check the configuration",
        description="Check the key, the balance, the data folder and GPTunnel's reachability; one line "
        "per check, OK or what to fix. Exit code 0 when all pass.",
    )

    migrate = commands.add_parser(
        "migrate",
        parents=[common],
        help="copy the history into PostgreSQL, for replicas",
        description="Copy every task (of every user), the ledger of creates the caps count and the "
        "images of the done tasks from this home into a PostgreSQL database. Safe to run again: nothing "
        "is copied twice, and nothing the database holds in a newer version is overwritten. Exit codes: "
        "0 copied, 1 the copy failed (run it again to finish it), 2 bad usage or configuration, or a history "
        "that cannot be opened.",
    )
    migrate.add_argument(
        "--to",
        dest="database_url",
        metavar="URL",
        help="postgresql://user:password@host:port/database (default: GPTUNNEL_MCP_DATABASE_URL, which "
        "also keeps the password out of the process list)",
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
    try:
        _main(argv)
    except KeyboardInterrupt:
        # Ctrl-C before a command or the server has taken over (imports take a second or two):
        # the person changed their mind, which deserves no traceback.
        raise SystemExit(130) from None


def _main(argv: Sequence[str] | None) -> None:
    args = _parser().parse_args(argv)
    log_level = getattr(args, "log_level", "INFO")
    flagged = {field: getattr(args, field, None) for field in _FLAGS}
    if getattr(args, "command_wait_timeout", None) is not None:
        flagged["wait_timeout"] = args.command_wait_timeout
    from ._exceptions import ConfigError
    from ._settings import load_settings

    try:
        settings = load_settings(sandbox=getattr(args, "sandbox", None), **flagged)
    except ConfigError as exc:
        _fail(_in_flag_words(str(exc), {field for field, value in flagged.items() if value is not None}))
    if args.command in ("generate", "result") and "wait_timeout" not in settings.model_fields_set:
        settings.wait_timeout = TERMINAL_WAIT_TIMEOUT
    if args.command is None:
        _configure_logging(log_level)
        from ._exceptions import StorageError
        from ._wiring import check_store
        from .server import serve

        try:
            check_store(settings)
            code = serve(settings, log_level)
        except (ConfigError, StorageError) as exc:
            _fail(str(exc))
        raise SystemExit(code)
    # Terminal commands talk to people: only warnings go to the log, the rest is their output.
    _configure_logging("WARNING" if log_level == "INFO" else log_level)
    from ._terminal import run

    raise SystemExit(run(settings, args))


def _in_flag_words(message: str, from_flags: set[str]) -> str:
    """`load_settings` names the environment variable of a refused value; when the value came
    from a flag, name the flag instead."""
    from ._settings import _ENV_NAMES

    for field in from_flags:
        prefix = f"invalid {_ENV_NAMES[field]}:"
        if message.startswith(prefix):
            return f"invalid {_FLAGS[field]}:{message.removeprefix(prefix)}"
    return message


def _fail(message: str, code: int = 2) -> NoReturn:
    print(f"gptunnel-mcp: {message}", file=sys.stderr)
    raise SystemExit(code)
