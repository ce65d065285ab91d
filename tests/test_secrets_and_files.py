"""Secrets and files (issue 9): the key never reaches an error or the log, even cut short; each
user's images are stored apart; everything the server writes under its home is private."""

from __future__ import annotations

import base64
import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp_types import BlobResourceContents

from gptunnel_mcp import GPTunnelMCPError, ImageRequest, StorageError
from gptunnel_mcp._files import ImageFolder
from gptunnel_mcp._httpx import httpx
from gptunnel_mcp._records import StoredFile
from gptunnel_mcp._upstream import GPTunnelClient

from .conftest import MULTI_USER, ServerLauncher, mcp_client, serve_http, structured
from .standin import Behaviour, StandIn

# --- the key, echoed by GPTunnel where an error text cuts it --------------------------------------

#: Distinctive, so that any six characters of it found in a text are a leak.
KEY = "sk-Zq8vR3mW7tY2pL9xKc4"
TASK_ID = "687fab1e49832bb77d34db47"


def _pad_before_key(prefix: str, cut: int) -> str:
    """Filler that puts the key right across a cut at `cut` characters, after `prefix`: a cut
    made before redaction keeps all of the key but its last character."""
    return "x" * (cut - len(prefix) - (len(KEY) - 1))


def _leaks(text: str) -> list[str]:
    return [KEY[i : i + 6] for i in range(len(KEY) - 5) if KEY[i : i + 6] in text]


def _json_prefix(body: object, marker: str = "\0") -> str:
    """The JSON text of `body` up to where `marker` stands in it."""
    dumped = json.dumps(body, ensure_ascii=False)
    return dumped[: dumped.index(json.dumps(marker)[1:-1])]


def _echoes() -> list[Any]:
    """(operation, HTTP status, body) named by what echoes the key, each with the key across its cut."""
    message = "x" * (300 - len(KEY) + 1) + KEY  # _message keeps 300 characters
    issues = [{"message": "\0"}]
    issues[0]["message"] = _pad_before_key(_json_prefix(issues), 500) + KEY  # the issues keep 500
    untask: dict[str, object] = {"code": 0, "note": "\0"}
    untask["note"] = _pad_before_key(_json_prefix(untask), 200) + KEY  # a non-task answer keeps 200
    return [
        pytest.param("result", 400, {"message": message}, id="HTTP 400 body"),
        pytest.param("result", 200, {"code": 1001, "error": message}, id="code error message"),
        pytest.param("create", 200, {"code": 3, "error": "bad", "issues": issues}, id="code 3 issues"),
        pytest.param("create", 200, untask, id="create answer that is no task"),
        pytest.param("result", 200, untask, id="result answer that is no task"),
        pytest.param("result", 200, {**_task(), "status": "failed", "error": message}, id="failed task"),
    ]


def _task() -> dict[str, object]:
    return {"code": 0, "id": TASK_ID, "model": "m", "prompt": "p", "created_at": 1, "status": "idle"}


def _call(handler: Callable[[httpx.Request], httpx.Response], op: str) -> str:
    """Everything the client made of GPTunnel's answer: the error text, or the task it read."""

    async def run() -> str:
        client = GPTunnelClient("http://gptunnel.test", transport=httpx.MockTransport(handler))
        try:
            if op == "create":
                task = await client.create(ImageRequest(model="m", prompt="p"), KEY)
            else:
                task = await client.result(TASK_ID, KEY)
        except GPTunnelMCPError as exc:
            return str(exc)
        finally:
            await client.aclose()
        return task.model_dump_json()

    return anyio.run(run)


@pytest.mark.parametrize(("op", "status", "body"), _echoes())
def test_no_part_of_an_echoed_key_survives_a_cut_error_text(op: str, status: int, body: object) -> None:
    shown = _call(lambda request: httpx.Response(status, json=body), op)
    assert not _leaks(shown), shown
    assert "xxxx" in shown, "the echo did not reach the text at all: the test proves nothing"


def test_no_part_of_an_echoed_key_survives_a_broken_answer() -> None:
    """Protocol errors quote what the server sent."""

    said = "illegal header line: b'X-Echo: "
    said += _pad_before_key(said, 200) + KEY  # such texts keep 200 characters

    def broken(request: httpx.Request) -> httpx.Response:
        raise httpx.RemoteProtocolError(said, request=request)

    for op in ("create", "result"):
        shown = _call(broken, op)
        assert "RemoteProtocolError" in shown and not _leaks(shown), shown


@pytest.mark.parametrize("depth", [600, 100_000])
def test_an_answer_nested_too_deep_is_a_clear_error(depth: int) -> None:
    """Redaction walks the whole answer, and reading it nests as deep as it does: an answer deeper
    than Python follows is an error that says what happened, not a crash (depth 600 passes
    the parser but not the walk, 100,000 neither)."""
    body = b'{"code": 0, "id": ' + b"[" * depth + b"]" * depth + b"}"
    for op in ("create", "result"):
        shown = _call(lambda request: httpx.Response(200, content=body), op)
        assert "GPTunnel" in shown and "answer" in shown, shown


# --- each user's images apart ---------------------------------------------------------------------

KEY_A = "sk-user-A-5d2e9b7c41f0"
KEY_B = "sk-user-B-8a3f6e0d27c9"
SAME_ID = "6a1b2c3d4e5f60718293a4b5"


@pytest.fixture
def open_standin() -> Iterator[StandIn]:
    """Accepts any key: the users of a multi-user server."""
    with StandIn(api_key=None, behaviour=Behaviour(generation_seconds=0.05, image_size=(320, 240))) as s:
        yield s


