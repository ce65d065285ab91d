"""Soak: many generate_and_wait calls through one server while GPTunnel fails at random.

Starts a stand-in GPTunnel that fails a share of its requests transiently (HTTP 503 and 429 with
a short Retry-After, codes 1, 6 and 500, HTML error pages, dropped connections; image downloads
answer 503 or break off half-way), and ONE server over streamable HTTP on a temporary home
folder. Then it drives N generate_and_wait calls, each with its own prompt, with bounded
concurrency through the official MCP client, and checks every job:

- done: the stored file is exactly what the stand-in served, and it is the only task made for
  the job's prompt;
- failed with a clear error: a tool error with a message. A create whose answer was lost (a
  dropped connection or an HTML page in answer to a create) is not retried by design, so nothing
  is paid twice: those are counted apart;
- lost: anything else: no answer, a crash, a job still pending at the end, a wrong or missing
  file, an image paid for upstream that the job was not given.

A job that made more than one task upstream was created twice. The last line is
``N passed, M failed`` (passed: done or a clear error; failed: lost or created twice) and the
exit status is 1 if any job failed.

    python bench/soak.py --jobs 200 --concurrency 8 --fault-rate 0.3

`tests/test_soak.py` runs `run_soak` with fewer jobs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import re
import secrets
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import CallToolResult

from _server import Behaviour, StandIn, http_server  # bench/ is not a package: found next to this script

API_KEY = "sk-gptunnel-SOAK-4b1d"
#: Kinds of random upstream faults; 429 twice, so it is the commonest, as with a real rate limit.
FAULT_KINDS: tuple[str, ...] = (
    "http429",
    "http429",
    "http503",
    "code6",
    "code1",
    "code500",
    "html",
    "disconnect",
)

# Error texts by where they come from (see _upstream._unknown_create and _upstream._code_error).
_UNKNOWN_OUTCOME = "answer was lost"
_TRANSIENT = ("gptunnel is unavailable", "heavy load", "internal error", "did not answer", "cannot reach")
# Server log lines of a retry: one request retried at once (`Engine._retry`), or a poll retried
# while waiting (`Engine.wait`).
_QUICK_RETRY = re.compile(r"transient failure \(.*\); retry \d+ in")
_WAIT_RETRY = re.compile(r"task [0-9a-f]{24}: retrying after a transient error")


@dataclass(frozen=True)
class SoakConfig:
    jobs: int = 200
    concurrency: int = 8
    #: Probability that a request under /v1 (create, result) fails transiently.
    fault_rate: float = 0.3
    #: Probability that an image download fails (503, or broken off half-way); None: fault_rate / 2.
    download_fault_rate: float | None = None
    fault_kinds: tuple[str, ...] = FAULT_KINDS
    retry_after: float = 0.2
    generation_seconds: float = 0.5
    generation_jitter: float = 0.5
    seed: int = 20260728
    #: The server's GPTUNNEL_WAIT_TIMEOUT; a job still pending then is followed with get_result.
    wait_timeout: float = 30.0
    #: Longest one job (its generate_and_wait and any get_result after it) may take.
    job_timeout: float = 120.0
    #: Longest the whole run may take.
    run_timeout: float = 1800.0
    model: str = "gpt-image-1-low"

    @property
    def download_faults(self) -> float:
        return self.fault_rate / 2 if self.download_fault_rate is None else self.download_fault_rate


@dataclass
class JobOutcome:
    index: int
    prompt: str
    #: "done", "error" (a clear tool error) or "lost".
    state: str = "lost"
    #: For errors: "unknown_outcome", "transient", "storage", "failed" or "other".
    error_kind: str | None = None
    task_id: str | None = None
    text: str = ""
    seconds: float = 0.0
    #: get_result calls after a generate_and_wait that came back pending.
    follow_ups: int = 0
    #: Tasks made upstream for this job's prompt (more than one: created twice).
    upstream_tasks: int = 0
    #: Why a job counts as lost (or why a done job is not right).
    problem: str | None = None
    file_path: str | None = None
    sha256: str | None = None

    @property
    def created_twice(self) -> bool:
        return self.upstream_tasks > 1

    @property
    def passed(self) -> bool:
        return self.state in ("done", "error") and not self.created_twice


@dataclass
class SoakReport:
    config: SoakConfig
    jobs: list[JobOutcome]
    wall_seconds: float
    create_calls: int
    result_calls: int
    download_calls: int
    #: Upstream task id -> prompt, for every task the stand-in made.
    tasks: dict[str, str]
    faults: dict[str, int]
    #: Retry lines in the server's log: (quick retries of one request, polls retried while waiting).
    logged_retries: tuple[int, int]
    #: Task id -> status in the server's history database after the run.
    history: dict[str, str]
    #: Problems not tied to one job (leftover temporaries, history gaps, a server crash).
    problems: list[str] = field(default_factory=list)

    def count(self, state: str) -> int:
        return sum(1 for j in self.jobs if j.state == state)

    @property
    def passed(self) -> int:
        return sum(1 for j in self.jobs if j.passed)

    @property
    def failed(self) -> int:
        return len(self.jobs) - self.passed

    @property
    def created_twice(self) -> list[JobOutcome]:
        return [j for j in self.jobs if j.created_twice]

    @property
    def successful_creates(self) -> int:
        """Create calls the stand-in answered with a task (every other one was a fault)."""
        return self.create_calls - sum(n for k, n in self.faults.items() if k.startswith("create:"))

    @property
    def ok(self) -> bool:
        return self.failed == 0 and not self.problems

    def lines(self) -> list[str]:
        c = self.config
        jobs = len(self.jobs)
        errors = Counter(j.error_kind for j in self.jobs if j.state == "error")
        tasks = len(self.tasks)
        with_task = sum(1 for j in self.jobs if j.upstream_tasks > 0)
        quick, waiting = self.logged_retries
        out = [
            f"soak: {jobs} jobs, concurrency {c.concurrency}, fault rate {c.fault_rate:.2f} on create/result "
            f"(kinds {', '.join(sorted(set(c.fault_kinds)))}; 429 Retry-After {c.retry_after:g} s), "
            f"download fault rate {c.download_faults:.2f}, generation {c.generation_seconds:g} s "
            f"+/-{c.generation_jitter:.0%}, seed {c.seed}",
            f"jobs: {self.count('done')} done, {self.count('error')} failed with a clear error, "
            f"{self.count('lost')} lost",
            "clear errors: "
            + (", ".join(f"{n} {_ERROR_NAMES.get(k or '', k)}" for k, n in errors.most_common()) or "none"),
            f"wall time: {self.wall_seconds:.1f} s ({jobs / self.wall_seconds:.1f} jobs/s)",
            f"upstream creates: {self.create_calls} calls for {jobs} jobs, "
            f"{self.successful_creates} answered with a task, {tasks} distinct tasks, "
            f"{with_task} jobs with a task, {len(self.created_twice)} jobs created twice",
            f"result calls: {self.result_calls} ({self.result_calls / max(1, tasks):.2f} per created task, "
            f"{self.result_calls / max(1, jobs):.2f} per job)",
            f"downloads: {self.download_calls} for {self.count('done')} stored images",
            "faults injected: " + _faults_line(self.faults),
            f"retries observed: {quick + waiting} in the server log ({quick} quick retries of one request, "
            f"{waiting} polls retried while waiting); creates sent again: {self.create_calls - jobs}; "
            f"downloads again: {self.download_calls - self.count('done')}",
        ]
        follow = sum(j.follow_ups for j in self.jobs)
        if follow:
            out.append(f"get_result follow-ups after a pending wait: {follow}")
        for job in [j for j in self.jobs if not j.passed][:10]:
            out.append(
                f"FAILED job {job.index} ({job.state}, {job.upstream_tasks} upstream tasks): {job.problem}"
            )
        out.extend(f"PROBLEM: {p}" for p in self.problems)
        out.append(f"{self.passed} passed, {self.failed} failed")
        return out


_ERROR_NAMES = {
    "unknown_outcome": "create with unknown outcome (not retried by design: no double charge)",
    "transient": "create still refused after its retries",
    "storage": "storage errors",
    "failed": "failed tasks",
    "other": "other errors",
}


def _faults_line(faults: dict[str, int]) -> str:
    by_endpoint: dict[str, Counter[str]] = {}
    for key, n in faults.items():
        endpoint, _, kind = key.partition(":")
        by_endpoint.setdefault(endpoint, Counter())[kind] += n
    parts = []
    for endpoint in sorted(by_endpoint):
        kinds = by_endpoint[endpoint]
        detail = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
        parts.append(f"{endpoint} {sum(kinds.values())} ({detail})")
    return "; ".join(parts) or "none"


def classify_error(text: str) -> str:
    lowered = text.lower()
    if _UNKNOWN_OUTCOME in lowered:
        return "unknown_outcome"
    if any(t in lowered for t in _TRANSIENT):
        return "transient"
    if "cannot write" in lowered:
        return "storage"
    return "other"


@contextlib.asynccontextmanager
async def _server(standin: StandIn, home: Path, log: Path, wait_timeout: float) -> AsyncIterator[str]:
    """The server on a free port, logging at INFO into `log`; yields its MCP URL once healthy."""
    with log.open("wb") as out:
        env = {"GPTUNNEL_WAIT_TIMEOUT": str(wait_timeout)}
        async with http_server(standin, home, API_KEY, log=out, env=env) as (url, process):
            yield url
            if process.poll() is not None:
                raise RuntimeError(f"the server died during the run (exit {process.returncode}): see {log}")


def _text(result: CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if block.type == "text")


async def _run_job(client: Client, job: JobOutcome, config: SoakConfig) -> None:
    started = time.monotonic()
    try:
        with anyio.fail_after(config.job_timeout):
            result = await client.call_tool(
                "generate_and_wait", {"prompt": job.prompt, "model": config.model}
            )
            while not result.is_error and (result.structured_content or {}).get("status") == "pending":
                job.follow_ups += 1
                await anyio.sleep(1.0)
                task_id = (result.structured_content or {}).get("task_id")
                result = await client.call_tool("get_result", {"task_id": task_id})
    except TimeoutError:
        job.problem = f"no final answer within {config.job_timeout:g} s"
        return
    except Exception as exc:  # anything the client raises is a job without an answer
        job.problem = f"the call raised {type(exc).__name__}: {exc}"[:300]
        return
    finally:
        job.seconds = time.monotonic() - started
    job.text = _text(result)
    data: dict[str, Any] = dict(result.structured_content or {})
    job.task_id = data.get("task_id")
    if result.is_error:
        if not job.text.strip():
            job.problem = "a tool error without a message"
            return
        job.state = "error"
        job.error_kind = "failed" if data.get("status") == "failed" else classify_error(job.text)
        return
    if data.get("status") != "done":
        job.problem = f"ended with status {data.get('status')!r}: {job.text[:200]}"
        return
    job.state = "done"
    job.file_path = data.get("file_path")
    job.sha256 = data.get("sha256")


def _check_jobs(report_jobs: list[JobOutcome], standin: StandIn) -> None:
    """Hold every job against what the stand-in made and served."""
    tasks = standin.task_prompts()
    by_prompt: dict[str, list[str]] = {}
    for task_id, prompt in tasks.items():
        by_prompt.setdefault(prompt, []).append(task_id)
    for job in report_jobs:
        made = by_prompt.get(job.prompt, [])
        job.upstream_tasks = len(made)
        if job.created_twice:
            job.problem = f"created twice upstream: {', '.join(made)}"
        if job.state == "done":
            problem = _check_done(job, made, standin)
            if problem is not None:
                job.state, job.problem = "lost", problem
        elif job.state == "error" and made and job.error_kind != "unknown_outcome":
            # A task was made (and paid for) but the job got an error: the image is lost to it.
            job.state = "lost"
            job.problem = f"task {made[0]} was made upstream but the job got an error: {job.text[:200]}"


def _check_done(job: JobOutcome, made: list[str], standin: StandIn) -> str | None:
    if job.task_id not in made:
        return f"done with task {job.task_id}, which was not made for its prompt (made: {made})"
    assert job.task_id is not None
    served = standin.image_bytes(job.task_id)
    if job.file_path is None or not Path(job.file_path).is_file():
        return f"done, but its file {job.file_path} does not exist"
    stored = Path(job.file_path).read_bytes()
    if stored != served:
        return f"done, but the stored file ({len(stored)} bytes) is not what was served ({len(served)} bytes)"
    if job.sha256 != hashlib.sha256(served).hexdigest():
        return "done, but its sha256 is wrong"
    return None


def _read_history(db: Path) -> dict[str, str]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return {task_id: status for task_id, status in conn.execute("SELECT task_id, status FROM tasks")}


def _check_home(home: Path, report: SoakReport) -> None:
    images = home / "images"
    leftovers = sorted(p.name for p in images.glob(".*.part"))
    if leftovers:
        report.problems.append(f"temporary files left in the images folder: {leftovers[:5]}")
    empty = sorted(p.name for p in images.iterdir() if p.is_file() and p.stat().st_size == 0)
    if empty:
        report.problems.append(f"empty files in the images folder: {empty[:5]}")
    missing = sorted(set(report.tasks) - set(report.history))
    if missing:
        report.problems.append(f"tasks made upstream but missing from the history: {missing[:5]}")
    for job in report.jobs:
        if job.state == "done" and job.task_id is not None and report.history.get(job.task_id) != "done":
            report.problems.append(
                f"task {job.task_id} is done but the history says {report.history.get(job.task_id)}"
            )


def _count_retries(log: Path) -> tuple[int, int]:
    text = log.read_text(errors="replace") if log.exists() else ""
    return len(_QUICK_RETRY.findall(text)), len(_WAIT_RETRY.findall(text))


@contextlib.contextmanager
def _workdir(keep: Path | None) -> Iterator[Path]:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix="gptunnel-soak-") as tmp:
        yield Path(tmp)


async def run_soak(config: SoakConfig, *, workdir: Path | None = None) -> SoakReport:
    """Run the soak and check every job; never raises for a job's failure (see the report)."""
    behaviour = Behaviour(
        generation_seconds=config.generation_seconds,
        generation_jitter=config.generation_jitter,
        image_size=(512, 512),
        fault_rate=config.fault_rate,
        fault_kinds=config.fault_kinds,
        retry_after=config.retry_after,
        download_fault_rate=config.download_faults,
    )
    tag = secrets.token_hex(3)
    jobs = [
        JobOutcome(index=i, prompt=f"soak {tag} job {i}: a lighthouse on a cliff, storm light, wide shot")
        for i in range(config.jobs)
    ]
    with (
        _workdir(workdir) as work,
        StandIn(api_key=API_KEY, behaviour=behaviour, seed=config.seed) as standin,
    ):
        home, log = work / "home", work / "server.log"
        started = time.monotonic()
        with anyio.fail_after(config.run_timeout):
            async with (
                _server(standin, home, log, config.wait_timeout) as url,
                httpx2.AsyncClient(timeout=httpx2.Timeout(30, read=config.job_timeout)) as http,
                Client(streamable_http_client(url, http_client=http), cache=None) as client,
            ):
                queue = iter(jobs)

                async def worker() -> None:
                    for job in queue:
                        await _run_job(client, job, config)

                async with anyio.create_task_group() as group:
                    for _ in range(max(1, config.concurrency)):
                        group.start_soon(worker)
        wall = time.monotonic() - started
        stats = standin.stats
        _check_jobs(jobs, standin)
        history = _read_history(home / "history.sqlite3") if (home / "history.sqlite3").exists() else {}
        report = SoakReport(
            config=config,
            jobs=jobs,
            wall_seconds=wall,
            create_calls=stats.create_calls,
            result_calls=stats.result_calls,
            download_calls=stats.download_calls,
            tasks=standin.task_prompts(),
            faults=dict(stats.faults),
            logged_retries=_count_retries(log),
            history=history,
        )
        _check_home(home, report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=SoakConfig.jobs)
    parser.add_argument("--concurrency", type=int, default=SoakConfig.concurrency)
    parser.add_argument("--fault-rate", type=float, default=SoakConfig.fault_rate)
    parser.add_argument(
        "--download-fault-rate", type=float, default=None, help="default: half the fault rate"
    )
    parser.add_argument("--retry-after", type=float, default=SoakConfig.retry_after)
    parser.add_argument("--generation-seconds", type=float, default=SoakConfig.generation_seconds)
    parser.add_argument("--seed", type=int, default=SoakConfig.seed)
    parser.add_argument("--keep", type=Path, default=None, help="keep the home folder and log here")
    args = parser.parse_args(argv)
    config = SoakConfig(
        jobs=args.jobs,
        concurrency=args.concurrency,
        fault_rate=args.fault_rate,
        download_fault_rate=args.download_fault_rate,
        retry_after=args.retry_after,
        generation_seconds=args.generation_seconds,
        seed=args.seed,
    )
    report = anyio.run(functools.partial(run_soak, config, workdir=args.keep))
    for line in report.lines():
        print(line, flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
