"""A real PostgreSQL for the tests: Debian's server binaries, one cluster per test process (each
xdist worker starts its own, on its own port) in a temporary folder, listening on 127.0.0.1 only
with trust authentication, and a fresh database for every test.

The machines run as root, which PostgreSQL refuses: the cluster belongs to the `postgres` user
(or `nobody`) and its programs run as that user. Missing binaries fail the test that needs them
rather than skip it: CI installs them (`.ci/run`), and the backend must never go untested.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

import psycopg
import pytest

from .processes import dies_with_parent, free_port

#: Start-up options for a throwaway cluster: durability is worth nothing here, speed is.
_FAST = ("-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off")
_START_SECONDS = 30


def _bin_dir() -> Path:
    """The newest Debian PostgreSQL's programs, or the ones on PATH (other systems)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    initdb = found[-1] if found else shutil.which("initdb")
    if initdb is None:
        pytest.fail(
            "PostgreSQL's server programs (initdb, postgres) are not installed, and the PostgreSQL "
            "backend's tests need them: apt-get install postgresql (.ci/run does)",
            pytrace=False,
        )
    return Path(initdb).parent


def _unprivileged_user() -> pwd.struct_passwd | None:
    """Whom to run PostgreSQL as: None for ourselves, unless we are root (which it refuses)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    pytest.fail("running as root, and there is no postgres or nobody user to run PostgreSQL as")


class _As(NamedTuple):
    user: int | None
    group: int | None
    extra_groups: list[int] | None


class Cluster:
    """One running PostgreSQL server; `database()` makes a fresh database on it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.admin_url = f"postgresql://postgres@127.0.0.1:{port}/postgres"

    @classmethod
    @contextlib.contextmanager
    def running(cls, settings: Mapping[str, str] | None = None) -> Iterator[Cluster]:
        """A cluster started with `settings` (server settings, as `postgres -c name=value`) on
        top of the fast ones, e.g. `{"shared_preload_libraries": "pg_stat_statements"}`."""
        bin_dir, user = _bin_dir(), _unprivileged_user()
        extra = tuple(f"-c{name}={value}" for name, value in (settings or {}).items())
        root = Path(tempfile.mkdtemp(prefix="gptunnel-pg-"))
        try:
            data = root / "data"
            if user is not None:
                os.chown(root, user.pw_uid, user.pw_gid)
            # As that user, without root's supplementary groups.
            as_user = _As(user.pw_uid, user.pw_gid, []) if user is not None else _As(None, None, None)
            # The user's own home may not exist (nobody's does not): PostgreSQL needs none.
            env = {**os.environ, "LC_ALL": "C", "HOME": str(root)}
            initdb = [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"]
            made = subprocess.run(
                [*initdb, "-N", "-E", "UTF8", "--no-locale", "--no-instructions"],
                env=env,
                capture_output=True,
                text=True,
                check=False,
                user=as_user.user,
                group=as_user.group,
                extra_groups=as_user.extra_groups,
            )
            if made.returncode != 0:
                pytest.fail(f"initdb failed ({made.returncode}):\n{made.stdout}{made.stderr}", pytrace=False)
            with cls._server(bin_dir, data, root / "server.log", env, as_user, extra) as port:
                yield cls(port)
        finally:
            shutil.rmtree(root, ignore_errors=True)

    @staticmethod
    @contextlib.contextmanager
    def _server(
        bin_dir: Path, data: Path, log: Path, env: dict[str, str], as_user: _As, settings: tuple[str, ...]
    ) -> Iterator[int]:
        """`postgres` on a free loopback port (another worker may take the port between the
        probe and the bind: then another port), no Unix socket; stopped on the way out."""
        for _ in range(5):
            port = free_port()
            command = [str(bin_dir / "postgres"), "-D", str(data), "-p", str(port)]
            command += ["-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=", *_FAST]
            command += settings
            with log.open("ab") as out:
                server = subprocess.Popen(
                    command,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    # Runs after the switch of user, so the setting survives it.
                    preexec_fn=dies_with_parent(signal.SIGQUIT),
                    user=as_user.user,
                    group=as_user.group,
                    extra_groups=as_user.extra_groups,
                )
            try:
                if _ready(server, port):
                    yield port
                    return
            finally:
                # SIGQUIT: immediate shutdown; the files are thrown away next.
                server.send_signal(signal.SIGQUIT)
                server.wait(timeout=_START_SECONDS)
        raise RuntimeError(f"PostgreSQL did not start; its log:\n{log.read_text(errors='replace')[-3000:]}")

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        """A new, empty database; its URL. Dropped afterwards, with whatever is still connected."""
        name = f"t_{secrets.token_hex(6)}"
        with psycopg.connect(self.admin_url, autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name}")
        try:
            yield f"postgresql://postgres@127.0.0.1:{self.port}/{name}"
        finally:
            with psycopg.connect(self.admin_url, autocommit=True) as admin:
                admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


def _ready(server: subprocess.Popen[bytes], port: int) -> bool:
    """Whether the server came up on `port` (False: it exited, most likely the port was taken)."""
    deadline = time.monotonic() + _START_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            return False
        with contextlib.suppress(psycopg.OperationalError):
            psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", connect_timeout=2).close()
            return True
        time.sleep(0.02)
    raise RuntimeError(f"PostgreSQL did not answer on 127.0.0.1:{port} within {_START_SECONDS} s")
