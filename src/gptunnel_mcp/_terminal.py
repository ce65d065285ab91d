"""The terminal front end: `generate`, `result`, `history` and `doctor` for people at a
terminal, on the same engine, history and cache as the MCP tools, in their own words."""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
from collections.abc import Awaitable, Callable
from importlib.metadata import version as package_version
from pathlib import Path

import anyio

from ._engine import Engine
from ._exceptions import ConfigError, GPTunnelMCPError, InputError, StorageError, TaskNotFoundError
from ._records import TaskRecord
from ._request import parse_image_request
from ._settings import Settings
from ._version import __version__
from ._wiring import open_engine

#: Exit codes a script can rely on.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PENDING = 0, 1, 2, 3


def run(settings: Settings, args: argparse.Namespace) -> int:
    """Run the command `args` names; the exit code. Errors are printed, never raised."""
    command: Callable[[Engine], Awaitable[int]] = {
        "generate": lambda engine: _generate(engine, args),
        "result": lambda engine: _result(engine, args),
        "history": lambda engine: _history(engine, args.limit, as_json=args.json),
        "doctor": _doctor,
    }[args.command]

    async def main() -> int:
        async with open_engine(settings) as engine:
            return await command(engine)

    try:
        return anyio.run(main)
    except (InputError, ConfigError) as exc:
        return _fail(explain(exc), EXIT_USAGE)
    except GPTunnelMCPError as exc:
        return _fail(explain(exc), EXIT_FAILED)
    except KeyboardInterrupt:
        return 130


def _fail(message: str, code: int) -> int:
    print(f"gptunnel-mcp: {message}", file=sys.stderr)
    return code


#: How a person at the terminal names each request field.
_FLAGS = {"aspect_ratio": "--aspect-ratio", "images": "--image", "model": "--model", "prompt": "the prompt"}


def explain(exc: GPTunnelMCPError) -> str:
    """The core's account of what happened, and what a person at a terminal can do about it."""
    text = str(exc)
    if isinstance(exc, InputError) and exc.argument in _FLAGS:
        text = f"invalid {_FLAGS[exc.argument]}: {text}"
    elif isinstance(exc, TaskNotFoundError):
        text += ". `gptunnel-mcp history` lists the known tasks."
    elif isinstance(exc, StorageError) and exc.task_id is not None:
        text += (
            f". GPTunnel's task is kept in the history: once the data folder is fixed, "
            f"`gptunnel-mcp result {exc.task_id}` fetches the image."
        )
    return text


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
        rows = [
            {**r.model_dump(mode="json"), "file_path": str(engine.folder.path(r.file)) if r.file else None}
            for r in records
        ]
        print(json.dumps(rows, indent=2, ensure_ascii=False))
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
