"""The job engine: create a task, poll it, download its image, and record every step.

Every front end (MCP tools and resources, terminal commands) goes through `Engine`; none of
them talks to GPTunnel, the database or the images folder directly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Protocol, TypeVar
from weakref import WeakValueDictionary

import anyio

from ._accounts import Account, Accounts, load_server_secret
from ._catalog import check_options
from ._client import Balance, GPTunnelClient
from ._download import ImageDownloader
from ._exceptions import (
    ConfigError,
    DownloadError,
    InputError,
    QuotaExceededError,
    StorageError,
    TaskNotFoundError,
    TransientUpstreamError,
)
from ._files import ImageFolder
from ._images import Preview, make_preview
from ._models import (
    ImageRequest,
    ImageResult,
    StoredFile,
    TaskRecord,
    UpstreamTask,
    file_uri,
    is_task_id,
    utcnow,
)
from ._schedule import Backoff, PollPlan, PollSchedule, Timing
from ._settings import Settings
from ._sqlite import SQLiteStore
from ._store import TaskStore

logger = logging.getLogger("gptunnel_mcp")
_T = TypeVar("_T")

#: Retries of one request inside a single tool call that is not a wait (create, one get_result).
_QUICK_ATTEMPTS = 3
#: Recent tasks of a model whose durations shape the poll plan.
_TIMING_SAMPLES = 10


class JobEvents(Protocol):
    """What a front end wants to hear while a job runs."""

    async def progress(self, progress: float, total: float | None, message: str) -> None:
        """`progress` grows with every call; `total`, when known, is the expected end."""
        ...

    async def image_stored(self, record: TaskRecord) -> None: ...


class _Silent:
    async def progress(self, progress: float, total: float | None, message: str) -> None:
        return None

    async def image_stored(self, record: TaskRecord) -> None:
        return None


SILENT: JobEvents = _Silent()


@dataclass(frozen=True)
class Started:
    """A task a create call answered with; `reused` when it was an earlier identical one."""

    record: TaskRecord
    reused: bool


@dataclass
class Engine:
    settings: Settings
    store: TaskStore
    folder: ImageFolder
    client: GPTunnelClient
    #: Who may call, and as whom: one account, or one per GPTunnel key in multi-user mode.
    accounts: Accounts
    downloader: ImageDownloader
    schedule: PollSchedule = field(default_factory=PollSchedule)
    backoff: Backoff = field(default_factory=Backoff)
    _preview_slots: anyio.CapacityLimiter = field(
        default_factory=lambda: anyio.CapacityLimiter(os.cpu_count() or 2), repr=False
    )
    _create_locks: WeakValueDictionary[tuple[str, str], anyio.Lock] = field(
        default_factory=WeakValueDictionary, repr=False
    )

    # --- starting a task -------------------------------------------------------------------

    async def create(self, request: ImageRequest, account: Account, *, new_image: bool = False) -> Started:
        """Start a task upstream and record it before returning, unless an identical request is
        still running or finished moments ago: agents retry calls their client cut off, and
        paying twice for one image is the costliest mistake this server could make."""
        check_options(request)
        key = _key(account)
        request_key = request.key()
        lock = self._create_locks.setdefault((account.owner, request_key), anyio.Lock())
        async with lock:
            if not new_image:
                earlier = await self._reusable(account.owner, request_key)
                if earlier is not None:
                    logger.info("reusing task %s for an identical request", earlier.task_id)
                    return Started(earlier, reused=True)
            await self._check_caps(account.owner)
            return Started(await self._create(request, request_key, account, key), reused=False)

    async def _reusable(self, owner: str, request_key: str) -> TaskRecord | None:
        window = self.settings.reuse_window
        if window <= 0:
            return None
        record = await self.store.find_reusable(owner, request_key, utcnow() - timedelta(seconds=window))
        # A task whose image is gone for good (expired before download) is no answer to anyone.
        return None if record is not None and record.status == "pending" and _stale(record) else record

    async def _check_caps(self, owner: str) -> None:
        now = utcnow()
        for cap, span, unit, name in (
            (self.settings.max_images_per_hour, timedelta(hours=1), "hour", "GPTUNNEL_MAX_IMAGES_PER_HOUR"),
            (self.settings.max_images_per_day, timedelta(days=1), "day", "GPTUNNEL_MAX_IMAGES_PER_DAY"),
        ):
            if cap is None:
                continue
            # Counted from the history, so a restart does not reset the count.
            recent = await self.store.created_since(owner, now - span)
            if len(recent) >= cap:
                frees = recent[len(recent) - cap] + span
                raise QuotaExceededError(
                    f"the cap of {cap} images per {unit} ({name}) is reached: {len(recent)} made in the "
                    f"last {unit}. The next can be made at {frees:%Y-%m-%d %H:%M:%S} UTC. "
                    "Nothing was sent to GPTunnel."
                )

    async def _create(
        self, request: ImageRequest, request_key: str, account: Account, key: str
    ) -> TaskRecord:
        submitted = utcnow()
        # Only failures that prove the request was not taken on are retried (see `_client`).
        upstream = await self._retry(
            lambda: self.client.create(request.payload(), key), attempts=_QUICK_ATTEMPTS
        )
        now = utcnow()
        record = TaskRecord(
            task_id=upstream.id.lower(),
            owner=account.owner,
            model=upstream.model or request.model,
            prompt=request.prompt,
            aspect_ratio=request.aspect_ratio,
            images=request.images,
            created_at=_from_unix(upstream.created_at) or now,
            updated_at=now,
            request_key=request_key,
            submitted_at=submitted,
        )
        _apply(record, upstream)
        try:
            await self.store.put(record)
        except StorageError as exc:
            raise StorageError(
                f"GPTunnel started task {record.task_id}, but it could not be recorded ({exc}). "
                f"Fix the data folder, then call get_result with task_id {record.task_id}."
            ) from None
        logger.info("created task %s (model %s)", record.task_id, record.model)
        return record

    # --- following a task ------------------------------------------------------------------

    async def refresh(self, task_id: str, account: Account, events: JobEvents = SILENT) -> TaskRecord:
        """The task's state now: from the history if it is finished, else asked of GPTunnel once
        (with quick retries), downloading the image when it is ready."""
        record = await self._known(task_id, account)
        if record is not None and self._finished(record):
            return record
        return await self._step(task_id, account, record, events, attempts=_QUICK_ATTEMPTS)

    async def wait(
        self, task_id: str, account: Account, events: JobEvents = SILENT, *, poll_now: bool = True
    ) -> TaskRecord:
        """Poll until the task is finished or `wait_timeout` has passed; a timeout is no error,
        the task comes back pending. `poll_now=False` waits for the plan's first poll (a fresh task)."""
        started = time.monotonic()
        deadline = started + self.settings.wait_timeout
        record = await self._known(task_id, account)
        plan = await self._plan(record)
        origin = record.submitted_at if record is not None and record.submitted_at else utcnow()
        failures = 0
        last_error: TransientUpstreamError | None = None
        delay = 0.0 if poll_now else max(0.0, plan.next_age(_age(origin)) - _age(origin))
        while record is None or not self._finished(record):
            if time.monotonic() + delay > deadline:
                if record is None and last_error is not None:
                    raise last_error
                break
            await anyio.sleep(delay)
            try:
                record = await self._step(
                    task_id, account, record, events, attempts=1, keep_quiet_polls=False
                )
                failures, last_error = 0, None
                age = _age(origin)
                delay = max(0.0, plan.next_age(age) - age)
                state = record.upstream_status
            except TransientUpstreamError as exc:
                failures, last_error = failures + 1, exc
                # Backoff and Retry-After win over the plan: the upstream asked for room.
                delay = self.backoff.delay(failures, exc.retry_after)
                state = f"retrying after a transient error ({exc})"
                logger.info("task %s: %s", task_id, state)
            age = _age(origin)
            if record is not None and self._finished(record):
                await events.progress(age, age, f"{state}, {age:.0f} s elapsed")
            else:
                await self._report(events, age, plan.timing, state)
        assert record is not None
        return record

    async def _plan(self, record: TaskRecord | None) -> PollPlan:
        if record is None or not record.model:
            return PollPlan(fallback=self.schedule)
        spans = await self.store.durations(record.model, limit=_TIMING_SAMPLES)
        return PollPlan(Timing.from_spans(spans), fallback=self.schedule)

    @staticmethod
    async def _report(events: JobEvents, age: float, timing: Timing | None, state: str) -> None:
        """Progress as age over expected duration: it never goes back, and stays below 100%
        until the image is there, however late the task runs."""
        if timing is None:
            await events.progress(age, None, f"{state}, {age:.0f} s elapsed")
            return
        left = timing.expected - age
        total = max(timing.expected, age / 0.95)
        if left >= 1:
            await events.progress(age, total, f"{state}, about {left:.0f} s left")
        else:
            await events.progress(age, total, f"{state}, taking longer than usual ({age:.0f} s so far)")

    async def advance(self, task_id: str, account: Account) -> tuple[TaskRecord, float]:
        """Move a task on by at most one upstream poll, when the poll plan says one is due, and
        say in how many seconds to ask again. For callers that poll us (the MCP tasks
        extension): the plan, not the caller's pace, decides what GPTunnel sees."""
        record = await self.lookup(task_id, account.owner)
        if self._finished(record) or record.cancelled_at is not None:
            return record, 0.0
        plan = await self._plan(record)
        origin = record.submitted_at or record.created_at
        last = record.last_polled_at
        due = last is None or _age(origin) >= plan.next_age((last - origin).total_seconds())
        retry_in: float | None = None
        if due:
            try:
                record = await self._step(task_id, account, record, SILENT, attempts=1)
            except TransientUpstreamError as exc:
                logger.info("task %s: transient error (%s)", task_id, exc)
                retry_in = self.backoff.delay(1, exc.retry_after)
        age = _age(origin)
        return record, retry_in if retry_in is not None else max(0.0, plan.next_age(age) - age)

    async def cancel(self, task_id: str, account: Account) -> TaskRecord:
        """Stop following a task. GPTunnel has no cancel call, so the image may still be made:
        the task stays in the history and get_result can still fetch it."""
        record = await self.lookup(task_id, account.owner)
        if record.cancelled_at is None and not self._finished(record):
            record.cancelled_at = utcnow()
            await self.store.put(record)
        return record

    async def generate(
        self, request: ImageRequest, account: Account, events: JobEvents = SILENT, *, new_image: bool = False
    ) -> Started:
        started = await self.create(request, account, new_image=new_image)
        record = started.record
        what = "an identical earlier task reused" if started.reused else "created"
        await events.progress(0.0, None, f"task {record.task_id} {what}, {record.upstream_status}")
        record = await self.wait(record.task_id, account, events, poll_now=started.reused)
        return Started(record, started.reused)

    async def _step(
        self,
        task_id: str,
        account: Account,
        record: TaskRecord | None,
        events: JobEvents,
        *,
        attempts: int,
        keep_quiet_polls: bool = True,
    ) -> TaskRecord:
        """One upstream poll; the download when the image is ready. Every change is recorded; a
        poll that changed nothing is too, unless `keep_quiet_polls` is off (a wait that holds the
        record in memory needs no write per poll)."""
        key = _key(account)
        upstream = await self._retry(lambda: self.client.result(task_id, key), attempts=attempts)
        if record is None:
            # A task started elsewhere (another client, GPTunnel's site): adopt it into the history.
            now = utcnow()
            record = TaskRecord(
                task_id=task_id,
                owner=account.owner,
                model=upstream.model or "",
                prompt=upstream.prompt or "",
                created_at=_from_unix(upstream.created_at) or now,
                updated_at=now,
            )
        previous_poll, record.last_polled_at = record.last_polled_at, utcnow()
        status_before = record.upstream_status if previous_poll is not None else None
        _apply(record, upstream)
        if record.upstream_status.lower() == "done" and upstream.url:
            record.source_url = upstream.url
            if record.completed_at is None:
                record.completed_at = record.last_polled_at
                _time_finish(record, previous_poll)
            # Record "done upstream" first: if the download fails the link is not lost.
            await self.store.put(record)
            url = upstream.url
            try:
                record.file = await self._retry(
                    lambda: self.downloader.download(url, task_id),
                    attempts=_QUICK_ATTEMPTS,
                )
            except StorageError as exc:
                # The agent may never have seen this task's id (generate_and_wait): name it.
                raise StorageError(
                    f"{exc}. The task is kept: call get_result with task_id {task_id} to fetch the image."
                ) from None
            except DownloadError:
                if not _stale(record):
                    raise
                # Past GPTunnel's 48 hours the link will never work again: say so once, for good.
                record.status = "failed"
                record.error = "the image's link expired (48 hours) before it could be downloaded"
                await self.store.put(record)
                return record
            record.status = "done"
            record.updated_at = utcnow()
            await self.store.put(record)
            logger.info("task %s stored as %s", task_id, record.file.file_name)
            await events.image_stored(record)
            return record
        if keep_quiet_polls or record.upstream_status != status_before:
            await self.store.put(record)
        return record

    def _finished(self, record: TaskRecord) -> bool:
        if record.status == "failed":
            return True
        return record.status == "done" and record.file is not None and self.folder.exists(record.file)

    # --- reading the history ---------------------------------------------------------------

    async def _known(self, task_id: str, account: Account) -> TaskRecord | None:
        """The caller's record of the task. A task missing from a single user's history is looked
        up at GPTunnel (it may have been started elsewhere); on a multi-user server it is not,
        so nobody reaches another user's task by knowing its id."""
        if self.accounts.multi_user:
            return await self.lookup(task_id, account.owner)
        return await self.lookup_or_none(task_id, account.owner)

    async def lookup_or_none(self, task_id: str, owner: str) -> TaskRecord | None:
        return await self.store.get(check_task_id(task_id), owner)

    async def lookup(self, task_id: str, owner: str) -> TaskRecord:
        record = await self.lookup_or_none(task_id, owner)
        if record is None:
            raise TaskNotFoundError(
                f"no task {task_id} in the history. List known tasks with the resource gptunnel://images."
            )
        return record

    async def history(self, owner: str, *, limit: int = 50, offset: int = 0) -> list[TaskRecord]:
        """The owner's tasks, newest first."""
        return await self.store.recent(owner, limit=limit, offset=offset)

    async def count(self, owner: str) -> int:
        return await self.store.count(owner)

    async def image_bytes(self, record: TaskRecord) -> bytes:
        if record.file is None or not self._finished(record):
            raise TaskNotFoundError(f"task {record.task_id} has no stored image yet; call get_result first.")
        stored = record.file
        return await anyio.to_thread.run_sync(lambda: self.folder.read(stored))

    async def preview(self, stored: StoredFile) -> Preview:
        """A small copy for inline display. Decoding a full image takes tens of MB, so only as
        many run at once as there are cores; the rest queue instead of growing memory."""
        path = self.folder.path(stored)
        max_px = self.settings.preview_max_px
        return await anyio.to_thread.run_sync(make_preview, path, max_px, limiter=self._preview_slots)

    def describe(self, record: TaskRecord, *, reused: bool = False) -> ImageResult:
        """The tool-facing view of a record, with a sentence telling the agent what to do next."""
        result = ImageResult(
            task_id=record.task_id,
            status=record.status,
            upstream_status=record.upstream_status,
            model=record.model,
            prompt=record.prompt,
            aspect_ratio=record.aspect_ratio,
            images=record.images,
            created_at=record.created_at,
            completed_at=record.completed_at,
            source_url=record.source_url,
            source_url_expires_at=record.source_url_expires_at,
            error=record.error,
            message="",
            sandbox=self.settings.sandbox,
        )
        if record.status == "done" and record.file is not None:
            path = self.folder.path(record.file).resolve()
            result.file_path = str(path)
            result.resource_uri = file_uri(record.task_id)
            result.mime_type = record.file.mime_type
            result.size_bytes = record.file.size_bytes
            result.sha256 = record.file.sha256
            result.width = record.file.width
            result.height = record.file.height
            result.message = (
                f"The image is ready: {record.file.width}x{record.file.height}, stored at {path}."
            )
        elif record.status == "failed":
            result.message = (
                f"GPTunnel could not make this image: {record.error}. Change the prompt or the model "
                "and try again."
            )
        else:
            result.message = (
                f"Task {record.task_id} is not finished yet (GPTunnel says '{record.upstream_status}'). "
                f"Call get_result with task_id {record.task_id} in a little while to fetch the image."
            )
        if self.settings.sandbox:
            result.message = "Sandbox mode: made locally, nothing was charged. " + result.message
        if reused:
            result.reused = True
            result.message = (
                f"An identical request made at {record.created_at:%H:%M:%S} UTC was answered with this "
                "task instead of paying for a new image (pass new_image=true to get a fresh one). "
                + result.message
            )
        return result

    # --- plumbing ----------------------------------------------------------------------------

    async def authenticate(self, api_key: str) -> Account:
        """The account of a caller's own key, checked with GPTunnel once and then remembered.

        Raises `AuthenticationError` for a key GPTunnel refuses.
        """
        account = self.accounts.for_key(api_key)
        if not self.accounts.is_known(account):
            await self.balance(account)
            self.accounts.remember(account)
        return account

    async def balance(self, account: Account) -> Balance:
        key = _key(account)
        return await self._retry(lambda: self.client.balance(key), attempts=_QUICK_ATTEMPTS)

    async def _retry(self, call: Callable[[], Awaitable[_T]], *, attempts: int) -> _T:
        for attempt in range(1, attempts + 1):
            try:
                return await call()
            except TransientUpstreamError as exc:
                if attempt == attempts:
                    raise
                delay = self.backoff.delay(attempt, exc.retry_after)
                logger.info("transient failure (%s); retry %d in %.1f s", exc, attempt, delay)
                await anyio.sleep(delay)
        raise AssertionError("unreachable")


