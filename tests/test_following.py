"""Replicas on one PostgreSQL follow each task once between them: the replica holding a task's
lease polls it and downloads its image, the others read what it stored, and when it dies another
adopts its tasks and finishes them with nobody asking. In process: each `connect` is a replica,
with a home of its own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
from mcp_types import ImageContent

from gptunnel_mcp._exceptions import StorageError
from gptunnel_mcp._postgres import PostgresStore

from .conftest import MULTI_USER, ServerLauncher, mcp_client, serve_http, structured, text_of
from .standin import Behaviour, StandIn

pytestmark = [pytest.mark.anyio, pytest.mark.standin(generation_seconds=600, image_size=(64, 64))]


def replica(server: ServerLauncher, url: str, home: Path, *, wait: str = "3", lease: str = "10") -> Any:
    return server.connect(
        GPTUNNEL_MCP_DATABASE_URL=url,
        GPTUNNEL_MCP_HOME=str(home),
        GPTUNNEL_WAIT_TIMEOUT=wait,
        GPTUNNEL_MCP_LEASE_SECONDS=lease,
    )


async def stored_status(url: str, task_id: str) -> tuple[str, str | None]:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        row = await (
            await conn.execute("SELECT status, lease_holder FROM tasks WHERE task_id = %s", (task_id,))
        ).fetchone()
    assert row is not None
    return row[0], row[1]


#: Seconds a wait for another replica's work may take: it takes one or two here, but a loaded
#: 2-core machine has been seen to take more than ten.
PATIENCE = 30


async def until_stored(url: str, task_id: str, status: str, seconds: float) -> str | None:
    """The task's lease holder once the database shows `status`, within `seconds`."""
    with anyio.fail_after(seconds):
        while True:
            found, holder = await stored_status(url, task_id)
            if found == status:
                return holder
            await anyio.sleep(0.05)


async def test_a_replica_without_the_lease_reads_the_history_instead_of_polling(
    memory_server: ServerLauncher, standin: StandIn, postgres_url: str, tmp_path: Path
) -> None:
    async with replica(memory_server, postgres_url, tmp_path / "r1", lease="300") as first:
        made = structured(await first.call_tool("create_image", {"prompt": "a fox held by one replica"}))
    task_id = made["task_id"]
    polls = standin.stats.result_calls_by_task.get(task_id, 0)
    # The first replica has stopped; its lease has not run out.
    async with replica(memory_server, postgres_url, tmp_path / "r2", lease="300") as second:
        for _ in range(3):
            result = await second.call_tool("get_result", {"task_id": task_id})
            assert not result.is_error, text_of(result)
            assert structured(result)["status"] == "pending"
        waited = structured(
            await second.call_tool("generate_and_wait", {"prompt": "a fox held by one replica"})
        )
    assert waited["task_id"] == task_id and waited["status"] == "pending"
    assert standin.stats.result_calls_by_task.get(task_id, 0) == polls
    assert standin.stats.create_calls == 1


async def test_a_dead_replicas_task_is_adopted_and_finished_with_nobody_asking(
    memory_server: ServerLauncher, standin: StandIn, postgres_url: str, tmp_path: Path
) -> None:
    async with replica(memory_server, postgres_url, tmp_path / "r3", lease="1") as first:
        made = structured(await first.call_tool("create_image", {"prompt": "an orphaned owl"}))
    task_id = made["task_id"]
    first_holder = (await stored_status(postgres_url, task_id))[1]
    assert first_holder is not None
    async with replica(memory_server, postgres_url, tmp_path / "r4", lease="1"):
        # Nobody calls anything: the survivor takes the lease once it runs out...
        holder: str | None = first_holder
        with anyio.fail_after(1 + 1 / 3 + 3):
            while holder == first_holder:
                await anyio.sleep(0.05)
                holder = (await stored_status(postgres_url, task_id))[1]
        # ... and downloads the image when GPTunnel has it.
        standin.finish(task_id)
        await until_stored(postgres_url, task_id, "done", PATIENCE)
    assert standin.stats.download_calls == 1 and standin.stats.create_calls == 1
    async with replica(memory_server, postgres_url, tmp_path / "r5", lease="1") as third:
        result = structured(await third.call_tool("get_result", {"task_id": task_id}))
    assert result["status"] == "done"
    assert Path(result["file_path"]).read_bytes() == standin.image_bytes(task_id)


async def test_the_holder_finishes_a_task_whose_caller_left(
    memory_server: ServerLauncher, standin: StandIn, postgres_url: str, tmp_path: Path
) -> None:
    async with replica(memory_server, postgres_url, tmp_path / "r6") as only:
        made = structured(await only.call_tool("create_image", {"prompt": "a heron nobody waits for"}))
        standin.finish(made["task_id"])
        # No get_result: the replica's follower sees it done and keeps the image.
        await until_stored(postgres_url, made["task_id"], "done", PATIENCE)
    assert standin.stats.download_calls == 1


