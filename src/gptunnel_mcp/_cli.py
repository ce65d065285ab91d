"""The `gptunnel-mcp` command: the MCP server by default, and `generate`, `history` and `doctor`
for people at a terminal. The commands use the same engine, history and cache as the tools."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import platform
import shutil
import sys
from collections.abc import Awaitable, Callable, Sequence
from importlib.metadata import version as package_version
from pathlib import Path

import anyio

from . import __version__
from ._engine import Engine, open_engine
from ._exceptions import ConfigError, GPTunnelMCPError, InputError
from ._models import TaskRecord, parse_image_request
from ._settings import Settings, load_settings

#: Exit codes a script can rely on.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PENDING = 0, 1, 2, 3


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
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLevelName(level)))


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    log_level = getattr(args, "log_level", "INFO")
    overrides = {
        "base_url": getattr(args, "base_url", None),
        "home": getattr(args, "home", None),
        "sandbox": getattr(args, "sandbox", None),
        "default_model": getattr(args, "default_model", None),
        "wait_timeout": args.wait_timeout,
        "transport": getattr(args, "transport", None),
        "host": getattr(args, "host", None),
        "port": getattr(args, "port", None),
    }
    try:
        settings = load_settings(**overrides)
    except ConfigError as exc:
        _fail(str(exc))
    if args.command is None:
        _configure_logging(log_level)
        _serve(settings, log_level)
        return
    # Terminal commands talk to people: only warnings go to the log, the rest is their output.
    _configure_logging("WARNING" if log_level == "INFO" else log_level)
    command: Callable[[Engine], Awaitable[int]] = {
        "generate": lambda engine: _generate(engine, args),
        "result": lambda engine: _result(engine, args),
        "history": lambda engine: _history(engine, args.limit, as_json=args.json),
        "doctor": _doctor,
    }[args.command]

    async def run() -> int:
        async with open_engine(settings) as engine:
            return await command(engine)

    try:
        code = anyio.run(run)
    except (InputError, ConfigError) as exc:
        _fail(str(exc), EXIT_USAGE)
    except GPTunnelMCPError as exc:
        _fail(str(exc), EXIT_FAILED)
    except KeyboardInterrupt:
        code = 130
    raise SystemExit(code)


def _fail(message: str, code: int = EXIT_USAGE) -> None:
    print(f"gptunnel-mcp: {message}", file=sys.stderr)
    raise SystemExit(code)


def _serve(settings: Settings, log_level: str) -> None:
    log = logging.getLogger("gptunnel_mcp")
    if settings.sandbox:
        log.warning("sandbox mode: no real images, no cost; history in %s", settings.home)
    elif settings.api_key is None and not settings.multi_user:
        log.warning("GPTUNNEL_API_KEY is not set: tools will ask for it; stored images stay readable")
    with contextlib.suppress(KeyboardInterrupt):
        if settings.transport == "http":
            import uvicorn

            from ._http import MCP_PATH, build_http_app

            host = f"[{settings.host}]" if ":" in settings.host else settings.host
            log.info("serving MCP at http://%s:%d%s (health: /healthz)", host, settings.port, MCP_PATH)
            app = build_http_app(settings)
            uvicorn.run(
                app, host=settings.host, port=settings.port, log_level=log_level.lower(), log_config=None
            )
        else:
            from ._server import build_server

            build_server(settings).run("stdio")


class _ProgressLine:
    """One status line on stderr, redrawn in place on a terminal, appended otherwise."""

    def __init__(self) -> None:
        self._tty = sys.stderr.isatty()

    async def progress(self, progress: float, total: float | None, message: str) -> None:
        if self._tty:
            print(f"\r\033[K{message}", end="", file=sys.stderr, flush=True)
        else:
            print(message, file=sys.stderr, flush=True)

    async def image_stored(self, record: TaskRecord) -> None:
        if self._tty:
            print(file=sys.stderr)

    def done(self) -> None:
        if self._tty:
            print("\r\033[K", end="", file=sys.stderr, flush=True)


async def _generate(engine: Engine, args: argparse.Namespace) -> int:
    request = parse_image_request(
        engine.settings.default_model, args.prompt, args.model, args.aspect_ratio, args.image
    )
    line = _ProgressLine()
    started = await engine.generate(request, engine.accounts.default, line, new_image=args.new)
    line.done()
    if started.reused:
        print(f"reusing identical task {started.record.task_id} (--new for a fresh image)", file=sys.stderr)
    return _finish(engine, started.record, args.out)


async def _result(engine: Engine, args: argparse.Namespace) -> int:
    line = _ProgressLine()
    record = await engine.wait(args.task_id, engine.accounts.default, line)
    line.done()
    return _finish(engine, record, args.out)


def _finish(engine: Engine, record: TaskRecord, out: Path | None) -> int:
    """Print where the image is, or why there is none, and choose the exit code."""
    if record.status == "failed":
        print(f"gptunnel-mcp: task {record.task_id} failed: {record.error}", file=sys.stderr)
        return EXIT_FAILED
    if record.status == "pending" or record.file is None:
        print(
            f"gptunnel-mcp: task {record.task_id} is still {record.upstream_status}; the wait ended. "
            f"It is kept: fetch it later with `gptunnel-mcp result {record.task_id}`.",
            file=sys.stderr,
        )
        return EXIT_PENDING
    path = engine.folder.path(record.file).resolve()
    if out is not None:
        shutil.copyfile(path, out)
        path = out.resolve()
    print(path)
    return EXIT_OK


async def _history(engine: Engine, limit: int, *, as_json: bool) -> int:
    owner = engine.accounts.default.owner
    total, records = await engine.count(owner), await engine.history(owner, limit=max(1, limit))
    if as_json:
        print(json.dumps([engine.describe(r).model_dump(mode="json") for r in records], indent=2))
        return EXIT_OK
    if not records:
        print(f"No tasks yet. History lives in {engine.settings.home}.")
        return EXIT_OK
    for r in records:
        prompt = r.prompt if len(r.prompt) <= 50 else r.prompt[:49] + "…"
        where = str(engine.folder.path(r.file)) if r.file else (r.error or "")
        print(f"{r.created_at:%Y-%m-%d %H:%M}  {r.status:<7}  {r.task_id}  {r.model:<20}  {prompt}  {where}")
    if total > len(records):
        print(f"({len(records)} of {total}; --limit N for more)")
    return EXIT_OK


async def _doctor(engine: Engine) -> int:
    settings = engine.settings
    results: list[bool] = []

    def report(ok: bool, text: str) -> None:
        results.append(ok)
        print(f"{'OK  ' if ok else 'FAIL'}  {text}")

    versions = f"gptunnel-mcp {__version__}, mcp {package_version('mcp')}, Python {platform.python_version()}"
    report(True, f"versions: {versions}")
    probe = settings.images_dir / ".doctor-probe"
    try:
        probe.write_bytes(b"ok")
        probe.unlink()
        total = await engine.count(engine.accounts.default.owner)
        report(True, f"data folder {settings.home} is writable; history has {total} task(s)")
    except (OSError, GPTunnelMCPError) as exc:
        report(False, f"data folder {settings.home}: {exc}; set GPTUNNEL_MCP_HOME to a writable folder")
    if engine.accounts.default.api_key is None:
        report(False, "GPTUNNEL_API_KEY is not set: set it to the key from your GPTunnel account")
        return EXIT_OK if all(results) else EXIT_FAILED
    report(True, "GPTUNNEL_API_KEY is set")
    try:
        balance = await engine.balance(engine.accounts.default)
    except GPTunnelMCPError as exc:
        report(False, f"GPTunnel at {settings.api_base}: {exc}")
    else:
        report(True, f"GPTunnel at {settings.api_base} is reachable and accepts the key")
        report(
            balance.balance > 0,
            f"balance {balance.balance:.2f} RUB (credit limit {balance.credit_limit:.2f} RUB)"
            + ("" if balance.balance > 0 else ": top up the account before generating"),
        )
    return EXIT_OK if all(results) else EXIT_FAILED
