"""Three replicas on one PostgreSQL, end to end: real server processes, each with a home of its
own, behind a client that sends each call to the next replica in turn (tests/replicas.py).

What a team running replicas counts on: a request is created once however many replicas it
reaches at once; caps hold across them; any replica serves any image with the same bytes; and
when the replica following a task dies, mid-poll or mid-download, another adopts the task and
finishes it with no client asking, polling it one call at a time and downloading it once.

The three replicas start once per test process for the module (each start costs about a
second; the cap's test has three of its own); a test that kills one gets it back at the next
test's start. Each test's requests have prompts of their own, so the tests share the database
without meeting in it.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
import psycopg
import pytest
from psycopg.rows import DictRow, dict_row

from .conftest import API_KEY, structured, text_of
from .postgres import Cluster
from .replicas import Replicas, RoundRobin, replica_settings
from .standin import Behaviour, StandIn
from .test_http import read_blob

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

#: Short, so a dead replica's tasks are adopted within seconds.
LEASE = 3.0
#: Adoption comes a lease and a third of one after the holder died; the rest of the bound is
#: the adopter's first poll and the download.
ADOPTED_WITHIN = LEASE * 4 / 3 + 10
ADOPTED = "the dead replica's task adopted, downloaded and stored by another"
TWO_POLLS = "two polls of the task were at GPTunnel at once; the replicas said:\n"
DOWNLOADED_AGAIN = "the image was downloaded more than once; the replicas said:\n"
STANDIN_DEFAULTS: dict[str, Any] = {"generation_seconds": 0.5, "image_size": (320, 240)}

T = TypeVar("T")


@dataclass
class Deployment:
    replicas: Replicas
    gptunnel: StandIn
    database_url: str


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    # Module-wide, so the module-scoped replicas below can be started from async code.
    return "asyncio"


@pytest.fixture(scope="module")
def gptunnel() -> Iterator[StandIn]:
    standin = StandIn(api_key=API_KEY, behaviour=Behaviour(**STANDIN_DEFAULTS))
    standin.start()
    yield standin
    standin.stop(wait=False)


def settings(gptunnel: StandIn, database_url: str, **env: str) -> dict[str, str]:
    return replica_settings(
        api_key=API_KEY, base_url=gptunnel.url, database_url=database_url, lease_seconds=LEASE, **env
    )


@pytest.fixture(scope="module")
async def module_deployment(
    postgres_cluster: Cluster, gptunnel: StandIn, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Deployment]:
    with postgres_cluster.database() as url:
        async with Replicas(3, tmp_path_factory.mktemp("replicas"), settings(gptunnel, url)) as replicas:
            yield Deployment(replicas, gptunnel, url)


@pytest.fixture
async def deployment(module_deployment: Deployment) -> Deployment:
    """The module's three replicas, all running, and the stand-in with its default knobs."""
    module_deployment.gptunnel.behaviour = Behaviour(**STANDIN_DEFAULTS)
    await module_deployment.replicas.start()
    return module_deployment


@pytest.fixture
async def client(deployment: Deployment) -> AsyncIterator[RoundRobin]:
    async with deployment.replicas.connect() as client:
        yield client


def unique(prompt: str) -> str:
    """A prompt no other test (or run on the same database) sends: no reuse across tests."""
    return f"{prompt} [{secrets.token_hex(4)}]"


def creates_for(gptunnel: StandIn, prompt: str) -> int:
    """Tasks GPTunnel made for this prompt: more than one is a second create."""
    return list(gptunnel.task_prompts().values()).count(prompt)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def eventually(
    probe: Callable[[], Awaitable[T | None]],
    seconds: float,
    what: str,
    context: Callable[[], str] = lambda: "",
) -> T:
    """The first true value `probe` gives, asked every 50 ms; fails after `seconds`, saying
    `what` did not happen, and `context()` (e.g. the replicas' logs)."""
    with anyio.move_on_after(seconds):
        while True:
            if value := await probe():
                return value
            await anyio.sleep(0.05)
    raise AssertionError(f"not within {seconds:g} s: {what}\n{context()}")


async def standin_sees(check: Callable[[], object], seconds: float, what: str) -> None:
    """Returns once `check` (a look at the stand-in) is true; fails after `seconds`."""

    async def probe() -> object:
        return check() or None

    await eventually(probe, seconds, what)


