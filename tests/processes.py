"""Real server processes for the tests that need one, and for the benchmark scripts."""

from __future__ import annotations

import contextlib
import ctypes
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
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
        await until_healthy(process, port)
        yield process
    finally:
        stop_server(process)


async def until_healthy(process: subprocess.Popen[bytes], port: int, seconds: float = 20) -> None:
    """Returns once GET /healthz on `port` answers 200; raises if the process exits first or
    `seconds` pass."""
    with anyio.fail_after(seconds):
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}")
            with contextlib.suppress(httpx2.HTTPError):
                async with httpx2.AsyncClient() as probe:
                    if (await probe.get(f"http://127.0.0.1:{port}/healthz", timeout=1)).status_code == 200:
                        return
            await anyio.sleep(0.05)


def stop_server(process: subprocess.Popen[bytes]) -> None:
    """Terminate, then kill if it lingers."""
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


def dies_with_parent(signum: int) -> Callable[[], None] | None:
    """A `preexec_fn` for a helper process (a database, a browser): a test process that is killed
    must not leave it running, so the kernel sends it `signum` then. None where Linux's prctl is
    missing."""
    if sys.platform != "linux":
        return None

    def arrange() -> None:
        ctypes.CDLL(None, use_errno=True).prctl(1, signum)  # 1: PR_SET_PDEATHSIG

    return arrange
