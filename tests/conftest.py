"""Shared fixtures: a stand-in GPTunnel on loopback and the real server driven by the official client."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client

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
    """Starts `python -m gptunnel_mcp` over stdio as a client would, and keeps what it wrote to stderr."""

    def __init__(self, standin: StandIn, home: Path, log_dir: Path) -> None:
        self.standin = standin
        self.home = home
        self.log_dir = log_dir
        self.logs: list[Path] = []

    def params(self, **env: str | None) -> StdioServerParameters:
        values: dict[str, str | None] = {
            "GPTUNNEL_API_KEY": API_KEY,
            "GPTUNNEL_BASE_URL": self.standin.url,
            "GPTUNNEL_MCP_HOME": str(self.home),
            "GPTUNNEL_WAIT_TIMEOUT": "20",
            **env,
        }
        merged = {k: v for k, v in values.items() if v is not None}
        # Coverage and the like work through the parent's environment; keep PATH for the interpreter.
        merged.setdefault("PATH", os.environ.get("PATH", ""))
        return StdioServerParameters(
            command=sys.executable, args=["-m", "gptunnel_mcp", "--log-level", "DEBUG"], env=merged
        )

    @contextlib.asynccontextmanager
    async def connect(self, mode: str = "auto", **env: str | None) -> AsyncIterator[Client]:
        log = self.log_dir / f"server-{len(self.logs)}.log"
        self.logs.append(log)
        with log.open("w") as errlog:
            transport = stdio_client(self.params(**env), errlog=errlog)
            async with Client(transport, mode=mode, cache=None) as client:  # type: ignore[arg-type]
                yield client

    def stderr(self) -> str:
        return "".join(p.read_text() for p in self.logs if p.exists())


@pytest.fixture
def server(standin: StandIn, home: Path) -> Iterator[ServerLauncher]:
    with tempfile.TemporaryDirectory() as logs:
        yield ServerLauncher(standin, home, Path(logs))


def structured(result: Any) -> dict[str, Any]:
    assert result.structured_content is not None, result.content
    return dict(result.structured_content)


def text_of(result: Any) -> str:
    return "\n".join(block.text for block in result.content if block.type == "text")
