"""The download path and the reference URLs under a hostile or broken upstream: links to this
machine or a private network are refused (by address, however spelled, at every redirect), a
link that keeps failing ends its task instead of being retried for ever, the wait timeout bounds
the download too, answers too large to be GPTunnel's are not read, and reference images that
GPTunnel could not fetch cost nothing."""

from __future__ import annotations

import ipaddress
import json
import time
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp_types import TextResourceContents

from gptunnel_mcp import _engine, _netguard

from .conftest import ServerLauncher, structured, text_of
from .standin import StandIn

pytestmark = [pytest.mark.anyio, pytest.mark.standin(generation_seconds=0, image_size=(64, 64))]

#: What a single call may send for one link: the request and the redirects it follows.
REQUESTS_PER_CALL = 6


async def record_of(client: Client, task_id: str) -> dict[str, Any]:
    (contents,) = (await client.read_resource(f"gptunnel://images/{task_id}")).contents
    assert isinstance(contents, TextResourceContents)
    return dict(json.loads(contents.text))


def stored_files(home: Path) -> list[str]:
    images = home / "images"
    return sorted(p.name for p in images.rglob("*") if p.is_file()) if images.exists() else []


# --- where links may lead --------------------------------------------------------------------

PRIVATE_LINKS = [
    "http://localhost:{port}{path}",
    "http://2130706433:{port}{path}",
    "http://0x7f.1:{port}{path}",
    "http://[::ffff:127.0.0.1]:{port}{path}",
]


@pytest.mark.parametrize("link", PRIVATE_LINKS)
async def test_a_link_to_this_machine_is_refused_unless_the_operator_allows_private_downloads(
    memory_server: ServerLauncher, standin: StandIn, home: Path, link: str
) -> None:
    # The stand-in itself serves the file on every one of these spellings of 127.0.0.1: only the
    # guard stands between the link and an internal image.
    standin.behaviour.file_url_override = link
    async with memory_server.connect() as client:
        refused = await client.call_tool("generate_and_wait", {"prompt": "an internal image"})
        (task_id,) = standin.task_ids()
        kept = await record_of(client, task_id)
    text = text_of(refused)
    assert refused.is_error, text
    assert "only downloads from public addresses" in text and "GPTUNNEL_ALLOW_PRIVATE_DOWNLOADS=1" in text
    assert standin.stats.download_calls == 0
    assert stored_files(home) == []
    assert (kept["status"], kept["upstream_status"]) == ("pending", "done")

    async with memory_server.connect(GPTUNNEL_ALLOW_PRIVATE_DOWNLOADS="1") as client:
        allowed = await client.call_tool("get_result", {"task_id": task_id})
    assert not allowed.is_error, text_of(allowed)
    assert structured(allowed)["status"] == "done"
    assert Path(structured(allowed)["file_path"]).read_bytes() == standin.image_bytes(task_id)


@pytest.mark.parametrize(
    ("link", "words"),
    [
        ("http://user:secret-pw@127.0.0.1:{port}{path}", "user name or password"),
        ("ftp://127.0.0.1:{port}{path}", "not an http(s) URL"),
        ("http://127.0.0.1:{port}{path}?" + "a" * 5000, "not a usable link"),
    ],
)
async def test_a_link_of_a_form_never_fetched_is_refused_at_once_and_not_shown(
    memory_server: ServerLauncher, standin: StandIn, home: Path, link: str, words: str
) -> None:
    standin.behaviour.file_url_override = link
    async with memory_server.connect() as client:
        refused = await client.call_tool("generate_and_wait", {"prompt": "an odd link"})
        (task_id,) = standin.task_ids()
        kept = await record_of(client, task_id)
    text = text_of(refused)
    assert refused.is_error and words in text, text
    assert standin.stats.download_calls == 0 and stored_files(home) == []
    assert kept["status"] == "pending" and kept["source_url"] is None
    assert "secret-pw" not in refused.model_dump_json() + json.dumps(kept) + memory_server.logs()


async def test_a_redirect_to_this_machine_is_refused_at_the_hop(
    memory_server: ServerLauncher, standin: StandIn, home: Path
) -> None:
    # The link is on the API's own origin (allowed); where it sends the download is not.
    standin.behaviour.download_redirect_to = "http://localhost:{port}/files/secret.png"
    async with memory_server.connect() as client:
        refused = await client.call_tool("generate_and_wait", {"prompt": "redirected inwards"})
    text = text_of(refused)
    assert refused.is_error and "only downloads from public addresses" in text, text
    assert standin.stats.download_calls == 1
    assert stored_files(home) == []


