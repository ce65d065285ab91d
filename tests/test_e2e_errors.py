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
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp_types import BlobResourceContents, TextResourceContents

from .standin import StandIn, Stats

from .conftest import API_KEY, ServerLauncher, structured, text_of

pytestmark = pytest.mark.anyio

UNKNOWN_ID = "0123456789abcdef01234567"
NOT_AN_IMAGE = b"<html>not an image</html>"


@pytest.fixture
def server(standin: StandIn, home: Path, tmp_path: Path) -> ServerLauncher:
    """Over stdio only: the error paths are transport-independent, and each start costs time."""
    logs = tmp_path / "logs"
    logs.mkdir()
    return ServerLauncher(standin, home, logs, transport="stdio")


@pytest.fixture(autouse=True)
def _quick_generation(standin: StandIn) -> None:
    standin.behaviour.generation_seconds = 0.3


async def read_json(client: Client, uri: str) -> dict[str, Any]:
    contents = (await client.read_resource(uri)).contents[0]
    assert isinstance(contents, TextResourceContents), contents
    return dict(json.loads(contents.text))


async def read_blob(client: Client, uri: str) -> bytes:
    contents = (await client.read_resource(uri)).contents[0]
    assert isinstance(contents, BlobResourceContents), contents
    return base64.b64decode(contents.blob)


async def history(client: Client) -> dict[str, Any]:
    return await read_json(client, "gptunnel://images")


async def record_of(client: Client, task_id: str) -> dict[str, Any]:
    return await read_json(client, f"gptunnel://images/{task_id}")


def assert_says(text: str, *words: str) -> None:
    for word in words:
        assert word.lower() in text.lower(), f"{word!r} not in {text!r}"


def files_of(home: Path) -> list[Path]:
    images = home / "images"
    return sorted(images.iterdir()) if images.exists() else []


# --- 1. permanent upstream errors on create --------------------------------------------------

PERMANENT = [
    (2, ["rejected the API key", "GPTUNNEL_API_KEY"]),
    (3, ["invalid (code 3)", "the stand-in was told to refuse", "fix the arguments"]),
    (5, ["balance is too low", "top up"]),
    (7, ["may not use this model", "choose another model"]),
    (1001, ["sensitive content", "rephrase"]),
    (1002, ["content safety check", "rephrase"]),
]


async def test_permanent_create_errors_are_explained_not_retried_and_not_recorded(
    server: ServerLauncher, standin: StandIn, subtests: pytest.Subtests
) -> None:
    async with server.connect() as client:
        for tool in ("create_image", "generate_and_wait"):
            for code, words in PERMANENT:
                with subtests.test(tool=tool, code=code):
                    standin.stats = Stats()
                    standin.behaviour.create_code = code
                    result = await client.call_tool(tool, {"prompt": "a cat on a mat"})
                    text = text_of(result)
                    assert result.is_error, text
                    assert_says(text, f"code {code}", *words)
                    # Final: one request, no polling, and nothing pending that invites a retry.
                    assert standin.stats.create_calls == 1
                    assert standin.stats.result_calls == 0
                    assert standin.task_ids() == []
                    listed = await history(client)
                    assert listed["total"] == 0 and listed["tasks"] == []


# --- 2. task ids GPTunnel does not know, or that are not ids ----------------------------------


async def test_unknown_and_malformed_task_ids(
    server: ServerLauncher, standin: StandIn, subtests: pytest.Subtests
) -> None:
    async with server.connect() as client:
        with subtests.test("unknown id"):
            result = await client.call_tool("get_result", {"task_id": UNKNOWN_ID})
            text = text_of(result)
            assert result.is_error, text
            assert_says(text, "no task with this id", "code 4", "gptunnel://images")
            assert standin.stats.result_calls == 1  # code 4 is final: not retried
            assert (await history(client))["tasks"] == []  # not adopted into the history
        for task_id in ("xyz", UNKNOWN_ID[:-1] + "g", UNKNOWN_ID + "8", UNKNOWN_ID + "\n", " " + UNKNOWN_ID):
            with subtests.test("malformed id", task_id=task_id):
                standin.stats = Stats()
                result = await client.call_tool("get_result", {"task_id": task_id})
                text = text_of(result)
                assert result.is_error, text
                assert_says(text, repr(task_id), "not a GPTunnel task id", "24 hexadecimal characters")
                assert standin.stats == Stats(), "a malformed id reached GPTunnel"


# --- 3. bad inputs are refused before anything is sent ----------------------------------------

