"""OAuth sign-in (issue 13), as hosts do it: the SDK's own OAuth client against the whole HTTP
app on an in-process uvicorn, a user who fills in the sign-in page, and the stand-in GPTunnel."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import ServerLauncher, structured
from .oauth import User, host_auth, host_client, oauth_server
from .standin import Behaviour, StandIn

pytestmark = pytest.mark.anyio

KEY_A = "sk-oauth-A-71c3e9d05b2a"
KEY_B = "sk-oauth-B-2f8a6d4c90e1"


@pytest.fixture
def open_standin() -> Iterator[StandIn]:
    with StandIn(api_key=None, behaviour=Behaviour(generation_seconds=0.05, image_size=(320, 240))) as s:
        yield s


@pytest.fixture
def launcher(open_standin: StandIn, home: Path) -> ServerLauncher:
    return ServerLauncher(open_standin, home, transport="http")


async def test_a_host_signs_a_user_in_and_calls_a_tool(launcher: ServerLauncher) -> None:
    user = User(KEY_A)
    async with oauth_server(launcher) as url, host_client(url, host_auth(url, user)) as client:
        done = structured(await client.call_tool("generate_and_wait", {"prompt": "a lighthouse"}))
        assert done["status"] == "done"
