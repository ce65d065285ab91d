"""The engine on its own, against the stand-in over real HTTP: behaviour no tool call can reach
in a test's time span (a link that expired two days ago)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import anyio
import pytest

from gptunnel_mcp import DownloadError, ImageRequest, load_settings, open_engine
from gptunnel_mcp._models import utcnow
from .standin import Behaviour, StandIn

from .conftest import API_KEY

pytestmark = pytest.mark.anyio


async def test_a_link_that_expired_before_its_download_ends_the_task_as_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPTUNNEL_API_KEY", API_KEY)
    with StandIn(api_key=API_KEY, behaviour=Behaviour(generation_seconds=0.2)) as standin:
        settings = load_settings(home=str(tmp_path), base_url=standin.url)
        async with open_engine(settings) as engine:
            account = engine.accounts.default
            started = await engine.create(ImageRequest(prompt="late", model="gpt-image-1-low"), account)
            await anyio.sleep(0.4)
            standin.behaviour.download_status = 404
            # Within the 48 hours a broken link may be the storage's hiccup: the task stays pending.
            with pytest.raises(DownloadError, match="48 hours"):
                await engine.refresh(started.record.task_id, account)
            record = await engine.lookup(started.record.task_id, account.owner)
            assert record.status == "pending" and record.source_url

            record.completed_at = utcnow() - timedelta(hours=49)
            await engine.store.put(record)
            failed = await engine.refresh(record.task_id, account)
            assert failed.status == "failed" and "expired" in (failed.error or "")
            calls = standin.stats.result_calls
            assert (await engine.refresh(record.task_id, account)).status == "failed"
            assert standin.stats.result_calls == calls  # a failed task is answered from the history
