"""Every way a call can go wrong, as an agent using the server meets it: the server in this
process, the official MCP client, and the stand-in GPTunnel over HTTP failing in each
documented way.

Each test asserts what an agent would notice: the tool error says what is wrong and what to do,
nothing is paid for twice, nothing half-done is left behind, and the API key never shows.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp_types import BlobResourceContents, TextResourceContents

import gptunnel_mcp.server
from gptunnel_mcp._main import main

from .conftest import API_KEY, TOOL_NAMES, ServerLauncher, environment, structured, text_of
from .standin import StandIn, Stats

pytestmark = pytest.mark.anyio

UNKNOWN_ID = "0123456789abcdef01234567"
NOT_AN_IMAGE = b"<html>not an image</html>"


@pytest.fixture(autouse=True)
def _quick_tasks(standin: StandIn) -> None:
    """The errors here come before a task is made or once it has ended, never while it runs; and
    no test here is about the picture, whose rendering at full size takes a fifth of a second."""
    standin.behaviour.generation_seconds = 0
    standin.behaviour.image_size = (256, 256)


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


# --- permanent upstream errors on create -----------------------------------------------------

PERMANENT = [
    (2, ["rejected the API key", "GPTUNNEL_API_KEY", "restart the MCP server"]),
    (3, ["invalid (code 3)", "the stand-in was told to refuse", "fix the request"]),
    (5, ["balance is too low", "top up"]),
    (7, ["may not use this model", "choose another model"]),
    (1001, ["sensitive content", "rephrase"]),
    (1002, ["content safety check", "rephrase"]),
]


async def test_permanent_create_errors_are_explained_not_retried_and_not_recorded(
    memory_server: ServerLauncher, standin: StandIn, subtests: pytest.Subtests
) -> None:
    async with memory_server.connect() as client:
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


# --- task ids GPTunnel does not know, or that are not ids ------------------------------------


async def test_unknown_and_malformed_task_ids(
    memory_server: ServerLauncher, standin: StandIn, subtests: pytest.Subtests
) -> None:
    async with memory_server.connect() as client:
        with subtests.test("unknown id"):
            result = await client.call_tool("get_result", {"task_id": UNKNOWN_ID})
            text = text_of(result)
            assert result.is_error, text
            assert_says(
                text, "no task with this id", "code 4", "list known tasks with the resource gptunnel://images"
            )
            assert standin.stats.result_calls == 1  # code 4 is final: not retried
            assert (await history(client))["tasks"] == []  # not adopted into the history
        for task_id in ("xyz", UNKNOWN_ID[:-1] + "g", UNKNOWN_ID + "8", UNKNOWN_ID + "\n", " " + UNKNOWN_ID):
            with subtests.test("malformed id", task_id=task_id):
                standin.stats = Stats()
                result = await client.call_tool("get_result", {"task_id": task_id})
                text = text_of(result)
                assert result.is_error, text
                assert_says(
                    text,
                    repr(task_id),
                    "not a GPTunnel task id",
                    "24 hexadecimal characters",
                    "as returned by create_image or generate_and_wait",
                )
                assert standin.stats == Stats(), "a malformed id reached GPTunnel"


# --- bad inputs are refused before anything is sent ------------------------------------------

BAD_INPUTS: list[tuple[dict[str, Any], list[str]]] = [
    ({"prompt": ""}, ["invalid prompt", "at least 1 character"]),
    ({"prompt": "   \n\t "}, ["invalid prompt", "blank"]),
    ({"prompt": "ok", "aspect_ratio": "2:1"}, ["invalid aspect_ratio", "'1:1'", "'16:9'", "'3:4'", "'9:21'"]),
    ({"prompt": "ok", "images": ["ftp://example.com/a.png"]}, ["invalid images", "ftp://", "http(s) URL"]),
    ({"prompt": "ok", "images": ["data:image/png;base64,iVBORw0KGgo="]}, ["invalid images", "base64"]),
    ({"prompt": "ok", "images": ["/home/me/cat.png"]}, ["invalid images", "http(s) URL"]),
    (
        {"prompt": "ok", "model": "yandex-art", "aspect_ratio": "16:9"},
        ["invalid aspect_ratio", "takes no aspect_ratio", "gptunnel://models"],
    ),
    (
        {"prompt": "ok", "model": "flux-dev", "images": ["https://example.com/a.png"]},
        ["invalid images", "takes no reference images", "gpt-image-1-low", "gptunnel://models"],
    ),
]


async def test_bad_inputs_never_cost_a_request(
    memory_server: ServerLauncher, standin: StandIn, subtests: pytest.Subtests
) -> None:
    async with memory_server.connect() as client:
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


# --- a task that GPTunnel ends as failed -----------------------------------------------------


async def test_a_failed_task_is_a_tool_error_and_recorded_as_failed(
    memory_server: ServerLauncher, standin: StandIn, home: Path, subtests: pytest.Subtests
) -> None:
    async with memory_server.connect() as client:
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


# --- transient faults are retried, without a second create -----------------------------------


@pytest.mark.parametrize("kind", ["http503", "http429", "code6", "code1", "code500"])
async def test_transient_faults_on_create_are_retried_into_exactly_one_task(
    memory_server: ServerLauncher, standin: StandIn, kind: str
) -> None:
    behaviour = standin.behaviour
    behaviour.retry_after = 0.05
    behaviour.transient_kind, behaviour.transient_failures = kind, 2
    async with memory_server.connect() as client:
        result = await client.call_tool("generate_and_wait", {"prompt": f"survives {kind}"})
    assert not result.is_error, text_of(result)
    data = structured(result)
    assert data["status"] == "done"
    # Two refused creates, then one that worked: one task upstream, one image.
    assert behaviour.transient_failures == 0
    assert standin.stats.create_calls == 3
    assert standin.task_ids() == [data["task_id"]]
    assert Path(data["file_path"]).read_bytes() == standin.image_bytes(data["task_id"])
    assert "transient failure" in memory_server.logs()


@pytest.mark.parametrize("kind", ["http503", "http429", "code6", "html", "disconnect"])
async def test_transient_faults_while_polling_are_retried(
    memory_server: ServerLauncher, standin: StandIn, kind: str
) -> None:
    """Reading a task costs nothing, so even an answer of unknown meaning is retried there."""
    behaviour = standin.behaviour
    behaviour.retry_after = 0.05
    async with memory_server.connect() as client:
        task_id = structured(await client.call_tool("create_image", {"prompt": f"polled through {kind}"}))[
            "task_id"
        ]
        standin.stats = Stats()
        behaviour.transient_kind, behaviour.transient_failures = kind, 2
        result = await client.call_tool("get_result", {"task_id": task_id})
    assert not result.is_error, text_of(result)
    assert structured(result)["status"] == "done"
    assert standin.stats.result_calls == 3 and standin.stats.create_calls == 0
    assert standin.task_ids() == [task_id]


# --- a create whose outcome is unknown is never retried --------------------------------------


async def test_a_create_with_unknown_outcome_is_not_retried(
    memory_server: ServerLauncher, standin: StandIn, subtests: pytest.Subtests
) -> None:
    """An HTML page with HTTP 200, or a dropped connection, after the create was sent: GPTunnel may
    have started (and billed) the task, so asking again could pay twice."""
    behaviour = standin.behaviour
    async with memory_server.connect() as client:
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
                    assert_says(text, "not charged twice", "check your GPTunnel account")
                    assert standin.stats.create_calls == 1
                    assert behaviour.transient_failures == 1  # no second attempt took the other fault
                    assert len(standin.task_ids()) - before <= 1
                    behaviour.transient_failures = 0


# --- a configured cap ------------------------------------------------------------------------


async def test_a_cap_on_images_refuses_before_paying(memory_server: ServerLauncher, standin: StandIn) -> None:
    async with memory_server.connect(GPTUNNEL_MAX_IMAGES_PER_HOUR="1") as client:
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


# --- download problems -----------------------------------------------------------------------


async def test_a_link_serving_no_image_stores_nothing_and_the_task_stays_resumable(
    memory_server: ServerLauncher, standin: StandIn, home: Path
) -> None:
    standin.behaviour.download_bytes_override = NOT_AN_IMAGE
    async with memory_server.connect() as client:
        result = await client.call_tool("generate_and_wait", {"prompt": "a bad link"})
        text = text_of(result)
        assert result.is_error, text
        assert_says(text, "did not return an image", "try again later")
        (task_id,) = standin.task_ids()
        # generate_and_wait never showed the agent the task id: the error must.
        assert f"call get_result with task_id {task_id}" in text
        assert standin.stats.download_calls == 1  # not an image is final: not retried
        assert files_of(home) == [], "a file or a .part was left in the images folder"
        # The task is kept, done upstream, not done here.
        listed = await history(client)
        assert [(t["task_id"], t["status"]) for t in listed["tasks"]] == [(task_id, "pending")]
        assert (await record_of(client, task_id))["upstream_status"] == "done"

        standin.behaviour.download_bytes_override = None
        # "Try again" is safe: the same call finishes the task it already paid for.
        retried = await client.call_tool("generate_and_wait", {"prompt": "a bad link"})
        finished = await client.call_tool("get_result", {"task_id": task_id})
    assert not retried.is_error, text_of(retried)
    assert structured(retried)["reused"] and structured(retried)["task_id"] == task_id
    assert not finished.is_error, text_of(finished)
    data = structured(finished)
    assert data["status"] == "done"
    assert Path(data["file_path"]).read_bytes() == standin.image_bytes(task_id)
    assert [p.name for p in files_of(home)] == [Path(data["file_path"]).name]
    assert standin.stats.create_calls == 1 and standin.stats.download_calls == 2


async def test_an_expired_link_says_so(memory_server: ServerLauncher, standin: StandIn, home: Path) -> None:
    standin.behaviour.download_status = 404
    async with memory_server.connect() as client:
        result = await client.call_tool("generate_and_wait", {"prompt": "too late"})
    text = text_of(result)
    assert result.is_error, text
    assert_says(text, "HTTP 404", "expire", "48 hours", "create the image again")
    assert standin.stats.download_calls == 1
    assert files_of(home) == []


# --- no key, wrong key -----------------------------------------------------------------------


async def test_without_a_key_the_server_starts_explains_and_serves_stored_images(
    memory_server: ServerLauncher, standin: StandIn
) -> None:
    async with memory_server.connect() as client:
        earlier = structured(await client.call_tool("generate_and_wait", {"prompt": "made with a key"}))
    assert earlier["status"] == "done"
    before = (standin.stats.create_calls, standin.stats.result_calls, standin.stats.balance_calls)

    async with memory_server.connect(GPTUNNEL_API_KEY=None) as client:
        tools = {t.name for t in (await client.list_tools()).tools}
        assert tools == TOOL_NAMES
        refused = [
            await client.call_tool("create_image", {"prompt": "no key"}),
            await client.call_tool("generate_and_wait", {"prompt": "no key"}),
            await client.call_tool("get_balance", {}),
        ]
        listed = await history(client)
        blob = await read_blob(client, earlier["resource_uri"])
        stored = await client.call_tool("get_result", {"task_id": earlier["task_id"]})
        found = await client.call_tool("search_images", {"query": "WITH A KEY"})
    for result in refused:
        text = text_of(result)
        assert result.is_error, text
        assert_says(text, "set GPTUNNEL_API_KEY", "MCP server's environment", "restart the server")
    assert [t["task_id"] for t in listed["tasks"]] == [earlier["task_id"]]
    assert blob == standin.image_bytes(earlier["task_id"])
    assert not stored.is_error and structured(stored)["sha256"] == earlier["sha256"]
    assert [t["task_id"] for t in structured(found)["tasks"]] == [earlier["task_id"]]
    after = (standin.stats.create_calls, standin.stats.result_calls, standin.stats.balance_calls)
    assert after == before, "a call without a key reached GPTunnel"


async def test_a_wrong_key_is_reported_as_rejected_without_showing_it(
    memory_server: ServerLauncher, standin: StandIn
) -> None:
    wrong = "wrong-key-3e8d1f0a"
    async with memory_server.connect(GPTUNNEL_API_KEY=wrong) as client:
        created = await client.call_tool("create_image", {"prompt": "who am I"})
        balance = await client.call_tool("get_balance", {})
    for result, reason in ((created, "code 2"), (balance, "HTTP 401")):
        text = text_of(result)
        assert result.is_error, text
        assert_says(text, "rejected the API key", reason, "GPTUNNEL_API_KEY", "restart the MCP server")
        assert wrong not in result.model_dump_json()
    assert standin.stats.auth_headers == [wrong, wrong]  # sent, bare, once each: not retried
    assert standin.task_ids() == []
    assert wrong not in memory_server.logs()


# --- the key stays secret --------------------------------------------------------------------


async def test_the_key_appears_in_no_result_resource_log_or_file(
    memory_server: ServerLauncher, standin: StandIn, home: Path
) -> None:
    behaviour = standin.behaviour
    seen: list[str] = []

    async def call(client: Client, tool: str, args: dict[str, Any]) -> Any:
        result = await client.call_tool(tool, args)
        seen.append(result.model_dump_json())
        return result

    async with memory_server.connect() as client:
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
    log = memory_server.logs()
    assert "created task" in log and "transient failure" in log and API_KEY not in log
    files = [p for p in home.rglob("*") if p.is_file()]
    assert any(p.name.endswith(".sqlite3") for p in files)
    for path in files:
        assert API_KEY.encode() not in path.read_bytes(), path


# --- configuration errors at start ----------------------------------------------------------


def test_bad_configuration_stops_the_server_with_one_line(
    memory_server: ServerLauncher,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    subtests: pytest.Subtests,
) -> None:
    def serve(*_: object) -> int:
        raise AssertionError("the server started serving despite its bad configuration")

    monkeypatch.setattr(gptunnel_mcp.server, "serve", serve)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cases = [
        ("GPTUNNEL_WAIT_TIMEOUT", "soon", ["'soon'", "number"]),
        ("GPTUNNEL_BASE_URL", "not-a-url", ["'not-a-url'", "URL"]),
        ("GPTUNNEL_MCP_HOME", str(blocker / "home"), ["cannot create the data folder", "writable folder"]),
    ]
    for variable, value, words in cases:
        with subtests.test(variable=variable):
            with environment(memory_server.env(**{variable: value})), pytest.raises(SystemExit) as stopped:
                main([])
            out, err = capsys.readouterr()
            assert stopped.value.code == 2
            assert out == ""
            lines = err.strip().splitlines()
            assert len(lines) == 1, err
            assert variable in lines[0] and "Traceback" not in err
            assert_says(lines[0], *words)
            assert API_KEY not in err
