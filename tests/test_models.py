"""Models move: GPTunnel adds models and its providers' status words, and the server keeps up. An
id in any case goes upstream as the catalogue spells it, an id the catalogue does not know goes
through with a note naming the ones it does, and every "still working" text reads as pending.
With the official client and the stand-in GPTunnel."""

from __future__ import annotations

import pytest

from gptunnel_mcp._catalog import MODELS

from .conftest import ServerLauncher, structured, text_of
from .standin import StandIn

pytestmark = [pytest.mark.anyio, pytest.mark.standin(generation_seconds=0.05, image_size=(320, 200))]

#: Long enough that only `standin.finish` ends a task within a test.
FOREVER = 600.0


async def test_a_known_model_in_any_case_is_sent_as_the_catalogue_spells_it(
    memory_server: ServerLauncher, standin: StandIn
) -> None:
    async with memory_server.connect() as client:
        shouted = structured(
            await client.call_tool("generate_and_wait", {"prompt": "a kite", "model": "FLUX-Dev"})
        )
        assert shouted["status"] == "done" and shouted["model"] == "flux-dev"
        assert shouted["model_note"] is None
        assert standin.task_models() == {shouted["task_id"]: "flux-dev"}
        # The same request, however the model is spelled: answered with the same task, not paid twice.
        again = structured(
            await client.call_tool("generate_and_wait", {"prompt": "a kite", "model": "flux-dev"})
        )
        assert again["reused"] and again["task_id"] == shouted["task_id"]
    assert standin.stats.create_calls == 1


async def test_an_unknown_model_goes_through_with_a_note_naming_the_known_ones(
    memory_server: ServerLauncher, standin: StandIn
) -> None:
    async with memory_server.connect() as client:
        # Options are not checked for a model the catalogue cannot speak for.
        result = await client.call_tool(
            "generate_and_wait", {"prompt": "a comet", "model": "Flux-2-Pro", "aspect_ratio": "21:9"}
        )
    assert not result.is_error, text_of(result)
    data = structured(result)
    assert data["status"] == "done" and data["model"] == "Flux-2-Pro"
    assert standin.task_models() == {data["task_id"]: "Flux-2-Pro"}
    note = data["model_note"]
    assert note is not None and note.startswith("Flux-2-Pro is not a model this server knows")
    assert all(model.id in note for model in MODELS) and "gptunnel://models" in note
    assert note in text_of(result)


@pytest.mark.parametrize(
    "working",
    [
        "idle",
        "processing",
        "RUNNING",
        "Queued",
        "pending",
        "in_progress",
        "In-Progress",
        "started",
        "thinking",
    ],
)
async def test_every_still_working_text_reads_as_pending(
    memory_server: ServerLauncher, standin: StandIn, working: str
) -> None:
    standin.behaviour.generation_seconds = FOREVER
    standin.behaviour.working_status = working
    async with memory_server.connect() as client:
        started = await client.call_tool("create_image", {"prompt": f"still {working}"})
        assert not started.is_error, text_of(started)
        task_id = structured(started)["task_id"]
        polled = await client.call_tool("get_result", {"task_id": task_id})
        assert not polled.is_error, text_of(polled)
        still = structured(polled)
        assert (still["status"], still["upstream_status"]) == ("pending", working)
        assert f"GPTunnel says '{working}'" in still["message"] and "get_result" in still["message"]
        standin.finish(task_id)
        done = structured(await client.call_tool("get_result", {"task_id": task_id}))
    assert done["status"] == "done" and done["file_path"]
    assert standin.stats.create_calls == 1
    # A text this server does not know is read as pending, and the operator is told of it.
    unknown = "which this server does not know" in memory_server.logs()
    assert unknown is (working == "thinking")


async def test_a_failure_text_in_any_case_reads_as_failed(
    memory_server: ServerLauncher, standin: StandIn
) -> None:
    async with memory_server.connect() as client:
        for final in ("FAILED", "Canceled"):
            standin.behaviour.final_status = final
            result = await client.call_tool("generate_and_wait", {"prompt": f"doomed, {final}"})
            assert result.is_error, text_of(result)
            assert structured(result)["status"] == "failed"