async def test_a_waiter_on_another_replica_hears_the_image_and_so_do_its_subscribers(
    memory_server: ServerLauncher, standin: StandIn, postgres_url: str, tmp_path: Path
) -> None:
    prompt = {"prompt": "a crane seen from two replicas"}
    async with (
        replica(memory_server, postgres_url, tmp_path / "r7", wait="20") as holder,
        replica(memory_server, postgres_url, tmp_path / "r8", wait="20") as other,
    ):
        made = structured(await holder.call_tool("create_image", prompt))
        async with other.listen(resources_list_changed=True) as subscription:
            async with anyio.create_task_group() as group:
                waited: dict[str, Any] = {}

                async def wait() -> None:
                    # The identical request: the other replica waits on the holder's task.
                    waited.update(structured(await other.call_tool("generate_and_wait", prompt)))

                group.start_soon(wait)
                await anyio.sleep(0.5)
                standin.finish(made["task_id"])
            with anyio.fail_after(5):
                event = await subscription.__anext__()
    assert waited["task_id"] == made["task_id"] and waited["status"] == "done"
    assert "resources" in type(event).__name__.lower() or "list_changed" in str(event)
    assert standin.stats.download_calls == 1 and standin.stats.create_calls == 1


async def test_the_follower_outlives_stray_notices_and_a_failing_look(
    memory_server: ServerLauncher,
    standin: StandIn,
    postgres_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = PostgresStore.durations
    failures = [StorageError("the database was away for a moment")]

    async def flaky(self: PostgresStore, model: str, *, limit: int) -> list[tuple[float | None, float]]:
        if failures:
            raise failures.pop()
        return await real(self, model, limit=limit)

    monkeypatch.setattr(PostgresStore, "durations", flaky)
    async with replica(memory_server, postgres_url, tmp_path / "r1", lease="1") as client:
        async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as conn:
            for payload in (
                "not json",
                '["a", "b", "c", "done", "extra"]',
                '[1, 2, 3, "done"]',
                '["a","","x","lost"]',
            ):
                await conn.execute("SELECT pg_notify('gptunnel_mcp_tasks', %s)", (payload,))
        made = structured(await client.call_tool("create_image", {"prompt": "a robin after the noise"}))
        standin.finish(made["task_id"])
        await until_stored(postgres_url, made["task_id"], "done", PATIENCE)
        # The server still answers.
        assert (
            structured(await client.call_tool("get_result", {"task_id": made["task_id"]}))["status"] == "done"
        )
    assert not failures


async def test_a_task_id_in_capitals_is_the_same_task_under_the_same_lease(
    memory_server: ServerLauncher, standin: StandIn, postgres_url: str, tmp_path: Path
) -> None:
    async with replica(memory_server, postgres_url, tmp_path / "r1", lease="300") as first:
        made = structured(await first.call_tool("create_image", {"prompt": "a wren in capitals"}))
    task_id = made["task_id"]
    polls = standin.stats.result_calls_by_task.get(task_id, 0)
    async with replica(memory_server, postgres_url, tmp_path / "r2", lease="300") as second:
        result = structured(await second.call_tool("get_result", {"task_id": task_id.upper()}))
    assert result["task_id"] == task_id and result["status"] == "pending"
    assert standin.stats.result_calls_by_task.get(task_id, 0) == polls
    status, _ = await stored_status(postgres_url, task_id)
    assert status == "pending"


async def test_a_reused_image_another_replica_downloaded_is_served_here(
    memory_server: ServerLauncher, standin: StandIn, postgres_url: str, tmp_path: Path
) -> None:
    standin.behaviour.generation_seconds = 0.05
    prompt = {"prompt": "a kingfisher made once"}
    async with replica(memory_server, postgres_url, tmp_path / "r1") as first:
        made = structured(await first.call_tool("generate_and_wait", prompt))
    async with replica(memory_server, postgres_url, tmp_path / "r2") as second:
        again = await second.call_tool("create_image", prompt)
    reused = structured(again)
    assert reused["reused"] and reused["task_id"] == made["task_id"]
    assert Path(reused["file_path"]).read_bytes() == standin.image_bytes(made["task_id"])
    assert any(isinstance(block, ImageContent) for block in again.content)
    assert standin.stats.download_calls == 1


async def test_a_users_task_is_adopted_by_a_replica_that_never_saw_their_key(
    postgres_url: str, tmp_path: Path
) -> None:
    alice = "sk-user-A-5d2e9b7c41f0"
    with StandIn(api_key=None, behaviour=Behaviour(generation_seconds=600, image_size=(64, 64))) as standin:
        one = ServerLauncher(standin, tmp_path / "r1", transport="http")
        two = ServerLauncher(standin, tmp_path / "r2", transport="http")
        shared = {**MULTI_USER, "GPTUNNEL_MCP_DATABASE_URL": postgres_url, "GPTUNNEL_MCP_LEASE_SECONDS": "1"}
        async with serve_http(one.settings(**shared)) as url, mcp_client(url, alice) as client:
            made = structured(await client.call_tool("create_image", {"prompt": "alice's owl"}))
        task_id = made["task_id"]
        async with await psycopg.AsyncConnection.connect(postgres_url) as conn:
            (sealed,) = await (await conn.execute("SELECT sealed FROM sealed_keys")).fetchone() or (b"",)
        # Sealed: the key is not in the database as it was sent.
        assert sealed and alice.encode() not in bytes(sealed)
        # The second replica has no client at all: it knows alice's key only from the database.
        async with serve_http(two.settings(**shared)):
            holder = await until_held_by_another(postgres_url, task_id)
            standin.finish(task_id)
            await until_stored(postgres_url, task_id, "done", PATIENCE)
        assert holder is not None and standin.stats.download_calls == 1


async def until_held_by_another(url: str, task_id: str) -> str | None:
    first = (await stored_status(url, task_id))[1]
    holder = first
    with anyio.fail_after(PATIENCE):
        while holder == first:
            await anyio.sleep(0.05)
            holder = (await stored_status(url, task_id))[1]
    return holder
