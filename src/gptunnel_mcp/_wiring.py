"""The composition root: settings in, a running `Engine` out, with its store, images folder and
HTTP clients (or, in sandbox mode, the in-process stand-in behind them), closed again on exit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import anyio

from ._accounts import SECRET_FILE, Account, Accounts, legacy_server_secret
from ._download import ImageDownloader
from ._engine import Engine
from ._files import ImageFolder
from ._schedule import Backoff, PollSchedule
from ._settings import Settings
from ._sqlite import SQLiteStore
from ._store import ImageShelf, TaskStore
from ._upstream import GPTunnelClient

logger = logging.getLogger("gptunnel_mcp")
_T = TypeVar("_T")


def loop_factory(settings: Settings) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop to run on, where the default will not do: psycopg's async connections
    cannot use Windows' default (proactor) loop. None: the default."""
    if sys.platform == "win32" and settings.database_url is not None:
        return asyncio.SelectorEventLoop
    return None


def run_async(settings: Settings, main: Callable[[], Awaitable[_T]]) -> _T:
    """`anyio.run(main)` on the event loop `settings` need."""
    factory = loop_factory(settings)
    return anyio.run(main, backend_options={} if factory is None else {"loop_factory": factory})


async def open_store(settings: Settings) -> TaskStore:
    """The history: PostgreSQL when GPTUNNEL_MCP_DATABASE_URL names one (its driver is imported
    only then), else SQLite in the home folder."""
    if settings.database_url is None:
        return SQLiteStore(settings.db_path)
    from ._postgres import PostgresStore

    return await PostgresStore.open(settings.database_url.get_secret_value())


def check_store(settings: Settings) -> None:
    """Open the history and close it again: a server that cannot use it says why in one line
    (`StorageError`, `ConfigError`) before it serves, not in a traceback from its first start."""

    async def check() -> None:
        # A damaged secret file of an earlier build, too, is found now rather than by the lifespan.
        legacy_server_secret(settings.home)
        await (await open_store(settings)).close()

    run_async(settings, check)


async def _open_history(settings: Settings) -> tuple[TaskStore, bytes]:
    """The store, and the server secret it holds: made now, or adopted from the file an earlier
    build kept in the home folder, so that the fingerprints and handles made under it stay valid."""
    legacy = legacy_server_secret(settings.home)
    store = await open_store(settings)
    try:
        secret = await store.server_secret(legacy)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await store.close()
        raise
    if legacy is not None and legacy != secret:
        logger.warning(
            "ignoring %s: the history already holds another server secret (made by another server "
            "on it), which every server on it uses; task handles and multi-user tasks made under "
            "the file's secret are not found. Delete the file to silence this warning",
            settings.home / SECRET_FILE,
        )
    return store, secret


@contextlib.asynccontextmanager
async def open_engine(
    settings: Settings,
    *,
    follow: bool = False,
    schedule: PollSchedule | None = None,
    backoff: Backoff | None = None,
) -> AsyncIterator[Engine]:
    """`follow`: a server's engine, which follows tasks in the background on a shared store.
    `schedule` and `backoff` replace the built-in poll timing (tests make it quick)."""
    folder = ImageFolder(settings.images_dir, max_pixels=settings.max_image_pixels)
    removed = folder.remove_stray_temporaries()
    if removed:
        logger.info("removed %d unfinished download(s) left by an earlier run", removed)
    key = settings.api_key.get_secret_value() if settings.api_key else None
    base_url, transport = settings.api_base, None
    if settings.sandbox:
        from ._sandbox import Sandbox

        sandbox = Sandbox(settings.home / "sandbox-upstream")
        base_url, transport, key = sandbox.base_url, sandbox.transport(), key or "sandbox"
    client = GPTunnelClient(
        base_url, timeout=settings.request_timeout, transport=transport, redact_keys=not settings.sandbox
    )
    downloader = ImageDownloader(
        folder,
        timeout=settings.request_timeout,
        max_bytes=settings.max_image_bytes,
        origin=base_url,
        allow_private=settings.allow_private_downloads,
        transport=transport,
    )
    try:
        store, secret = await _open_history(settings)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await client.aclose()
            await downloader.aclose()
        raise
    engine = Engine(
        settings=settings,
        store=store,
        folder=folder,
        client=client,
        downloader=downloader,
        shelf=store if isinstance(store, ImageShelf) else None,
        accounts=Accounts(Account(owner="", api_key=key), secret, multi_user=settings.multi_user),
        schedule=schedule or PollSchedule(),
        backoff=backoff or Backoff(),
        shared=settings.database_url is not None,
    )
    failure: Exception | None = None
    try:
        async with anyio.create_task_group() as background:
            if follow and engine.shared:
                # Replicas on one database finish every task between them; a terminal command
                # comes and goes, and leaves that to them.
                background.start_soon(engine.follow)
            try:
                yield engine
            except Exception as exc:
                # Raised after the group, as itself: a task group would wrap it in a group.
                failure = exc
            finally:
                background.cancel_scope.cancel()
        if failure is not None:
            raise failure
    finally:
        with anyio.CancelScope(shield=True):
            await client.aclose()
            await downloader.aclose()
            await store.close()
