"""Nothing is lost when the process dies: SIGKILL mid-wait and mid-download, and a full disk.

The server that dies, or runs under a file-size limit, is a real process (streamable HTTP,
`subprocess.Popen`): SIGKILL needs one, and a file-size limit is how a full disk is simulated
here (the tests run as root, so permission tricks would not refuse a write). The server that
comes after it on the same GPTUNNEL_MCP_HOME, as after a crash, runs in this process: its
start-up (`open_engine`, which cleans up what a dead process left) is the same code, without
another Python start-up.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client
from mcp_types import BlobResourceContents, CallToolResult, TextResourceContents
from PIL import Image

from .conftest import ProcessLauncher, ServerLauncher, http_client, structured, text_of
from .processes import free_port, running_server
from .standin import StandIn

pytestmark = pytest.mark.anyio

#: The file-size limit of the "disk full" server, in 1024-byte blocks (bash's `ulimit -f` unit):
#: room for the history database, its WAL, the log and a normal image, not for a 3 MB one.
FILE_LIMIT_BLOCKS = 1024
#: Long enough that a task cannot end on its own while a test looks: it ends by `standin.finish`.
LONG = 60.0


class PreconditionFailed(Exception):
    """The scenario did not happen (a problem of the test's set-up), not the behaviour under test."""


def noise_png(side: int) -> bytes:
    """A real PNG of random pixels: it does not compress, so it is about side*side*3 bytes."""
    image = Image.frombytes("RGB", (side, side), os.urandom(side * side * 3))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def kill(self) -> None:
        """SIGKILL: no cleanup handler, no finally block, no flush runs."""
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        assert self.process.returncode == -signal.SIGKILL

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Servers:
    """Server processes on one home folder, and in-process servers that start after them."""

    processes: ProcessLauncher
    in_process: ServerLauncher
    started: list[ServerProcess] = field(default_factory=list)

    @property
    def images(self) -> Path:
        return self.processes.home / "images"

    @contextlib.asynccontextmanager
    async def run(
        self, *, file_limit_blocks: int | None = None, **env: str | None
    ) -> AsyncIterator[ServerProcess]:
        """`python -m gptunnel_mcp --transport http`, optionally under a file-size limit."""
        port = free_port()
        log = self.processes.log_dir / f"server-{len(self.started)}.log"
        command = [
            sys.executable, "-m", "gptunnel_mcp", "--transport", "http", "--port", str(port),
            "--log-level", "INFO",
        ]  # fmt: skip
        if file_limit_blocks is not None:
            # SIGXFSZ ignored (it survives the exec), so a write past the limit fails with EFBIG
            # instead of killing the process: what a full disk looks like to the program.
            script = f"trap '' XFSZ; ulimit -f {file_limit_blocks}; exec \"$@\""
            command = ["bash", "-c", script, "bash", *command]
        with log.open("wb") as out:
            async with running_server(command, self.processes.env(**env), out, port) as process:
                server = ServerProcess(process, f"http://127.0.0.1:{port}/mcp", log)
                self.started.append(server)
                yield server

    def restart(self) -> contextlib.AbstractAsyncContextManager[Client]:
        """A new server on the same home, connected: what a client meets after a crash."""
        return self.in_process.connect()

    def logs(self) -> str:
        logs = [f"--- {s.log.name}\n{s.log_text()}" for s in self.started]
        return "\n".join([*logs, f"--- in process\n{self.in_process.logs()}"])


@pytest.fixture
def servers(process_server: ProcessLauncher, memory_server: ServerLauncher) -> Servers:
    assert process_server.home == memory_server.home
    return Servers(process_server, memory_server)


@contextlib.asynccontextmanager
async def connect(server: ServerProcess) -> AsyncIterator[Client]:
    async with (
        http_client(server.url, None) as http,
        Client(streamable_http_client(server.url, http_client=http), cache=None) as client,
    ):
        yield client


async def kill_mid_call(
    server: ServerProcess,
    tool: str,
    arguments: dict[str, Any],
    ready: Callable[[], bool],
    *,
    within: float = 20,
) -> dict[str, Any]:
    """Call `tool`, SIGKILL the server as soon as `ready()` holds, and give the client up.

    Returns what became of the call: {"result": ...} if it returned before the kill (a test
    failure: the kill came too late), {"error": ...} if the client saw the connection die, or
    neither if it was still waiting when it was cancelled.
    """
    outcome: dict[str, Any] = {}

    async def call(client: Client) -> None:
        try:
            outcome["result"] = await client.call_tool(tool, arguments)
        except Exception as exc:  # the connection dies under it: any error will do
            outcome["error"] = exc

    killed = False
    with anyio.fail_after(within + 15):
        # The client's own teardown may complain about the dead server: that is not under test.
        with contextlib.suppress(Exception):
            async with connect(server) as client, anyio.create_task_group() as group:
                group.start_soon(call, client)
                with contextlib.suppress(AssertionError):
                    await wait_until(lambda: ready() or "result" in outcome, within, "the moment to kill")
                if ready():
                    server.kill()
                    killed = True
                group.cancel_scope.cancel()
    assert killed, f"the moment to kill the server never came ({outcome})\n{server.log_text()}"
    return outcome


async def wait_until(condition: Callable[[], bool], within: float, what: str) -> None:
    """Poll `condition` every 10 ms; AssertionError if it does not hold within `within` seconds."""
    deadline = anyio.current_time() + within
    while True:
        if condition():
            return
        if anyio.current_time() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await anyio.sleep(0.01)


async def get_result_until_settled(client: Client, task_id: str, within: float = 10) -> CallToolResult:
    """get_result until the task is no longer pending (bounded)."""
    deadline = anyio.current_time() + within
    while True:
        result = await client.call_tool("get_result", {"task_id": task_id})
        if result.is_error or structured(result)["status"] != "pending":
            return result
        if anyio.current_time() > deadline:
            raise AssertionError(f"task {task_id} still pending after {within} s: {structured(result)}")
        await anyio.sleep(0.05)


async def history(client: Client) -> list[dict[str, Any]]:
    contents = (await client.read_resource("gptunnel://images")).contents[0]
    assert isinstance(contents, TextResourceContents), contents
    return list(json.loads(contents.text)["tasks"])


def temporaries(images: Path) -> list[Path]:
    return sorted(images.glob(".*.part")) if images.exists() else []


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def watch_folder(images: Path, expected_size: Callable[[str], int | None]) -> Iterator[list[str]]:
    """Sample the images folder every few milliseconds on a thread; collect every sighting of a
    stored (not temporary) file that is empty or not the size it should have."""
    problems: list[str] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.003):
            try:
                entries = list(os.scandir(images))
            except FileNotFoundError:
                continue
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                try:
                    size = entry.stat().st_size
                except FileNotFoundError:
                    continue
                want = expected_size(entry.name)
                if size == 0 or (want is not None and size != want):
                    problems.append(f"{entry.name}: {size} bytes (expected {want})")

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield problems
    finally:
        stop.set()
        thread.join(timeout=5)


