"""The history's interface. The engine talks to this Protocol only, so a second backend (a
shared PostgreSQL for several replicas) is a new class beside `SQLiteStore`, not a rewrite."""

from __future__ import annotations

import math
import statistics
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal, Protocol, runtime_checkable

from ._records import StoredFile, TaskRecord, TaskStatus


@dataclass(frozen=True)
class Cap:
    """At most `limit` create requests per `span` for one owner, counted by this server's clock."""

    limit: int
    span: timedelta
    #: How a person names the span ("hour"), and the setting that set the limit.
    unit: str
    setting: str


@dataclass(frozen=True)
class Budget:
    """At most `limit` roubles per `span` for one owner, counted by this server's clock: what
    GPTunnel reported for the owner's tasks made in the span, an estimate for those of them still
    being made and for creates not yet settled, and an estimate for the creates asked for. A
    model's estimate is the average of its newest `samples` recorded costs, any owner's (the
    price is the model's); for a model with none, see `weigh`."""

    limit: float
    span: timedelta
    #: The setting that set the limit.
    setting: str
    samples: int = 20


@dataclass(frozen=True)
class Charge:
    """One image in a budget's span: when it was made, and what it cost (`recorded`) or is
    estimated to cost; `amount` None: an estimate of a model with no recorded cost."""

    at: datetime
    amount: float | None
    recorded: bool = False


@dataclass(frozen=True)
class Spending:
    """Why a budget refuses a call: `spent`, the recorded costs in its span; `estimated`, the
    estimates for images still being made (or whose create was not answered); `unknown` of
    those are of a model with no recorded cost; the call's `count` creates, estimated at `each`
    roubles (None: unknown); and the moment enough has left the span for the call to fit (None:
    never, the call alone does not fit)."""

    spent: float
    estimated: float
    unknown: int
    each: float | None
    count: int
    frees_at: datetime | None


def average(costs: Sequence[float]) -> float | None:
    """A model's estimate from its recorded costs; None when it has none. The median: one figure
    far off (a broken answer, a price since cut) must not block or free the budget for all."""
    return statistics.median(costs) if costs else None


#: How far back recorded costs make a model's estimate.
COST_MEMORY = timedelta(days=7)


def charges(
    rows: Sequence[tuple[datetime, float | None, str, str]],
    estimates: Mapping[str, float | None],
    *,
    dearest: float | None,
) -> list[Charge]:
    """The budget's charges from (made at, cost, model, status) rows of tasks and unsettled
    creates: a reported cost as it is; an image being made, or a create not known to have made
    one, at its model's estimate (None: unknown); an image made that GPTunnel reported no cost
    for at the estimate too, or at nothing when its model has none (else, with a GPTunnel that
    reports no costs, nothing could ever be made); a failed task at nothing. A create whose
    outcome will never be known ("lost": unanswered past the in-flight window, or answered with
    no task) is counted at its model's estimate, or without one at the `dearest` price recorded
    of any model, or at nothing: it is no longer on its way, and an image of unknown price
    counted as taking all the rest would lock the user out for a whole day."""
    found: list[Charge] = []
    for at, cost, model, status in rows:
        if cost is not None:
            found.append(Charge(at, float(cost), recorded=True))
        elif status == "lost":
            estimate = estimates.get(model)
            found.append(Charge(at, estimate if estimate is not None else dearest or 0.0))
        elif status == "pending":
            found.append(Charge(at, estimates.get(model)))
        elif status == "done" and estimates.get(model) is not None:
            found.append(Charge(at, estimates[model]))
    return found


#: Roubles a sum may be off by float rounding and still be taken at its word.
_ROUNDING = 1e-6


def weigh(budget: Budget, charges: Sequence[Charge], *, each: float | None, count: int) -> Spending | None:
    """Whether `count` creates estimated at `each` roubles fit in `budget` beside the `charges`
    in its span: None if they do, else the facts of the refusal.

    An image of a model with no recorded cost yet (`each` None, or a charge's `amount` None) is
    counted as taking all that is left of the budget until GPTunnel reports what it cost: it is
    made alone, only when the rest leaves room, and nothing else is made while it is being made.
    So nothing of unknown price can run past the budget more than once at a time, and the first
    image of a new model teaches its price for the next."""

    def fits(known: float, unknown: int) -> bool:
        if unknown:
            return False
        if each is None:
            return count == 1 and known < budget.limit - _ROUNDING
        return known + each * count <= budget.limit + _ROUNDING

    known = math.fsum(c.amount for c in charges if c.amount is not None)
    unknown = sum(1 for c in charges if c.amount is None)
    if fits(known, unknown):
        return None
    frees_at = None
    for charge in sorted(charges, key=lambda c: c.at):
        if charge.amount is None:
            unknown -= 1
        else:
            known -= charge.amount
        if fits(known, unknown):
            frees_at = charge.at + budget.span
            break
    return Spending(
        spent=math.fsum(c.amount for c in charges if c.recorded and c.amount is not None),
        estimated=math.fsum(c.amount for c in charges if not c.recorded and c.amount is not None),
        unknown=sum(1 for c in charges if c.amount is None),
        each=each,
        count=count,
        frees_at=frees_at,
    )


