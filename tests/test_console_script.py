"""The installed `gptunnel-mcp` script, started as a person (or an MCP client) starts it: the few
things only a real process shows. Four process starts in all; everything else about the
command line is tested in process (test_cli.py)."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import gptunnel_mcp

from .conftest import initialize_request

SCRIPT = Path(sys.executable).with_name("gptunnel-mcp")
#: Modules `--version` and `--help` must not load: the MCP SDK and the other heavy imports.
HEAVY = ("mcp", "uvicorn", "starlette", "PIL")


def environment(home: Path, **extra: str) -> dict[str, str]:
    """A bare environment with its own HOME: the default data folder is inside it."""
    return {"PATH": os.environ.get("PATH", ""), "HOME": str(home), **extra}


@pytest.fixture(scope="module", autouse=True)
def sandbox_generate(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """`gptunnel-mcp --sandbox generate`, started before this module's first test: the sandbox
    takes its seconds to make an image, and the other tests run meanwhile."""
    home = tmp_path_factory.mktemp("home")
    process = subprocess.Popen(
        [str(SCRIPT), "--sandbox", "generate", "рыжая лиса"],
        env=environment(home),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    yield process, home
    if process.poll() is None:
        process.kill()
    process.communicate()


@pytest.mark.parametrize("flag", ["--version", "--help"])
def test_version_and_help_answer_without_loading_the_sdk(tmp_path: Path, flag: str) -> None:
    # Python lists every module it imports on stderr: the honest account of what was loaded.
    shown = subprocess.run(
        [str(SCRIPT), flag],
        env=environment(tmp_path, PYTHONPROFILEIMPORTTIME="1"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    if flag == "--version":
        assert shown.stdout.strip() == f"gptunnel-mcp {gptunnel_mcp.__version__}"
    else:
        assert shown.stdout.startswith("usage: gptunnel-mcp")
    imported = {line.rsplit("|", 1)[-1].strip() for line in shown.stderr.splitlines() if "|" in line}
    assert "gptunnel_mcp._main" in imported
    assert not {name for name in imported if name.split(".")[0] in HEAVY}


def test_ctrl_c_stops_the_stdio_server_while_stdin_stays_open(tmp_path: Path) -> None:
    server = subprocess.Popen(
        [str(SCRIPT), "--sandbox"],
        env=environment(tmp_path),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert server.stdin is not None and server.stdout is not None
    try:
        server.stdin.write(json.dumps(initialize_request("ctrl-c-test")).encode() + b"\n")
        server.stdin.flush()
        # Its answer shows the server is serving, its stdin read by the SDK.
        assert select.select([server.stdout], [], [], 30)[0], "the server did not answer initialize"
        assert json.loads(server.stdout.readline())["id"] == 1
        server.send_signal(signal.SIGINT)
        try:
            code = server.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pytest.fail("the server was still running 2 s after Ctrl-C")
        stderr = server.stderr.read().decode() if server.stderr else ""
        assert code in (0, 130), stderr
        assert "Traceback" not in stderr
    finally:
        if server.poll() is None:
            server.kill()
        server.communicate()


def test_sandbox_generate_prints_the_path_of_a_png(
    sandbox_generate: tuple[subprocess.Popen[str], Path],
) -> None:
    process, home = sandbox_generate
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    image = Path(out.strip())
    assert image.is_relative_to(home)
    assert image.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert err.splitlines()[-1].startswith("done")
