"""Benchmark: how soon the agent sees its image, what it costs in upstream calls, and what one
server process needs under load. Prints a table; not part of the test suite.

    python bench/bench.py            # the full run (about 3 minutes)
    python bench/bench.py --quick    # a smaller run, for a first look

Everything runs on loopback: the project's stand-in GPTunnel, with generation times spread
+-15% around a mean, and the real server, driven through the official MCP client.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client

import _server  # bench/ is not a package: found next to this script
from _server import Behaviour, StandIn
from gptunnel_mcp._images import make_preview

KEY = "bench-key"
JITTER = 0.15
#: Measured tasks run this many at a time.
WAVE = 10


# --- processes -------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def http_server(standin: StandIn, home: Path, **env: str) -> AsyncIterator[tuple[str, int]]:
    """One server process, quiet; yields its MCP URL and pid."""
    settings = {"GPTUNNEL_WAIT_TIMEOUT": "120", **env}
    async with _server.http_server(standin, home, KEY, log_level="WARNING", env=settings) as (url, process):
        yield url, process.pid


@contextlib.asynccontextmanager
async def mcp_client(url: str) -> AsyncIterator[Client]:
    limits = httpx2.Limits(max_connections=200, max_keepalive_connections=200)
    async with (
        httpx2.AsyncClient(timeout=httpx2.Timeout(30, read=300), limits=limits) as http,
        Client(streamable_http_client(url, http_client=http), cache=None) as client,
    ):
        yield client


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def gather_limited(jobs: list[Callable[[], Awaitable[Any]]], limit: int) -> list[Any]:
    gate = asyncio.Semaphore(limit)

    async def one(job: Callable[[], Awaitable[Any]]) -> Any:
        async with gate:
            return await job()

    return await asyncio.gather(*(one(job) for job in jobs))


# --- 1. detection delay and upstream calls ---------------------------------------------------


@dataclass
class Sample:
    delays: list[float] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)

    def extend(self, other: Sample) -> None:
        self.delays += other.delays
        self.calls += other.calls


async def ours(client: Client, standin: StandIn, model: str, prompts: list[str]) -> Sample:
    async def job(prompt: str) -> tuple[str, float]:
        result = await client.call_tool("generate_and_wait", {"prompt": prompt, "model": model})
        received = time.time()
        data = result.structured_content or {}
        if data.get("status") != "done":
            raise RuntimeError(f"not done: {data.get('message') or result.content}")
        return str(data["task_id"]), received

    finished = await asyncio.gather(*(job(p) for p in prompts))
    return _sample(standin, finished)


async def fixed_poller(standin: StandIn, model: str, prompts: list[str], interval: float = 2.0) -> Sample:
    """The baseline: create, ask every `interval` seconds, download when done."""
    async with httpx2.AsyncClient(base_url=standin.url, headers={"Authorization": KEY}, timeout=30) as http:

        async def job(prompt: str) -> tuple[str, float]:
            task = (await http.post("/v1/media/create", json={"model": model, "prompt": prompt})).json()
            while True:
                await asyncio.sleep(interval)
                state = (await http.post("/v1/media/result", json={"task_id": task["id"]})).json()
                if state["status"] == "done":
                    await http.get(state["url"])
                    return str(task["id"]), time.time()

        finished = await asyncio.gather(*(job(p) for p in prompts))
    return _sample(standin, finished)


def _sample(standin: StandIn, finished: list[tuple[str, float]]) -> Sample:
    sample = Sample()
    for task_id, received in finished:
        sample.delays.append(received - standin.stats.task_done_at[task_id])
        sample.calls.append(standin.stats.result_calls_by_task[task_id])
    return sample


def p95(values: list[float] | list[int]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[18] if len(values) > 1 else float(values[0])


async def polling_section(mean: float, tasks: int, warmup: int, home: Path) -> list[str]:
    behaviour = Behaviour(generation_seconds=mean, generation_jitter=JITTER)
    model = f"bench-{mean:.0f}s"
    with StandIn(api_key=KEY, behaviour=behaviour) as standin:
        async with http_server(standin, home) as (url, _), mcp_client(url) as client:
            await ours(client, standin, model, [f"warm-up {i}" for i in range(warmup)])
            mine, baseline = Sample(), Sample()
            # Measured in waves, as an agent's requests arrive: each wave's tasks teach the next.
            for wave in range(0, tasks, WAVE):
                prompts = range(wave, min(tasks, wave + WAVE))
                ours_wave, base_wave = await asyncio.gather(
                    ours(client, standin, model, [f"measured {i}" for i in prompts]),
                    fixed_poller(standin, model, [f"baseline {i}" for i in prompts]),
                )
                mine.extend(ours_wave)
                baseline.extend(base_wave)
    rows = []
    for name, sample in (("gptunnel-mcp", mine), ("fixed 2 s poller", baseline)):
        rows.append(
            f"| {mean:.0f} s | {name} | {statistics.median(sample.delays):.2f} s "
            f"({statistics.median(sample.delays) / mean:.1%}) | {p95(sample.delays):.2f} s "
            f"| {statistics.median(sample.calls):.1f} | {p95(sample.calls):.1f} |"
        )
    ratio = statistics.median(mine.calls) / statistics.median(baseline.calls)
    rows.append(f"| {mean:.0f} s | ratio of calls (ours / baseline) | | | {ratio:.2f} | |")
    return rows


# --- 2. load: concurrent jobs into one process -----------------------------------------------


async def load_section(jobs: int, home: Path) -> list[str]:
    behaviour = Behaviour(generation_seconds=2.0, generation_jitter=JITTER)
    with StandIn(api_key=KEY, behaviour=behaviour) as standin:
        async with http_server(standin, home) as (url, pid), mcp_client(url) as client:
            # Warm the server up (imports, first preview, learned timing) before measuring.
            await ours(client, standin, "bench-load", [f"warm-up {i}" for i in range(10)])
            cpu_before = cpu_seconds(pid)
            started = time.monotonic()
            results = await asyncio.gather(
                *(
                    client.call_tool("generate_and_wait", {"prompt": f"load {i}", "model": "bench-load"})
                    for i in range(jobs)
                ),
                return_exceptions=True,
            )
            wall = time.monotonic() - started
            cpu = cpu_seconds(pid) - cpu_before
            rss = peak_rss_mb(pid)
        done = sum(
            1
            for r in results
            if not isinstance(r, BaseException) and (r.structured_content or {}).get("status") == "done"
        )
        stored = next(home.glob("images/*.webp"))
    preview = preview_cpu_ms(stored)
    per_job = cpu / jobs * 1000
    return [
        f"| {jobs} concurrent generate_and_wait over HTTP | {done}/{jobs} done |",
        f"| wall time | {wall:.1f} s (generation 2 s +-15%) |",
        f"| peak RSS of the server | {rss:.0f} MB |",
        f"| server CPU per job | {per_job:.1f} ms |",
        f"| preview alone, same image | {preview:.1f} ms |",
        f"| CPU per job above the preview | {per_job - preview:.1f} ms |",
    ]


def preview_cpu_ms(path: Path, repeat: int = 20) -> float:
    make_preview(path, 512, 40_000_000)  # imports and first-use costs are not the preview's
    started = time.process_time()
    for _ in range(repeat):
        make_preview(path, 512, 40_000_000)
    return (time.process_time() - started) / repeat * 1000


# --- 3. cold start ---------------------------------------------------------------------------

BARE_SERVER = textwrap.dedent(
    """
    from mcp.server import MCPServer

    server = MCPServer("bare")

    @server.tool()
    def add(a: int, b: int) -> int:
        return a + b

    server.run("stdio")
    """
)


async def first_tools_list(params: StdioServerParameters) -> float:
    started = time.perf_counter()
    with open(os.devnull, "w") as quiet:
        async with Client(stdio_client(params, errlog=quiet), cache=None) as client:
            await client.list_tools()
            return time.perf_counter() - started


async def cold_start_section(home: Path, repeat: int) -> list[str]:
    bare = home / "bare_server.py"
    bare.write_text(BARE_SERVER)
    env = {"PATH": os.environ.get("PATH", ""), "GPTUNNEL_MCP_HOME": str(home / "cold")}
    ours_params = StdioServerParameters(command=sys.executable, args=["-m", "gptunnel_mcp"], env=env)
    bare_params = StdioServerParameters(command=sys.executable, args=[str(bare)], env=env)
    await first_tools_list(ours_params)  # the first start writes .pyc files and the home folder
    ours_times, bare_times = [], []
    for _ in range(repeat):  # interleaved, so both see the same machine load
        ours_times.append(await first_tools_list(ours_params))
        bare_times.append(await first_tools_list(bare_params))
    mine, base = statistics.median(ours_times), statistics.median(bare_times)
    return [
        f"| gptunnel-mcp (stdio) to first tools/list | {mine:.2f} s |",
        f"| bare MCPServer with one tool | {base:.2f} s |",
        f"| ratio | {mine / base:.2f}x |",
    ]


# --- main ------------------------------------------------------------------------------------


async def main(quick: bool) -> None:
    tasks, warmup, jobs, repeat = (8, 10, 30, 3) if quick else (30, 10, 100, 7)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        print("Detection delay (stand-in marks done -> tool result at the client) and result calls per task")
        print(f"({tasks} tasks per mean, {WAVE} at a time, after {warmup} of warm-up; both side by side)\n")
        print("| mean | poller | delay median (of mean) | delay p95 | calls median | calls p95 |")
        print("|---|---|---|---|---|---|")
        for mean in (10.0, 30.0):
            for row in await polling_section(mean, tasks, warmup, root / f"poll-{mean:.0f}"):
                print(row, flush=True)
        print("\nLoad: one server process\n\n| measure | value |\n|---|---|")
        for row in await load_section(jobs, root / "load"):
            print(row, flush=True)
        print(f"\nCold start (median of {repeat})\n\n| measure | value |\n|---|---|")
        for row in await cold_start_section(root, repeat):
            print(row, flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer tasks and jobs")
    asyncio.run(main(parser.parse_args().quick))
