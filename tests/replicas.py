"""Several real server processes on one PostgreSQL database: the replicas of a deployment, for
the end-to-end tests (tests/test_replicas.py) and the benchmark (bench/replicas.py).

Each replica is `python -m gptunnel_mcp --transport http` on a loopback port of its own, with a
`GPTUNNEL_MCP_HOME` of its own (its local cache) and the same database and GPTunnel as the rest.
`Replicas.kill` ends one with SIGKILL, as a crashed machine ends: no shutdown code runs.
`Replicas.connect` gives a `RoundRobin` client, which speaks 2026-07-28 (stateless: no session
ties a client to a replica) and sends each call to the next live replica in turn, as a load
balancer would.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import CallToolResult

from .processes import free_port, stop_server, until_healthy

__all__ = ["Replica", "Replicas", "RoundRobin", "replica_settings"]


def replica_settings(
    *, api_key: str, base_url: str, database_url: str, lease_seconds: float, **env: str
) -> dict[str, str]:
    """What every replica of one deployment is given: one key, one GPTunnel, one database, one
    lease; `env` adds or overrides variables (e.g. `GPTUNNEL_MAX_IMAGES_PER_HOUR="3"`)."""
    return {
        "GPTUNNEL_API_KEY": api_key,
        "GPTUNNEL_BASE_URL": base_url,
        "GPTUNNEL_MCP_DATABASE_URL": database_url,
        "GPTUNNEL_MCP_LEASE_SECONDS": format(lease_seconds, "g"),
        "GPTUNNEL_WAIT_TIMEOUT": "30",
        **env,
    }


@dataclass
class Replica:
    index: int
    home: Path
    log: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    #: Where the current process's part of the log begins (earlier runs' parts come before).
    log_start: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int:
        assert self.process is not None, f"replica {self.index} was never started"
        return self.process.pid


class Replicas:
    """`count` replicas under `root` (`root/replica-N/` is replica N's home, `root/replica-N.log`
    what it wrote to stderr, kept across restarts), all given `settings` (see `replica_settings`)."""

    def __init__(
        self, count: int, root: Path, settings: Mapping[str, str], *, log_level: str = "DEBUG"
    ) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.settings = dict(settings)
        self.log_level = log_level
        self.members = [Replica(i, root / f"replica-{i}", root / f"replica-{i}.log") for i in range(count)]

    async def __aenter__(self) -> Replicas:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.stop()

    def __getitem__(self, index: int) -> Replica:
        return self.members[index]

    @property
    def alive(self) -> list[Replica]:
        return [r for r in self.members if r.alive]

    async def start(self) -> None:
        """Starts every replica that is not running (all at once: each takes about a second to
        come up), on a fresh port; returns when all of them answer /healthz."""
        starting = [r for r in self.members if not r.alive]
        # They share the machine while they start: the bound grows with their number.
        bound = 20 * len(starting)
        try:
            for replica in starting:
                self._launch(replica)
            with anyio.fail_after(bound):
                for replica in starting:
                    await self._until_up(replica, bound)
        except BaseException:
            self.stop()
            raise

    def _launch(self, replica: Replica) -> None:
        replica.port = free_port()
        command = [sys.executable, "-m", "gptunnel_mcp", "--transport", "http"]
        command += ["--port", str(replica.port), "--log-level", self.log_level]
        env = {**self.settings, "GPTUNNEL_MCP_HOME": str(replica.home), "PATH": os.environ.get("PATH", "")}
        replica.log_start = replica.log.stat().st_size if replica.log.exists() else 0
        with replica.log.open("ab") as log:
            replica.process = subprocess.Popen(
                command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )

    async def _until_up(self, replica: Replica, seconds: float) -> None:
        """Waits for /healthz; a replica whose port was taken between `free_port` and its own
        bind (by anything else on the machine) is started again on another port."""
        for _ in range(3):
            assert replica.process is not None
            try:
                await until_healthy(replica.process, replica.port, seconds=seconds)
                return
            except RuntimeError as exc:
                with replica.log.open("rb") as log:
                    log.seek(replica.log_start)
                    said = log.read().decode(errors="replace")
                if "choose another --port" not in said:
                    raise RuntimeError(f"replica {replica.index}: {exc}; it wrote:\n{said[-3000:]}") from None
                self._launch(replica)
        raise RuntimeError(f"replica {replica.index} found no free port in 3 tries")

    def kill(self, index: int) -> None:
        """SIGKILL: the replica ends at once, in whatever it was doing."""
        replica = self.members[index]
        assert replica.process is not None and replica.alive, f"replica {index} is not running"
        replica.process.send_signal(signal.SIGKILL)
        replica.process.wait(timeout=10)

    def stop(self, *indices: int) -> None:
        """Stops these replicas (all, when none is named) as an operator would: SIGTERM."""
        for replica in [self.members[i] for i in indices] or self.members:
            if replica.process is not None:
                stop_server(replica.process)

    def logs(self, lines: int = 30) -> str:
        """The last `lines` each replica wrote, under a heading: for a failing test's message."""
        logs = [(r.index, r.log) for r in self.members if r.log.exists()]
        return "".join(
            f"--- replica {index}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) + "\n"
            for index, log in logs
        )

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[RoundRobin]:
        """A client for each live replica, as one `RoundRobin`."""
        limits = httpx2.Limits(max_connections=100, max_keepalive_connections=100)
        async with contextlib.AsyncExitStack() as stack:
            clients: dict[int, Client] = {}
            for replica in self.alive:
                http = await stack.enter_async_context(
                    httpx2.AsyncClient(timeout=httpx2.Timeout(30, read=120), limits=limits)
                )
                # A pinned modern version: no discovery round trip, and nothing kept per replica.
                transport = streamable_http_client(replica.url, http_client=http)
                clients[replica.index] = await stack.enter_async_context(
                    Client(transport, mode="2026-07-28", cache=None)
                )
            yield RoundRobin(self, clients)


class RoundRobin:
    """Sends each call to the next live replica in turn; `on(i)` is replica i's own client, for
    a call that must reach one replica in particular."""

    def __init__(self, replicas: Replicas, clients: dict[int, Client]) -> None:
        self._replicas = replicas
        self._clients = clients
        self._turns = itertools.cycle(sorted(clients))

    def on(self, index: int) -> Client:
        return self._clients[index]

    def next(self) -> Client:
        """The next live replica's client (a killed one is passed over)."""
        for _ in range(len(self._clients)):
            index = next(self._turns)
            if self._replicas[index].alive:
                return self._clients[index]
        raise RuntimeError("no replica is running")

    async def call_tool(self, name: str, arguments: dict[str, Any]) -> CallToolResult:
        return await self.next().call_tool(name, arguments)

    async def each(self, name: str, arguments: dict[str, Any]) -> list[CallToolResult]:
        """The same call sent to every live replica at the same moment; the answers in replica order."""
        live = [i for i in sorted(self._clients) if self._replicas[i].alive]
        answers: dict[int, CallToolResult] = {}

        async def one(index: int) -> None:
            answers[index] = await self._clients[index].call_tool(name, arguments)

        async with anyio.create_task_group() as group:
            for index in live:
                group.start_soon(one, index)
        return [answers[i] for i in live]
