"""The stdio transport as clients start it: `python -m gptunnel_mcp` in its own process, driven by the
official client over its stdin and stdout. Behaviour is tested in process; this proves the wiring:
stdout carries the protocol and nothing else, the log goes to stderr, and the key to neither."""

from __future__ import annotations

from pathlib import Path

import pytest
from mcp import Client
from mcp.client.session import IncomingMessage
from mcp.client.stdio import stdio_client

from .conftest import API_KEY, ProcessLauncher, structured, text_of
from .standin import StandIn

pytestmark = pytest.mark.anyio


async def test_stdio_process_speaks_only_protocol_on_stdout_and_logs_on_stderr(
    process_server: ProcessLauncher, standin: StandIn, tmp_path: Path
) -> None:
    # A stray line on stdout (a print, a library's banner) reaches the client as an exception
    # item instead of a message: most clients give up on the server, this one only reports it.
    garbage: list[Exception] = []

    async def on_message(message: IncomingMessage) -> None:
        if isinstance(message, Exception):
            garbage.append(message)

    stderr = tmp_path / "stderr.log"
    with stderr.open("w") as errlog:
        transport = stdio_client(process_server.params(), errlog=errlog)
        async with Client(transport, cache=None, message_handler=on_message) as client:
            tools = {t.name for t in (await client.list_tools()).tools}
            assert {"create_image", "get_result", "generate_and_wait", "get_balance"} <= tools
            result = await client.call_tool("generate_and_wait", {"prompt": "over stdio"})
    assert not result.is_error, text_of(result)
    data = structured(result)
    assert data["status"] == "done"
    assert Path(data["file_path"]).read_bytes() == standin.image_bytes(data["task_id"])
    assert standin.stats.create_calls == 1

    assert garbage == []
    log = stderr.read_text()
    assert f"created task {data['task_id']}" in log
    assert API_KEY not in log
    assert API_KEY not in result.model_dump_json()