def _key(account: Account) -> str:
    if account.api_key is None:
        raise ConfigError(
            "no GPTunnel API key is configured. Set GPTUNNEL_API_KEY in the MCP server's "
            "environment (your client's server config) to the key from your GPTunnel account, "
            "then restart the server."
        )
    return account.api_key


def check_task_id(task_id: str) -> str:
    if not is_task_id(task_id):
        raise InputError(
            f"{task_id[:40]!r} is not a GPTunnel task id: it must be 24 hexadecimal characters, "
            "as returned by create_image."
        )
    return task_id.lower()


def _age(origin: datetime) -> float:
    return (utcnow() - origin).total_seconds()


def _time_finish(record: TaskRecord, previous_poll: datetime | None) -> None:
    """Bracket when GPTunnel finished: between the previous poll and this one."""
    if record.submitted_at is None or record.completed_at is None:
        return
    record.finished_by = (record.completed_at - record.submitted_at).total_seconds()
    if previous_poll is not None and previous_poll > record.submitted_at:
        record.finished_after = (previous_poll - record.submitted_at).total_seconds()


def _stale(record: TaskRecord) -> bool:
    return (
        record.source_url is not None
        and record.source_url_expires_at is not None
        and (record.source_url_expires_at < utcnow())
    )


def _apply(record: TaskRecord, upstream: UpstreamTask) -> None:
    record.upstream_status = upstream.status
    record.updated_at = utcnow()
    if upstream.outcome == "failed":
        record.status = "failed"
        record.error = _failure_text(upstream)
    elif record.status != "done":
        record.status = "pending"


