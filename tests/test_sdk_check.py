"""The server leans on a few SDK internals (server/_sdk.py); if an SDK upgrade moves them, the
server must refuse to start with a message naming the SDK, not fail later inside a request."""

from __future__ import annotations

from pathlib import Path

import pytest
from mcp.server import MCPServer

from gptunnel_mcp import load_settings
from gptunnel_mcp.server import build_server
from gptunnel_mcp.server._sdk import check_sdk


def test_the_installed_sdk_has_everything_the_server_reaches_for(tmp_path: Path) -> None:
    server = build_server(load_settings(home=tmp_path, api_key="k"))
    check_sdk(server)


def test_an_sdk_without_the_low_level_server_is_refused_by_name() -> None:
    server: MCPServer[None] = MCPServer("bare")
    del server._lowlevel_server
    with pytest.raises(RuntimeError) as refused:
        check_sdk(server)
    message = str(refused.value)
    assert "MCPServer._lowlevel_server" in message
    assert "tested with mcp 2.3.x" in message and "install mcp~=2.3.0" in message