BAD_INPUTS: list[tuple[dict[str, Any], list[str]]] = [
    ({"prompt": ""}, ["invalid prompt", "at least 1 character"]),
    ({"prompt": "   \n\t "}, ["invalid prompt", "blank"]),
    ({"prompt": "ok", "aspect_ratio": "2:1"}, ["invalid aspect_ratio", "'1:1'", "'16:9'", "'3:4'", "'9:21'"]),
    ({"prompt": "ok", "images": ["ftp://example.com/a.png"]}, ["invalid images", "ftp://", "http(s) URL"]),
    ({"prompt": "ok", "images": ["data:image/png;base64,iVBORw0KGgo="]}, ["invalid images", "base64"]),
    ({"prompt": "ok", "images": ["/home/me/cat.png"]}, ["invalid images", "http(s) URL"]),
    ({"prompt": "ok", "model": "yandex-art", "aspect_ratio": "16:9"}, ["aspect_ratio", "takes no"]),
]


async def test_bad_inputs_never_cost_a_request(
    server: ServerLauncher, standin: StandIn, subtests: pytest.Subtests
) -> None:
    async with server.connect() as client:
        for args, words in BAD_INPUTS:
            for tool in ("create_image", "generate_and_wait"):
                with subtests.test(tool=tool, args=args):
                    result = await client.call_tool(tool, args)
                    text = text_of(result)
                    assert result.is_error, text
                    assert_says(text, *words, "Nothing was sent to GPTunnel")
        listed = await history(client)
    assert standin.stats.create_calls == 0
    assert standin.stats == Stats(), "a bad input reached GPTunnel"
    assert listed["tasks"] == []


# --- 4. a task that GPTunnel ends as failed ----------------------------------------------------


async def test_a_failed_task_is_a_tool_error_and_recorded_as_failed(
    server: ServerLauncher, standin: StandIn, home: Path, subtests: pytest.Subtests
) -> None:
    async with server.connect() as client:
        for final in ("failed", "error"):
            with subtests.test(final_status=final):
                standin.behaviour.final_status = final
                upstream_error = f"generation failed: the stand-in was told to end this task as {final!r}"
                result = await client.call_tool("generate_and_wait", {"prompt": f"doomed to {final}"})
                text = text_of(result)
                assert result.is_error, text
                assert_says(text, upstream_error, "change the prompt or the model")
                data = structured(result)
                assert data["status"] == "failed" and data["upstream_status"] == final
                assert data["error"] == upstream_error and data["file_path"] is None
                task_id = data["task_id"]
                assert task_id == standin.task_ids()[-1]

                record = await record_of(client, task_id)
                assert record["status"] == "failed" and record["error"] == upstream_error
                entries = {t["task_id"]: t["status"] for t in (await history(client))["tasks"]}
                assert entries[task_id] == "failed"

                # Failed is final: asking again is answered from the history, not by GPTunnel.
                calls = standin.stats.result_calls
                again = await client.call_tool("get_result", {"task_id": task_id})
                assert again.is_error and structured(again)["error"] == upstream_error
                assert standin.stats.result_calls == calls
    assert standin.stats.download_calls == 0 and files_of(home) == []


# --- 5. transient faults are retried, without a second create ----------------------------------


async def test_transient_faults_on_create_are_retried_into_exactly_one_task(
    server: ServerLauncher, standin: StandIn, subtests: pytest.Subtests
) -> None:
    behaviour = standin.behaviour
    behaviour.retry_after = 0.2
    async with server.connect() as client:
        for kind in ("http503", "http429", "code6", "code1", "code500"):
            with subtests.test(kind=kind):
                standin.stats = Stats()
                before = standin.task_ids()
                behaviour.transient_kind, behaviour.transient_failures = kind, 2
                result = await client.call_tool("generate_and_wait", {"prompt": f"survives {kind}"})
                assert not result.is_error, text_of(result)
                data = structured(result)
                assert data["status"] == "done"
                # Two refused creates, then one that worked: one new task upstream, one image.
                assert behaviour.transient_failures == 0
                assert standin.stats.create_calls == 3
                assert standin.task_ids() == [*before, data["task_id"]]
                assert Path(data["file_path"]).read_bytes() == standin.image_bytes(data["task_id"])
    assert "transient failure" in server.stderr()


async def test_transient_faults_while_polling_are_retried(
    server: ServerLauncher, standin: StandIn, subtests: pytest.Subtests
) -> None:
    """Reading a task costs nothing, so even an answer of unknown meaning is retried there."""
    behaviour = standin.behaviour
    behaviour.retry_after = 0.2
    kinds = ("http503", "http429", "code6", "html", "disconnect")
    async with server.connect() as client:
        tasks = [
            structured(await client.call_tool("create_image", {"prompt": f"polled through {kind}"}))[
                "task_id"
            ]
            for kind in kinds
        ]
        await anyio.sleep(0.5)  # all finished upstream
        for kind, task_id in zip(kinds, tasks, strict=True):
            with subtests.test(kind=kind):
                standin.stats = Stats()
                behaviour.transient_kind, behaviour.transient_failures = kind, 2
                result = await client.call_tool("get_result", {"task_id": task_id})
                assert not result.is_error, text_of(result)
                assert structured(result)["status"] == "done"
                assert standin.stats.result_calls == 3 and standin.stats.create_calls == 0
    assert standin.task_ids() == tasks


