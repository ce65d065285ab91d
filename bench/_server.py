"""Runs the real server for the bench scripts: `gptunnel-mcp --transport http` on a free
loopback port, pointed at a stand-in GPTunnel, until the run ends. Also the scripts' way to what
lives with the tests: the stand-in (`tests/standin.py`), replicas on one database
(`tests/replicas.py`) and a throwaway PostgreSQL (`tests/postgres.py`)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any

# Run as `python bench/soak.py`, only bench/ is on sys.path; the stand-in is imported from the
# repository root, as the tests import it, so both get the same module.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.postgres import Cluster  # noqa: E402
from tests.processes import free_port, running_server  # noqa: E402
from tests.replicas import Replicas, RoundRobin, replica_settings  # noqa: E402
from tests.standin import Behaviour, StandIn  # noqa: E402

__all__ = [
    "Behaviour",
    "Cluster",
    "Replicas",
    "RoundRobin",
    "StandIn",
    "free_port",
    "http_server",
    "replica_settings",
]


@contextlib.asynccontextmanager
async def http_server(
    standin: StandIn,
    home: Path,
    key: str,
    *,
    log: IO[Any] | None = None,
    log_level: str = "INFO",
    env: dict[str, str] | None = None,
) -> AsyncIterator[tuple[str, subprocess.Popen[bytes]]]:
    """Yields the server's MCP URL and process once /healthz answers; stops it on the way out."""
    port = free_port()
    environment = {
        "PATH": os.environ.get("PATH", ""),
        "GPTUNNEL_API_KEY": key,
        "GPTUNNEL_BASE_URL": standin.url,
        "GPTUNNEL_MCP_HOME": str(home),
        **(env or {}),
    }
    command = [sys.executable, "-m", "gptunnel_mcp", "--transport", "http", "--port", str(port)]
    command += ["--log-level", log_level]
    async with running_server(command, environment, log, port) as process:
        yield f"http://127.0.0.1:{port}/mcp", process
