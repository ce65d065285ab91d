"""Runs the real server for the bench scripts: `gptunnel-mcp --transport http` on a free
loopback port, pointed at a stand-in GPTunnel, until the run ends."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any

import anyio
import httpx

from gptunnel_mcp.standin import StandIn


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def http_server(
    standin: StandIn,
    home: Path,
    key: str,
    *,
    log: IO[Any] | None = None,
    log_level: str = "INFO",
    **env: str,
) -> AsyncIterator[tuple[str, subprocess.Popen[bytes]]]:
    """Yields the server's MCP URL and process once /healthz answers; stops it on the way out."""
    port = free_port()
    environment = {
        "PATH": os.environ.get("PATH", ""),
        "GPTUNNEL_API_KEY": key,
        "GPTUNNEL_BASE_URL": standin.url,
        "GPTUNNEL_MCP_HOME": str(home),
        **env,
    }
    command = [sys.executable, "-m", "gptunnel_mcp", "--transport", "http", "--port", str(port)]
    command += ["--log-level", log_level]
    process = subprocess.Popen(command, env=environment, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        with anyio.fail_after(30):
            async with httpx.AsyncClient(timeout=1) as probe:
                while True:
                    if process.poll() is not None:
                        raise RuntimeError(f"the server exited with {process.returncode}")
                    with contextlib.suppress(httpx.HTTPError):
                        if (await probe.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                            break
                    await anyio.sleep(0.05)
        yield f"http://127.0.0.1:{port}/mcp", process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
