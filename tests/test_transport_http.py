"""The HTTP transport as deployed: `python -m gptunnel_mcp --transport http` in its own process, bound
to every interface behind a token. Behaviour is tested in process (test_http.py); this proves the
command line serves that app: health check, token, Host and Origin guard, a tool call, and a log
that holds neither the token nor the key. One process serves every test here: each start costs a
Python start-up.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

import gptunnel_mcp

from .conftest import (
    API_KEY,
    MCP_HEADERS,
    ProcessLauncher,
    http_client,
    initialize_request,
    structured,
    text_of,
)
from .standin import Behaviour, StandIn

pytestmark = pytest.mark.anyio

AUTH_TOKEN = "smoke-token-3e8d0b6a"
INITIALIZE = initialize_request("smoke-test")
AUTHORIZED = {**MCP_HEADERS, "Authorization": f"Bearer {AUTH_TOKEN}"}


@dataclass
class Deployed:
    url: str
    standin: StandIn
    log: Path


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    # Module scope, so the one server process below can be shared by every test in the module.
    return "asyncio"


@pytest.fixture(scope="module")
def module_standin() -> Iterator[StandIn]:
    with StandIn(api_key=API_KEY, behaviour=Behaviour(generation_seconds=0.3, image_size=(320, 240))) as s:
        yield s


@pytest.fixture(scope="module")
async def deployed(
    module_standin: StandIn, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Deployed]:
    root = tmp_path_factory.mktemp("http-process")
    launcher = ProcessLauncher(module_standin, root / "home", root, transport="http")
    log = root / "server.log"
    with log.open("w") as errlog:
        async with launcher.http_server(
            errlog,
            GPTUNNEL_MCP_HOST="0.0.0.0",  # a public bind, which only a token makes acceptable
            GPTUNNEL_MCP_AUTH_TOKEN=AUTH_TOKEN,
        ) as url:
            yield Deployed(url, module_standin, log)


@pytest.fixture
async def raw() -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(timeout=15) as client:
        yield client


async def test_health_is_open_and_mcp_needs_the_token(deployed: Deployed, raw: httpx2.AsyncClient) -> None:
    health = await raw.get(deployed.url.removesuffix("/mcp") + "/healthz", headers=AUTHORIZED)
    assert health.status_code == 200
    assert health.json()["version"] == gptunnel_mcp.__version__ and health.json()["auth"] is True

    for headers in (MCP_HEADERS, {**MCP_HEADERS, "Authorization": "Bearer wrong-token"}):
        refused = await raw.post(deployed.url, json=INITIALIZE, headers=headers)
        assert refused.status_code == 401, (refused.status_code, refused.text)
        assert refused.headers["www-authenticate"].startswith("Bearer ")
        assert AUTH_TOKEN not in refused.text


async def test_foreign_host_and_origin_are_refused_even_with_the_token(
    deployed: Deployed, raw: httpx2.AsyncClient
) -> None:
    port = httpx2.URL(deployed.url).port
    evil_host = await raw.post(
        deployed.url, json=INITIALIZE, headers={**AUTHORIZED, "Host": f"evil.example:{port}"}
    )
    assert evil_host.status_code == 421, evil_host.text
    evil_origin = await raw.post(
        deployed.url, json=INITIALIZE, headers={**AUTHORIZED, "Origin": "http://evil.example"}
    )
    assert evil_origin.status_code == 403, evil_origin.text
    accepted = await raw.post(deployed.url, json=INITIALIZE, headers=AUTHORIZED)
    assert accepted.status_code == 200 and '"protocolVersion"' in accepted.text, accepted.text


async def test_a_tool_call_with_the_token_stores_the_image(deployed: Deployed) -> None:
    async with (
        http_client(deployed.url, AUTH_TOKEN) as http,
        Client(streamable_http_client(deployed.url, http_client=http), cache=None) as client,
    ):
        result = await client.call_tool("generate_and_wait", {"prompt": "over http"})
    assert not result.is_error, text_of(result)
    data = structured(result)
    assert data["status"] == "done"
    assert Path(data["file_path"]).read_bytes() == deployed.standin.image_bytes(data["task_id"])
    assert deployed.standin.stats.create_calls == 1
    # The upstream got the GPTunnel key, never the MCP token.
    assert set(deployed.standin.stats.auth_headers) == {API_KEY}

    log = deployed.log.read_text()
    assert f"created task {data['task_id']}" in log and "POST /mcp" in log
    for secret in (AUTH_TOKEN, API_KEY):
        assert secret not in log
        assert secret not in result.model_dump_json()