@contextlib.asynccontextmanager
async def database(url: str) -> AsyncIterator[psycopg.AsyncConnection[DictRow]]:
    """A connection that sees every commit at once (autocommit): for watching the replicas."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True, row_factory=dict_row) as conn:
        yield conn


async def task_row(db: psycopg.AsyncConnection[DictRow], task_id: str) -> DictRow | None:
    cursor = await db.execute("SELECT status, lease_holder FROM tasks WHERE task_id = %s", (task_id,))
    return await cursor.fetchone()


async def done_row(db: psycopg.AsyncConnection[DictRow], task_id: str) -> DictRow | None:
    row = await task_row(db, task_id)
    return row if row is not None and row["status"] == "done" else None


async def served_everywhere(client: RoundRobin, deployment: Deployment, task_id: str) -> None:
    """Every live replica answers get_result and the image resource with GPTunnel's bytes."""
    image = deployment.gptunnel.image_bytes(task_id)
    for replica in deployment.replicas.alive:
        answer = await client.on(replica.index).call_tool("get_result", {"task_id": task_id})
        assert not answer.is_error, text_of(answer)
        data = structured(answer)
        assert (data["status"], data["sha256"]) == ("done", sha256(image)), data
        # A path on the replica that answered: the others' homes may be on other machines.
        assert Path(data["file_path"]).is_relative_to(replica.home.resolve()), data["file_path"]
        assert Path(data["file_path"]).read_bytes() == image
        assert await read_blob(client.on(replica.index), data["resource_uri"]) == image


# --- one request, many replicas ------------------------------------------------------------------


async def test_the_same_request_sent_to_all_three_at_once_is_created_once(
    deployment: Deployment, client: RoundRobin
) -> None:
    arguments = {"prompt": unique("a lighthouse asked of three replicas at once")}
    with anyio.fail_after(30):
        answers = [structured(a) for a in await client.each("generate_and_wait", arguments)]
    assert [a["status"] for a in answers] == ["done"] * 3, answers
    assert len({a["task_id"] for a in answers}) == 1
    image = deployment.gptunnel.image_bytes(answers[0]["task_id"])
    assert {a["sha256"] for a in answers} == {sha256(image)}
    assert creates_for(deployment.gptunnel, arguments["prompt"]) == 1, "a second create"


async def test_only_the_replica_holding_a_task_polls_it_and_downloads_it(
    deployment: Deployment, client: RoundRobin
) -> None:
    gptunnel, replicas = deployment.gptunnel, deployment.replicas
    # Every poll held open a while: two polls of the task at once would overlap at GPTunnel.
    gptunnel.behaviour.result_delay = 0.3
    gptunnel.behaviour.generation_seconds = 2.0
    arguments = {"prompt": unique("a harbour watched from every replica")}
    task_id = structured(await client.on(0).call_tool("create_image", arguments))["task_id"]
    answers: list[dict[str, Any]] = []

    async def wait_for_it(index: int) -> None:
        answers.append(structured(await client.on(index).call_tool("generate_and_wait", arguments)))

    async def keep_asking(index: int) -> None:
        while True:
            answer = structured(await client.on(index).call_tool("get_result", {"task_id": task_id}))
            if answer["status"] != "pending":
                answers.append(answer)
                return
            await anyio.sleep(0.1)

    # Agents on the two other replicas: one sends the same request, one asks for the task.
    with anyio.fail_after(30):
        async with anyio.create_task_group() as group:
            for index in (1, 2):
                group.start_soon(wait_for_it, index)
                group.start_soon(keep_asking, index)
    assert [(a["task_id"], a["status"]) for a in answers] == [(task_id, "done")] * 4, answers
    assert gptunnel.stats.max_concurrent_result_calls_by_task[task_id] == 1, TWO_POLLS + replicas.logs()
    assert gptunnel.stats.download_calls_by_task[task_id] == 1, DOWNLOADED_AGAIN + replicas.logs()
    assert creates_for(gptunnel, arguments["prompt"]) == 1, "a second create"


async def test_a_cap_holds_across_replicas_under_parallel_calls(
    postgres_url: str, gptunnel: StandIn, tmp_path: Path
) -> None:
    gptunnel.behaviour = Behaviour(**STANDIN_DEFAULTS)
    prompts = [unique(f"capped picture {i}") for i in range(9)]
    answers = []
    capped = settings(gptunnel, postgres_url, GPTUNNEL_MAX_IMAGES_PER_HOUR="3")
    async with Replicas(3, tmp_path, capped) as replicas, replicas.connect() as client:

        async def create(prompt: str) -> None:
            answers.append(await client.call_tool("create_image", {"prompt": prompt}))

        # Nine at once, three to each replica.
        with anyio.fail_after(30):
            async with anyio.create_task_group() as group:
                for prompt in prompts:
                    group.start_soon(create, prompt)
    made = [a for a in answers if not a.is_error]
    refused = [text_of(a) for a in answers if a.is_error]
    assert len(made) == 3, refused
    assert len(refused) == 6 and all("GPTUNNEL_MAX_IMAGES_PER_HOUR" in text for text in refused), refused
    assert sum(creates_for(gptunnel, prompt) for prompt in prompts) == 3


