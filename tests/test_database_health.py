"""A replica and its database: /healthz says whether the history can be used (503 when not, so a
load balancer sends the work elsewhere), a replica that lost its database refuses new work before
anything is sent or charged, and the same server works again once the database is back."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import anyio
import httpx2
import psycopg
import pytest

from gptunnel_mcp._sqlite import SQLiteStore

from .conftest import ServerLauncher, serve_http, text_of
from .standin import StandIn

# Tasks stay pending: these tests are about whether work is taken, not how it ends.
pytestmark = [pytest.mark.anyio, pytest.mark.standin(generation_seconds=60, image_size=(64, 64))]

TOKEN = "health-token-5d2c8e17a9"
#: In the URL, to see that no answer ever shows it (the test cluster trusts anyone: it is unused).
PASSWORD = "pw-never-shown-71c3"
AUTHORIZED = {"Authorization": f"Bearer {TOKEN}"}


def with_password(url: str) -> str:
    return url.replace("postgresql://postgres@", f"postgresql://postgres:{PASSWORD}@")


@contextlib.contextmanager
def lost(url: str) -> Iterator[None]:
    """The database refuses every connection, and the open ones are cut, as in an outage; it is
    back when the block ends."""
    name = url.rsplit("/", 1)[1]
    admin_url = url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        # ALLOW_CONNECTIONS binds superusers too (a connection limit does not).
        admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
        # With a timeout: returns once each is gone, not when it was only asked to go.
        admin.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
    try:
        yield
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")


def health_url(mcp_url: str) -> str:
    return mcp_url.removesuffix("/mcp") + "/healthz"


async def test_healthz_reports_sqlite_to_authorised_callers_only(memory_server: ServerLauncher) -> None:
    settings = memory_server.settings(GPTUNNEL_MCP_AUTH_TOKEN=TOKEN)
    async with serve_http(settings) as url, httpx2.AsyncClient() as raw:
        stranger = await raw.get(health_url(url))
        authorised = await raw.get(health_url(url), headers=AUTHORIZED)
    assert stranger.status_code == 200 and stranger.json() == {"status": "ok"}
    assert authorised.status_code == 200
    assert authorised.json()["database"] == {"backend": "sqlite", "ok": True}


async def test_a_probe_storm_asks_the_database_once_a_second(
    memory_server: ServerLauncher, monkeypatch: pytest.MonkeyPatch
) -> None:
    pings = 0
    ping = SQLiteStore.ping

    async def counted(store: SQLiteStore) -> None:
        nonlocal pings
        pings += 1
        await ping(store)

    monkeypatch.setattr(SQLiteStore, "ping", counted)
    async with serve_http(memory_server.settings()) as url, httpx2.AsyncClient() as raw:
        answers: list[int] = []

        async def probe() -> None:
            answers.append((await raw.get(health_url(url))).status_code)

        async with anyio.create_task_group() as tasks:
            for _ in range(30):
                tasks.start_soon(probe)
    assert answers == [200] * 30
    # (That a later probe asks again: the PostgreSQL test below sees the database come back.)
    assert pings == 1


async def test_healthz_says_when_postgresql_is_lost_and_when_it_is_back(
    memory_server: ServerLauncher, postgres_url: str
) -> None:
    url = with_password(postgres_url)
    settings = memory_server.settings(GPTUNNEL_MCP_AUTH_TOKEN=TOKEN, GPTUNNEL_MCP_DATABASE_URL=url)
    place = postgres_url.split("@", 1)[1].split("/", 1)[0]
    async with serve_http(settings) as mcp_url, httpx2.AsyncClient(timeout=30) as raw:
        health = health_url(mcp_url)
        with lost(postgres_url):
            stranger = await raw.get(health)
            authorised = await raw.get(health, headers=AUTHORIZED)
        # Back: the same server answers without a restart, once its pool has reconnected.
        deadline = time.monotonic() + 15
        while (again := await raw.get(health, headers=AUTHORIZED)).status_code != 200:
            assert time.monotonic() < deadline, again.text
            await anyio.sleep(0.1)
    assert stranger.status_code == 503 and stranger.json() == {"status": "unavailable"}
    assert authorised.status_code == 503
    details = authorised.json()
    assert details["status"] == "unavailable"
    database = details["database"]
    assert database["backend"] == "postgresql" and database["ok"] is False
    assert "is unavailable" in database["error"] and place in database["error"]
    assert "not currently accepting connections" in database["error"]  # the database's own reason
    assert PASSWORD not in authorised.text
    assert again.json()["status"] == "ok"
    assert again.json()["database"] == {"backend": "postgresql", "ok": True}


async def test_a_replica_without_its_database_refuses_to_create_and_works_again_once_it_is_back(
    memory_server: ServerLauncher, standin: StandIn, postgres_url: str
) -> None:
    async with memory_server.connect(GPTUNNEL_MCP_DATABASE_URL=with_password(postgres_url)) as client:
        with lost(postgres_url):
            started = time.monotonic()
            refused = await client.call_tool("create_image", {"prompt": "a lighthouse"})
            took = time.monotonic() - started
        assert refused.is_error
        text = text_of(refused)
        assert text.startswith("The history database") and "is unavailable" in text
        assert "Nothing was sent to GPTunnel and nothing was charged" in text
        assert PASSWORD not in text
        assert standin.stats.create_calls == 0
        # Told within seconds, not left hanging for the pool's whole connect timeout.
        assert took < 6
        deadline = time.monotonic() + 15
        while (result := await client.call_tool("create_image", {"prompt": "a lighthouse"})).is_error:
            # While the pool reconnects: still refused before anything is sent.
            assert standin.stats.create_calls == 0, text_of(result)
            assert time.monotonic() < deadline, text_of(result)
    assert standin.stats.create_calls == 1