# --- a. killed while polling --------------------------------------------------------------------


async def test_sigkill_while_polling_keeps_the_task_and_a_new_server_finishes_it(
    servers: Servers, standin: StandIn
) -> None:
    standin.behaviour.generation_seconds = LONG
    async with servers.run() as first:
        # Killed once the server has polled at least once: it is inside generate_and_wait's wait.
        outcome = await kill_mid_call(
            first,
            "generate_and_wait",
            {"prompt": "a lighthouse in a storm"},
            lambda: standin.stats.result_calls >= 1,
        )
        assert "result" not in outcome, "the call finished before the kill: the test proves nothing"
    (task_id,) = standin.task_ids()
    assert standin.stats.download_calls == 0

    async with servers.restart() as client:
        tasks = await history(client)
        assert [(t["task_id"], t["status"]) for t in tasks] == [(task_id, "pending")], servers.logs()
        standin.finish()
        done = await get_result_until_settled(client, task_id)
        assert not done.is_error, text_of(done)
        data = structured(done)
    assert data["status"] == "done"
    served = standin.image_bytes(task_id)
    assert Path(data["file_path"]).read_bytes() == served
    assert data["sha256"] == hashlib.sha256(served).hexdigest()
    assert standin.stats.create_calls == 1, "a new task was created after the restart"
    assert standin.stats.download_calls == 1
    assert standin.task_ids() == [task_id]


