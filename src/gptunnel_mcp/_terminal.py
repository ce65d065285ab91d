"""The terminal front end: `generate`, `result`, `history` and `doctor` for people at a
terminal, on the same engine, history and cache as the MCP tools, in their own words; and
`migrate`, which copies the history into PostgreSQL."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import re
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from importlib.metadata import version as package_version
from types import TracebackType

from ._engine import Engine
from ._exceptions import (
    BudgetExceededError,
    ConfigError,
    GPTunnelMCPError,
    InputError,
    StorageError,
    TaskNotFoundError,
)
from ._export import Destination, check_destination, write_image
from ._records import TaskRecord
from ._request import parse_image_request
from ._settings import Settings, mask_password
from ._store import Search
from ._version import __version__
from ._wiring import open_engine, run_async

#: Exit codes a script can rely on.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PENDING = 0, 1, 2, 3


def run(settings: Settings, args: argparse.Namespace) -> int:
    """Run the command `args` names; the exit code. Errors are printed, never raised."""
    if args.command == "migrate":
        return _migrate(settings, from_flag=args.database_url is not None)
    try:
        # Before anything is sent: an image made and paid for deserves a place to go.
        out = check_destination(args.out) if getattr(args, "out", None) is not None else None
    except InputError as exc:
        return _fail(f"{explain(exc)}. Nothing was sent to GPTunnel.", EXIT_USAGE)
    command: Callable[[Engine], Awaitable[int]] = {
        "generate": lambda engine: _generate(engine, args, out),
        "result": lambda engine: _result(engine, args, out),
        "history": lambda engine: _history(engine, args.limit, as_json=args.json, text=args.search),
        "doctor": _doctor,
    }[args.command]

    async def main() -> int:
        async with open_engine(settings) as engine:
            return await command(engine)

    try:
        return run_async(settings, main)
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
_FLAGS = {
    "aspect_ratio": "--aspect-ratio",
    "images": "--image",
    "model": "--model",
    "prompt": "the prompt",
    "destination": "--out",
}


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
    elif isinstance(exc, BudgetExceededError):
        if exc.unknown:
            text += " `gptunnel-mcp result TASK_ID` finishes a task still being made."
        text += " `gptunnel-mcp history` shows what each image cost."
    return text


#: At most one line this often when the state stays the same (stderr is a log or a pipe).
_QUIET_SECONDS = 5.0
_NUMBERS = re.compile(r"\d+")
#: How the progress line ends, by the task's status when the wait is over.
_FINAL = {"done": "done", "failed": "failed", "pending": "still pending"}


class _ProgressLine:
    """The job's progress on stderr. On a terminal, one line redrawn in place that ends showing
    the final state; elsewhere (a log, a pipe), a line when the state changes or every few
    seconds, never the same line twice. Use as a context manager, and `finish` once the task
    is over."""

    def __init__(self) -> None:
        self._tty = sys.stderr.isatty()
        self._started = time.monotonic()
        self._last = ""  # the latest message received
        self._shown = ""  # the latest message drawn or printed
        self._shown_at = -math.inf
        self._drawn = False  # a terminal line is drawn and not yet ended

    def __enter__(self) -> _ProgressLine:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # An error message must not start in the middle of the progress line.
        self._end_line()

    async def progress(self, progress: float, total: float | None, message: str) -> None:
        self._last = message
        if self._tty or self._due(message):
            self._show(message)

    async def image_stored(self, record: TaskRecord) -> None:
        return None

    def finish(self, record: TaskRecord) -> None:
        word = _FINAL[record.status]
        final = self._last if self._last.startswith(word) else f"{word}, {self._elapsed():.0f} s elapsed"
        if final != self._shown:
            self._show(final)
        self._end_line()

    def _due(self, message: str) -> bool:
        # Messages count seconds, so two lines about the same state differ only in their numbers.
        if message == self._shown:
            return False
        same_state = _NUMBERS.sub("#", message) == _NUMBERS.sub("#", self._shown)
        return not same_state or time.monotonic() - self._shown_at >= _QUIET_SECONDS

    def _show(self, message: str) -> None:
        self._shown, self._shown_at = message, time.monotonic()
        if self._tty:
            # A line wider than the terminal wraps, and the carriage return redraws only its last row.
            width = shutil.get_terminal_size().columns - 1
            print(f"\r\033[K{message[:width]}", end="", file=sys.stderr, flush=True)
            self._drawn = True
        else:
            print(message, file=sys.stderr, flush=True)

    def _end_line(self) -> None:
        if self._drawn:
            print(file=sys.stderr, flush=True)
            self._drawn = False

    def _elapsed(self) -> float:
        return time.monotonic() - self._started


async def _generate(engine: Engine, args: argparse.Namespace, out: Destination | None) -> int:
    request = parse_image_request(
        engine.settings.default_model, args.prompt, args.model, args.aspect_ratio, args.image
    )
    with _ProgressLine() as line:
        started = await engine.generate(request, engine.accounts.default, line, new_image=args.new)
        line.finish(started.record)
    if started.reused:
        print(f"reusing identical task {started.record.task_id} (--new for a fresh image)", file=sys.stderr)
    return _finish(engine, started.record, out)


async def _result(engine: Engine, args: argparse.Namespace, out: Destination | None) -> int:
    with _ProgressLine() as line:
        record = await engine.wait(args.task_id, engine.accounts.default, line)
        line.finish(record)
    return _finish(engine, record, out)


def _finish(engine: Engine, record: TaskRecord, out: Destination | None) -> int:
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
        try:
            # Any file the user names: they asked for it by name.
            path = write_image(path, record.file, out, overwrite=True).path
        except InputError as exc:
            return _fail(f"{explain(exc)}; the image is stored at {path}", EXIT_FAILED)
    print(path)
    return EXIT_OK


def _history_place(settings: Settings) -> str:
    if settings.database_url is None:
        return str(settings.home)
    return f"the PostgreSQL database {mask_password(settings.database_url.get_secret_value())}"


async def _history(engine: Engine, limit: int, *, as_json: bool, text: str | None) -> int:
    owner = engine.accounts.default.owner
    if text is None:
        total, records = await engine.count(owner), await engine.history(owner, limit=limit)
        more = f"({len(records)} of {total}; --limit N for more)" if total > len(records) else None
    else:
        found = await engine.search(owner, Search(text=text), limit=limit)
        records = found.records
        more = f"(the newest {len(records)} that match; --limit N for more)" if found.cursor else None
    # On a shared database, an image another replica downloaded is not in this home yet.
    here = {r.task_id: engine.folder.path(r.file) for r in records if r.file and engine.folder.exists(r.file)}
    if as_json:
        rows = [
            {**r.model_dump(mode="json"), "file_path": str(here[r.task_id]) if r.task_id in here else None}
            for r in records
        ]
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return EXIT_OK
    if not records:
        if text is not None:
            print(f"No tasks match {text!r}.")
        else:
            print(f"No tasks yet. History lives in {_history_place(engine.settings)}.")
        return EXIT_OK
    for r in records:
        prompt = r.prompt if len(r.prompt) <= 50 else r.prompt[:49] + "…"
        if r.task_id in here:
            where = str(here[r.task_id])
        elif r.file:
            where = f"(in the database: `gptunnel-mcp result {r.task_id}` copies it here)"
        else:
            where = r.error or ""
        cost = "" if r.cost is None else f"{r.cost:.2f} RUB"
        print(
            f"{r.created_at:%Y-%m-%d %H:%M}  {r.status:<7}  {r.task_id}  {r.model:<20}  {cost:>10}  "
            f"{prompt}  {where}"
        )
    if more is not None:
        print(more)
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
    shared = settings.database_url is not None
    try:
        probe.write_bytes(b"ok")
        probe.unlink()
        if shared:
            report(True, f"image cache {settings.home} is writable")
        else:
            total = await engine.count(engine.accounts.default.owner)
            report(True, f"data folder {settings.home} is writable; history has {total} task(s)")
    except (OSError, GPTunnelMCPError) as exc:
        report(False, f"data folder {settings.home}: {exc}; set GPTUNNEL_MCP_HOME to a writable folder")
    if shared:
        try:
            await engine.store.ping()
            total = await engine.count(engine.accounts.default.owner)
        except GPTunnelMCPError as exc:
            report(False, f"history: {exc}")
        else:
            report(True, f"history in {_history_place(settings)} answers; it has {total} task(s)")
    if settings.sandbox:
        report(True, "sandbox mode: no GPTunnel key is needed, and GPTunnel is not contacted")
        upstream, answered = "the sandbox's stand-in GPTunnel", "answers (its balance is play money)"
    elif engine.accounts.default.api_key is None:
        report(False, "GPTUNNEL_API_KEY is not set: set it to the key from your GPTunnel account")
        return EXIT_FAILED
    else:
        report(True, "GPTUNNEL_API_KEY is set")
        upstream, answered = f"GPTunnel at {settings.api_base}", "is reachable and accepts the key"
    try:
        balance = await engine.balance(engine.accounts.default)
    except GPTunnelMCPError as exc:
        report(False, f"{upstream}: {exc}")
    else:
        report(True, f"{upstream} {answered}")
        report(
            balance.balance > 0,
            f"balance {balance.balance:.2f} RUB (credit limit {balance.credit_limit:.2f} RUB)"
            + ("" if balance.balance > 0 else ": top up the account before generating"),
        )
    return EXIT_OK if all(results) else EXIT_FAILED


def _migrate(settings: Settings, *, from_flag: bool) -> int:
    """Copy this home's SQLite history into the PostgreSQL database named by --to or
    GPTUNNEL_MCP_DATABASE_URL. Anything that stops it before the copy begins is exit 2, as for
    the server at start, as is a database whose server secret is not the history's; a copy that
    fails on the way is exit 1 (running it again finishes it)."""
    if settings.database_url is None:
        return _fail(
            "migrate copies the history into PostgreSQL: name the database with "
            "--to postgresql://user:password@host:port/database, or set GPTUNNEL_MCP_DATABASE_URL",
            EXIT_USAGE,
        )
    url, source_path = settings.database_url.get_secret_value(), settings.db_path
    if not source_path.is_file():
        return _fail(
            f"there is no history to copy at {source_path}: point --home (or GPTUNNEL_MCP_HOME) at the "
            "folder that holds history.sqlite3",
            EXIT_USAGE,
        )

    def in_our_words(exc: GPTunnelMCPError) -> str:
        text = explain(exc)
        return text.replace("GPTUNNEL_MCP_DATABASE_URL", "--to") if from_flag else text

    async def main() -> int:
        from ._accounts import legacy_server_secret
        from ._files import ImageFolder
        from ._sqlite import SQLiteStore
        from ._transfer import copy_history

        async with contextlib.AsyncExitStack() as stores:
            try:
                from ._postgres import PostgresStore

                source = SQLiteStore(source_path)
                stores.push_async_callback(source.close)
                target = await PostgresStore.open(url)
                stores.push_async_callback(target.close)
            except GPTunnelMCPError as exc:
                return _fail(in_our_words(exc), EXIT_USAGE)
            try:
                images = ImageFolder(settings.images_dir, max_pixels=settings.max_image_pixels)
                done = await copy_history(
                    source, target, images, legacy_secret=legacy_server_secret(settings.home)
                )
            except ConfigError as exc:
                return _fail(in_our_words(exc), EXIT_USAGE)
            except GPTunnelMCPError as exc:
                return _fail(f"{in_our_words(exc)}; run migrate again to finish the copy", EXIT_FAILED)
        print(
            f"copied {done.tasks_copied} tasks and {done.ledger_copied} ledger entries "
            f"from {source_path} to {mask_password(url)}"
        )
        there = (done.tasks_read - done.tasks_copied, done.ledger_read - done.ledger_copied)
        if any(there):
            print(f"({there[0]} tasks and {there[1]} ledger entries were there already, as new or newer)")
        print(f"{done.images_kept} images are in the database, for every replica to serve")
        if done.images_missing:
            print(
                f"{done.images_missing} done tasks have no image in {settings.images_dir} as recorded "
                "(deleted or damaged): the replicas download those again while GPTunnel's link lasts"
            )
        return EXIT_OK

    try:
        return run_async(settings, main)
    except KeyboardInterrupt:
        return 130