async def _read_blob(client: Client, uri: str) -> bytes:
    content = (await client.read_resource(uri)).contents[0]
    assert isinstance(content, BlobResourceContents), content
    return base64.b64decode(content.blob)


@pytest.mark.anyio
async def test_two_users_given_the_same_task_id_each_keep_their_own_image(
    open_standin: StandIn, home: Path
) -> None:
    open_standin.behaviour.fixed_task_id = SAME_ID
    settings = ServerLauncher(open_standin, home).settings(**MULTI_USER)
    async with serve_http(settings) as url, mcp_client(url, KEY_A) as alice, mcp_client(url, KEY_B) as bob:
        a = structured(await alice.call_tool("generate_and_wait", {"prompt": "alice's secret garden"}))
        alices = open_standin.image_bytes(SAME_ID)
        b = structured(await bob.call_tool("generate_and_wait", {"prompt": "bob's noisy garage"}))
        bobs = open_standin.image_bytes(SAME_ID)
        assert a["task_id"] == b["task_id"] == SAME_ID and alices != bobs
        assert await _read_blob(alice, a["resource_uri"]) == alices
        assert await _read_blob(bob, b["resource_uri"]) == bobs
        listed = {r.uri: r.name for r in (await alice.list_resources()).resources}
        assert listed[a["resource_uri"]] == f"{SAME_ID}.webp", "a file's name, not where it is kept"
        for result, data in ((a, alices), (b, bobs)):
            path = Path(result["file_path"])
            assert path.read_bytes() == data
            # images/<owner>/<id>.<ext>: the owner's folder, never named by anything a user chose.
            assert path.parent.parent == settings.images_dir and path.name.startswith(SAME_ID)


@pytest.mark.anyio
@pytest.mark.standin(generation_seconds=0.05, image_size=(320, 240))
async def test_a_single_users_images_stay_in_the_images_folder(memory_server: ServerLauncher) -> None:
    async with memory_server.connect() as client:
        done = structured(await client.call_tool("generate_and_wait", {"prompt": "a lighthouse"}))
    path = Path(done["file_path"])
    assert path.parent == memory_server.home / "images" and path.name.startswith(done["task_id"])


def _stored(file_name: str) -> StoredFile:
    return StoredFile(
        file_name=file_name, mime_type="image/png", size_bytes=1, sha256="0" * 64, width=1, height=1
    )


@pytest.mark.parametrize(
    "file_name",
    ["../secret.png", "a/../../x.png", "/etc/passwd", "a/b/c.png", ".hidden.png", "a\\..\\x.png", ""],
)
def test_a_stored_name_that_would_leave_the_images_folder_is_refused(tmp_path: Path, file_name: str) -> None:
    with pytest.raises(StorageError):
        ImageFolder(tmp_path / "images").path(_stored(file_name))


@pytest.mark.parametrize(
    ("task_id", "owner"), [("../x", ""), ("a/b", ""), ("x", ".."), ("x", "a/b"), (".x", "")]
)
def test_a_download_that_would_land_outside_the_images_folder_is_refused(
    tmp_path: Path, task_id: str, owner: str
) -> None:
    with pytest.raises(StorageError):
        ImageFolder(tmp_path / "images").open_temporary(task_id, owner)
    assert not tmp_path.exists() or not any(tmp_path.rglob("*.part"))


# --- everything under the home is private ---------------------------------------------------------


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual umask, under which files are world-readable unless made otherwise."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def _modes(top: Path) -> dict[str, str]:
    return {
        str(p.relative_to(top.parent)): oct(stat.S_IMODE(p.stat().st_mode)) for p in [top, *top.rglob("*")]
    }


def _not_private(modes: dict[str, str], top: Path) -> dict[str, str]:
    return {
        name: mode
        for name, mode in modes.items()
        if mode != ("0o700" if (top.parent / name).is_dir() else "0o600")
    }


@pytest.mark.anyio
@pytest.mark.usefixtures("umask_022")
async def test_the_home_is_private_whatever_the_umask(open_standin: StandIn, home: Path) -> None:
    settings = ServerLauncher(open_standin, home).settings(**MULTI_USER)
    async with serve_http(settings) as url, mcp_client(url, KEY_A) as alice:
        done = structured(await alice.call_tool("generate_and_wait", {"prompt": "my private diary"}))
        assert done["status"] == "done"
        # While the server runs, so that the history's -wal and -shm exist.
        modes = _modes(home)
    names = {Path(name).name for name in modes}
    assert {"history.sqlite3", "history.sqlite3-wal", Path(done["file_path"]).name} <= names
    assert not _not_private(modes, home), modes


@pytest.mark.anyio
@pytest.mark.usefixtures("umask_022")
async def test_the_sandbox_is_private_whatever_the_umask(memory_server: ServerLauncher) -> None:
    """Its own records of the tasks it was asked for hold the prompts too."""
    async with memory_server.connect(GPTUNNEL_SANDBOX="1", GPTUNNEL_API_KEY=None) as client:
        created = structured(await client.call_tool("create_image", {"prompt": "my private diary"}))
        modes = _modes(memory_server.home / "sandbox")
    assert any(name.endswith(f"{created['task_id']}.json") for name in modes), modes
    assert not _not_private(modes, memory_server.home / "sandbox"), modes
    # The home the sandbox's folder sits in is this server's too.
    assert stat.S_IMODE(memory_server.home.stat().st_mode) == 0o700
