"""The soak, short: many jobs through one server while the stand-in fails at random, and the
stand-in's random-fault knobs it relies on. The long run is `python bench/soak.py`."""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from .standin import Behaviour, StandIn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import soak  # bench/ is not a package: found through the sys.path entry above

KEY = "soak-test-key"
MODEL = "gpt-image-1-low"


@pytest.fixture
def standin() -> Iterator[StandIn]:
    with StandIn(api_key=KEY, behaviour=Behaviour(generation_seconds=0.0), seed=5) as s:
        yield s


@pytest.fixture
def api(standin: StandIn) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=standin.url, headers={"Authorization": KEY}, timeout=5.0) as http:
        yield http


def create(api: httpx2.Client, prompt: str = "a fox") -> httpx2.Response:
    return api.post("/v1/media/create", json={"model": MODEL, "prompt": prompt})


# -- the knobs -----------------------------------------------------------------------------------


def test_no_random_faults_by_default(standin: StandIn, api: httpx2.Client) -> None:
    for _ in range(30):
        assert create(api).json()["code"] == 0
    assert standin.stats.faults == {}


def test_fault_rate_one_fails_every_create_and_result_with_the_chosen_kinds(
    standin: StandIn, api: httpx2.Client
) -> None:
    task_id = create(api).json()["id"]
    standin.behaviour.fault_rate = 1.0
    standin.behaviour.fault_kinds = ("code6",)
    for _ in range(3):
        assert create(api).json()["code"] == 6
        assert api.post("/v1/media/result", json={"task_id": task_id}).json()["code"] == 6
    assert standin.stats.faults == {"create:code6": 3, "result:code6": 3}
    assert standin.task_ids() == [task_id], "a faulted create made a task"
    standin.behaviour.fault_kinds = ("http429",)
    standin.behaviour.retry_after = 0.2
    response = create(api)
    assert response.status_code == 429 and response.headers["retry-after"] == "0.2"


def test_fault_rate_is_roughly_the_share_of_failed_requests_and_mixes_kinds(
    standin: StandIn, api: httpx2.Client
) -> None:
    standin.behaviour.fault_rate = 0.3
    standin.behaviour.fault_kinds = ("http503", "code1", "code500")
    outcomes = [api.get("/v1/balance") for _ in range(400)]
    failed = sum(1 for r in outcomes if r.status_code != 200 or "code" in r.json())
    assert 70 <= failed <= 170, failed
    assert set(standin.stats.faults) == {"balance:http503", "balance:code1", "balance:code500"}
    assert sum(standin.stats.faults.values()) == failed


def test_the_same_seed_gives_the_same_faults() -> None:
    def sequence(seed: int) -> list[int]:
        behaviour = Behaviour(fault_rate=0.5, fault_kinds=("http503", "http429"))
        with (
            StandIn(api_key=None, behaviour=behaviour, seed=seed) as standin,
            httpx2.Client(base_url=standin.url, timeout=5.0) as http,
        ):
            return [http.get("/v1/balance").status_code for _ in range(40)]

    first = sequence(11)
    assert first == sequence(11)
    assert first != sequence(12)
    assert {200, 503, 429} == set(first)


def test_transient_failures_come_before_random_faults_and_are_counted(
    standin: StandIn, api: httpx2.Client
) -> None:
    standin.behaviour.transient_failures = 1
    standin.behaviour.transient_kind = "html"
    standin.behaviour.fault_rate = 1.0
    standin.behaviour.fault_kinds = ("code500",)
    assert create(api).headers["content-type"].startswith("text/html")
    assert create(api).json()["code"] == 500
    assert standin.stats.faults == {"create:html": 1, "create:code500": 1}


def test_download_faults(standin: StandIn, api: httpx2.Client) -> None:
    task_id = create(api).json()["id"]
    url = api.post("/v1/media/result", json={"task_id": task_id}).json()["url"]
    served = standin.image_bytes(task_id)
    standin.behaviour.download_fault_rate = 1.0
    standin.behaviour.download_fault_kinds = ("http503",)
    with httpx2.Client(timeout=5.0) as storage:
        assert storage.get(url).status_code == 503
        standin.behaviour.download_fault_kinds = ("truncate",)
        with storage.stream("GET", url) as response:
            assert int(response.headers["content-length"]) == len(served)
            with pytest.raises(httpx2.RemoteProtocolError):
                response.read()
        standin.behaviour.download_fault_rate = 0.0
        assert storage.get(url).content == served
    assert standin.stats.faults == {"download:http503": 1, "download:truncate": 1}
    assert standin.stats.download_calls == 3


