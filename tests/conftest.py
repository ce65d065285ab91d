"""Shared fixtures: a stand-in GPTunnel on loopback and the real server driven by the official client."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import anyio
import httpx
import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.extension import ClientExtension
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client

from gptunnel_mcp.standin import Behaviour, StandIn

#: The stand-in's key. Distinctive, so a leak anywhere is found by a substring search.
API_KEY = "sk-gptunnel-TEST-9f3a7c1e5b"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def standin() -> Iterator[StandIn]:
    with StandIn(api_key=API_KEY, behaviour=Behaviour(generation_seconds=0.6, image_size=(1200, 800))) as s:
        yield s


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


class ServerLauncher:
    """Starts `python -m gptunnel_mcp` as a client would, over stdio or streamable HTTP, and keeps
    what it wrote to stderr. Each `connect` is a new server process on the same home folder."""

    def __init__(self, standin: StandIn, home: Path, log_dir: Path, transport: str = "stdio") -> None:
        self.standin = standin
        self.home = home
        self.log_dir = log_dir
        self.transport = transport
        self.logs: list[Path] = []

    def env(self, **env: str | None) -> dict[str, str]:
        values: dict[str, str | None] = {
            "GPTUNNEL_API_KEY": API_KEY,
            "GPTUNNEL_BASE_URL": self.standin.url,
            "GPTUNNEL_MCP_HOME": str(self.home),
            "GPTUNNEL_WAIT_TIMEOUT": "20",
            **env,
        }
        merged = {k: v for k, v in values.items() if v is not None}
        merged.setdefault("PATH", os.environ.get("PATH", ""))
        return merged

    def params(self, **env: str | None) -> StdioServerParameters:
        return StdioServerParameters(
            command=sys.executable, args=["-m", "gptunnel_mcp", "--log-level", "DEBUG"], env=self.env(**env)
        )

    @contextlib.asynccontextmanager
    async def connect(
        self,
        mode: str = "auto",
        *,
        token: str | None = None,
        extensions: Sequence[ClientExtension] | None = None,
        **env: str | None,
    ) -> AsyncIterator[Client]:
        log = self.log_dir / f"server-{len(self.logs)}.log"
        self.logs.append(log)
        with log.open("w") as errlog:
            if self.transport == "stdio":
                transport = stdio_client(self.params(**env), errlog=errlog)
                async with Client(transport, mode=mode, cache=None, extensions=extensions) as client:  # type: ignore[arg-type]
                    yield client
                return
            async with (
                self.http_server(errlog, **env) as url,
                http_client(url, token) as http,
                Client(
                    streamable_http_client(url, http_client=http),  # type: ignore[arg-type]
                    mode=mode,
                    cache=None,
                    extensions=extensions,
                ) as client,
            ):
                yield client

    @contextlib.asynccontextmanager
    async def http_server(self, errlog: IO[str], **env: str | None) -> AsyncIterator[str]:
        """A server process on a free loopback port; yields its MCP URL once /healthz answers."""
        port = free_port()
        command = [sys.executable, "-m", "gptunnel_mcp", "--transport", "http", "--port", str(port)]
        async with running_server([*command, "--log-level", "DEBUG"], self.env(**env), errlog, port):
            yield f"http://127.0.0.1:{port}/mcp"

    def stderr(self) -> str:
        return "".join(p.read_text() for p in self.logs if p.exists())


@pytest.fixture(params=["stdio", "http"])
def server(request: pytest.FixtureRequest, standin: StandIn, home: Path) -> Iterator[ServerLauncher]:
    """The server as clients meet it, once per transport: every test using it runs over both."""
    with tempfile.TemporaryDirectory() as logs:
        yield ServerLauncher(standin, home, Path(logs), transport=request.param)


@contextlib.asynccontextmanager
async def running_server(
    command: list[str], env: dict[str, str], log: IO[Any], port: int
) -> AsyncIterator[subprocess.Popen[bytes]]:
    """Runs `command` (a server process); yields it once GET /healthz on `port` answers 200, and
    stops it (terminate, then kill) on the way out."""
    process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        with anyio.fail_after(20):
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"server exited with {process.returncode}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
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


@contextlib.asynccontextmanager
async def http_client(url: str, token: str | None) -> AsyncIterator[httpx2.AsyncClient]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=120)) as client:
        yield client


def structured(result: Any) -> dict[str, Any]:
    assert result.structured_content is not None, result.content
    return dict(result.structured_content)


def text_of(result: Any) -> str:
    return "\n".join(block.text for block in result.content if block.type == "text")
