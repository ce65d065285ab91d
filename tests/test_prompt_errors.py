"""A bad prompts/get is the client's mistake, said as one: invalid params naming what to send,
on both protocol eras (MCPServer alone answers 2026-07-28 clients "Internal server error")."""

from __future__ import annotations

import pytest
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS

from .conftest import ServerLauncher

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("mode", ["auto", "legacy"])
@pytest.mark.parametrize(
    ("name", "arguments", "said"),
    [
        ("image-brief", {}, "missing idea"),
        ("image-brief", {"idea": "a fox", "colour": "red"}, "unknown colour"),
        ("image-brief", {"idea": ""}, "missing idea"),
        ("no-such-prompt", {"idea": "a fox"}, "this server has: image-brief"),
    ],
)
async def test_bad_prompt_requests_are_invalid_params_that_say_what_to_send(
    memory_server: ServerLauncher, mode: str, name: str, arguments: dict[str, str], said: str
) -> None:
    async with memory_server.connect(mode) as client:
        with pytest.raises(MCPError) as raised:
            await client.get_prompt(name, arguments)
        assert raised.value.error.code == INVALID_PARAMS
        assert said in raised.value.error.message
        # The same connection still serves a good request.
        good = await client.get_prompt("image-brief", {"idea": "a fox", "lighting": "dusk"})
    assert "a fox" in good.messages[0].content.text  # type: ignore[union-attr]
    assert "Internal" not in memory_server.logs()