# --- b. killed while downloading ----------------------------------------------------------------


async def test_sigkill_while_downloading_leaves_no_partial_image_and_a_new_server_downloads_again(
    servers: Servers, standin: StandIn
) -> None:
    payload = noise_png(700)  # ~1.5 MB
    behaviour = standin.behaviour
    behaviour.generation_seconds = 0
    behaviour.image_format = "PNG"
    behaviour.download_bytes_override = payload
    # Half the body arrives, then the link stalls: the server holds a half-written temporary.
    behaviour.download_pause_at = len(payload) // 2
    behaviour.download_delay = LONG

    def partial_on_disk() -> bool:
        return standin.stats.download_calls >= 1 and any(
            p.stat().st_size >= 64 * 1024 for p in temporaries(servers.images) if p.exists()
        )

    def stored_size(name: str) -> int | None:
        return len(payload) if name.endswith(".png") else None

    with watch_folder(servers.images, stored_size) as problems:
        async with servers.run() as first:
            outcome = await kill_mid_call(
                first, "generate_and_wait", {"prompt": "a field of static"}, partial_on_disk
            )
            assert "result" not in outcome
        (task_id,) = standin.task_ids()
        assert standin.stats.download_calls == 1

        # What the dead process left: its temporary, and nothing that looks like a stored image.
        left = sorted(servers.images.iterdir())
        assert left, "the kill came before the download wrote anything"
        for path in left:
            assert path.name.startswith(f".{task_id}.") and path.name.endswith(".part"), left
            assert 0 < path.stat().st_size < len(payload)

        behaviour.download_delay = 0
        behaviour.download_pause_at = None
        async with servers.restart() as client:
            # Cleaned at start, before any call.
            assert temporaries(servers.images) == [], servers.logs()
            assert list(servers.images.iterdir()) == []
            listed = {str(r.uri) for r in (await client.list_resources()).resources}
            assert f"gptunnel://images/{task_id}/file" not in listed
            with pytest.raises(MCPError, match="no stored image"):
                await client.read_resource(f"gptunnel://images/{task_id}/file")
            (entry,) = await history(client)
            assert (entry["task_id"], entry["status"]) == (task_id, "pending")

            done = await get_result_until_settled(client, task_id)
            assert not done.is_error, text_of(done)
            data = structured(done)
            listed = {str(r.uri) for r in (await client.list_resources()).resources}
            blob = (await client.read_resource(f"gptunnel://images/{task_id}/file")).contents[0]
    assert problems == []
    assert data["status"] == "done"
    assert standin.stats.download_calls == 2
    assert standin.stats.create_calls == 1
    assert Path(data["file_path"]).read_bytes() == payload
    assert f"gptunnel://images/{task_id}/file" in listed
    assert isinstance(blob, BlobResourceContents)
    assert base64.b64decode(blob.blob) == payload
    assert [p.name for p in servers.images.iterdir()] == [f"{task_id}.png"]


# --- c. the disk fills up while downloading ----------------------------------------------------


