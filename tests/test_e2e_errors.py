"""Every way a call can go wrong, as a user of the server meets it: a real stdio subprocess, the
official MCP client, and the stand-in GPTunnel over HTTP failing in each documented way.

Each test asserts what a user would notice: the tool error says what is wrong and what to do,
nothing is paid for twice, nothing half-done is left behind, and the API key never shows.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from gptunnel_mcp.standin import StandIn, Stats

from .conftest import API_KEY, ServerLauncher, structured, text_of

pytestmark = pytest.mark.anyio

UNKNOWN_ID = "0123456789abcdef01234567"
NOT_AN_IMAGE = b"<html>not an image</html>"


@pytest.fixture
def server(standin: StandIn, home: Path, tmp_path: Path) -> Iterator[ServerLauncher]:
    """Over stdio only: the error paths are transport-independent, and each start costs time."""
    logs = tmp_path / "logs"
    logs.mkdir()
    yield ServerLauncher(standin, home, logs, transport="stdio")


@pytest.fixture(autouse=True)
def _quick_generation(standin: StandIn) -> None:
    standin.behaviour.generation_seconds = 0.3


async def history(client: Client) -> dict[str, Any]:
    return dict(json.loads((await client.read_resource("gptunnel://images")).contents[0].text))


async def record_of(client: Client, task_id: str) -> dict[str, Any]:
    return dict(json.loads((await client.read_resource(f"gptunnel://images/{task_id}")).contents[0].text))


def files_of(home: Path) -> list[Path]:
    images = home / "images"
    return sorted(images.iterdir()) if images.exists() else []


# --- 1. permanent upstream errors on create --------------------------------------------------


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (2, ["rejected the API key", "GPTUNNEL_API_KEY"]),
        (3, ["invalid (code 3)", "the stand-in was told to refuse", "Fix the arguments"]),
        (5, ["balance is too low", "Top up"]),
        (7, ["may not use this model", "Choose another model"]),
        (1001, ["sensitive content", "Rephrase"]),
        (1002, ["content safety check", "Rephrase"]),
    ],
)
@pytest.mark.parametrize("tool", ["create_image", "generate_and_wait"])
async def test_permanent_create_errors_are_explained_not_retried_and_not_recorded(
    server: ServerLauncher, standin: StandIn, code: int, words: list[str], tool: str
) -> None:
    standin.behaviour.create_code = code
    async with server.connect() as client:
        result = await client.call_tool(tool, {"prompt": "a cat on a mat"})
        text = text_of(result)
        assert result.is_error, text
        for word in words:
            assert word in text, (word, text)
        assert f"code {code}" in text
        # A permanent error is final: one request, and nothing pending that would tempt a retry.
        assert standin.stats.create_calls == 1
        assert standin.stats.result_calls == 0
        assert standin.task_ids() == []
        listed = await history(client)
    assert listed["total"] == 0 and listed["tasks"] == []


# --- 2. task ids GPTunnel does not know, or that are not ids ----------------------------------


async def test_unknown_task_id_is_not_found_and_not_adopted(server: ServerLauncher, standin: StandIn) -> None:
    async with server.connect() as client:
        result = await client.call_tool("get_result", {"task_id": UNKNOWN_ID})
        listed = await history(client)
    text = text_of(result)
    assert result.is_error, text
    assert "no task with this id" in text and "code 4" in text
    assert "gptunnel://images" in text  # where to look instead
    assert standin.stats.result_calls == 1  # code 4 is final: not retried
    assert listed["tasks"] == []


@pytest.mark.parametrize("task_id", ["xyz", "0123456789abcdef0123456g", "0123456789abcdef012345678"])
async def test_malformed_task_id_costs_no_request(server: ServerLauncher, standin: StandIn, task_id: str) -> None:
    async with server.connect() as client:
        result = await client.call_tool("get_result", {"task_id": task_id})
    text = text_of(result)
    assert result.is_error, text
    assert "not a GPTunnel task id" in text and "24 hexadecimal characters" in text
    assert repr(task_id) in text
    assert standin.stats == Stats()


# --- 3. bad inputs are refused before anything is sent ----------------------------------------


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ({"prompt": ""}, ["invalid prompt", "at least 1 character"]),
        ({"prompt": "   \n\t "}, ["invalid prompt", "blank"]),
        ({"prompt": "ok", "aspect_ratio": "2:1"}, ["invalid aspect_ratio", "'1:1'", "'16:9'", "'9:21'"]),
        ({"prompt": "ok", "images": ["ftp://example.com/a.png"]}, ["invalid images", "http(s) URL"]),
        ({"prompt": "ok", "images": ["data:image/png;base64,iVBORw0KGgo="]}, ["invalid images", "base64"]),
        ({"prompt": "ok", "images": ["/home/me/cat.png"]}, ["invalid images", "http(s) URL"]),
        ({"prompt": "ok", "model": "yandex-art", "aspect_ratio": "16:9"}, ["takes no aspect_ratio"]),
    ],
)
async def test_bad_inputs_never_cost_a_request(
    server: ServerLauncher, standin: StandIn, args: dict[str, Any], words: list[str]
) -> None:
    async with server.connect() as client:
        results = [await client.call_tool(tool, args) for tool in ("create_image", "generate_and_wait")]
        listed = await history(client)
    for result in results:
        text = text_of(result)
        assert result.is_error, text
        for word in words:
            assert word in text, (word, text)
        assert "Nothing was sent to GPTunnel" in text
    assert standin.stats.create_calls == 0 and standin.stats == Stats()
    assert listed["tasks"] == []


# --- 4. a task that GPTunnel ends as failed ----------------------------------------------------


@pytest.mark.parametrize("final", ["failed", "error"])
async def test_a_failed_task_is_a_tool_error_and_recorded_as_failed(
    server: ServerLauncher, standin: StandIn, home: Path, final: str
) -> None:
    standin.behaviour.final_status = final
    upstream_error = f"generation failed: the stand-in was told to end this task as {final!r}"
    async with server.connect() as client:
        result = await client.call_tool("generate_and_wait", {"prompt": "doomed"})
        (task_id,) = standin.task_ids()
        record = await record_of(client, task_id)
        listed = await history(client)
        # Failed is final: asking again answers from the history, without GPTunnel.
        calls = standin.stats.result_calls
        again = await client.call_tool("get_result", {"task_id": task_id})
    text = text_of(result)
    assert result.is_error, text
    assert upstream_error in text and "Change the prompt or the model" in text
    data = structured(result)
    assert data["status"] == "failed" and data["upstream_status"] == final
    assert data["error"] == upstream_error and data["file_path"] is None
    assert record["status"] == "failed" and record["error"] == upstream_error
    assert [(t["task_id"], t["status"]) for t in listed["tasks"]] == [(task_id, "failed")]
    assert again.is_error and structured(again)["error"] == upstream_error
    assert standin.stats.result_calls == calls
    assert standin.stats.download_calls == 0 and files_of(home) == []


# --- 5. transient faults are retried, without a second create ----------------------------------

TRANSIENT_KINDS = ["http503", "http429", "code6", "code1", "code500"]


@pytest.mark.parametrize("kind", TRANSIENT_KINDS)
async def test_transient_faults_on_create_are_retried_into_exactly_one_task(
    server: ServerLauncher, standin: StandIn, kind: str
) -> None:
    standin.behaviour.transient_failures = 2
    standin.behaviour.transient_kind = kind
    standin.behaviour.retry_after = 0.2
    async with server.connect() as client:
        result = await client.call_tool("generate_and_wait", {"prompt": f"survives {kind}"})
    assert not result.is_error, text_of(result)
    data = structured(result)
    assert data["status"] == "done"
    # Two refused creates, then one that worked: one task upstream, one image.
    assert standin.stats.create_calls == 3
    assert standin.task_ids() == [data["task_id"]]
    assert standin.behaviour.transient_failures == 0
    assert Path(data["file_path"]).read_bytes() == standin.image_bytes(data["task_id"])
    assert "transient failure" in server.stderr()


@pytest.mark.parametrize("kind", [*TRANSIENT_KINDS, "html", "disconnect"])
async def test_transient_faults_while_polling_are_retried(server: ServerLauncher, standin: StandIn, kind: str) -> None:
    """Reading a task costs nothing, so even an answer of unknown meaning is retried there."""
    standin.behaviour.retry_after = 0.2
    async with server.connect() as client:
        task_id = structured(await client.call_tool("create_image", {"prompt": f"polled through {kind}"}))[
            "task_id"
        ]
        await anyio.sleep(0.4)  # finished upstream
        standin.behaviour.transient_kind = kind
        standin.behaviour.transient_failures = 2
        result = await client.call_tool("get_result", {"task_id": task_id})
    assert not result.is_error, text_of(result)
    assert structured(result)["status"] == "done"
    assert standin.stats.result_calls == 3
    assert standin.stats.create_calls == 1 and standin.task_ids() == [task_id]


# --- 6. a create whose outcome is unknown is never retried -------------------------------------


@pytest.mark.parametrize("kind", ["html", "disconnect"])
@pytest.mark.parametrize("tool", ["create_image", "generate_and_wait"])
async def test_a_create_with_unknown_outcome_is_not_retried(
    server: ServerLauncher, standin: StandIn, kind: str, tool: str
) -> None:
    standin.behaviour.transient_failures = 2
    standin.behaviour.transient_kind = kind
    async with server.connect() as client:
        result = await client.call_tool(tool, {"prompt": "pay once"})
    text = text_of(result)
    assert result.is_error, text
    assert "not charged twice" in text and "gptunnel://images" in text
    assert standin.stats.create_calls == 1
    assert standin.behaviour.transient_failures == 1  # the second fault was never asked for
    assert len(standin.task_ids()) <= 1


# --- 7. download problems ------------------------------------------------------------------------


async def test_a_link_serving_no_image_stores_nothing_and_the_task_stays_resumable(
    server: ServerLauncher, standin: StandIn, home: Path
) -> None:
    standin.behaviour.download_bytes_override = NOT_AN_IMAGE
    async with server.connect() as client:
        result = await client.call_tool("generate_and_wait", {"prompt": "a bad link"})
        text = text_of(result)
        assert result.is_error, text
        assert "did not return an image" in text
        (task_id,) = standin.task_ids()
        assert standin.stats.download_calls == 1  # not an image is final: not retried
        assert files_of(home) == [], "a file or a .part was left in the images folder"
        # The task is kept, done upstream, not done here.
        listed = await history(client)
        assert [(t["task_id"], t["status"]) for t in listed["tasks"]] == [(task_id, "pending")]
        assert (await record_of(client, task_id))["upstream_status"] == "done"

        standin.behaviour.download_bytes_override = None
        finished = await client.call_tool("get_result", {"task_id": task_id})
    assert not finished.is_error, text_of(finished)
    data = structured(finished)
    assert data["status"] == "done"
    assert Path(data["file_path"]).read_bytes() == standin.image_bytes(task_id)
    assert [p.name for p in files_of(home)] == [Path(data["file_path"]).name]
    assert standin.stats.create_calls == 1 and standin.stats.download_calls == 2


async def test_an_expired_link_says_so(server: ServerLauncher, standin: StandIn, home: Path) -> None:
    standin.behaviour.download_status = 404
    async with server.connect() as client:
        result = await client.call_tool("generate_and_wait", {"prompt": "too late"})
    text = text_of(result)
    assert result.is_error, text
    assert "HTTP 404" in text and "expire" in text and "48 hours" in text
    assert standin.stats.download_calls == 1
    assert files_of(home) == []


# --- 8, 9. no key, wrong key ---------------------------------------------------------------------


async def test_without_a_key_the_server_starts_explains_and_serves_stored_images(
    server: ServerLauncher, standin: StandIn
) -> None:
    async with server.connect() as client:
        earlier = structured(await client.call_tool("generate_and_wait", {"prompt": "made with a key"}))
    assert earlier["status"] == "done"
    before = (standin.stats.create_calls, standin.stats.result_calls, standin.stats.balance_calls)

    async with server.connect(GPTUNNEL_API_KEY=None) as client:
        tools = {t.name for t in (await client.list_tools()).tools}
        assert tools == {"create_image", "get_result", "generate_and_wait", "get_balance"}
        refused = [
            await client.call_tool("create_image", {"prompt": "no key"}),
            await client.call_tool("generate_and_wait", {"prompt": "no key"}),
            await client.call_tool("get_balance", {}),
        ]
        listed = await history(client)
        blob = (await client.read_resource(earlier["resource_uri"])).contents[0]
        stored = await client.call_tool("get_result", {"task_id": earlier["task_id"]})
    for result in refused:
        text = text_of(result)
        assert result.is_error, text
        assert "Set GPTUNNEL_API_KEY" in text and "restart the server" in text
    assert [t["task_id"] for t in listed["tasks"]] == [earlier["task_id"]]
    assert base64.b64decode(blob.blob) == standin.image_bytes(earlier["task_id"])
    assert not stored.is_error and structured(stored)["sha256"] == earlier["sha256"]
    after = (standin.stats.create_calls, standin.stats.result_calls, standin.stats.balance_calls)
    assert after == before, "a call without a key reached GPTunnel"
    assert "GPTUNNEL_API_KEY is not set" in server.stderr()


async def test_a_wrong_key_is_reported_as_rejected_without_showing_it(
    server: ServerLauncher, standin: StandIn
) -> None:
    wrong = "wrong-key-3e8d1f0a"
    async with server.connect(GPTUNNEL_API_KEY=wrong) as client:
        created = await client.call_tool("create_image", {"prompt": "who am I"})
        balance = await client.call_tool("get_balance", {})
    for result, reason in ((created, "code 2"), (balance, "HTTP 401")):
        text = text_of(result)
        assert result.is_error, text
        assert "rejected the API key" in text and reason in text and "GPTUNNEL_API_KEY" in text
        assert wrong not in result.model_dump_json()
    assert standin.stats.auth_headers == [wrong, wrong]  # sent, bare, once each: not retried
    assert standin.task_ids() == []
    assert wrong not in server.stderr()


# --- 10. the key stays secret ----------------------------------------------------------------------


async def test_the_key_appears_in_no_result_resource_log_or_file(
    server: ServerLauncher, standin: StandIn, home: Path
) -> None:
    behaviour = standin.behaviour
    seen: list[str] = []

    async def call(client: Client, tool: str, args: dict[str, Any]) -> Any:
        result = await client.call_tool(tool, args)
        seen.append(result.model_dump_json())
        return result

    async with server.connect() as client:
        done = structured(await call(client, "generate_and_wait", {"prompt": "secret keeper"}))
        await call(client, "get_balance", {})
        for code in (2, 3, 5, 1002):
            behaviour.create_code = code
            assert (await call(client, "create_image", {"prompt": "refused"})).is_error
        behaviour.create_code = 0
        behaviour.transient_kind, behaviour.transient_failures = "code6", 1
        await call(client, "create_image", {"prompt": "after a hiccup"})
        behaviour.transient_kind, behaviour.transient_failures = "html", 1
        await call(client, "create_image", {"prompt": "lost answer"})
        await call(client, "get_result", {"task_id": UNKNOWN_ID})
        await call(client, "get_result", {"task_id": "xyz"})
        await call(client, "create_image", {"prompt": " "})
        behaviour.final_status = "failed"
        await call(client, "generate_and_wait", {"prompt": "fails"})
        behaviour.final_status = "done"
        behaviour.download_bytes_override = NOT_AN_IMAGE
        await call(client, "generate_and_wait", {"prompt": "no image"})
        behaviour.download_bytes_override = None

        seen.append((await client.list_resources()).model_dump_json())
        seen.append((await client.read_resource("gptunnel://models")).model_dump_json())
        listed = await history(client)
        seen.append(json.dumps(listed))
        for task in listed["tasks"]:
            seen.append((await client.read_resource(task["resource_uri"])).model_dump_json())
        seen.append((await client.read_resource(done["resource_uri"])).model_dump_json())

    # The key was in use all along (so its absence below means something).
    assert API_KEY in standin.stats.auth_headers and len(listed["tasks"]) >= 4
    for text in seen:
        assert API_KEY not in text
    log = server.stderr()
    assert "created task" in log and API_KEY not in log
    files = [p for p in home.rglob("*") if p.is_file()]
    assert any(p.name.endswith(".sqlite3") for p in files)
    for path in files:
        assert API_KEY.encode() not in path.read_bytes(), path


# --- 11. configuration errors at start ------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("GPTUNNEL_WAIT_TIMEOUT", "soon"),
        ("GPTUNNEL_BASE_URL", "not-a-url"),
        ("GPTUNNEL_MCP_HOME", "under-a-file"),
    ],
)
async def test_bad_configuration_stops_the_server_with_one_line(
    server: ServerLauncher, tmp_path: Path, variable: str, value: str
) -> None:
    if value == "under-a-file":
        blocker = tmp_path / "a-file"
        blocker.write_text("not a folder")
        value = str(blocker / "home")
    started = time.monotonic()
    with anyio.fail_after(30):
        process = await anyio.run_process(
            [sys.executable, "-m", "gptunnel_mcp"],
            stdin=subprocess.DEVNULL,
            env=server.env(**{variable: value}),
            check=False,
        )
    assert time.monotonic() - started < 20
    stderr = process.stderr.decode()
    assert process.returncode != 0
    assert process.stdout == b""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert variable in lines[0] and "Traceback" not in stderr
    assert API_KEY not in stderr


# --- 12. stdout belongs to the protocol, logs go to stderr ------------------------------------------


async def test_logs_go_to_stderr(server: ServerLauncher) -> None:
    async with server.connect() as client:
        data = structured(await client.call_tool("generate_and_wait", {"prompt": "log me"}))
    log = server.stderr()
    assert f"created task {data['task_id']}" in log
    assert f"task {data['task_id']} stored as" in log
