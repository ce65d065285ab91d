"""The engine on its own, against the stand-in over real HTTP: behaviour no tool call can reach
in a test's time span (a link that expired two days ago)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from gptunnel_mcp import DownloadError, ImageRequest, open_engine
from gptunnel_mcp._records import utcnow

from .conftest import QUICK_BACKOFF, QUICK_POLLS, ServerLauncher
from .standin import StandIn

pytestmark = pytest.mark.anyio


async def test_a_link_that_expired_before_its_download_ends_the_task_as_failed(
    memory_server: ServerLauncher, standin: StandIn
) -> None:
    settings = memory_server.settings()
    async with open_engine(settings, schedule=QUICK_POLLS, backoff=QUICK_BACKOFF) as engine:
        account = engine.accounts.default
        started = await engine.create(ImageRequest(prompt="late", model="gpt-image-1-low"), account)
        standin.finish(started.record.task_id)
        standin.behaviour.download_status = 404
        # Within the 48 hours a broken link may be the storage's hiccup: the task stays pending.
        with pytest.raises(DownloadError, match="48 hours"):
            await engine.refresh(started.record.task_id, account)
        assert standin.stats.download_calls == 1  # a 404 is not retried
        record = await engine.lookup(started.record.task_id, account.owner)
        assert record.status == "pending" and record.source_url

        record.completed_at = utcnow() - timedelta(hours=49)
        await engine.store.put(record)
        failed = await engine.refresh(record.task_id, account)
        assert failed.status == "failed" and "expired" in (failed.error or "")
        calls = standin.stats.result_calls
        assert (await engine.refresh(record.task_id, account)).status == "failed"
        assert standin.stats.result_calls == calls  # a failed task is answered from the history
    assert standin.stats.create_calls == 1