@dataclass(frozen=True)
class Spent:
    """An owner's tasks made since a moment: how many, how many of them GPTunnel reported a cost
    for, and the sum of those costs (roubles)."""

    tasks: int
    priced: int
    cost: float


@dataclass(frozen=True)
class Admission:
    """The store's answer to "may this request be created?", decided atomically with every other
    caller's, in this process and in any other on the same store. Exactly one field is set:
    `ticket`, a slot taken for a new create; `reuse`, an identical request's task to answer with;
    `in_flight`, an identical create is on its way right now (ask again shortly); `cap`, the cap
    that refuses it, with `made` creates in its span and the moment enough of them have left it
    (None: never, the call asks for more than the cap); `spending`, why the budget refuses it."""

    ticket: str | None = None
    reuse: TaskRecord | None = None
    in_flight: bool = False
    cap: Cap | None = None
    made: int = 0
    frees_at: datetime | None = None
    spending: Spending | None = None


def cap_refusal(cap: Cap, made: Sequence[datetime], needed: int) -> Admission | None:
    """Whether `needed` more creates fit in `cap` beside those `made` in its span (oldest
    first): None if they do, else the refusal, with the moment enough of the oldest have left
    the span for all of them to fit (None: never, more are needed than the cap allows)."""
    if len(made) + needed <= cap.limit:
        return None
    leave = len(made) + needed - cap.limit
    return Admission(
        cap=cap, made=len(made), frees_at=made[leave - 1] + cap.span if leave <= len(made) else None
    )


@dataclass(frozen=True)
class Search:
    """Which of an owner's tasks `TaskStore.search` finds: each field set narrows it. `text` is
    found anywhere in the prompt, literally (no wildcards) and in any case (`searchable`);
    `model` in any case; `since` includes its own moment."""

    text: str = ""
    model: str | None = None
    status: TaskStatus | None = None
    since: datetime | None = None


@dataclass(frozen=True)
class Position:
    """A place in an owner's history, newest first: tasks are ordered by `created_at`, then by
    `task_id` (unique per owner). Tasks made later come before every position, so a page
    begun at one is the same however many tasks arrive meanwhile."""

    created_at: datetime
    task_id: str


#: How a create request ended: GPTunnel made the task, refused it for sure, or may have made it.
Settlement = Literal["created", "refused", "unknown"]


@dataclass(frozen=True)
class LedgerEntry:
    """One create in the ledger, as `migrate` copies it from one store to another: `state` is
    "sending" until the create is settled as "created" or "unknown" (refused ones leave it)."""

    ticket: str
    owner: str
    request_key: str
    made_at: datetime
    state: str
    task_id: str | None
    model: str = ""


@dataclass(frozen=True)
class Claim:
    """A task as stored, and whether the caller holds its lease now: only the holder polls the
    task at GPTunnel or downloads its image, so several processes on one store never do so twice."""

    record: TaskRecord
    held: bool


