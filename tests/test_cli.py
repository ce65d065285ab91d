"""The terminal commands, run in this process as `gptunnel-mcp ...` runs them: `main(argv)`, its
output and its exit code, against the stand-in GPTunnel.

The poll timing is the product's (the first poll of a new task comes after about a second), so
only one test waits for a poll; the others end a wait early (`--wait-timeout` below the first
poll: exit 3) and finish the task with `standin.finish` before `result` fetches it at once.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import anyio
import pytest
from PIL import Image

import gptunnel_mcp
from gptunnel_mcp import _terminal
from gptunnel_mcp._main import main
from gptunnel_mcp._records import TaskRecord, utcnow

from .conftest import API_KEY
from .standin import StandIn

#: A well-formed task id GPTunnel does not know.
UNKNOWN_TASK = "0123456789abcdef01234567"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: Words of the MCP front end, which mean nothing to a person at a terminal.
MCP_WORDS = ("create_image", "get_result", "generate_and_wait", "gptunnel://", "new_image")


@dataclass
class Ran:
    code: int | str | None
    out: str
    err: str


Gptunnel = Callable[..., Ran]


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """`main` points the root logger at the stderr of the moment (here, a capture that ends with
    the test): later tests must not log into it."""
    root, httpx_logger = logging.getLogger(), logging.getLogger("httpx2")
    handlers, level, httpx_level = root.handlers[:], root.level, httpx_logger.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    httpx_logger.setLevel(httpx_level)


@pytest.fixture
def gptunnel(
    standin: StandIn, home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Gptunnel:
    """`gptunnel-mcp ARGS` against the stand-in, with the key in the environment."""
    monkeypatch.setenv("GPTUNNEL_API_KEY", API_KEY)

    def run(*args: str) -> Ran:
        with pytest.raises(SystemExit) as ended:
            main(["--base-url", standin.url, "--home", str(home), *args])
        captured = capsys.readouterr()
        return Ran(ended.value.code, captured.out, captured.err)

    return run


def pending_task(gptunnel: Gptunnel, standin: StandIn, prompt: str) -> str:
    """A task created by `generate` whose wait ended before the first poll, finished upstream."""
    before = set(standin.task_ids())
    ran = gptunnel("generate", prompt, "--wait-timeout", "0.2")
    assert ran.code == 3, ran.err
    (task_id,) = set(standin.task_ids()) - before
    assert f"`gptunnel-mcp result {task_id}`" in ran.err
    standin.finish(task_id)
    return task_id


def test_generate_prints_the_stored_path_and_writes_out_in_the_format_its_name_says(
    gptunnel: Gptunnel, standin: StandIn, home: Path, tmp_path: Path
) -> None:
    standin.behaviour.generation_seconds = 0.05
    out = tmp_path / "fox.png"
    ran = gptunnel("generate", "a red fox in snow", "--aspect-ratio", "16:9", "--out", str(out))
    assert ran.code == 0, ran.err
    assert Path(ran.out.strip()) == out.resolve()
    (task_id,) = standin.task_ids()
    stored = home / "images" / f"{task_id}.webp"
    assert stored.read_bytes() == standin.image_bytes(task_id)
    # The stand-in serves WebP: a file named .png must be a PNG.
    assert out.read_bytes().startswith(PNG_MAGIC)
    with Image.open(out) as written, Image.open(stored) as original:
        assert written.format == "PNG" and written.size == original.size
    progress = ran.err.splitlines()
    assert progress[0].startswith(f"task {task_id} created") and progress[-1].startswith("done")
    assert len(progress) == len(set(progress))  # stderr is no terminal here: no line twice
    assert API_KEY not in ran.out + ran.err
    assert standin.stats.create_calls == 1


@pytest.mark.parametrize("command", ["generate", "result"])
@pytest.mark.parametrize(
    ("out", "says"),
    [
        ("missing/fox.png", "no folder {tmp}/missing "),
        ("missing/", "no folder {tmp}/missing;"),
        ("fox.gif", "must end in .png, .jpg, .jpeg or .webp"),
    ],
)
def test_out_is_checked_before_anything_is_sent(
    gptunnel: Gptunnel, standin: StandIn, tmp_path: Path, command: str, out: str, says: str
) -> None:
    target = "x" if command == "generate" else UNKNOWN_TASK
    ran = gptunnel(command, target, "--out", f"{tmp_path}/{out}")
    assert ran.code == 2
    assert ran.err.startswith("gptunnel-mcp: invalid --out: ")
    assert says.format(tmp=tmp_path) in ran.err
    assert len(ran.err.strip().splitlines()) == 1 and "Traceback" not in ran.err
    assert standin.stats.create_calls == standin.stats.result_calls == 0


def test_result_writes_out_into_a_folder_or_as_the_named_format(
    gptunnel: Gptunnel, standin: StandIn, tmp_path: Path
) -> None:
    task_id = pending_task(gptunnel, standin, "a lighthouse")
    folder = tmp_path / "pictures"
    folder.mkdir()
    for given in (f"{folder}/", str(folder)):
        ran = gptunnel("result", task_id, "--out", given)
        assert ran.code == 0, ran.err
        assert Path(ran.out.strip()) == folder / f"{task_id}.webp"
        assert (folder / f"{task_id}.webp").read_bytes() == standin.image_bytes(task_id)
    ran = gptunnel("result", task_id, "--out", str(tmp_path / "same.WEBP"))
    assert (tmp_path / "same.WEBP").read_bytes() == standin.image_bytes(task_id)  # copied, not re-encoded
    for name, fmt in (("photo.jpg", "JPEG"), ("photo.jpeg", "JPEG")):
        ran = gptunnel("result", task_id, "--out", str(tmp_path / name))
        assert ran.code == 0, ran.err
        assert (tmp_path / name).read_bytes().startswith(b"\xff\xd8\xff")
        with Image.open(tmp_path / name) as written:
            assert written.format == fmt
    assert not list(tmp_path.glob(".*.part"))
    assert standin.stats.create_calls == 1


def test_out_never_writes_through_a_symbolic_link(
    gptunnel: Gptunnel, standin: StandIn, home: Path, tmp_path: Path
) -> None:
    task_id = pending_task(gptunnel, standin, "a lighthouse")
    theirs = tmp_path / "theirs.png"
    theirs.write_bytes(b"someone else's file")
    (tmp_path / "link.png").symlink_to(theirs)
    ran = gptunnel("result", task_id, "--out", str(tmp_path / "link.png"))
    assert ran.code == 1
    message = ran.err.splitlines()[-1]
    assert message.startswith("gptunnel-mcp: invalid --out: ") and "not a plain file" in message
    assert message.endswith(f"the image is stored at {home.resolve() / 'images' / task_id}.webp")
    assert theirs.read_bytes() == b"someone else's file" and (tmp_path / "link.png").is_symlink()


def test_a_wait_that_ends_early_exits_3_and_result_finishes_it_later(
    gptunnel: Gptunnel, standin: StandIn
) -> None:
    task_id = pending_task(gptunnel, standin, "slow one")
    done = gptunnel("result", task_id)
    assert done.code == 0, done.err
    assert Path(done.out.strip()).read_bytes() == standin.image_bytes(task_id)
    assert standin.stats.create_calls == 1


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _last_drawn(text: str) -> str:
    """What a terminal shows of the progress line: its last redraw, up to the line's end."""
    line, newline, _ = text.partition("\n")
    assert newline, f"the progress line was never ended: {text!r}"
    return line.rsplit("\r\033[K", 1)[-1]