def _failure_text(upstream: UpstreamTask) -> str:
    error = upstream.error
    if isinstance(error, dict):
        error = error.get("message")
    return str(error)[:300] if error else f"the task ended with status '{upstream.status}'"


def _from_unix(value: float | None) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromtimestamp(value, tz=timezone.utc)
    except (OverflowError, OSError, ValueError):
        return None


@contextlib.asynccontextmanager
async def open_engine(settings: Settings) -> AsyncIterator[Engine]:
    """The engine with its store, folder and HTTP clients, closed again on exit."""
    store = SQLiteStore(settings.db_path)
    folder = ImageFolder(settings.images_dir)
    removed = folder.remove_stray_temporaries()
    if removed:
        logger.info("removed %d unfinished download(s) left by an earlier run", removed)
    key = settings.api_key.get_secret_value() if settings.api_key else None
    secret = load_server_secret(settings.home) if settings.multi_user else None
    async with contextlib.AsyncExitStack() as stack:
        base_url = settings.api_base
        if settings.sandbox:
            base_url = await stack.enter_async_context(_sandbox())
            key = key or "sandbox"
        client = GPTunnelClient(base_url, timeout=settings.request_timeout)
        downloader = ImageDownloader(
            folder, timeout=settings.request_timeout, max_bytes=settings.max_image_bytes
        )
        engine = Engine(
            settings=settings,
            store=store,
            folder=folder,
            client=client,
            downloader=downloader,
            accounts=Accounts(Account(owner="", api_key=key), secret),
        )
        try:
            yield engine
        finally:
            with anyio.CancelScope(shield=True):
                await client.aclose()
                await downloader.aclose()
                await store.close()


@contextlib.asynccontextmanager
async def _sandbox() -> AsyncIterator[str]:
    """A stand-in GPTunnel in this process, on a free loopback port: the sandbox's upstream."""
    from .standin import Behaviour, StandIn

    standin = StandIn(api_key=None, behaviour=Behaviour(generation_seconds=3.0, generation_jitter=0.3))
    await anyio.to_thread.run_sync(standin.start)
    logger.info("sandbox mode: images come from a built-in stand-in GPTunnel at %s", standin.url)
    try:
        yield standin.url
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(standin.stop)
