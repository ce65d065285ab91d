"""The job engine: the life of one GPTunnel task. Create it (or reuse an identical one, within
the caps), poll it, download its image, record every step, retry what may be retried.

Every front end (MCP tools and resources, terminal commands) goes through `Engine`; none of
them talks to GPTunnel, the database or the images folder directly. The engine answers in
records and exceptions that carry facts; the words for each audience are the front ends'.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import secrets
import socket
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Protocol, TypeVar
from weakref import WeakValueDictionary

import anyio
import anyio.abc

from ._accounts import Account, Accounts
from ._catalog import Observed, catalogue_spelling, check_options
from ._download import ImageDownloader, keepable_link
from ._exceptions import (
    BudgetExceededError,
    DownloadError,
    FlakyLinkError,
    GPTunnelMCPError,
    ImageNotReadyError,
    InputError,
    MissingKeyError,
    QuotaExceededError,
    StorageError,
    TaskNotFoundError,
    TransientUpstreamError,
    UnknownCreateOutcomeError,
    UpstreamError,
)
from ._export import Destination, Written, write_image
from ._files import ImageFolder
from ._images import PREVIEW_MAX_BYTES, Preview, make_preview
from ._links import check_link, signed_link
from ._records import (
    SOURCE_URL_LIFETIME,
    StoredFile,
    TaskRecord,
    TaskStatus,
    check_task_id,
    is_task_id,
    utcnow,
)
from ._request import ImageRequest, check_public_hosts, referenced_task
from ._schedule import MAX_RETRY_AFTER, Backoff, PollPlan, PollSchedule, Timing
from ._search import SearchPage, next_cursor, read_cursor, scope
from ._settings import Settings
from ._store import (
    Admission,
    Budget,
    Cap,
    ChangeFeed,
    ImageShelf,
    KeyRing,
    Search,
    Settlement,
    Spent,
    TaskStore,
    average,
)
from ._upstream import Balance, GPTunnelClient, UpstreamTask

logger = logging.getLogger("gptunnel_mcp")
_T = TypeVar("_T")

#: Retries of one request inside a single tool call that is not a wait (create, one get_result).
_QUICK_ATTEMPTS = 3
#: How often to look whether another process's identical create has been answered.
_IN_FLIGHT_POLL = 0.1
#: Between a create's time running out and an identical one being allowed: clocks and writes.
_IN_FLIGHT_MARGIN = 5.0
#: Recent tasks of a model whose durations shape the poll plan.
_TIMING_SAMPLES = 10
#: Failed downloads of one task's image, over all calls, after which the task ends as failed.
MAX_DOWNLOAD_FAILURES = 5
#: Images one call may ask for.
MAX_COUNT = 4
#: GPTunnel's own link to an image is sent as a reference only while it lasts this much longer:
#: GPTunnel fetches reference images some time after the create, and its 48 hours started
#: before this server saw the task done.
_LINK_MARGIN = timedelta(hours=1)
#: The window of GPTUNNEL_MAX_SPEND_PER_DAY, and of the spending `get_balance` reports.
BUDGET_SPAN = timedelta(days=1)
#: Recorded costs of a model that make its estimate and the catalogue's average.
COST_SAMPLES = 20
#: Tasks a follower takes over from dead replicas at one look, and follows at once at most.
_ADOPT_BATCH = 50
_FOLLOW_AT_ONCE = 8


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
class Outcome:
    """The task a request was answered with, in its latest known state; `reused` when it is an
    earlier identical request's task rather than a new one."""

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
    #: Where every replica on a shared store finds the images (PostgreSQL): `folder` is then a
    #: cache in front of it. None: the folder is where the images live (SQLite).
    shelf: ImageShelf | None = None
    schedule: PollSchedule = field(default_factory=PollSchedule)
    backoff: Backoff = field(default_factory=Backoff)
    _preview_slots: anyio.CapacityLimiter = field(
        default_factory=lambda: anyio.CapacityLimiter(os.cpu_count() or 2), repr=False
    )
    _read_slots: anyio.CapacityLimiter = field(default_factory=lambda: anyio.CapacityLimiter(2), repr=False)
    #: Whether several processes follow tasks on this store (replicas on one database): then a
    #: task is polled only under its lease, and a server's `follow` finishes every task.
    shared: bool = False
    #: Names this engine in the leases it holds; unique, so that a restarted replica is another.
    holder: str = field(
        default_factory=lambda: f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(4)}"
    )
    _create_locks: WeakValueDictionary[tuple[str, str], anyio.Lock] = field(
        default_factory=WeakValueDictionary, repr=False
    )
    #: One poll of a task at a time in this process, whoever asks (a caller, the follower).
    _poll_locks: WeakValueDictionary[tuple[str, str], anyio.Lock] = field(
        default_factory=WeakValueDictionary, repr=False
    )
    #: Waiters for a task to finish, woken by this process's work or another's notice.
    _finish_events: WeakValueDictionary[tuple[str, str], anyio.Event] = field(
        default_factory=WeakValueDictionary, repr=False
    )
    _image_hooks: list[Callable[[str], Awaitable[None]]] = field(default_factory=list, repr=False)
    #: The accounts whose tasks the follower can poll: each caller's, as they call.
    _accounts_seen: dict[str, Account] = field(default_factory=dict, repr=False)

    # --- starting a task -------------------------------------------------------------------

    async def create(self, request: ImageRequest, account: Account, *, new_image: bool = False) -> Outcome:
        """Start a task upstream and record it before returning, unless an identical request is
        still running or finished moments ago: agents retry calls their client cut off, and
        paying twice for one image is the costliest mistake this server could make.

        Reuse and the caps are decided by the store in one transaction that also takes a slot
        for the new request, so they hold for parallel calls and for every process on the store.
        """
        (outcome,) = await self.create_many(request, account, count=1, new_image=new_image)
        if isinstance(outcome, GPTunnelMCPError):
            raise outcome
        return outcome

    async def create_many(
        self, request: ImageRequest, account: Account, *, count: int, new_image: bool = False
    ) -> list[Outcome | GPTunnelMCPError]:
        """`count` images of one request, as `create` makes one: each is reused or created on
        its own (the n-th image of a request is identical only to the n-th of an identical
        request), but the caps admit all the creates needed or none, before anything is sent.
        The creates then go out in parallel; one that fails is its error in the answer, in its
        place, and does not undo the others. Raises what refuses them all."""
        if not 1 <= count <= MAX_COUNT:
            raise InputError(
                f"ask for 1 to {MAX_COUNT} images in one call, not {count}. Nothing was sent to GPTunnel.",
                argument="count",
            )
        request = catalogue_spelling(request)
        check_options(request)
        key = _key(account)
        # Before the store is asked: a refused request takes no slot.
        outgoing = await self._outgoing(request, account)
        if request.images and not self.settings.sandbox:
            # (The sandbox fetches nothing, and may have no network to look names up on.)
            await check_public_hosts(request)
        request_keys = [request.key(n) for n in range(count)]
        # Identical requests of this process queue here rather than asking the store in a loop.
        lock = self._create_locks.setdefault((account.owner, request_keys[0]), anyio.Lock())
        outcomes: list[Outcome | GPTunnelMCPError | None] = [None] * count
        async with lock:
            admissions = await self._admit(account.owner, request_keys, request.model, new_image=new_image)

            async def create(n: int, ticket: str) -> None:
                try:
                    record = await self._create(request, outgoing, request_keys[n], account, key, ticket)
                    outcomes[n] = Outcome(record, reused=False)
                except GPTunnelMCPError as exc:
                    outcomes[n] = exc

            async with anyio.create_task_group() as group:
                for n, admission in enumerate(admissions):
                    if admission.reuse is not None:
                        logger.info("reusing task %s for an identical request", admission.reuse.task_id)
                        outcomes[n] = Outcome(admission.reuse, reused=True)
                        # Its image may be one another replica downloaded: fetched here now.
                        with contextlib.suppress(StorageError):
                            await self._have(admission.reuse)
                    else:
                        assert admission.ticket is not None
                        group.start_soon(create, n, admission.ticket)
        return [outcome for outcome in outcomes if outcome is not None]

    async def _admit(
        self, owner: str, request_keys: list[str], model: str, *, new_image: bool
    ) -> list[Admission]:
        window = self.settings.reuse_window
        caps = [
            Cap(limit, span, unit, setting)
            for limit, span, unit, setting in (
                (
                    self.settings.max_images_per_hour,
                    timedelta(hours=1),
                    "hour",
                    "GPTUNNEL_MAX_IMAGES_PER_HOUR",
                ),
                (self.settings.max_images_per_day, timedelta(days=1), "day", "GPTUNNEL_MAX_IMAGES_PER_DAY"),
            )
            if limit is not None
        ]
        spend = self.settings.max_spend_per_day
        budget = (
            None if spend is None else Budget(spend, BUDGET_SPAN, "GPTUNNEL_MAX_SPEND_PER_DAY", COST_SAMPLES)
        )
        # A create still unsettled after this long belonged to a process that died on the way:
        # it may have cost money (it counts for the caps) but nobody will finish it.
        in_flight_for = self._create_window()
        while True:
            now = utcnow()
            try:
                admissions = await self.store.admit(
                    owner,
                    request_keys,
                    now=now,
                    reuse_since=None if new_image or window <= 0 else now - timedelta(seconds=window),
                    in_flight_since=now - timedelta(seconds=in_flight_for),
                    caps=caps,
                    budget=budget,
                    model=model,
                )
            except StorageError as exc:
                # Admission comes before anything is sent: say so, it is what a caller worries about.
                raise StorageError(
                    f"{exc.reason}. Nothing was sent to GPTunnel and nothing was charged"
                ) from None
            first = admissions[0]
            if first.cap is not None:
                cap = first.cap
                raise QuotaExceededError(
                    cap=cap.limit,
                    unit=cap.unit,
                    setting=cap.setting,
                    made=first.made,
                    frees_at=first.frees_at,
                    asked=sum(1 for a in admissions if a.reuse is None),
                )
            if first.spending is not None:
                assert budget is not None
                spending = first.spending
                raise BudgetExceededError(
                    budget=budget.limit,
                    unit="day",
                    setting=budget.setting,
                    spent=spending.spent,
                    estimated=spending.estimated,
                    unknown=spending.unknown,
                    model=model,
                    each=spending.each,
                    count=spending.count,
                    frees_at=spending.frees_at,
                )
            if not first.in_flight:
                return admissions
            # Another process is creating this very request: its answer is ours to reuse.
            await anyio.sleep(_IN_FLIGHT_POLL)

    def _create_window(self) -> float:
        """The longest a create may take, its retries and their waits included: an identical
        create unsettled for longer is given up for lost (`_admit`), so no create may outlive it."""
        waits = max(self.backoff.cap, MAX_RETRY_AFTER) * (_QUICK_ATTEMPTS - 1)
        return self.settings.request_timeout * _QUICK_ATTEMPTS + waits + _IN_FLIGHT_MARGIN

    async def _create(
        self,
        request: ImageRequest,
        outgoing: ImageRequest,
        request_key: str,
        account: Account,
        key: str,
        ticket: str,
    ) -> TaskRecord:
        """Create `outgoing`, the request as GPTunnel gets it, and record `request`, as asked."""
        submitted = utcnow()
        try:
            # Only failures that prove the request was not taken on are retried (see `_upstream`).
            # Shielded, within its window: a create the caller gave up on is still answered and
            # recorded, since GPTunnel may be making (and charging for) the image regardless.
            with (
                anyio.CancelScope(shield=True),
                anyio.move_on_after(self._create_window() - _IN_FLIGHT_MARGIN) as window,
            ):
                upstream = await self._retry(
                    lambda: self.client.create(outgoing, key), attempts=_QUICK_ATTEMPTS
                )
            if window.cancelled_caught:
                raise UnknownCreateOutcomeError(
                    "GPTunnel did not answer the request in time; it may still make the image. "
                    "Check your GPTunnel account before asking again"
                )
        except GPTunnelMCPError as exc:
            outcome: Settlement = "unknown" if isinstance(exc, UnknownCreateOutcomeError) else "refused"
            await self._settle(ticket, outcome)
            raise
        except BaseException:
            # Cancelled with the request on its way: it may have been taken on, and paid for.
            await self._settle(ticket, "unknown")
            raise
        if not is_task_id(upstream.id):
            await self._settle(ticket, "unknown")
            raise UpstreamError(
                f"GPTunnel accepted the request but answered with {upstream.id[:40]!r}, which is not a task "
                "id, so the image cannot be followed. It may still be made: check your GPTunnel account."
            )
        now = utcnow()
        record = TaskRecord(
            task_id=upstream.id.lower(),
            owner=account.owner,
            # As asked (in the catalogue's spelling), not as GPTunnel names it: the budget
            # estimates an image by the model it was asked of, before the answer and after.
            model=request.model,
            prompt=request.prompt,
            aspect_ratio=request.aspect_ratio,
            images=request.images,
            # This server's clock: GPTunnel's created_at is its word, and caps and reuse must not
            # depend on it.
            created_at=submitted,
            updated_at=now,
            request_key=request_key,
            submitted_at=submitted,
        )
        _apply(record, upstream)
        try:
            # Shielded: a paid task must be recorded even when the call is being cancelled.
            with anyio.CancelScope(shield=True):
                await self.store.settle(ticket, "created", record)
        except StorageError as exc:
            raise StorageError(
                f"GPTunnel started it, but it could not be recorded ({exc.reason})", task_id=record.task_id
            ) from None
        logger.info("created task %s (model %s)", record.task_id, record.model)
        if self.shared:
            # This process follows it, whether or not the caller waits for it.
            await self._seen(account)
            try:
                await self.store.claim(
                    record.task_id, record.owner, self.holder, seconds=self.settings.lease_seconds
                )
            except StorageError as exc:
                logger.warning("task %s: not leased (%s); a follower adopts it", record.task_id, exc.reason)
        return record

    async def _outgoing(self, request: ImageRequest, account: Account) -> ImageRequest:
        """The request as GPTunnel is to get it: each of the caller's own images that it names by
        its task, as a link GPTunnel can fetch. Raises `InputError` naming `images` for a task
        that is not the caller's, has no image, or cannot be linked to."""
        if not any(referenced_task(image) for image in request.images):
            return request
        images = []
        for image in request.images:
            task_id = referenced_task(image)
            images.append(image if task_id is None else await self._link_to(task_id, account))
        # Validated already: the links are GPTunnel's own storage's, or this server's.
        return request.model_copy(update={"images": images})

    async def _link_to(self, task_id: str, account: Account) -> str:
        """A link to the caller's image of `task_id` that works for a while yet: GPTunnel's own
        while it lasts, else one this server signs (`GPTUNNEL_MCP_PUBLIC_URL`)."""
        # Like every lookup of a caller's: another user's task is no task at all.
        record = await self.lookup_or_none(task_id, account.owner)
        if record is None:
            problem = f"no task {task_id} in the history, so it is none of your images to refer to"
        elif record.status == "pending":
            problem = (
                f"task {task_id} is not finished yet, so it has no image to refer to: wait until it is done"
            )
        elif record.status == "failed" or record.file is None:
            problem = f"task {task_id} failed, so it has no image to refer to"
        else:
            now, expires = utcnow(), record.source_url_expires_at
            if record.source_url is not None and expires is not None and expires - _LINK_MARGIN > now:
                return record.source_url
            gone = f"GPTunnel no longer keeps the image of task {task_id} (it keeps images 48 hours)"
            base = self.settings.public_base
            if base is None:
                address = "the address at which GPTunnel reaches it"
                serve = f"set GPTUNNEL_MCP_PUBLIC_URL to {address}"
                if self.settings.transport != "http":
                    serve = (
                        "run this server over HTTP (GPTUNNEL_MCP_TRANSPORT=http) with "
                        f"GPTUNNEL_MCP_PUBLIC_URL set to {address}"
                    )
                problem = (
                    f"{gone}, and this server has no public address to send it from: {serve}, or pass a "
                    "public URL of the image instead"
                )
            elif not await self._have(record):
                problem = f"{gone}, nor is it stored here any more: pass a public URL of the image instead"
            else:
                return signed_link(self.accounts.secret, base, record.task_id, record.file, now)
        raise InputError(f"{problem}. Nothing was sent to GPTunnel.", argument="images")

    async def linked_image(
        self, task_id: str, sha256: str, expires: str, signature: str
    ) -> tuple[StoredFile, bytes] | None:
        """The image a link made by `_link_to` names, from its parts as they came; None when the
        link is expired, not one this server signed, or its image is no longer here. Raises
        `StorageError` when the history or the image cannot be read now."""
        if not check_link(self.accounts.secret, task_id, sha256, expires, signature, utcnow()):
            return None
        # Any owner's record of it will do: the signature vouches for these very bytes.
        for record in await self.store.done_anywhere(task_id):
            stored = record.file
            if stored is None or stored.sha256 != sha256 or not await self._have(record):
                continue
            data = await anyio.to_thread.run_sync(self.folder.read_bytes, stored, limiter=self._read_slots)
            if data is not None:
                return stored, data
        return None

    async def _settle(self, ticket: str, outcome: Settlement) -> None:
        with anyio.CancelScope(shield=True):
            try:
                await self.store.settle(ticket, outcome)
            except StorageError as exc:
                # The slot stays taken: a cap errs on the side of money not spent.
                logger.warning("could not settle create %s as %s: %s", ticket, outcome, exc)

    # --- following a task ------------------------------------------------------------------

    async def refresh(self, task_id: str, account: Account, events: JobEvents = SILENT) -> TaskRecord:
        """The task's state now: from the history if it is finished, else asked of GPTunnel once
        (with quick retries), downloading the image when it is ready."""
        # One spelling from here on: leases, locks and GPTunnel itself know the task by it.
        task_id = check_task_id(task_id)
        record = await self._known(task_id, account)
        if record is not None and await self._have(record):
            return record
        deadline = time.monotonic() + self.settings.wait_timeout
        return await self._step(task_id, account, record, events, attempts=_QUICK_ATTEMPTS, deadline=deadline)

    async def wait(
        self,
        task_id: str,
        account: Account,
        events: JobEvents = SILENT,
        *,
        poll_now: bool = True,
        deadline: float | None = None,
    ) -> TaskRecord:
        """Poll until the task is finished or `wait_timeout` has passed (or the monotonic
        `deadline` of a call that began earlier), the image's download included; a timeout is no
        error, the task comes back pending. `poll_now=False` waits for the plan's first poll (a
        fresh task)."""
        if deadline is None:
            deadline = time.monotonic() + self.settings.wait_timeout
        task_id = check_task_id(task_id)
        record = await self._known(task_id, account)
        plan = await self._plan(record)
        origin = record.submitted_at if record is not None and record.submitted_at else utcnow()
        failures = 0
        last_error: TransientUpstreamError | None = None
        delay = 0.0 if poll_now else max(0.0, plan.next_age(_age(origin)) - _age(origin))
        while record is None or not await self._have(record):
            if time.monotonic() + delay > deadline:
                if record is None and last_error is not None:
                    raise last_error
                break
            await self._nap(account.owner, task_id, delay)
            try:
                record = await self._step(
                    task_id, account, record, events, attempts=1, keep_quiet_polls=False, deadline=deadline
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
            if record is not None and await self._have(record):
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
        task_id = check_task_id(task_id)
        record = await self.lookup(task_id, account.owner)
        if await self._have(record) or record.cancelled_at is not None:
            return record, 0.0
        plan = await self._plan(record)
        origin = record.submitted_at or record.created_at
        retry_in: float | None = None
        if _due(record, plan):
            try:
                deadline = time.monotonic() + self.settings.wait_timeout
                record = await self._step(task_id, account, record, SILENT, attempts=1, deadline=deadline)
            except TransientUpstreamError as exc:
                logger.info("task %s: transient error (%s)", task_id, exc)
                retry_in = self.backoff.delay(1, exc.retry_after)
        age = _age(origin)
        return record, retry_in if retry_in is not None else max(0.0, plan.next_age(age) - age)

    async def cancel(self, task_id: str, account: Account) -> TaskRecord:
        """Stop following a task. GPTunnel has no cancel call, so the image may still be made:
        the task stays in the history and get_result can still fetch it."""
        record = await self.lookup(task_id, account.owner)
        if record.cancelled_at is None and not await self._have(record):
            record.cancelled_at = utcnow()
            await self.store.put(record)
        return record

    async def generate(
        self, request: ImageRequest, account: Account, events: JobEvents = SILENT, *, new_image: bool = False
    ) -> Outcome:
        (outcome,) = await self.generate_many(request, account, events, count=1, new_image=new_image)
        if isinstance(outcome, GPTunnelMCPError):
            raise outcome
        return outcome

    async def generate_many(
        self,
        request: ImageRequest,
        account: Account,
        events: JobEvents = SILENT,
        *,
        count: int,
        new_image: bool = False,
    ) -> list[Outcome | GPTunnelMCPError]:
        """`create_many`, then wait for every image at once, as one job for `events`: its
        progress is the sum of the images' (each grows, so the sum does). The wait timeout bounds
        the whole call: creating, waiting and downloading."""
        deadline = time.monotonic() + self.settings.wait_timeout
        started = await self.create_many(request, account, count=count, new_image=new_image)
        outcomes: list[Outcome | GPTunnelMCPError] = list(started)
        parts = _Parts(events, len(outcomes))

        async def follow(n: int, begun: Outcome) -> None:
            record = begun.record
            what = "an identical earlier task reused" if begun.reused else "created"
            part = parts.part(n)
            await part.progress(0.0, None, f"task {record.task_id} {what}, {record.upstream_status}")
            try:
                record = await self.wait(
                    record.task_id, account, part, poll_now=begun.reused, deadline=deadline
                )
                outcomes[n] = Outcome(record, begun.reused)
            except GPTunnelMCPError as exc:
                outcomes[n] = exc

        async with anyio.create_task_group() as group:
            for n, begun in enumerate(started):
                if isinstance(begun, Outcome):
                    group.start_soon(follow, n, begun)
        return outcomes

    async def _step(
        self,
        task_id: str,
        account: Account,
        record: TaskRecord | None,
        events: JobEvents,
        *,
        attempts: int,
        deadline: float,
        keep_quiet_polls: bool = True,
    ) -> TaskRecord:
        """One upstream poll; the download when the image is ready; neither past the monotonic
        `deadline`. Every change is recorded; a poll that changed nothing is too, unless
        `keep_quiet_polls` is off (a wait that holds the record in memory needs no write per poll).

        Where several processes follow tasks (`shared`), a known task is polled only under its
        lease, and not again when someone polled it since `record` was read: the caller gets
        the stored record instead, which the holder keeps up to date."""
        key = _key(account)
        async with self._poll_locks.setdefault((account.owner, task_id), anyio.Lock()):
            if self.shared and record is not None:
                await self._seen(account)
                claim = await self.store.claim(
                    task_id, account.owner, self.holder, seconds=self.settings.lease_seconds
                )
                if claim is not None:
                    stored = claim.record
                    if await self._have(stored):
                        return stored
                    # A cancel made elsewhere since `record` was read must survive this poll's write.
                    record.cancelled_at = record.cancelled_at or stored.cancelled_at
                    # A done task whose image is in no home and not in the database is polled
                    # again for its link, by whoever asks: a repair, not the usual way.
                    if stored.status == "pending" and (not claim.held or _polled_since(stored, record)):
                        return stored
            return await self._poll(
                task_id,
                account,
                key,
                record,
                events,
                attempts=attempts,
                deadline=deadline,
                keep_quiet_polls=keep_quiet_polls,
            )

    async def _poll(
        self,
        task_id: str,
        account: Account,
        key: str,
        record: TaskRecord | None,
        events: JobEvents,
        *,
        attempts: int,
        deadline: float,
        keep_quiet_polls: bool,
    ) -> TaskRecord:
        upstream: UpstreamTask | None = None
        try:
            with anyio.move_on_after(_left(deadline)):
                upstream = await self._retry(lambda: self.client.result(task_id, key), attempts=attempts)
        except TaskNotFoundError:
            if record is None:
                raise
            # GPTunnel has forgotten it (code 4): no poll will ever finish it, and an identical
            # request must make a new image rather than be answered with this one.
            record.status, record.updated_at = "failed", utcnow()
            record.error = "GPTunnel no longer knows this task (code 4); make the image again"
            await self.store.put(record)
            await self._announce(record)
            return record
        if upstream is None:
            # The call's time ran out before GPTunnel answered: nothing is known that was not before.
            if record is None:
                raise TransientUpstreamError("GPTunnel did not answer within the time this call may take")
            return record
        if record is None:
            # A task started elsewhere (another client, GPTunnel's site): adopt it into the history.
            now = utcnow()
            record = TaskRecord(
                task_id=task_id,
                owner=account.owner,
                model=upstream.model or "",
                prompt=upstream.prompt or "",
                # Never in the future: GPTunnel's clock must not reorder the history.
                created_at=min(_from_unix(upstream.created_at) or now, now),
                updated_at=now,
            )
        previous_poll, record.last_polled_at = record.last_polled_at, utcnow()
        status_before = record.upstream_status if previous_poll is not None else None
        _apply(record, upstream)
        link = upstream.url
        if upstream.outcome == "done" and link:
            # GPTunnel's word: a link too long to be one, or with credentials, is not kept.
            record.source_url = link if keepable_link(link) else None
            if record.completed_at is None:
                record.completed_at = record.last_polled_at
                _time_finish(record, previous_poll)
            # Record "done upstream" first: if the download fails the link is not lost.
            await self.store.put(record)
            return await self._fetch_image(record, link, events, deadline=deadline)
        if keep_quiet_polls or record.upstream_status != status_before:
            await self.store.put(record)
        if record.status == "failed":
            await self._announce(record)
        return record

    async def _fetch_image(
        self, record: TaskRecord, url: str, events: JobEvents, *, deadline: float
    ) -> TaskRecord:
        """Download a done task's image. When the call's time runs out first, nothing is stored
        and the task stays pending, to be fetched by a later call."""
        task_id, owner = record.task_id, record.owner
        stored: StoredFile | None = None
        try:
            with anyio.move_on_after(_left(deadline)):
                stored = await self._retry(
                    lambda: self.downloader.download(url, task_id, owner), attempts=_QUICK_ATTEMPTS
                )
        except StorageError as exc:
            # The caller may never have seen this task's id (generate_and_wait): name it.
            raise StorageError(exc.reason, task_id=task_id) from None
        except (DownloadError, FlakyLinkError) as exc:
            return await self._download_failed(record, exc)
        if stored is None:
            logger.info("task %s: the call's time ran out during the download; it stays pending", task_id)
            return record
        if self.shelf is not None:
            await self._shelve(task_id, stored, self.shelf)
        record.file = stored
        record.status = "done"
        record.updated_at = utcnow()
        await self.store.put(record)
        logger.info("task %s stored as %s", task_id, stored.file_name)
        await events.image_stored(record)
        await self._announce(record)
        return record

    async def _shelve(self, task_id: str, stored: StoredFile, shelf: ImageShelf) -> None:
        """Put a download on the shelf before its task is recorded as done, so that no replica
        sees the task done without the image to serve. Until then the task stays pending, and a
        later poll downloads it again."""
        try:
            data = await anyio.to_thread.run_sync(self.folder.read_bytes, stored)
            if data is None:
                raise StorageError(f"the image {stored.file_name} changed in the folder before it was kept")
            await shelf.keep_image(stored, data)
        except StorageError as exc:
            raise StorageError(exc.reason, task_id=task_id) from None

    async def _download_failed(self, record: TaskRecord, exc: DownloadError | FlakyLinkError) -> TaskRecord:
        """Count a failed download; the `MAX_DOWNLOAD_FAILURES`th ends the task, as does a link
        past its 48 hours. Returns the ended task, or raises for the caller to try again later."""
        reason = exc.reason if isinstance(exc, DownloadError) else str(exc)
        record.updated_at = utcnow()
        if isinstance(exc, DownloadError) and _stale(record):
            # Past GPTunnel's 48 hours the link will never work again: say so once, for good.
            record.status = "failed"
            record.error = "the image's link expired (48 hours) before it could be downloaded"
            await self.store.put(record)
            await self._announce(record)
            return record
        record.download_failures += 1
        failures = record.download_failures
        if failures >= MAX_DOWNLOAD_FAILURES:
            # A link that fails this often is broken, not unlucky: stop trying it on every call.
            record.status = "failed"
            record.error = (
                f"the image could not be downloaded ({failures} attempts failed; the last: {reason})"
            )
            await self.store.put(record)
            logger.warning("task %s failed: %s", record.task_id, record.error)
            await self._announce(record)
            return record
        await self.store.put(record)
        if isinstance(exc, FlakyLinkError):
            raise exc
        raise DownloadError(
            f"{reason.rstrip('.')} (failed download {failures} of {MAX_DOWNLOAD_FAILURES}; then the task "
            "ends as failed).",
            task_id=record.task_id,
        ) from None

    # --- following tasks across processes --------------------------------------------------

    async def _seen(self, account: Account) -> None:
        """Remember a caller's account, whose tasks the follower may then poll; on a multi-user
        server on a shared store, for every replica (its key sealed in the store)."""
        if account.api_key is None or account.owner in self._accounts_seen:
            return
        self._accounts_seen[account.owner] = account
        if self.accounts.multi_user and isinstance(self.store, KeyRing):
            from ._sealing import seal

            try:
                await self.store.keep_key(
                    account.owner, seal(self.accounts.secret, account.owner, account.api_key)
                )
            except StorageError as exc:
                logger.warning("could not keep a user's key for the other replicas: %s", exc.reason)

    async def _keys_kept(self) -> None:
        """Take up the accounts other replicas sealed in the store (multi-user servers), so that
        this one can finish their tasks too."""
        if not (self.accounts.multi_user and isinstance(self.store, KeyRing)):
            return
        from ._sealing import unseal

        for owner, sealed in (await self.store.sealed_keys()).items():
            if owner not in self._accounts_seen:
                key = unseal(self.accounts.secret, owner, sealed)
                if key is not None:
                    self._accounts_seen[owner] = Account(owner=owner, api_key=key)

    def on_image_stored(self, hook: Callable[[str], Awaitable[None]]) -> None:
        """Call `hook(owner)` whenever an image of `owner` is kept, by this process or, on a
        store with a change feed, by another."""
        self._image_hooks.append(hook)

    async def _announce(self, record: TaskRecord) -> None:
        """The task finished here: wake its waiters, and tell who wants to know of new images."""
        await self._heard(record.owner, record.task_id, record.status)

    async def _heard(self, owner: str, task_id: str, status: TaskStatus) -> None:
        if status == "pending":
            return
        event = self._finish_events.pop((owner, task_id), None)
        if event is not None:
            event.set()
        if status == "done":
            for hook in self._image_hooks:
                try:
                    await hook(owner)
                except Exception:  # a listener's failure is not the job's
                    logger.exception("an image-stored listener failed")

    async def _nap(self, owner: str, task_id: str, seconds: float) -> None:
        """Sleep `seconds`, or less when the task finishes meanwhile (here or elsewhere)."""
        if seconds <= 0:
            return
        event = self._finish_events.setdefault((owner, task_id), anyio.Event())
        with anyio.move_on_after(seconds):
            await event.wait()

    async def follow(self) -> None:
        """Run for a server's life where several processes share the store (`shared`): every
        lease/3 s, renew this process's leases, adopt the tasks of processes that died (their
        lease ran out), and poll each task held when its plan says so, downloading its image
        when ready. So every task is finished by somebody, with nobody asking."""
        if self.accounts.default.api_key is not None:
            self._accounts_seen.setdefault(self.accounts.default.owner, self.accounts.default)
        follower = _Follower(self)
        async with anyio.create_task_group() as group:
            if isinstance(self.store, ChangeFeed):
                group.start_soon(self.store.listen, self._heard)
            while True:
                try:
                    await follower.look(group)
                except Exception:
                    # Whatever went wrong with this look, the next may go right: the follower
                    # must outlive it, or nobody finishes this replica's tasks.
                    logger.exception("following tasks failed; trying again shortly")
                await anyio.sleep(self.settings.lease_seconds / 3)

    async def _have(self, record: TaskRecord) -> bool:
        """Whether the task is finished: failed, or done with its image in the folder, where an
        image another replica downloaded is restored now from the shelf. Raises `StorageError`
        when the shelf cannot be read or its copy is not the recorded image."""
        if record.status == "failed":
            return True
        stored = record.file
        if record.status != "done" or stored is None:
            return False
        if self.folder.exists(stored):
            return True
        data = None if self.shelf is None else await self.shelf.image_bytes(stored.sha256)
        if data is None:
            return False
        await anyio.to_thread.run_sync(self.folder.restore, stored, data)
        logger.info("task %s: image restored into the folder from the shared store", record.task_id)
        return True

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
            raise TaskNotFoundError(task_id)
        return record

    async def history(self, owner: str, *, limit: int = 50, offset: int = 0) -> list[TaskRecord]:
        """The owner's tasks, newest first."""
        return await self.store.recent(owner, limit=limit, offset=offset)

    async def count(self, owner: str) -> int:
        return await self.store.count(owner)

    async def search(
        self, owner: str, search: Search, *, limit: int, cursor: str | None = None
    ) -> SearchPage:
        """A page of the owner's tasks that `search` finds, newest first, `limit` at most;
        `cursor`, a page's own, continues after it. Raises `InputError` for a cursor that is not
        one of this search's."""
        made_for = scope(owner, search)
        after = None if cursor is None else read_cursor(cursor, made_for)
        # One more than asked: whether it comes says whether a next page does.
        records = await self.store.search(owner, search, after=after, limit=limit + 1)
        shown = records[:limit]
        return SearchPage(shown, next_cursor(shown[-1], made_for) if len(records) > limit else None)

    async def spent(self, owner: str) -> Spent:
        """The owner's tasks made in the budget's window (the last 24 hours), and what GPTunnel
        reported they cost."""
        return await self.store.spent(owner, since=utcnow() - BUDGET_SPAN)

    async def observed(self, model: str) -> Observed:
        """What this server has seen of `model` lately: the average of its newest recorded costs
        (what the budget estimates an image of it at) and of its newest durations."""
        costs = await self.store.costs(model, limit=COST_SAMPLES, now=utcnow())
        spans = await self.store.durations(model, limit=COST_SAMPLES)
        return Observed(
            average_cost=average(costs),
            cost_samples=len(costs),
            average_seconds=statistics.fmean(Timing.middle(*span) for span in spans) if spans else None,
            duration_samples=len(spans),
        )

    async def image_base64(self, record: TaskRecord) -> str:
        """The stored image as base64 text. A read holds about 2.7 times the image's size until it
        is sent, so only a few run at once; the rest queue instead of growing memory."""
        stored = await self._stored(record)
        return await anyio.to_thread.run_sync(self.folder.read_base64, stored, limiter=self._read_slots)

    async def export(
        self, task_id: str, account: Account, destination: Destination, *, overwrite: bool
    ) -> Written:
        """Copy the caller's image of `task_id` to `destination` (see `write_image`). Converting
        decodes the whole image, so exports share the previews' slots."""
        record = await self.lookup(task_id, account.owner)
        stored = await self._stored(record)
        write = functools.partial(
            write_image, self.folder.path(stored), stored, destination, overwrite=overwrite
        )
        return await anyio.to_thread.run_sync(write, limiter=self._preview_slots)

    async def _stored(self, record: TaskRecord) -> StoredFile:
        """The record's image, there in the folder; `ImageNotReadyError` when there is none."""
        if record.status == "failed":
            raise ImageNotReadyError(record.task_id, failed=record.error or "no reason was given")
        if record.file is None or not await self._have(record):
            raise ImageNotReadyError(record.task_id)
        return record.file

    async def preview(self, stored: StoredFile, *, share: int = 1) -> Preview:
        """A small copy for inline display, made once and then kept beside the image; `share`:
        one of that many shown together, which share one preview's size and byte budget.

        Decoding a full image takes tens of MB, so only as many run at once as there are cores;
        the rest queue instead of growing memory. Raises `StorageError` for an image that cannot
        be previewed (more pixels than `max_image_pixels`, or damaged): the image itself is kept.
        """
        max_px = max(64, round(self.settings.preview_max_px / math.sqrt(share)))
        return await self.scaled(stored, max_px, PREVIEW_MAX_BYTES // share)

    async def scaled(self, stored: StoredFile, max_px: int, max_bytes: int) -> Preview:
        """A copy of the image no larger than `max_px` on its long side and `max_bytes`, made
        once and kept beside it; raises `StorageError` as `preview` does."""
        kept = await anyio.to_thread.run_sync(self.folder.read_preview, stored, max_px, max_bytes)
        if kept is not None:
            return kept
        path, max_pixels = self.folder.path(stored), self.settings.max_image_pixels
        try:
            preview = await anyio.to_thread.run_sync(
                make_preview, path, max_px, max_pixels, max_bytes, limiter=self._preview_slots
            )
        except FileNotFoundError:
            raise StorageError(f"the stored image {stored.file_name} is missing") from None
        except ValueError as exc:
            raise StorageError(f"the stored image {stored.file_name} cannot be previewed: {exc}") from None
        except OSError as exc:
            raise StorageError(f"cannot read the stored image {stored.file_name}: {exc.strerror}") from None
        await anyio.to_thread.run_sync(self.folder.keep_preview, stored, max_px, max_bytes, preview)
        return preview

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


class _Follower:
    """`Engine.follow`'s state: the tasks it is stepping now, and how many at once."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._busy: set[tuple[str, str]] = set()
        self._slots = anyio.CapacityLimiter(_FOLLOW_AT_ONCE)

    async def look(self, group: anyio.abc.TaskGroup) -> None:
        """Renew and adopt leases, and start a step for each task held whose poll is due."""
        engine = self._engine
        try:
            # Finished rather than cut off by a stop: psycopg gives up a connection whose
            # statement was cancelled, with a warning.
            with anyio.CancelScope(shield=True):
                await engine._keys_kept()
                held = await engine.store.leases(
                    engine.holder,
                    seconds=engine.settings.lease_seconds,
                    adopt=_ADOPT_BATCH,
                    owners=list(engine._accounts_seen),
                    made_since=utcnow() - SOURCE_URL_LIFETIME,
                )
        except StorageError as exc:
            logger.warning("cannot renew this replica's leases: %s", exc.reason)
            return
        plans: dict[str, PollPlan] = {}
        for record in held:
            task = (record.owner, record.task_id)
            account = engine._accounts_seen.get(record.owner)
            polling = engine._poll_locks.get(task)
            if task in self._busy or account is None or (polling is not None and polling.locked()):
                continue
            if record.model not in plans:
                plans[record.model] = await engine._plan(record)
            if _due(record, plans[record.model]):
                self._busy.add(task)
                group.start_soon(self._step, record, account)

    async def _step(self, record: TaskRecord, account: Account) -> None:
        engine = self._engine
        try:
            async with self._slots:
                deadline = time.monotonic() + engine.settings.wait_timeout
                await engine._step(record.task_id, account, record, SILENT, attempts=1, deadline=deadline)
        except GPTunnelMCPError as exc:
            logger.info("following task %s: %s", record.task_id, exc)
        except Exception:
            logger.exception("following task %s failed", record.task_id)
        finally:
            self._busy.discard((record.owner, record.task_id))


class _Parts:
    """One job's events for several images: progress is the sum of theirs, the message the
    latest image's, prefixed with which image it is."""

    def __init__(self, events: JobEvents, count: int) -> None:
        self.events = events
        self.count = count
        self.progress = [0.0] * count
        self.totals: list[float | None] = [None] * count

    def part(self, n: int) -> JobEvents:
        return _Part(self, n)


class _Part:
    def __init__(self, parts: _Parts, n: int) -> None:
        self._parts = parts
        self._n = n

    async def progress(self, progress: float, total: float | None, message: str) -> None:
        parts, n = self._parts, self._n
        parts.progress[n], parts.totals[n] = progress, total
        known = [t for t in parts.totals if t is not None]
        prefix = f"image {n + 1} of {parts.count}: " if parts.count > 1 else ""
        total_known = sum(known) if len(known) == parts.count else None
        await parts.events.progress(sum(parts.progress), total_known, prefix + message)

    async def image_stored(self, record: TaskRecord) -> None:
        await self._parts.events.image_stored(record)


def _key(account: Account) -> str:
    if account.api_key is None:
        raise MissingKeyError()
    return account.api_key


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _age(origin: datetime) -> float:
    return (utcnow() - origin).total_seconds()


def _time_finish(record: TaskRecord, previous_poll: datetime | None) -> None:
    """Bracket when GPTunnel finished: between the previous poll and this one."""
    if record.submitted_at is None or record.completed_at is None:
        return
    record.finished_by = (record.completed_at - record.submitted_at).total_seconds()
    if previous_poll is not None and previous_poll > record.submitted_at:
        record.finished_after = (previous_poll - record.submitted_at).total_seconds()


def _polled_since(stored: TaskRecord, mine: TaskRecord) -> bool:
    """Whether someone polled the task after the poll `mine` knows of."""
    return stored.last_polled_at is not None and (
        mine.last_polled_at is None or stored.last_polled_at > mine.last_polled_at
    )


def _due(record: TaskRecord, plan: PollPlan) -> bool:
    origin = record.submitted_at or record.created_at
    last = record.last_polled_at
    return last is None or _age(origin) >= plan.next_age((last - origin).total_seconds())


def _stale(record: TaskRecord) -> bool:
    return (
        record.source_url is not None
        and record.source_url_expires_at is not None
        and (record.source_url_expires_at < utcnow())
    )


def _apply(record: TaskRecord, upstream: UpstreamTask) -> None:
    if not upstream.status_known and upstream.status != record.upstream_status:
        # Once per change, for the operator: a new word may mean done or failed, and its tasks
        # would then stay pending until their wait ends.
        logger.warning(
            "task %s: GPTunnel reports the status %r, which this server does not know; it is read as "
            "still being made",
            record.task_id,
            upstream.status[:40],
        )
    record.upstream_status = upstream.status
    record.updated_at = utcnow()
    if upstream.cost is not None and upstream.outcome != "pending":
        # The price of a finished image only: a figure given while it is being made may be no
        # price at all, and the budget would take it at its word. An answer without the figure
        # does not unsay one given before.
        record.cost = upstream.cost
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