def test_download_pause_at_sends_part_of_the_body_before_the_delay(
    standin: StandIn, api: httpx2.Client
) -> None:
    task_id = create(api).json()["id"]
    url = api.post("/v1/media/result", json={"task_id": task_id}).json()["url"]
    served = standin.image_bytes(task_id)
    standin.behaviour.download_delay = 0.6
    standin.behaviour.download_pause_at = 1000
    with httpx2.Client(timeout=5.0) as storage, storage.stream("GET", url) as response:
        start = time.monotonic()
        chunks = response.iter_raw()
        first = next(chunks)
        assert time.monotonic() - start < 0.4, "the first part waited for the delay"
        rest = b"".join(chunks)
        assert time.monotonic() - start >= 0.5
    assert first + rest == served and len(first) <= 1000


def test_task_prompts(standin: StandIn, api: httpx2.Client) -> None:
    a = create(api, "one").json()["id"]
    b = create(api, "two").json()["id"]
    assert standin.task_prompts() == {a: "one", b: "two"}


# -- the soak ------------------------------------------------------------------------------------


def test_the_soak_check_catches_double_creates_wrong_files_and_paid_errors(
    standin: StandIn, api: httpx2.Client, tmp_path: Path
) -> None:
    """A soak that cannot fail proves nothing: its per-job check, fed each kind of bad ending."""
    twice = [create(api, "twice").json()["id"] for _ in range(2)]
    wrong, _paid, good = (create(api, p).json()["id"] for p in ("wrong", "paid", "good"))
    files: dict[str, Path] = {}
    for task_id, data in (
        (twice[0], standin.image_bytes(twice[0])),
        (wrong, b"not the image"),
        (good, standin.image_bytes(good)),
    ):
        files[task_id] = tmp_path / f"{task_id}.webp"
        files[task_id].write_bytes(data)

    def done(index: int, prompt: str, task_id: str) -> soak.JobOutcome:
        job = soak.JobOutcome(index, prompt, state="done", task_id=task_id, file_path=str(files[task_id]))
        job.sha256 = hashlib.sha256(standin.image_bytes(task_id)).hexdigest()
        return job

    jobs = [
        done(0, "twice", twice[0]),
        done(1, "wrong", wrong),
        soak.JobOutcome(2, "paid", state="error", error_kind="transient", text="GPTunnel is unavailable"),
        soak.JobOutcome(3, "ambiguous", state="error", error_kind="unknown_outcome", text="answer was lost"),
        done(4, "good", good),
    ]
    soak._check_jobs(jobs, standin)
    assert [(j.state, j.created_twice, j.passed) for j in jobs] == [
        ("done", True, False),  # the right image, but two tasks paid for one job
        ("lost", False, False),
        ("lost", False, False),
        ("error", False, True),
        ("done", False, True),
    ]
    assert "created twice" in (jobs[0].problem or "")
    assert "not what was served" in (jobs[1].problem or "")
    assert "was made upstream" in (jobs[2].problem or "")
    assert soak.classify_error("the request ... its answer was lost (ReadError)") == "unknown_outcome"
    assert soak.classify_error("GPTunnel is under heavy load (code 6)") == "transient"


@pytest.mark.slow
@pytest.mark.anyio
async def test_soak_every_job_ends_done_or_with_a_clear_error_and_nothing_is_created_twice(
    tmp_path: Path,
) -> None:
    config = soak.SoakConfig(jobs=40, concurrency=6, fault_rate=0.3, seed=1234, run_timeout=100)
    started = time.monotonic()
    report = await soak.run_soak(config, workdir=tmp_path)
    elapsed = time.monotonic() - started
    summary = "\n".join(report.lines())

    assert len(report.jobs) == 40
    assert report.problems == [], summary
    assert all(job.state in ("done", "error") for job in report.jobs), summary
    assert report.count("lost") == 0, summary
    assert report.created_twice == [], summary
    assert (report.passed, report.failed) == (40, 0), summary
    assert summary.endswith("40 passed, 0 failed")
    for job in report.jobs:
        if job.state == "error":
            assert job.text.strip() and job.error_kind in ("unknown_outcome", "transient"), job

    # Exactly one create per created task: every create the stand-in answered with a task made a
    # distinct task, one for each job that did not fail before creating, and each was delivered.
    failed_before_creating = [j for j in report.jobs if j.state == "error"]
    assert all(j.upstream_tasks == 0 for j in failed_before_creating), summary
    assert report.successful_creates == len(report.tasks) == 40 - len(failed_before_creating), summary
    done_ids = [j.task_id for j in report.jobs if j.state == "done"]
    assert len(set(done_ids)) == len(done_ids)
    assert set(done_ids) == set(report.tasks), summary
    assert {t: report.history[t] for t in report.tasks} == dict.fromkeys(report.tasks, "done")

    # The faults were real, on every endpoint, and the server retried through them.
    endpoints = {key.split(":")[0] for key in report.faults}
    assert {"create", "result", "download"} <= endpoints, report.faults
    assert report.create_calls > 40
    assert sum(report.logged_retries) > 0, summary
    assert elapsed < 50, f"the soak took {elapsed:.1f} s\n{summary}"
