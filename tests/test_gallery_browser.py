"""The gallery as a person sees it: the view in headless Chromium, inside the test host page
built on the official MCP Apps host bridge (tests/browser.py), connected to the real server over
HTTP. Every test also fails on any console error or uncaught exception in the page or the view."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from mcp import Client
from PIL import ImageStat

from .browser import View
from .conftest import Gallery, structured, text_of
from .standin import StandIn

pytestmark = [pytest.mark.anyio, pytest.mark.standin(generation_seconds=0.05, image_size=(640, 400))]

DOCS = Path(__file__).parent.parent / "docs"


async def generate(agent: Client, prompt: str) -> str:
    result = await agent.call_tool("generate_and_wait", {"prompt": prompt})
    assert structured(result)["status"] == "done", text_of(result)
    return str(structured(result)["task_id"])


async def tiles(view: View) -> list[str]:
    return [
        str(await tile.get_attribute("aria-label")) for tile in await view.frame.locator("#grid .tile").all()
    ]


async def test_the_image_appears_after_a_generation_with_what_is_known_of_it(gallery: Gallery) -> None:
    async with gallery() as (host, _):
        view = await host.open("generate_and_wait", {"prompt": "a red fox in snow"})
        card = view.frame.locator("#current figure[data-status=done]")
        image = card.locator("img")
        await image.wait_for()
        assert await image.get_attribute("alt") == "a red fox in snow"
        facts = await card.locator(".facts").inner_text()
        assert "gpt-image-1-medium" in facts and "640×400" in facts
        # The history below has it too, its tile drawn from an app-only tool.
        await view.frame.locator("#grid .tile img").first.wait_for()
        thumb = await host.call_to("gallery_image")
        assert thumb["arguments"]["size"] == "thumb"
        await view.screenshot()


async def test_a_pending_task_shows_progress_and_turns_into_the_image(
    gallery: Gallery, standin: StandIn
) -> None:
    standin.behaviour.generation_seconds = 600.0
    async with gallery(GPTUNNEL_WAIT_TIMEOUT="1") as (host, _):
        view = await host.open("generate_and_wait", {"prompt": "a slow sunrise"})
        outcome = await view.outcome()
        assert outcome["result"]["structuredContent"]["status"] == "pending"
        pending = view.frame.locator("#current figure[data-status=pending]")
        await pending.locator("progress").wait_for()
        # The tool call is over; the view goes on following the task by itself.
        await host.call_to("gallery_wait")
        standin.finish(outcome["result"]["structuredContent"]["task_id"])
        await view.frame.locator("#current figure[data-status=done] img").wait_for()
        assert await pending.count() == 0


async def test_the_history_pages_and_searches_and_opens_an_image_from_the_keyboard(gallery: Gallery) -> None:
    async with gallery() as (host, agent):
        for n in range(11):
            await generate(agent, f"a grey wolf, take {n}")
        await generate(agent, "a red fox in snow")
        await generate(agent, "an arctic fox at night")
        view = await host.open("show_gallery", {})
        # show_gallery's own result is the first page (up to 24): all 13, the newest first.
        await view.frame.locator("#grid .tile").nth(12).wait_for()
        labels = await tiles(view)
        assert labels[0] == "an arctic fox at night (done)" and len(labels) == 13

        await view.frame.locator("#query").fill("FOX")
        await view.frame.locator("#query").press("Enter")
        await view.frame.locator("#grid .tile").nth(1).wait_for()
        await view.frame.locator("#grid .tile").nth(2).wait_for(state="detached")
        assert await tiles(view) == ["an arctic fox at night (done)", "a red fox in snow (done)"]

        await view.frame.locator("#query").fill("wolf")
        await view.frame.locator("#search button").click()
        await view.frame.locator("#grid .tile").nth(10).wait_for()
        assert all("wolf" in label for label in await tiles(view)) and len(await tiles(view)) == 11

        # Keyboard: focus a tile, Enter opens it large, Escape closes and gives focus back.
        tile = view.frame.locator("#grid .tile").first
        await tile.focus()
        await tile.press("Enter")
        dialog = view.frame.locator("dialog#viewer[open]")
        await dialog.locator("figure[data-status=done] img").wait_for()
        assert "wolf" in str(await dialog.locator("img").get_attribute("alt"))
        await dialog.press("Escape")
        await dialog.wait_for(state="detached")
        assert await tile.evaluate("node => node === document.activeElement")


async def test_the_history_shows_more_pages_on_request(gallery: Gallery) -> None:
    async with gallery() as (host, agent):
        last = ""
        for n in range(13):
            last = await generate(agent, f"a heron, take {n}")
        view = await host.open("get_result", {"task_id": last})
        await view.frame.locator("#current figure[data-status=done] img").wait_for()
        more = view.frame.locator("#more")
        await more.wait_for()
        assert len(await tiles(view)) == 12
        await more.click()
        await view.frame.locator("#grid .tile").nth(12).wait_for()
        await more.wait_for(state="hidden")
        assert (await tiles(view))[-1] == "a heron, take 0 (done)"

        # The frame is as tall as the gallery: the image opens by the tile, not in the middle.
        oldest = view.frame.locator("#grid .tile").nth(12)
        await oldest.click()
        dialog = view.frame.locator("dialog#viewer[open]")
        await dialog.locator("figure[data-status=done] img").wait_for()
        tile_box, dialog_box = await oldest.bounding_box(), await dialog.bounding_box()
        assert tile_box is not None and dialog_box is not None
        assert dialog_box["y"] <= tile_box["y"] <= dialog_box["y"] + dialog_box["height"]


async def test_regenerate_goes_through_the_host_as_a_tool_call_and_a_new_image_appears(
    gallery: Gallery, standin: StandIn
) -> None:
    async with gallery() as (host, _):
        view = await host.open("generate_and_wait", {"prompt": "a lighthouse", "aspect_ratio": "16:9"})
        first = view.frame.locator("#current figure[data-status=done]")
        await first.locator("img").wait_for()
        await first.locator("[data-action=regenerate]").click()
        call = await host.call_to("create_image")
        assert call["arguments"] == {
            "prompt": "a lighthouse",
            "model": "gpt-image-1-medium",
            "aspect_ratio": "16:9",
            "new_image": True,
        }
        new_id = call["result"]["structuredContent"]["task_id"]
        assert new_id != await first.first.get_attribute("data-task-id")
        await view.frame.locator(f'#current figure[data-task-id="{new_id}"][data-status=done] img').wait_for()
        assert await view.frame.locator("#current figure[data-status=done]").count() == 2
        assert standin.stats.create_calls == 2


async def test_variations_an_edit_and_save_each_do_what_they_say(gallery: Gallery, tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "assets").mkdir(parents=True)
    async with gallery(GPTUNNEL_EXPORT_DIRS=str(project)) as (host, _):
        view = await host.open("generate_and_wait", {"prompt": "a teapot"})
        first = view.frame.locator("#current figure[data-status=done]").first
        await first.locator("img").wait_for()
        source = str(await first.get_attribute("data-task-id"))
        # New images come first: the teapot's card is found by its task from here on.
        card = view.frame.locator(f'#current figure[data-task-id="{source}"]')

        await card.locator("select").select_option("3")
        await card.locator("[data-action=variations]").click()
        variations = await host.call_to("create_image")
        assert variations["arguments"]["count"] == 3
        await view.frame.locator("#current figure[data-status=done] img").nth(3).wait_for()

        await card.locator("[data-action=edit]").click()
        await card.locator("input[name=change]").fill("make it blue")
        await card.locator("input[name=change]").press("Enter")
        await view.frame.locator("#current figure[data-status=done] img").nth(4).wait_for()
        records = await host.records()
        edit = [c for c in records["calls"] if c["name"] == "create_image"][-1]
        assert edit["arguments"]["images"] == [source] and edit["arguments"]["prompt"] == "make it blue"

        await card.locator("[data-action=save]").click()
        await card.locator("input[name=destination]").fill("assets/teapot.webp")
        await card.locator("input[name=destination]").press("Enter")
        saved = await host.call_to("save_image")
        assert not saved["result"].get("isError"), saved
        await card.locator(".note").wait_for()
        assert (project / "assets" / "teapot.webp").read_bytes()[8:12] == b"WEBP"


async def test_it_follows_the_host_theme_and_fits_narrow_and_wide_panels(
    gallery: Gallery, tmp_path: Path
) -> None:
    """Also makes the screenshots in docs/ when UPDATE_SCREENSHOTS is set."""
    folder = DOCS if os.environ.get("UPDATE_SCREENSHOTS") else tmp_path
    async with gallery() as (host, agent):
        for prompt in ("a red fox in snow", "a lighthouse at dusk", "a teapot on a table"):
            await generate(agent, prompt)
        for width, name, themes in ((760, "wide", ("light", "dark")), (360, "narrow", ("dark", "light"))):
            view = await host.open(
                "generate_and_wait", {"prompt": f"a grey wolf, {name}"}, theme=themes[0], width=width
            )
            await view.frame.locator("#current figure[data-status=done] img").wait_for()
            await view.frame.locator("#grid .tile img").nth(3).wait_for()
            # Nothing wider than the panel: no sideways scrolling.
            overflow = await view.frame.locator("html").evaluate(
                "root => root.scrollWidth - root.clientWidth"
            )
            assert overflow <= 0, f"{overflow} px too wide at {width} px"
            for theme in themes:
                # The second theme arrives as the host's context changes, with the view open.
                await host.set_theme(theme)
                await view.frame.locator(f"html[data-theme={theme}]").wait_for(state="attached")
                shot = await view.screenshot(folder / f"gallery-{theme}-{name}.png")
                corner = shot.crop((0, shot.height - 30, 30, shot.height))
                brightness = ImageStat.Stat(corner.convert("L")).mean[0]
                assert brightness < 80 if theme == "dark" else brightness > 180, (theme, name, brightness)