def test_on_a_terminal_the_progress_line_ends_showing_the_final_state(
    gptunnel: Gptunnel, standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert gptunnel("generate", "a slow one", "--wait-timeout", "0.2").code == 3
    assert _last_drawn(terminal.getvalue()).startswith("still pending")
    assert "gptunnel-mcp: task" in terminal.getvalue().split("\n")[1]  # the advice on a line of its own
    (task_id,) = standin.task_ids()
    standin.finish(task_id)
    terminal.seek(0)
    terminal.truncate()
    assert gptunnel("result", task_id).code == 0
    assert _last_drawn(terminal.getvalue()).startswith("done")


def test_progress_off_a_terminal_is_a_line_per_change_or_per_few_seconds_never_twice(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(_terminal, "time", SimpleNamespace(monotonic=lambda: clock.now))
    line = _terminal._ProgressLine()
    for at, message in [
        (0.0, "task 6b065a77df64a80e1524c480 created, idle"),
        (1.0, "idle, 1 s elapsed"),
        (1.4, "idle, 1 s elapsed"),
        (2.5, "processing, 2 s elapsed"),
        (4.0, "processing, 4 s elapsed"),
        (8.0, "processing, 8 s elapsed"),
        (9.0, "done, 9 s elapsed"),
    ]:
        clock.now = at
        anyio.run(line.progress, at, None, message)
    line.finish(
        TaskRecord(
            task_id="t", status="done", model="m", prompt="p", created_at=utcnow(), updated_at=utcnow()
        )
    )
    assert capsys.readouterr().err.splitlines() == [
        "task 6b065a77df64a80e1524c480 created, idle",
        "idle, 1 s elapsed",
        "processing, 2 s elapsed",
        "processing, 8 s elapsed",
        "done, 9 s elapsed",
    ]


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["generate", "x"], None, 600),
        (["generate", "x"], "45", 45),
        (["--wait-timeout", "30", "generate", "x"], "45", 30),
        (["--wait-timeout", "30", "generate", "x", "--wait-timeout", "20"], "45", 20),
        (["--wait-timeout", "30", "result", UNKNOWN_TASK], None, 30),
        (["result", UNKNOWN_TASK, "--wait-timeout", "20"], None, 20),
        # An agent's tool call keeps its own default.
        ([], None, 50),
    ],
)
def test_wait_timeout_command_flag_then_global_flag_then_environment_then_600(
    monkeypatch: pytest.MonkeyPatch, home: Path, args: list[str], env: str | None, expected: float
) -> None:
    waits: list[float] = []

    def record(settings: gptunnel_mcp.Settings, *rest: object) -> int:
        waits.append(settings.wait_timeout)
        return 0

    monkeypatch.setattr(_terminal, "run", record)
    monkeypatch.setattr("gptunnel_mcp.server.serve", record)
    if env is not None:
        monkeypatch.setenv("GPTUNNEL_WAIT_TIMEOUT", env)
    with pytest.raises(SystemExit):
        main(["--home", str(home), *args])
    assert waits == [expected]


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--wait-timeout", "abc", "generate", "x"], "invalid --wait-timeout:"),
        (["generate", "x", "--wait-timeout", "0"], "invalid --wait-timeout:"),
        (["--port", "abc"], "invalid --port:"),
        (["history", "--limit", "0"], "argument --limit: must be 1 or more"),
        (["history", "--limit", "-5"], "argument --limit: must be 1 or more"),
    ],
)
def test_a_refused_value_is_named_as_the_user_typed_it(
    gptunnel: Gptunnel, standin: StandIn, args: list[str], named: str
) -> None:
    ran = gptunnel(*args)
    assert ran.code == 2
    assert named in ran.err and "GPTUNNEL_" not in ran.err
    assert standin.stats.create_calls == 0


