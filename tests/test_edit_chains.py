"""Edit chains: one's own earlier image as a reference, named by its task id or its resource URI.
It goes to GPTunnel as GPTunnel's own link while that lasts (48 hours), then as a link this
server signs and serves (GPTUNNEL_MCP_PUBLIC_URL); when neither will do, or the task is nobody's
image of the caller's, the call is refused before anything is sent or counted.

Two days pass by editing the stored record (its completed_at), not by waiting.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import httpx2
import pytest

from gptunnel_mcp._links import signed_link
from gptunnel_mcp._postgres import PostgresStore
from gptunnel_mcp._records import TaskRecord, utcnow
from gptunnel_mcp._sqlite import SQLiteStore
from gptunnel_mcp._store import TaskStore

from .conftest import (
    MULTI_USER,
    ServerLauncher,
    loopback_socket,
    mcp_client,
    serve_http,
    structured,
    text_of,
)
from .standin import Behaviour, StandIn

pytestmark = [pytest.mark.anyio, pytest.mark.standin(generation_seconds=0.05, image_size=(320, 200))]

AUTH_TOKEN = "edit-chain-token-7c1d9e24"
#: Two users' GPTunnel keys, distinctive enough to search for.
KEY_A = "sk-user-A-0f3b8c6d5e21"
KEY_B = "sk-user-B-9e7a2d4c1b03"
#: A well-formed task id no one ever created.
NEVER = "0123456789abcdef01234567"
#: Long enough that no task ends on its own within a test.
FOREVER = 600.0
INVALID = "expired or invalid link"


async def finished_long_ago(store: TaskStore, task_id: str) -> TaskRecord:
    """Make the done task look finished 49 hours ago, whoever's it is: GPTunnel's link to its
    image has expired. Returns its record as it is now stored; closes `store`."""
    try:
        (record,) = await store.done_anywhere(task_id)
        assert record.completed_at is not None
        record.completed_at -= timedelta(hours=49)
        await store.put(record)
        return record
    finally:
        await store.close()


def history(home: Path) -> SQLiteStore:
    return SQLiteStore(home / "history.sqlite3")


async def server_secret(home: Path) -> bytes:
    store = history(home)
    try:
        return await store.server_secret()
    finally:
        await store.close()


def other_last(text: str) -> str:
    """`text` with its last character changed (hex stays hex)."""
    return text[:-1] + ("0" if text[-1] != "0" else "1")


@pytest.fixture
async def raw() -> AsyncIterator[httpx2.AsyncClient]:
    """Plain HTTP without credentials, as GPTunnel fetches reference images."""
    async with httpx2.AsyncClient(timeout=15) as client:
        yield client


async def test_within_48_hours_an_earlier_image_is_sent_as_gptunnels_own_link(
    server: ServerLauncher, standin: StandIn
) -> None:
    async with server.connect() as client:
        first = structured(await client.call_tool("generate_and_wait", {"prompt": "a red fox"}))
        edit = {"prompt": "the same fox, in snow", "images": [first["task_id"].upper()]}
        edited = await client.call_tool("generate_and_wait", edit)
        assert not edited.is_error, text_of(edited)
        # The same edit named by the image's resource URI: the same request, answered with its task.
        by_uri = {**edit, "images": [f"gptunnel://images/{first['task_id']}/file"]}
        again = structured(await client.call_tool("generate_and_wait", by_uri))
    second = structured(edited)
    assert second["status"] == "done"
    assert standin.task_images(second["task_id"]) == [first["source_url"]]
    # The history keeps which image it was, not a link that expires.
    assert second["images"] == [f"gptunnel://images/{first['task_id']}"]
    assert again["task_id"] == second["task_id"] and again["reused"]
    assert standin.stats.create_calls == 2


async def test_past_48_hours_a_server_with_a_public_address_sends_a_signed_link_that_serves_the_image(
    memory_server: ServerLauncher, standin: StandIn, home: Path, raw: httpx2.AsyncClient
) -> None:
    sock = loopback_socket()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    settings = memory_server.settings(
        GPTUNNEL_MCP_TRANSPORT="http", GPTUNNEL_MCP_PUBLIC_URL=base, GPTUNNEL_MCP_AUTH_TOKEN=AUTH_TOKEN
    )
    async with serve_http(settings, sock) as url, mcp_client(url, AUTH_TOKEN) as client:
        first = structured(await client.call_tool("generate_and_wait", {"prompt": "a grey heron"}))
        record = await finished_long_ago(history(home), first["task_id"])
        edit = {"prompt": "the heron, flying", "images": [first["task_id"]]}
        second = structured(await client.call_tool("create_image", edit))
        (link,) = standin.task_images(second["task_id"])
        assert link.startswith(f"{base}/reference-images/{first['task_id']}/")
        # GPTunnel fetches it with no token, under the server's public name.
        fetched = await raw.get(link, headers={"Host": "images.example.com"})
        assert fetched.status_code == 200, fetched.text
        assert fetched.content == Path(first["file_path"]).read_bytes()
        assert fetched.headers["content-type"] == first["mime_type"]
        head = await raw.head(link)
        assert head.status_code == 200 and int(head.headers["content-length"]) == len(fetched.content)
        assert (await raw.post(link)).status_code == 405
        # Asked again, the edit is the same request, though a new link would differ.
        again = structured(await client.call_tool("create_image", edit))
        assert again["task_id"] == second["task_id"] and again["reused"]

        assert record.file is not None
        sha256 = record.file.sha256
        parts = urlsplit(link)
        path, query = f"{base}{parts.path}", dict(p.split("=") for p in parts.query.split("&"))
        signature, expires = query["signature"], int(query["expires"])
        made_two_hours_ago = signed_link(
            await server_secret(home), base, record.task_id, record.file, utcnow() - timedelta(hours=2)
        )
        refused = [
            f"{path}?expires={expires}&signature={other_last(signature)}",
            f"{path}?expires={expires + 3600}&signature={signature}",
            f"{path.replace(sha256, other_last(sha256))}?expires={expires}&signature={signature}",
            path,
            made_two_hours_ago,
        ]
        for bad in refused:
            answer = await raw.get(bad)
            assert (answer.status_code, answer.text) == (404, INVALID), bad
        # The route is no way around the token to anything else.
        assert (await raw.post(url, json={})).status_code == 401
    assert standin.stats.create_calls == 2


async def test_any_replica_on_postgresql_serves_a_link_another_made(
    memory_server: ServerLauncher,
    standin: StandIn,
    postgres_url: str,
    tmp_path: Path,
    raw: httpx2.AsyncClient,
) -> None:
    # Each replica with a home of its own: the database is all they share, the secret included.
    sock = loopback_socket()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    shared = {"GPTUNNEL_MCP_DATABASE_URL": postgres_url, "GPTUNNEL_MCP_TRANSPORT": "http"}
    one = memory_server.settings(
        **shared, GPTUNNEL_MCP_HOME=str(tmp_path / "one"), GPTUNNEL_MCP_PUBLIC_URL=base
    )
    two = memory_server.settings(**shared, GPTUNNEL_MCP_HOME=str(tmp_path / "two"))
    async with serve_http(one) as url, serve_http(two, sock), mcp_client(url) as client:
        first = structured(await client.call_tool("generate_and_wait", {"prompt": "a shared swan"}))
        await finished_long_ago(await PostgresStore.open(postgres_url), first["task_id"])
        second = structured(
            await client.call_tool(
                "create_image", {"prompt": "the swan, gliding", "images": [first["task_id"]]}
            )
        )
        (link,) = standin.task_images(second["task_id"])
        fetched = await raw.get(link)
    # Served by the replica that never saw the image, from the database's copy.
    assert fetched.status_code == 200 and fetched.content == Path(first["file_path"]).read_bytes()
    assert [p.read_bytes() for p in (tmp_path / "two" / "images").iterdir()] == [fetched.content]


async def test_past_48_hours_without_a_public_address_the_error_says_what_to_do(
    memory_server: ServerLauncher, standin: StandIn, home: Path
) -> None:
    async with memory_server.connect(GPTUNNEL_MAX_IMAGES_PER_HOUR="2") as client:
        first = structured(await client.call_tool("generate_and_wait", {"prompt": "an old oak"}))
        await finished_long_ago(history(home), first["task_id"])
        for _ in range(3):
            refused = await client.call_tool(
                "create_image", {"prompt": "the oak in autumn", "images": [first["task_id"]]}
            )
            assert refused.is_error
        # Nothing was sent, and no slot of the cap was taken: one more image still fits.
        assert standin.stats.create_calls == 1
        assert not (await client.call_tool("create_image", {"prompt": "a young oak"})).is_error
    text = text_of(refused)
    assert text.startswith("Invalid images:") and first["task_id"] in text
    assert "48 hours" in text and "GPTUNNEL_MCP_TRANSPORT=http" in text and "GPTUNNEL_MCP_PUBLIC_URL" in text
    assert "pass a public URL of the image" in text and "Nothing was sent to GPTunnel" in text


@pytest.fixture
def open_standin() -> Iterator[StandIn]:
    """Accepts any key: the users of a multi-user server."""
    with StandIn(api_key=None, behaviour=Behaviour(generation_seconds=0.05, image_size=(320, 200))) as s:
        yield s


async def test_another_users_image_is_not_found_and_a_link_to_ones_own_names_no_one(
    open_standin: StandIn, home: Path, raw: httpx2.AsyncClient
) -> None:
    sock = loopback_socket()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    settings = ServerLauncher(open_standin, home).settings(**MULTI_USER, GPTUNNEL_MCP_PUBLIC_URL=base)
    async with (
        serve_http(settings, sock) as url,
        mcp_client(url, KEY_A) as alice,
        mcp_client(url, KEY_B) as bob,
    ):
        hers = structured(await alice.call_tool("generate_and_wait", {"prompt": "alice's lighthouse"}))
        for form in (hers["task_id"], f"gptunnel://images/{hers['task_id']}"):
            taken = await bob.call_tool("create_image", {"prompt": "my lighthouse", "images": [form]})
            unknown = await bob.call_tool("create_image", {"prompt": "my lighthouse", "images": [NEVER]})
            assert taken.is_error and unknown.is_error
            # Word for word what a task that never was gets.
            assert text_of(taken).replace(hers["task_id"], NEVER) == text_of(unknown)
        assert f"no task {NEVER} in the history" in text_of(unknown)
        assert open_standin.stats.create_calls == 1

        record = await finished_long_ago(history(home), hers["task_id"])
        edited = await alice.call_tool(
            "create_image", {"prompt": "her lighthouse", "images": [hers["task_id"]]}
        )
        assert not edited.is_error, text_of(edited)
        (link,) = open_standin.task_images(structured(edited)["task_id"])
        assert record.owner and record.owner not in link and KEY_A not in link
        assert (await raw.get(link)).content == Path(hers["file_path"]).read_bytes()


async def test_an_unfinished_or_failed_task_has_no_image_to_refer_to(
    memory_server: ServerLauncher, standin: StandIn
) -> None:
    standin.behaviour.generation_seconds = FOREVER
    async with memory_server.connect() as client:
        pending = structured(await client.call_tool("create_image", {"prompt": "a slow owl"}))
        early = await client.call_tool(
            "create_image", {"prompt": "the owl at night", "images": [pending["task_id"]]}
        )
        standin.behaviour.generation_seconds, standin.behaviour.final_status = 0.05, "failed"
        failed = structured(await client.call_tool("generate_and_wait", {"prompt": "a doomed owl"}))
        after = await client.call_tool(
            "create_image", {"prompt": "the owl at night", "images": [failed["task_id"]]}
        )
    assert early.is_error and text_of(early).startswith("Invalid images:")
    assert f"task {pending['task_id']} is not finished yet" in text_of(early)
    assert failed["status"] == "failed" and after.is_error
    assert f"task {failed['task_id']} failed, so it has no image" in text_of(after)
    assert standin.stats.create_calls == 2


@pytest.mark.parametrize(
    "image", ["gptunnel://models", "gptunnel://images/0123456789abcdef01234567/preview", "0123456789abcdef"]
)
async def test_what_names_no_image_is_refused_before_anything_is_sent(
    memory_server: ServerLauncher, standin: StandIn, image: str
) -> None:
    async with memory_server.connect() as client:
        refused = await client.call_tool("create_image", {"prompt": "a cat", "images": [image]})
    assert refused.is_error and text_of(refused).startswith("Invalid images:")
    assert "gptunnel://images/<task_id>" in text_of(refused)
    assert standin.stats.create_calls == 0