async def test_a_full_disk_while_downloading_is_a_clear_error_and_the_task_is_finished_later(
    servers: Servers, standin: StandIn
) -> None:
    big = noise_png(1000)  # ~3 MB, three times the file-size limit
    assert len(big) > 2 * FILE_LIMIT_BLOCKS * 1024
    standin.behaviour.generation_seconds = 0

    with watch_folder(servers.images, lambda name: None) as problems:
        async with servers.run(file_limit_blocks=FILE_LIMIT_BLOCKS) as limited, connect(limited) as client:
            # A normal image fits: the limit only refuses what a full disk would.
            first = await client.call_tool("generate_and_wait", {"prompt": "a small red fox"})
            assert not first.is_error, f"{text_of(first)}\n{servers.logs()}"
            stored = Path(structured(first)["file_path"])
            stored_sha = sha256_of(stored)
            assert stored_sha == structured(first)["sha256"]

            standin.behaviour.image_format = "PNG"
            standin.behaviour.download_bytes_override = big
            failed = await client.call_tool("generate_and_wait", {"prompt": "a field of static"})
            text = text_of(failed)
            _, task_id = standin.task_ids()
            assert failed.is_error, text
            assert "cannot write" in text.lower(), text
            assert "disk space" in text.lower(), text
            assert "task is kept in the history" in text.lower(), text
            # generate_and_wait's caller never saw the task's id: the error gives it to resume with.
            assert f"get_result with task_id {task_id}" in text, text

            # Nothing half-written, and the task is in the history, resumable.
            assert temporaries(servers.images) == []
            assert sorted(p.name for p in servers.images.iterdir()) == [stored.name]
            tasks = await history(client)
            assert [(t["task_id"], t["status"]) for t in tasks] == [
                (task_id, "pending"),
                (structured(first)["task_id"], "done"),
            ]
            # Still full: asking again is the same clear error, not a broken file.
            again = await client.call_tool("get_result", {"task_id": task_id})
            assert again.is_error and "cannot write" in text_of(again).lower()
            assert temporaries(servers.images) == []

        downloads = standin.stats.download_calls
        async with servers.restart() as client:
            done = await get_result_until_settled(client, task_id)
            assert not done.is_error, text_of(done)
            data = structured(done)
    assert problems == []
    assert data["status"] == "done"
    assert Path(data["file_path"]).read_bytes() == big
    assert data["sha256"] == hashlib.sha256(big).hexdigest()
    assert standin.stats.download_calls == downloads + 1
    assert standin.stats.create_calls == 2
    assert sha256_of(stored) == stored_sha, "an image stored before the failure changed"
    assert temporaries(servers.images) == []


# --- shared home: one server's start-up cleanup and another's download ---------------------------


async def test_a_second_server_starting_on_the_same_home_does_not_break_a_download_in_progress(
    memory_server: ServerLauncher, standin: StandIn, home: Path
) -> None:
    """Both servers run in this process: the download's lock is on its open file, not on the
    process, so the second server's clean-up sees it exactly as another process's would."""
    payload = noise_png(600)
    behaviour = standin.behaviour
    behaviour.generation_seconds = 0
    behaviour.download_bytes_override = payload
    behaviour.image_format = "PNG"
    # The first server holds half the file this long: ample for an in-process start (~0.1 s).
    behaviour.download_pause_at = len(payload) // 2
    behaviour.download_delay = 2
    images = home / "images"

    done = anyio.Event()
    outcome: dict[str, CallToolResult] = {}
    with anyio.fail_after(20):
        async with memory_server.connect() as client, anyio.create_task_group() as group:

            async def call() -> None:
                outcome["result"] = await client.call_tool("generate_and_wait", {"prompt": "shared home"})
                done.set()

            group.start_soon(call)
            await wait_until(lambda: bool(temporaries(images)), 10, "a download in progress")
            async with memory_server.connect():  # starts (cleaning up at start) and serves nobody
                pass
            if done.is_set():
                raise PreconditionFailed("the download finished before the second server had started")
            assert temporaries(images), "the second server removed a download in progress"
            await done.wait()
    result = outcome["result"]
    assert not result.is_error, text_of(result)
    assert structured(result)["status"] == "done"
    assert Path(structured(result)["file_path"]).read_bytes() == payload
    assert standin.stats.download_calls == 1