def test_a_refused_environment_variable_is_named_as_set(
    gptunnel: Gptunnel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPTUNNEL_WAIT_TIMEOUT", "abc")
    ran = gptunnel("generate", "x")
    assert ran.code == 2 and "invalid GPTUNNEL_WAIT_TIMEOUT:" in ran.err


def test_a_busy_port_is_one_clear_line(gptunnel: Gptunnel) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        ran = gptunnel("--transport", "http", "--port", str(port))
    assert ran.code == 2
    assert f"cannot listen on 127.0.0.1:{port}: address already in use; choose another --port" in ran.err
    assert "serving MCP" not in ran.err and "Traceback" not in ran.err


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--aspect-ratio", "2:1"], "invalid --aspect-ratio"),
        (["--image", "file:///etc/passwd"], "http(s) URL"),
    ],
)
def test_bad_input_is_a_usage_error_and_costs_nothing(
    gptunnel: Gptunnel, standin: StandIn, args: list[str], words: str
) -> None:
    failed = gptunnel("generate", "x", *args)
    assert failed.code == 2
    assert words in failed.err
    assert len(failed.err.strip().splitlines()) == 1 and "Traceback" not in failed.err
    assert standin.stats.create_calls == 0


def test_upstream_failures_exit_1_with_one_line(gptunnel: Gptunnel, standin: StandIn) -> None:
    standin.behaviour.create_code = 5
    failed = gptunnel("generate", "x")
    assert failed.code == 1
    assert "balance" in failed.err and "Traceback" not in failed.err
    standin.behaviour.create_code = 0
    standin.behaviour.final_status = "failed"
    task_id = pending_task(gptunnel, standin, "y")
    failed = gptunnel("result", task_id)
    assert failed.code == 1
    assert f"task {task_id} failed" in failed.err


