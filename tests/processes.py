"""Real server processes for the tests that need one, and for the benchmark scripts."""

from __future__ import annotations

import contextlib
import socket
import subprocess
from collections.abc import AsyncIterator
from typing import IO, Any

import anyio
import httpx2


@contextlib.asynccontextmanager
async def running_server(
    command: list[str], env: dict[str, str], log: IO[Any] | None, port: int
) -> AsyncIterator[subprocess.Popen[bytes]]:
    """Runs `command` (a server process); yields it once GET /healthz on `port` answers 200, and
    stops it (terminate, then kill) on the way out."""
    process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        with anyio.fail_after(20):
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"server exited with {process.returncode}")
                with contextlib.suppress(httpx2.HTTPError):
                    async with httpx2.AsyncClient() as probe:
                        if (
                            await probe.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                        ).status_code == 200:
                            break
                await anyio.sleep(0.05)
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
