"""Replicas on one PostgreSQL database, each with a home of its own: the images are in the
database (table `images`, by SHA-256), so any replica serves an image another one downloaded,
and its home folder is only a cache of them. A real PostgreSQL, a fresh database per test."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import anyio
import psycopg
import pytest
from mcp.shared.exceptions import MCPError
from mcp_types import BlobResourceContents

from .conftest import ServerLauncher, structured, text_of
from .standin import StandIn

pytestmark = [pytest.mark.anyio, pytest.mark.standin(generation_seconds=0.1, image_size=(320, 240))]


async def made_on(replica: ServerLauncher, url: str, prompt: str) -> dict[str, object]:
    async with replica.connect(GPTUNNEL_MCP_DATABASE_URL=url) as client:
        done = structured(await client.call_tool("generate_and_wait", {"prompt": prompt}))
    assert done["status"] == "done", done
    return done


def files_in(home: Path) -> list[Path]:
    """Everything in the home's images folder, temporary files included."""
    images = home / "images"
    return sorted(p for p in images.rglob("*") if p.is_file()) if images.exists() else []


async def test_an_image_one_replica_downloaded_is_served_by_another_with_its_own_home(
    standin: StandIn, postgres_url: str, tmp_path: Path
) -> None:
    a, b = ServerLauncher(standin, tmp_path / "a"), ServerLauncher(standin, tmp_path / "b")
    done = await made_on(a, postgres_url, "a lighthouse at dusk")
    task_id, polls = str(done["task_id"]), standin.stats.result_calls

    async with b.connect(GPTUNNEL_MCP_DATABASE_URL=postgres_url) as client:
        again = await client.call_tool("get_result", {"task_id": task_id})
        image = await client.read_resource(f"gptunnel://images/{task_id}/file")

    original = standin.image_bytes(task_id)
    blob = image.contents[0]
    assert isinstance(blob, BlobResourceContents)
    assert base64.b64decode(blob.blob) == original
    result = structured(again)
    assert not again.is_error and result["status"] == "done" and result["sha256"] == done["sha256"]
    assert any(block.type == "image" for block in again.content), "the preview is made from the restored file"
    # B's home now holds the image, private, where B's result says it is: B's cache.
    kept = Path(str(result["file_path"]))
    assert kept.parent == tmp_path / "b" / "images" and files_in(tmp_path / "b") == [kept]
    assert kept.read_bytes() == original and stat.S_IMODE(kept.stat().st_mode) == 0o600
    # GPTunnel was asked for nothing more: one download in all, and B never polled.
    assert standin.stats.download_calls == 1 and standin.stats.result_calls == polls


async def test_a_damaged_copy_in_the_database_is_a_clear_error_and_writes_no_file(
    standin: StandIn, postgres_url: str, tmp_path: Path
) -> None:
    a, b = ServerLauncher(standin, tmp_path / "a"), ServerLauncher(standin, tmp_path / "b")
    done = await made_on(a, postgres_url, "a lighthouse in fog")
    task_id = str(done["task_id"])
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as conn:
        # One byte changed: the size still matches, only the hash tells.
        await conn.execute("UPDATE images SET data = overlay(data PLACING '\\x00'::bytea FROM 100)")

    async with b.connect(GPTUNNEL_MCP_DATABASE_URL=postgres_url) as client:
        refused = await client.call_tool("get_result", {"task_id": task_id})
        with pytest.raises(MCPError) as unread:
            await client.read_resource(f"gptunnel://images/{task_id}/file")
    text = text_of(refused)
    assert refused.is_error and "Traceback" not in text
    assert f"database's copy of the image {task_id}." in text and "is damaged" in text
    assert "damaged" in str(unread.value)
    assert files_in(tmp_path / "b") == []

    # As the error says: without the damaged row, the image is downloaded again and served.
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as conn:
        await conn.execute("DELETE FROM images")
    async with b.connect(GPTUNNEL_MCP_DATABASE_URL=postgres_url) as client:
        again = structured(await client.call_tool("get_result", {"task_id": task_id}))
    assert again["status"] == "done" and again["sha256"] == done["sha256"]
    assert standin.stats.download_calls == 2


async def test_an_image_the_database_cannot_take_leaves_its_task_pending_until_it_can(
    standin: StandIn, postgres_url: str, tmp_path: Path
) -> None:
    a, b = ServerLauncher(standin, tmp_path / "a"), ServerLauncher(standin, tmp_path / "b")
    async with a.connect(GPTUNNEL_MCP_DATABASE_URL=postgres_url, GPTUNNEL_MCP_LEASE_SECONDS="1") as client:
        created = structured(await client.call_tool("create_image", {"prompt": "a lighthouse in rain"}))
        task_id = created["task_id"]
        async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as conn:
            await conn.execute("ALTER TABLE images RENAME TO images_away")
            # The identical request waits for the task just created, and downloads its image.
            refused = await client.call_tool("generate_and_wait", {"prompt": "a lighthouse in rain"})
            # No replica may find the task done while no replica can serve its image.
            (status,) = (await (await conn.execute("SELECT status FROM tasks")).fetchone()) or ("",)
            await conn.execute("ALTER TABLE images_away RENAME TO images")
    text = text_of(refused)
    assert refused.is_error and text.startswith(f"Task {task_id}: ") and '"images"' in text
    assert status == "pending"

    # Once the first replica's lease on it has run out, another replica finishes the job.
    async with b.connect(GPTUNNEL_MCP_DATABASE_URL=postgres_url, GPTUNNEL_MCP_LEASE_SECONDS="1") as client:
        with anyio.fail_after(15):
            again = structured(await client.call_tool("get_result", {"task_id": task_id}))
            while again["status"] != "done":
                await anyio.sleep(0.2)
                again = structured(await client.call_tool("get_result", {"task_id": task_id}))
    assert standin.stats.download_calls == 2
