"""The MCP tasks extension (io.modelcontextprotocol/tasks) on generate_and_wait, driven by the
official client with a client-side extension, in memory and over HTTP. Tasks end when the test
says so (`standin.finish`), so a long generation proves a handle came at once without waiting."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import anyio
import httpx2
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.extension import ClaimContext, ClientExtension, ResultClaim
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, RequestParams, Result
from pydantic import ConfigDict, Field

from .conftest import MCP_HEADERS, ServerLauncher, initialize_request, serve_http, structured, text_of
from .standin import StandIn

pytestmark = pytest.mark.anyio
EXTENSION = "io.modelcontextprotocol/tasks"
#: Long enough that nothing ends on its own while a test looks: tasks end by `standin.finish`.
LONG = 30.0


class TaskIdParams(RequestParams):
    model_config = ConfigDict(populate_by_name=True, extra="allow")
    task_id: str = Field(alias="taskId")


class CreateTaskResult(Result):
    result_type: Literal["task"]
    task_id: str
    status: str
    status_message: str | None = None
    created_at: str
    last_updated_at: str
    ttl_ms: int | None = None
    poll_interval_ms: int | None = None


class GetTaskResult(Result):
    task_id: str
    status: str
    status_message: str | None = None
    poll_interval_ms: int | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


class GetTaskRequest(types.Request[TaskIdParams, Literal["tasks/get"]]):
    method: Literal["tasks/get"] = "tasks/get"
    params: TaskIdParams
    name_param = "taskId"


class CancelTaskRequest(types.Request[TaskIdParams, Literal["tasks/cancel"]]):
    method: Literal["tasks/cancel"] = "tasks/cancel"
    params: TaskIdParams
    name_param = "taskId"


async def get_task(client: Any, task_id: str) -> GetTaskResult:
    request = GetTaskRequest(params=TaskIdParams(taskId=task_id))
    return await client.session.send_request(request, GetTaskResult)


async def follow(client: Any, created: CreateTaskResult, seen: list[GetTaskResult]) -> GetTaskResult:
    """tasks/get at the pace the server asks for, until the task is no longer working."""
    with anyio.fail_after(10):
        while True:
            snapshot = await get_task(client, created.task_id)
            seen.append(snapshot)
            if snapshot.status != "working":
                return snapshot
            await anyio.sleep((snapshot.poll_interval_ms or 1000) / 1000)


async def call_claimed(client: Client, arguments: dict[str, Any]) -> Any:
    """generate_and_wait as a tasks-aware client sends it: a task handle comes back as such."""
    return await client.session.call_tool("generate_and_wait", arguments, allow_claimed=True)


class ClientTasks(ClientExtension):
    """What a tasks-aware client does: follow the handle until the final result."""

    identifier = EXTENSION

    def claims(self) -> tuple[ResultClaim[Any], ...]:
        async def resolve(created: CreateTaskResult, ctx: ClaimContext) -> CallToolResult:
            snapshot = await follow(ctx, created, [])
            assert snapshot.status == "completed", snapshot
            return CallToolResult.model_validate(snapshot.result, by_name=False)

        return (ResultClaim(result_type="task", model=CreateTaskResult, resolve=resolve),)


async def test_a_declaring_client_gets_a_handle_at_once_and_the_same_result_at_the_end(
    server: ServerLauncher, standin: StandIn
) -> None:
    standin.behaviour.generation_seconds = LONG
    async with server.connect(extensions=[ClientTasks()]) as client:
        with anyio.fail_after(1.5):  # a handle at once, long before the image
            created = await call_claimed(client, {"prompt": "a task fox", "aspect_ratio": "16:9"})
        assert isinstance(created, CreateTaskResult), created
        assert created.status == "working" and created.poll_interval_ms
        assert len(created.task_id) > 40  # unguessable: not just GPTunnel's sequential id
        (gptunnel_id,) = standin.task_ids()
        assert created.task_id.startswith(gptunnel_id)

        seen = [await get_task(client, created.task_id)]
        assert seen[0].status == "working", seen
        standin.finish()
        final = await follow(client, created, seen)
        assert final.status == "completed"
        assert all(s.poll_interval_ms and s.poll_interval_ms >= 250 for s in seen if s.status == "working")
        result = CallToolResult.model_validate(final.result, by_name=False)
        assert [b.type for b in result.content] == ["image", "resource_link", "text"]
        data = structured(result)
        assert data["status"] == "done" and data["task_id"] == gptunnel_id
        assert data["aspect_ratio"] == "16:9"
        assert Path(data["file_path"]).read_bytes() == standin.image_bytes(gptunnel_id)
        # Asked again, a finished task answers from the history.
        calls = standin.stats.result_calls
        assert (await get_task(client, created.task_id)).status == "completed"
        assert standin.stats.result_calls == calls
    assert standin.stats.create_calls == 1
    assert standin.stats.download_calls == 1
    # The server, not the client's pace, decides how often GPTunnel is asked.
    assert standin.stats.result_calls <= len(seen)


async def test_the_official_client_resolves_the_task_transparently(
    server: ServerLauncher, standin: StandIn
) -> None:
    standin.behaviour.generation_seconds = 0
    async with server.connect(extensions=[ClientTasks()]) as client:
        result = await client.call_tool("generate_and_wait", {"prompt": "transparent"})
    assert not result.is_error
    assert structured(result)["status"] == "done"


async def test_clients_that_do_not_declare_it_get_the_synchronous_call(
    server: ServerLauncher, standin: StandIn
) -> None:
    # Which path a call takes is under test here, not how long it waits.
    standin.behaviour.generation_seconds = 0
    async with server.connect() as client:
        plain = await call_claimed(client, {"prompt": "plain"})
    assert isinstance(plain, CallToolResult) and structured(plain)["status"] == "done"
    async with server.connect("legacy", extensions=[ClientTasks()]) as client:
        legacy = await client.call_tool("generate_and_wait", {"prompt": "legacy"})
    assert structured(legacy)["status"] == "done"
    async with server.connect(extensions=[ClientTasks()]) as client:
        other_tool = await client.session.call_tool("create_image", {"prompt": "other"}, allow_claimed=True)
    assert isinstance(other_tool, CallToolResult)


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"prompt": "x", "aspect_ratio": "2:1"}, "aspect_ratio"),
        ({"prompt": "x", "new_image": "perhaps"}, "new_image"),
        ({"prompt": "x", "images": "https://example.com/a.png"}, "images"),
        ({"aspect_ratio": "1:1"}, "prompt"),
    ],
)
async def test_bad_input_is_a_clear_tool_error_not_a_task(
    memory_server: ServerLauncher, standin: StandIn, arguments: dict[str, Any], named: str
) -> None:
    async with memory_server.connect(extensions=[ClientTasks()]) as client:
        result = await call_claimed(client, arguments)
    # A tool error, not a protocol error: the agent learns which argument to fix, and that
    # nothing was paid for.
    assert isinstance(result, CallToolResult) and result.is_error, result
    text = text_of(result)
    assert text.lower().startswith(f"invalid {named}:"), text
    assert "nothing was sent to gptunnel" in text.lower(), text
    # The same call without the extension is refused too: both paths read arguments alike.
    async with memory_server.connect() as client:
        assert (await client.call_tool("generate_and_wait", arguments)).is_error
    assert standin.stats.create_calls == 0


async def test_new_image_as_a_string_means_what_it_says_on_the_tasks_path(
    memory_server: ServerLauncher, standin: StandIn
) -> None:
    """Some clients send booleans as strings; the tasks path validates with the tool's own model,
    so "false" is false (the identical earlier task is reused, nothing paid again) and "true" true."""
    standin.behaviour.generation_seconds = LONG
    async with memory_server.connect(extensions=[ClientTasks()]) as client:
        first = await call_claimed(client, {"prompt": "a string flag"})
        again = await call_claimed(client, {"prompt": "a string flag", "new_image": "false"})
        assert isinstance(first, CreateTaskResult) and isinstance(again, CreateTaskResult), (first, again)
        assert again.task_id == first.task_id
        assert standin.stats.create_calls == 1
        fresh = await call_claimed(client, {"prompt": "a string flag", "new_image": "true"})
        assert isinstance(fresh, CreateTaskResult) and fresh.task_id != first.task_id
    assert standin.stats.create_calls == 2


async def test_cancel_stops_following_and_the_image_stays_fetchable(
    server: ServerLauncher, standin: StandIn
) -> None:
    standin.behaviour.generation_seconds = LONG
    async with server.connect(extensions=[ClientTasks()]) as client:
        created = await call_claimed(client, {"prompt": "cancel"})
        assert isinstance(created, CreateTaskResult)
        await client.session.send_request(
            CancelTaskRequest(params=TaskIdParams(taskId=created.task_id)), types.EmptyResult
        )
        assert (await get_task(client, created.task_id)).status == "cancelled"
        standin.finish()
        calls = standin.stats.result_calls
        assert (await get_task(client, created.task_id)).status == "cancelled"  # terminal
        assert standin.stats.result_calls == calls, "a cancelled task is still being polled"
        (gptunnel_id,) = standin.task_ids()
        done = structured(await client.call_tool("get_result", {"task_id": gptunnel_id}))
    assert done["status"] == "done"
    assert standin.stats.create_calls == 1


async def test_a_task_survives_a_restart_and_forged_handles_are_not_found(
    server: ServerLauncher, standin: StandIn
) -> None:
    standin.behaviour.generation_seconds = LONG
    async with server.connect(extensions=[ClientTasks()]) as client:
        created = await call_claimed(client, {"prompt": "restart"})
    assert isinstance(created, CreateTaskResult)
    standin.finish()
    async with server.connect(extensions=[ClientTasks()]) as client:
        final = await follow(client, created, [])
        assert final.status == "completed"
        gptunnel_id = created.task_id.split("-")[0]
        for forged in (gptunnel_id, f"{gptunnel_id}-{'0' * 32}", "nonsense", created.task_id[:-1] + "x"):
            with pytest.raises(MCPError) as info:
                await get_task(client, forged)
            assert info.value.error.code == -32602
    assert standin.stats.create_calls == 1


async def test_a_2025_client_that_declares_tasks_at_the_handshake_still_gets_the_result(
    memory_server: ServerLauncher,
) -> None:
    """Some clients (the MCP Inspector among them) declare the extension in their 2025-11-25
    initialize; that era cannot carry a task result, so the call must stay synchronous."""
    headers = MCP_HEADERS
    initialize = initialize_request("tasks-at-handshake", {"extensions": {EXTENSION: {}}})
    call = {
        "jsonrpc": "2.0",
        "id": 2,
        "method": "tools/call",
        "params": {"name": "generate_and_wait", "arguments": {"prompt": "handshake"}},
    }
    async with serve_http(memory_server.settings()) as url, httpx2.AsyncClient(timeout=30) as http:
        opened = await http.post(url, json=initialize, headers=headers)
        session = {
            **headers,
            "mcp-session-id": opened.headers["mcp-session-id"],
            "mcp-protocol-version": "2025-11-25",
        }
        await http.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=session)
        answer = await http.post(url, json=call, headers=session)
    assert answer.status_code == 200
    assert '"resultType":"task"' not in answer.text.replace(" ", "")
    assert '"status":"done"' in answer.text.replace(" ", "")


async def test_a_handle_one_replica_gave_is_followed_to_the_image_on_another(
    memory_server: ServerLauncher, standin: StandIn, postgres_url: str, tmp_path: Path
) -> None:
    standin.behaviour.generation_seconds = LONG
    async with memory_server.connect(
        extensions=[ClientTasks()],
        GPTUNNEL_MCP_HOME=str(tmp_path / "one"),
        GPTUNNEL_MCP_DATABASE_URL=postgres_url,
    ) as client:
        created = await call_claimed(client, {"prompt": "a fox handed over"})
        standin.finish()
        # The first replica, holding the lease, downloads it while it runs.
        final_here = await follow(client, created, [])
    assert isinstance(created, CreateTaskResult) and final_here.status == "completed"
    async with memory_server.connect(
        extensions=[ClientTasks()],
        GPTUNNEL_MCP_HOME=str(tmp_path / "two"),
        GPTUNNEL_MCP_DATABASE_URL=postgres_url,
    ) as client:
        final = await follow(client, created, [])
    assert final.status == "completed"
    result = CallToolResult.model_validate(final.result, by_name=False)
    data = structured(result)
    # The other replica's home had no copy: it took the database's, the same bytes.
    assert Path(data["file_path"]).is_relative_to(tmp_path / "two")
    assert Path(data["file_path"]).read_bytes() == standin.image_bytes(data["task_id"])
    assert standin.stats.create_calls == 1 and standin.stats.download_calls == 1