class TaskStore(Protocol):
    """One record per GPTunnel task, scoped by `owner` ("" for a single-user server), and the
    ledger of create requests that caps and reuse are decided on."""

    async def put(self, record: TaskRecord) -> None:
        """Insert or update `record`. A done record is never overwritten by a not-done one, so two
        processes finishing the same task in a different order cannot undo each other's work."""
        ...

    async def get(self, task_id: str, owner: str = "") -> TaskRecord | None: ...

    async def done_anywhere(self, task_id: str) -> list[TaskRecord]:
        """Every owner's done record of the task: one, unless two GPTunnel accounts met the same
        id. Not scoped by owner, so only for what the server itself vouched for (a link it
        signed); what a caller asks for is looked up with `get`, in the caller's history."""
        ...

    async def recent(self, owner: str = "", *, limit: int = 50, offset: int = 0) -> list[TaskRecord]:
        """Newest first."""
        ...

    async def count(self, owner: str = "") -> int: ...

    async def search(
        self, owner: str, search: Search, *, after: Position | None = None, limit: int
    ) -> list[TaskRecord]:
        """Up to `limit` of the owner's tasks that `search` finds, newest first (as `Position`
        orders them), from just after `after` (None: from the newest)."""
        ...

    async def durations(self, model: str, *, limit: int) -> list[tuple[float | None, float]]:
        """When the newest finished tasks of `model` were done, as (finished after, finished by)
        seconds after submission (any owner: speed is the model's)."""
        ...

    async def costs(self, model: str, *, limit: int, now: datetime) -> list[float]:
        """What the newest finished tasks of `model` that GPTunnel reported a cost for cost, in
        roubles, newest first, of those made within `COST_MEMORY` before `now` (any owner: the
        price is the model's)."""
        ...

    async def spent(self, owner: str, *, since: datetime) -> Spent:
        """The owner's tasks made since `since`, and what GPTunnel reported they cost."""
        ...

    async def admit(
        self,
        owner: str,
        request_keys: Sequence[str],
        *,
        now: datetime,
        reuse_since: datetime | None,
        in_flight_since: datetime,
        caps: Sequence[Cap],
        budget: Budget | None = None,
        model: str = "",
    ) -> list[Admission]:
        """Decide the creates of one call for an image of `model`, one per request key, as one
        transaction: all of them or none. An identical request's task still pending (its link not
        expired) or done since `reuse_since` is reused (`reuse_since` None: never); if an
        identical create sent since `in_flight_since` is not yet settled, every key is told to
        wait for it; if a cap cannot take all the creates needed, every key is refused with it,
        and so if `budget` cannot (see `weigh`); otherwise each key that needs a create gets a
        ticket, entered in the ledger at `now` with `model`, which counts for the caps and the
        budget until it is settled as refused. The answers are in the order of `request_keys`."""
        ...

    async def settle(self, ticket: str, outcome: Settlement, record: TaskRecord | None = None) -> None:
        """Close a ticket: "created" stores `record` and ties it to the ticket in one step;
        "refused" frees the slot; "unknown" keeps it (the request may have cost money)."""
        ...

    async def claim(self, task_id: str, owner: str, holder: str, *, seconds: float) -> Claim | None:
        """Lease the pending task to `holder` for `seconds` (by the store's clock), when nobody
        holds it, its lease has run out, or `holder` holds it already (then it is renewed);
        None when the task is not stored."""
        ...

    async def leases(
        self, holder: str, *, seconds: float, adopt: int, owners: Sequence[str], made_since: datetime
    ) -> list[TaskRecord]:
        """The tasks `holder` follows to the end, in one transaction: renew its leases on those
        still pending, not cancelled and made since `made_since`; take up to `adopt` more of
        `owners`' such tasks that nobody holds or whose holder let the lease run out (it died);
        return every one it holds now."""
        ...

    async def server_secret(self, adopt: bytes | None = None) -> bytes:
        """The server's secret (32 bytes), made on first use and the same for every process on
        this store: of several asking first at once, one writes it and all read that one.
        `adopt` is the value to make it, if none is stored yet (a secret from an earlier build)."""
        ...

    async def ping(self) -> None:
        """One cheap round trip, answered within a few seconds: `StorageError` saying why (never
        with a password) when the history cannot be used now. For health checks."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class ChangeFeed(Protocol):
    """A store that tells every process on it when one of them changed a task (PostgreSQL's
    LISTEN/NOTIFY). Without one, a process learns of others' changes by reading again."""

    async def listen(self, heard: Callable[[str, str, TaskStatus], Awaitable[None]]) -> None:
        """Until cancelled, call `heard(owner, task_id, status)` for each task another process on
        the store wrote ("done": its image is kept). Reconnects by itself after the database was
        away."""
        ...


@runtime_checkable
class ImageShelf(Protocol):
    """The images themselves, kept where every replica on a shared store can read them, by their
    SHA-256. A store whose images live in one home folder (SQLite) is no shelf: the folder is."""

    async def keep_image(self, stored: StoredFile, data: bytes) -> None:
        """Keep `data`, the bytes `stored` describes, under `stored.sha256`. Bytes kept already
        are not written again."""
        ...

    async def image_bytes(self, sha256: str) -> bytes | None:
        """The bytes kept under `sha256`, or None when there are none. As kept: the caller checks
        them against its record before trusting them."""
        ...


@runtime_checkable
class KeyRing(Protocol):
    """Users' GPTunnel keys, sealed (`_sealing`), where every replica on a shared store can read
    them: a replica's follower finishes the tasks of users it has not seen itself."""

    async def keep_key(self, owner: str, sealed: bytes) -> None:
        """Keep `owner`'s sealed key, replacing the one kept before."""
        ...

    async def sealed_keys(self) -> dict[str, bytes]:
        """Every owner's sealed key."""
        ...


@dataclass(frozen=True)
class OAuthItem:
    """One piece of OAuth state (`_oauth` says what each kind holds): `id` is a client's id, or
    the SHA-256 of a code or token; `grant` the grant it was issued under ("" for none);
    `expires_at` seconds since the epoch; `body` JSON."""

    kind: str
    id: str
    grant: str
    expires_at: float
    body: str


@runtime_checkable
class OAuthRecords(Protocol):
    """OAuth state where every replica on the store sees it. Times are the caller's clock, in
    seconds since the epoch; an item is live until its `expires_at`."""

    async def oauth_put(self, item: OAuthItem) -> None:
        """Keep `item`, replacing the one of its kind and id."""
        ...

    async def oauth_get(self, kind: str, id: str, *, now: float) -> OAuthItem | None:
        """The live item of that kind and id."""
        ...

    async def oauth_spend(self, kind: str, id: str, *, now: float) -> OAuthItem | None:
        """Turn the live item of that kind and id into a "spent" one (same id, grant and expiry)
        and return it as it was; None when there is no such live item. Of several callers at
        once, one gets the item: single use across replicas."""
        ...

    async def oauth_drop(self, grant: str, kinds: Sequence[str] | None = None) -> None:
        """Delete the items issued under `grant` (of `kinds` only, when given)."""
        ...

    async def oauth_sweep(self, *, now: float) -> None:
        """Delete every item past its expiry."""
        ...