# --- 6. a create whose outcome is unknown is never retried -------------------------------------


async def test_a_create_with_unknown_outcome_is_not_retried(
    server: ServerLauncher, standin: StandIn, subtests: pytest.Subtests
) -> None:
    """An HTML page with HTTP 200, or a dropped connection, after the create was sent: GPTunnel may
    have started (and billed) the task, so asking again could pay twice."""
    behaviour = standin.behaviour
    async with server.connect() as client:
        for tool in ("create_image", "generate_and_wait"):
            for kind in ("html", "disconnect"):
                with subtests.test(tool=tool, kind=kind):
                    standin.stats = Stats()
                    before = len(standin.task_ids())
                    behaviour.transient_kind, behaviour.transient_failures = kind, 2
                    result = await client.call_tool(tool, {"prompt": "pay once"})
                    text = text_of(result)
                    assert result.is_error, text
                    # The task, if any, is only in the GPTunnel account: the server never saw its id.
                    assert_says(text, "not charged twice", "GPTunnel account")
                    assert standin.stats.create_calls == 1
                    assert behaviour.transient_failures == 1  # no second attempt took the other fault
                    assert len(standin.task_ids()) - before <= 1
                    behaviour.transient_failures = 0


# --- a configured cap ------------------------------------------------------------------------------


async def test_a_cap_on_images_refuses_before_paying(server: ServerLauncher, standin: StandIn) -> None:
    async with server.connect(GPTUNNEL_MAX_IMAGES_PER_HOUR="1") as client:
        first = structured(await client.call_tool("create_image", {"prompt": "the one"}))
        refused = await client.call_tool("generate_and_wait", {"prompt": "one too many"})
        # The same request again is answered with the task already made: that costs nothing.
        again = structured(await client.call_tool("create_image", {"prompt": "the one"}))
    text = text_of(refused)
    assert refused.is_error, text
    assert_says(
        text, "cap of 1 images per hour", "GPTUNNEL_MAX_IMAGES_PER_HOUR", "Nothing was sent to GPTunnel"
    )
    assert again["reused"] and again["task_id"] == first["task_id"]
    assert standin.stats.create_calls == 1 and standin.task_ids() == [first["task_id"]]


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
        blob = await read_blob(client, earlier["resource_uri"])
        stored = await client.call_tool("get_result", {"task_id": earlier["task_id"]})
    for result in refused:
        text = text_of(result)
        assert result.is_error, text
        assert "Set GPTUNNEL_API_KEY" in text and "restart the server" in text
    assert [t["task_id"] for t in listed["tasks"]] == [earlier["task_id"]]
    assert blob == standin.image_bytes(earlier["task_id"])
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


async def test_bad_configuration_stops_the_server_with_one_line(
    server: ServerLauncher, tmp_path: Path, subtests: pytest.Subtests
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cases = [
        ("GPTUNNEL_WAIT_TIMEOUT", "soon", ["'soon'", "number"]),
        ("GPTUNNEL_BASE_URL", "not-a-url", ["'not-a-url'", "URL"]),
        ("GPTUNNEL_MCP_HOME", str(blocker / "home"), ["cannot create the data folder", "writable folder"]),
    ]
    finished: dict[str, tuple[subprocess.CompletedProcess[bytes], float]] = {}

    async def start(variable: str, value: str) -> None:
        started = time.monotonic()
        process = await anyio.run_process(
            [sys.executable, "-m", "gptunnel_mcp"],
            stdin=subprocess.DEVNULL,
            env=server.env(**{variable: value}),
            check=False,
        )
        finished[variable] = (process, time.monotonic() - started)

    # The three at once: each is a Python start-up, and none may hang waiting for a client.
    with anyio.fail_after(30):
        async with anyio.create_task_group() as group:
            for variable, value, _ in cases:
                group.start_soon(start, variable, value)
    for variable, _, words in cases:
        with subtests.test(variable=variable):
            process, took = finished[variable]
            stderr = process.stderr.decode()
            assert process.returncode != 0 and took < 20
            assert process.stdout == b""
            lines = stderr.strip().splitlines()
            assert len(lines) == 1, stderr
            assert variable in lines[0] and "Traceback" not in stderr
            assert_says(lines[0], *words)
            assert API_KEY not in stderr


# --- 12. stdout belongs to the protocol, logs go to stderr ------------------------------------------


async def test_logs_go_to_stderr(server: ServerLauncher) -> None:
    async with server.connect() as client:
        data = structured(await client.call_tool("create_image", {"prompt": "log me"}))
    assert f"created task {data['task_id']}" in server.stderr()
