"""The terminal commands, run as a person runs them: a subprocess, its output and its exit code."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import gptunnel_mcp
from .standin import StandIn

from .conftest import API_KEY


def run(standin: StandIn, home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {
        "PATH": os.environ.get("PATH", ""),
        "GPTUNNEL_API_KEY": API_KEY,
        "GPTUNNEL_BASE_URL": standin.url,
        "GPTUNNEL_MCP_HOME": str(home),
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "gptunnel_mcp", *args],
        env=environment,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
    )


def test_generate_prints_the_stored_path_and_copies_with_out(
    standin: StandIn, home: Path, tmp_path: Path
) -> None:
    out = tmp_path / "fox.webp"
    done = run(standin, home, "generate", "a red fox in snow", "--aspect-ratio", "16:9", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == out.resolve()
    (task_id,) = standin.task_ids()
    assert out.read_bytes() == standin.image_bytes(task_id)
    assert (home / "images" / f"{task_id}.webp").read_bytes() == out.read_bytes()
    assert "elapsed" in done.stderr  # the progress display
    assert API_KEY not in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [(["--aspect-ratio", "2:1"], "aspect_ratio"), (["--image", "file:///etc/passwd"], "http(s) URL")],
)
def test_bad_input_is_a_usage_error_and_costs_nothing(
    standin: StandIn, home: Path, args: list[str], words: str
) -> None:
    failed = run(standin, home, "generate", "x", *args)
    assert failed.returncode == 2
    assert words in failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1 and "Traceback" not in failed.stderr
    assert standin.stats.create_calls == 0


def test_upstream_failures_exit_1_with_one_line(standin: StandIn, home: Path) -> None:
    standin.behaviour.create_code = 5
    failed = run(standin, home, "generate", "x")
    assert failed.returncode == 1
    assert "balance" in failed.stderr and "Traceback" not in failed.stderr
    standin.behaviour.create_code = 0
    standin.behaviour.final_status = "failed"
    failed = run(standin, home, "generate", "y")
    assert failed.returncode == 1
    assert "failed" in failed.stderr


def test_a_wait_that_ends_early_exits_3_and_result_finishes_it_later(standin: StandIn, home: Path) -> None:
    standin.behaviour.generation_seconds = 3
    pending = run(standin, home, "generate", "slow one", "--wait-timeout", "1")
    assert pending.returncode == 3
    (task_id,) = standin.task_ids()
    assert f"gptunnel-mcp result {task_id}" in pending.stderr
    time.sleep(2.5)
    done = run(standin, home, "result", task_id)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).read_bytes() == standin.image_bytes(task_id)
    assert standin.stats.create_calls == 1


def test_history_lists_newest_first(standin: StandIn, home: Path) -> None:
    for prompt in ("first picture", "second picture"):
        assert run(standin, home, "generate", prompt).returncode == 0
    listed = run(standin, home, "history")
    assert listed.returncode == 0
    lines = listed.stdout.strip().splitlines()
    assert "second picture" in lines[0] and "first picture" in lines[1]
    assert all(" done " in line for line in lines)
    limited = run(standin, home, "history", "--limit", "1")
    assert "(1 of 2" in limited.stdout


def test_doctor_says_what_is_fine_and_what_to_fix(standin: StandIn, home: Path) -> None:
    standin.behaviour.balance = 42.5
    healthy = run(standin, home, "doctor")
    assert healthy.returncode == 0, healthy.stdout
    assert all(line.startswith("OK") for line in healthy.stdout.strip().splitlines())
    assert "42.50" in healthy.stdout and gptunnel_mcp.__version__ in healthy.stdout

    wrong_key = run(standin, home, "doctor", GPTUNNEL_API_KEY="not-the-key")
    assert wrong_key.returncode == 1
    assert "FAIL" in wrong_key.stdout and "GPTUNNEL_API_KEY" in wrong_key.stdout
    assert "not-the-key" not in wrong_key.stdout + wrong_key.stderr

    no_key = run(standin, home, "doctor", GPTUNNEL_API_KEY="")
    assert no_key.returncode == 1 and "GPTUNNEL_API_KEY is not set" in no_key.stdout

    unreachable = run(standin, home, "doctor", GPTUNNEL_BASE_URL="http://127.0.0.1:9")
    assert unreachable.returncode == 1 and "cannot reach GPTunnel" in unreachable.stdout


def test_help_and_version(standin: StandIn, home: Path) -> None:
    for command in ([], ["generate"], ["result"], ["history"], ["doctor"]):
        shown = run(standin, home, *command, "--help")
        assert shown.returncode == 0 and "usage: gptunnel-mcp" in shown.stdout
    version = run(standin, home, "--version")
    assert version.stdout.strip() == f"gptunnel-mcp {gptunnel_mcp.__version__}"