async def test_an_image_one_replica_stored_is_served_by_the_others_with_the_same_bytes(
    deployment: Deployment, client: RoundRobin
) -> None:
    made = structured(
        await client.on(0).call_tool("generate_and_wait", {"prompt": unique("a fox on a roof")})
    )
    assert made["status"] == "done", made
    await served_everywhere(client, deployment, made["task_id"])
    # From the history, not from GPTunnel again.
    downloads = deployment.gptunnel.stats.download_calls_by_task[made["task_id"]]
    assert downloads == 1, DOWNLOADED_AGAIN + deployment.replicas.logs()


# --- a replica dies -------------------------------------------------------------------------------


async def test_a_task_whose_replica_dies_mid_poll_is_adopted_and_stored_with_no_client_asking(
    deployment: Deployment, client: RoundRobin
) -> None:
    gptunnel, replicas = deployment.gptunnel, deployment.replicas
    # Still being made upstream when its replica dies, and each poll held open, so the replica
    # dies with one in flight.
    gptunnel.behaviour.generation_seconds = 60
    gptunnel.behaviour.result_delay = 0.5
    prompt = unique("a lantern in the fog, orphaned mid-poll")
    made = structured(await client.on(0).call_tool("create_image", {"prompt": prompt}))
    task_id = made["task_id"]
    assert made["status"] == "pending", made
    async with database(deployment.database_url) as db:
        holder = (await eventually(lambda: task_row(db, task_id), 5, "the task stored"))["lease_holder"]
        assert holder is not None, "the replica that created the task holds no lease on it"
        polling = "replica 0 polling the task by itself"
        await standin_sees(lambda: gptunnel.polls_in_flight(task_id), 10, polling)
        replicas.kill(0)
        gptunnel.finish(task_id)
        # No client asks from here on: another replica must find the task, poll, download, store.
        row = await eventually(lambda: done_row(db, task_id), ADOPTED_WITHIN, ADOPTED, replicas.logs)
    assert row["lease_holder"] != holder
    assert gptunnel.stats.max_concurrent_result_calls_by_task[task_id] == 1, TWO_POLLS + replicas.logs()
    assert creates_for(gptunnel, prompt) == 1, "a second create"
    await served_everywhere(client, deployment, task_id)
    assert gptunnel.stats.downloads_served_by_task[task_id] == 1, DOWNLOADED_AGAIN + replicas.logs()


async def test_a_task_whose_replica_dies_mid_download_is_adopted_and_downloaded_once(
    deployment: Deployment, client: RoundRobin
) -> None:
    gptunnel, replicas = deployment.gptunnel, deployment.replicas
    # The download stalls after its first bytes: the replica dies holding part of the file.
    gptunnel.behaviour.download_delay = 60
    gptunnel.behaviour.download_pause_at = 1000
    prompt = unique("a kite over dunes, orphaned mid-download")
    made = structured(await client.on(1).call_tool("create_image", {"prompt": prompt}))
    task_id = made["task_id"]
    async with database(deployment.database_url) as db:
        holder = (await eventually(lambda: task_row(db, task_id), 5, "the task stored"))["lease_holder"]
        downloading = "replica 1 downloading the image"
        await standin_sees(lambda: gptunnel.stats.download_calls_by_task.get(task_id), 15, downloading)
        replicas.kill(1)
        gptunnel.behaviour.download_delay = 0
        row = await eventually(lambda: done_row(db, task_id), ADOPTED_WITHIN, ADOPTED, replicas.logs)
    assert row["lease_holder"] != holder
    assert gptunnel.stats.max_concurrent_result_calls_by_task[task_id] == 1, TWO_POLLS + replicas.logs()
    assert creates_for(gptunnel, prompt) == 1, "a second create"
    await served_everywhere(client, deployment, task_id)
    assert gptunnel.stats.downloads_served_by_task[task_id] == 1, DOWNLOADED_AGAIN + replicas.logs()