def test_errors_are_told_in_terminal_words(
    gptunnel: Gptunnel, standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    unknown = gptunnel("result", UNKNOWN_TASK)
    assert unknown.code == 1 and "`gptunnel-mcp history` lists the known tasks" in unknown.err
    malformed = gptunnel("result", "not-a-task")
    assert malformed.code == 2 and "24 hexadecimal characters" in malformed.err
    pending_task(gptunnel, standin, "a cat")
    reused = gptunnel("generate", "a cat", "--wait-timeout", "10")
    assert reused.code == 0 and "(--new for a fresh image)" in reused.err
    monkeypatch.setenv("GPTUNNEL_MAX_IMAGES_PER_HOUR", "1")
    capped = gptunnel("generate", "a dog")
    assert capped.code == 1 and "GPTUNNEL_MAX_IMAGES_PER_HOUR" in capped.err
    assert standin.stats.create_calls == 1
    helps = [gptunnel(*command, "--help") for command in ([], ["generate"], ["result"], ["history"])]
    for ran in (unknown, malformed, reused, capped, *helps):
        assert not [word for word in MCP_WORDS if word in ran.out + ran.err], ran


def test_history_lists_newest_first(gptunnel: Gptunnel, standin: StandIn) -> None:
    first, second = (pending_task(gptunnel, standin, p) for p in ("first picture", "second picture"))
    for task_id in (first, second):
        assert gptunnel("result", task_id).code == 0
    listed = gptunnel("history")
    assert listed.code == 0
    lines = listed.out.strip().splitlines()
    assert second in lines[0] and "second picture" in lines[0]
    assert first in lines[1] and "first picture" in lines[1]
    assert all(" done " in line for line in lines)
    assert "(1 of 2" in gptunnel("history", "--limit", "1").out
    rows = json.loads(gptunnel("history", "--json").out)
    assert [row["task_id"] for row in rows] == [second, first]
    assert Path(rows[0]["file_path"]).read_bytes() == standin.image_bytes(second)


def test_history_search_finds_prompts_in_any_case(gptunnel: Gptunnel, standin: StandIn) -> None:
    snow, grass, wolf = (
        pending_task(gptunnel, standin, p) for p in ("лиса в снегу", "Лиса на траве", "a wolf")
    )
    found = gptunnel("history", "--search", "ЛИСА")
    assert found.code == 0, found.err
    lines = found.out.strip().splitlines()
    assert len(lines) == 2 and grass in lines[0] and snow in lines[1]
    assert wolf not in found.out
    newest = gptunnel("history", "--search", "лиса", "--limit", "1").out
    assert (
        grass in newest and snow not in newest and "(the newest 1 that match; --limit N for more)" in newest
    )
    rows = json.loads(gptunnel("history", "--search", "WOLF", "--json").out)
    assert [row["task_id"] for row in rows] == [wolf]
    assert gptunnel("history", "--search", "%").out.strip() == "No tasks match '%'."


def test_doctor_says_what_is_fine_and_what_to_fix(
    gptunnel: Gptunnel, standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    standin.behaviour.balance = 42.5
    healthy = gptunnel("doctor")
    assert healthy.code == 0, healthy.out
    assert all(line.startswith("OK") for line in healthy.out.strip().splitlines())
    assert "42.50" in healthy.out and gptunnel_mcp.__version__ in healthy.out

    monkeypatch.setenv("GPTUNNEL_API_KEY", "not-the-key")
    wrong_key = gptunnel("doctor")
    assert wrong_key.code == 1
    assert "FAIL" in wrong_key.out and "GPTUNNEL_API_KEY" in wrong_key.out
    assert "not-the-key" not in wrong_key.out + wrong_key.err

    monkeypatch.setenv("GPTUNNEL_API_KEY", "")
    no_key = gptunnel("doctor")
    assert no_key.code == 1 and "GPTUNNEL_API_KEY is not set" in no_key.out

    monkeypatch.setenv("GPTUNNEL_API_KEY", API_KEY)
    unreachable = gptunnel("--base-url", "http://127.0.0.1:9", "doctor")  # the later --base-url wins
    assert unreachable.code == 1 and "cannot reach GPTunnel" in unreachable.out


def test_sandbox_doctor_reports_only_what_it_checked(
    gptunnel: Gptunnel, standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GPTUNNEL_API_KEY")
    ran = gptunnel("--sandbox", "doctor")
    assert ran.code == 0, ran.out
    lines = ran.out.strip().splitlines()
    assert all(line.startswith("OK") for line in lines)
    assert "no GPTunnel key is needed, and GPTunnel is not contacted" in ran.out
    assert "the sandbox's stand-in GPTunnel answers" in ran.out
    assert "GPTUNNEL_API_KEY is set" not in ran.out and "reachable" not in ran.out
    assert standin.stats.balance_calls == 0


def test_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ([], ["generate"], ["result"], ["history"], ["doctor"]):
        with pytest.raises(SystemExit) as ended:
            main([*command, "--help"])
        shown = capsys.readouterr().out
        assert ended.value.code == 0 and "usage: gptunnel-mcp" in shown
        if command in (["generate"], ["result"]):
            assert "else 600: a person at a terminal can wait longer than an agent" in " ".join(shown.split())
    with pytest.raises(SystemExit) as ended:
        main(["--version"])
    assert ended.value.code == 0
    assert capsys.readouterr().out.strip() == f"gptunnel-mcp {gptunnel_mcp.__version__}"


def test_on_postgresql_doctor_checks_the_database_and_history_says_where_images_are(
    gptunnel: Gptunnel,
    standin: StandIn,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    postgres_url: str,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("GPTUNNEL_MCP_DATABASE_URL", postgres_url)
    made = gptunnel("generate", "a fox on a shared database")
    assert made.code == 0, made.err
    healthy = gptunnel("doctor")
    assert healthy.code == 0, healthy.out
    assert "history in the PostgreSQL database" in healthy.out and "it has 1 task(s)" in healthy.out
    listed = gptunnel("history")
    assert made.out.strip() in listed.out
    # Another machine's home: the image is in the database, not here yet, and `result` fetches it.
    elsewhere = ["--base-url", standin.url, "--home", str(tmp_path / "elsewhere")]
    (task_id,) = standin.task_ids()
    with pytest.raises(SystemExit):
        main([*elsewhere, "history"])
    assert f"(in the database: `gptunnel-mcp result {task_id}` copies it here)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as fetched:
        main([*elsewhere, "result", task_id])
    assert fetched.value.code == 0
    assert Path(capsys.readouterr().out.strip()).read_bytes() == standin.image_bytes(task_id)
    assert standin.stats.download_calls == 1

    monkeypatch.setenv("GPTUNNEL_MCP_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    broken = gptunnel("doctor")
    assert broken.code != 0 and "127.0.0.1:1" in broken.out + broken.err


def test_history_shows_what_each_image_cost_and_the_budget_is_told_in_terminal_words(
    gptunnel: Gptunnel, standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    standin.behaviour.cost = "3"
    monkeypatch.setenv("GPTUNNEL_MAX_SPEND_PER_DAY", "5")
    task_id = pending_task(gptunnel, standin, "a priced picture")
    assert gptunnel("result", task_id).code == 0
    listed = gptunnel("history").out.strip().splitlines()
    assert task_id in listed[0] and "3.00 RUB" in listed[0]
    assert json.loads(gptunnel("history", "--json").out)[0]["cost"] == 3.0
    # 3 spent and another estimated at 3 would pass 5.
    refused = gptunnel("generate", "another picture")
    assert refused.code == 1 and "GPTUNNEL_MAX_SPEND_PER_DAY" in refused.err
    assert (
        "3.00 RUB spent" in refused.err and "`gptunnel-mcp history` shows what each image cost" in refused.err
    )
    assert not [word for word in MCP_WORDS if word in refused.err] and standin.stats.create_calls == 1
