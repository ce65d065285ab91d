"""The history's interface. The engine talks to this Protocol only, so a second backend (a
shared PostgreSQL for several replicas) is a new class beside `SQLiteStore`, not a rewrite."""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from ._records import TaskRecord


class TaskStore(Protocol):
    """One record per GPTunnel task, scoped by `owner` ("" for a single-user server)."""

    async def put(self, record: TaskRecord) -> None:
        """Insert or update `record`. A done record is never overwritten by a not-done one, so two
        processes finishing the same task in a different order cannot undo each other's work."""
        ...

    async def get(self, task_id: str, owner: str = "") -> TaskRecord | None: ...

    async def recent(self, owner: str = "", *, limit: int = 50, offset: int = 0) -> list[TaskRecord]:
        """Newest first."""
        ...

    async def count(self, owner: str = "") -> int: ...

    async def created_since(self, owner: str, since: datetime) -> list[datetime]:
        """Creation times of the owner's tasks from `since` on, oldest first (for the caps)."""
        ...

    async def durations(self, model: str, *, limit: int) -> list[tuple[float | None, float]]:
        """When the newest finished tasks of `model` were done, as (finished after, finished by)
        seconds after submission (any owner: speed is the model's)."""
        ...

    async def find_reusable(self, owner: str, request_key: str, since: datetime) -> TaskRecord | None:
        """The newest task made from the same request that is still pending, or done since `since`."""
        ...

    async def close(self) -> None: ...