async def test_the_connection_goes_to_the_address_that_was_checked(
    memory_server: ServerLauncher, standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The name is looked up once, by the guard; the socket goes to what the guard saw. (No
    resolver on this machine knows `images.example`: a second lookup could not connect.)"""
    seen: list[str] = []
    resolve = _netguard.resolve

    async def fake(host: str, port: int) -> list[_netguard.IPAddress]:
        seen.append(host)
        if host == "images.example":
            return [ipaddress.ip_address("127.0.0.1")]
        return await resolve(host, port)

    monkeypatch.setattr(_netguard, "resolve", fake)
    standin.behaviour.file_url_override = "http://images.example:{port}{path}"
    async with memory_server.connect(GPTUNNEL_ALLOW_PRIVATE_DOWNLOADS="1") as client:
        done = await client.call_tool("generate_and_wait", {"prompt": "pinned"})
    assert not done.is_error, text_of(done)
    assert structured(done)["status"] == "done"
    assert seen == ["images.example"]


# --- links that keep failing ----------------------------------------------------------------


async def test_a_redirect_loop_costs_a_few_requests_a_call_and_then_ends_the_task(
    memory_server: ServerLauncher, standin: StandIn
) -> None:
    standin.behaviour.download_redirect_to = "{path}"  # the link redirects to itself
    async with memory_server.connect() as client:
        first = await client.call_tool("generate_and_wait", {"prompt": "round and round"})
        assert first.is_error and "redirected more than" in text_of(first), text_of(first)
        assert standin.stats.download_calls <= REQUESTS_PER_CALL
        (task_id,) = standin.task_ids()
        results = [first]
        for _ in range(_engine.MAX_DOWNLOAD_FAILURES - 1):
            before = standin.stats.download_calls
            results.append(await client.call_tool("get_result", {"task_id": task_id}))
            assert standin.stats.download_calls - before <= REQUESTS_PER_CALL
        last = structured(results[-1])
        spent = standin.stats.download_calls
        again = structured(await client.call_tool("get_result", {"task_id": task_id}))
    assert last["status"] == "failed" and "redirected more than" in last["error"], last
    assert again["status"] == "failed"
    assert standin.stats.download_calls == spent, "an ended task's link was tried again"


async def test_a_body_that_always_breaks_off_ends_the_task_within_one_wait(
    memory_server: ServerLauncher, standin: StandIn, home: Path
) -> None:
    standin.behaviour.download_truncate_at = 100
    async with memory_server.connect(GPTUNNEL_WAIT_TIMEOUT="5") as client:
        result = await client.call_tool("generate_and_wait", {"prompt": "never whole"})
    data = structured(result)
    assert data["status"] == "failed", data
    assert "broke off" in data["error"] and f"{_engine.MAX_DOWNLOAD_FAILURES} attempts" in data["error"]
    # GPTunnel did make it: the agent must not be told to change its prompt.
    assert "GPTunnel made this image, but it could not be fetched" in data["message"]
    assert stored_files(home) == []


# --- the wait timeout bounds the download ----------------------------------------------------


async def test_a_trickling_link_does_not_outlast_the_wait_timeout(
    memory_server: ServerLauncher, standin: StandIn, home: Path
) -> None:
    standin.behaviour.download_trickle_seconds = 30
    async with memory_server.connect(GPTUNNEL_WAIT_TIMEOUT="1") as client:
        started = time.monotonic()
        cut = await client.call_tool("generate_and_wait", {"prompt": "drip, drip"})
        took = time.monotonic() - started
        assert not cut.is_error, text_of(cut)
        assert structured(cut)["status"] == "pending"
        # Far below the 30 s the link would take; the margin is for a machine under load.
        assert took < 5, f"generate_and_wait took {took:.1f} s with a 1 s wait timeout"
        assert stored_files(home) == [], "part of the image was left in the images folder"

        standin.behaviour.download_trickle_seconds = 0
        task_id = structured(cut)["task_id"]
        done = await client.call_tool("get_result", {"task_id": task_id})
    assert structured(done)["status"] == "done", text_of(done)
    assert Path(structured(done)["file_path"]).read_bytes() == standin.image_bytes(task_id)


# --- answers too large to be GPTunnel's -------------------------------------------------------


async def test_an_answer_too_large_to_be_gptunnels_is_not_read(
    memory_server: ServerLauncher, standin: StandIn
) -> None:
    async with memory_server.connect() as client:
        created = structured(await client.call_tool("create_image", {"prompt": "a long answer"}))
        standin.behaviour.result_padding = 3 * 1024 * 1024
        refused = await client.call_tool("get_result", {"task_id": created["task_id"]})
        standin.behaviour.result_padding = 0
        fine = await client.call_tool("get_result", {"task_id": created["task_id"]})
    assert refused.is_error and "over 1024 KiB" in text_of(refused), text_of(refused)
    assert structured(fine)["status"] == "done"


# --- reference images GPTunnel could not fetch -----------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/x.png",
        "http://10.0.0.1/a.png",
        "http://[::1]/a.png",
        "http://169.254.169.254/latest/meta-data",
        "http://0x7f.1/a.png",
        "http://localhost:8080/a.png",
        "http://user:pw@example.com/a.png",
        "https://no-such-host.invalid/a.png",
        "https://intranet.example/a.png",
    ],
)
async def test_a_reference_image_gptunnel_could_not_fetch_costs_nothing(
    memory_server: ServerLauncher, standin: StandIn, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    resolve = _netguard.resolve

    async def fake(host: str, port: int) -> list[_netguard.IPAddress]:
        if host == "intranet.example":
            return [ipaddress.ip_address("93.184.215.14"), ipaddress.ip_address("192.168.1.20")]
        return await resolve(host, port)

    monkeypatch.setattr(_netguard, "resolve", fake)
    async with memory_server.connect() as client:
        result = await client.call_tool("create_image", {"prompt": "like this", "images": [url]})
    text = text_of(result)
    assert result.is_error, text
    assert "invalid images" in text.lower() and "Nothing was sent to GPTunnel" in text, text
    assert "pw@" not in text
    assert standin.stats.create_calls == 0


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("93.184.215.14", True),
        ("2606:4700::1111", True),
        ("100.64.0.1", False),  # shared (carrier-grade NAT)
        ("224.0.0.1", False),
        ("0.0.0.0", False),
        ("::", False),
        ("fe80::1", False),
        ("fd00::1", False),
        ("::ffff:10.0.0.1", False),
        ("64:ff9b::7f00:1", False),  # NAT64 of 127.0.0.1
        ("2002:7f00:1::", False),  # 6to4 of 127.0.0.1
    ],
)
def test_what_counts_as_a_public_address(address: str, public: bool) -> None:
    assert _netguard.is_public(ipaddress.ip_address(address)) is public
