"""The gallery under hosts that are within the MCP Apps spec but unlike the friendly default, and
under a person with a keyboard or a screen reader: headless Chromium around the official host
bridge (tests/browser.py), as in test_gallery_browser.py."""

from __future__ import annotations

import pytest

from .browser import View
from .conftest import Gallery
from .standin import StandIn

pytestmark = [pytest.mark.anyio, pytest.mark.standin(generation_seconds=0.05, image_size=(640, 400))]


async def settled(view: View) -> None:
    """Returns once the view has handled everything the host sent it before: messages from one
    window arrive in order, so the answer to a ping comes after them."""
    assert await view.request("ping") == {"result": {}}


async def test_a_result_that_arrives_before_the_tool_input_stays_on_screen(gallery: Gallery) -> None:
    async with gallery() as (host, _):
        view = await host.open("generate_and_wait", {"prompt": "a red fox in snow"}, result_first=True)
        await settled(view)
        await view.frame.locator("#current figure[data-status=done] img").wait_for()
        assert await view.frame.locator("#current figure").count() == 1


async def test_a_host_that_calls_no_tools_for_views_gets_the_image_and_no_dead_controls(
    gallery: Gallery, standin: StandIn
) -> None:
    async with gallery(GPTUNNEL_WAIT_TIMEOUT="1") as (host, _):
        view = await host.open("generate_and_wait", {"prompt": "a teapot"}, server_tools=False)
        await view.outcome()
        card = view.frame.locator("#current figure[data-status=done]")
        await card.locator("img").wait_for()
        await settled(view)
        # Only what works here: no history it cannot read, no buttons whose tool calls would fail.
        assert await view.frame.locator("#history").is_hidden()
        assert await card.locator("button.open").count() == 0
        for action in ("regenerate", "variations", "edit", "save"):
            assert await card.locator(f"[data-action={action}]").count() == 0, action
        assert await card.locator("[data-action=copy]").is_visible()

        standin.behaviour.generation_seconds = 600.0
        slow = await host.open("generate_and_wait", {"prompt": "a slow sunrise"}, server_tools=False)
        task_id = (await slow.outcome())["result"]["structuredContent"]["task_id"]
        await settled(slow)
        pending = slow.frame.locator("#current figure[data-status=pending]")
        # The view cannot follow the task here: it says how to get the image instead of failing.
        assert task_id in await pending.locator(".progress-text").inner_text()
        assert (await host.records())["calls"] == []


async def test_a_call_the_host_refuses_leaves_the_image_as_it_is(gallery: Gallery, standin: StandIn) -> None:
    standin.behaviour.generation_seconds = 600.0
    async with gallery(GPTUNNEL_WAIT_TIMEOUT="1") as (host, _):
        view = await host.open(
            "generate_and_wait", {"prompt": "a slow sunrise"}, refuse=("gallery_wait", "gallery_image")
        )
        task_id = (await view.outcome())["result"]["structuredContent"]["task_id"]
        await host.call_to("gallery_wait")
        card = view.frame.locator(f'#current figure[data-task-id="{task_id}"]')
        await card.locator(".progress-text", has_text="did not allow").wait_for()
        # A refusal says nothing of the image: it is still being made, not failed.
        assert await card.get_attribute("data-status") == "pending"

        standin.behaviour.generation_seconds = 0.05
        pair = await host.open(
            "generate_and_wait", {"prompt": "two cats", "count": 2}, refuse=("gallery_image",)
        )
        await pair.outcome()
        await pair.frame.locator("#current figure .note", has_text="did not allow").nth(1).wait_for()
        cards = pair.frame.locator("#current figure")
        assert await cards.evaluate_all("nodes => nodes.map(n => n.dataset.status)") == ["done", "done"]


async def test_the_view_answers_the_host_as_the_official_app_does(gallery: Gallery) -> None:
    async with gallery() as (host, _):
        view = await host.open("generate_and_wait", {"prompt": "a lighthouse"})
        await view.frame.locator("#current figure[data-status=done] img").wait_for()
        events = await view.events()
        # Nothing before the handshake is over: sizes follow "initialized".
        assert events[0] == "initialized" and "sizechange" in events, events
        unknown = await view.request("x-test/unknown")
        assert unknown["code"] == -32601, unknown
        assert await view.request("ui/resource-teardown") == {"result": {}}


async def test_copying_a_prompt_keeps_the_keyboard_where_it_was(gallery: Gallery) -> None:
    async with gallery() as (host, _):
        view = await host.open("generate_and_wait", {"prompt": "a teapot"})
        card = view.frame.locator("#current figure[data-status=done]")
        await card.locator("img").wait_for()
        # The live region is there before it speaks: screen readers miss one that appears.
        assert await view.frame.get_by_role("status").count() == 1
        copy = card.locator("[data-action=copy]")
        await copy.focus()
        await copy.press("Enter")
        await view.frame.locator("#status", has_text="copied").wait_for()
        assert await copy.evaluate("node => node === document.activeElement")


async def test_hostile_long_and_right_to_left_prompts_show_as_text_in_their_direction(
    gallery: Gallery,
) -> None:
    hostile = '<img src=x onerror="document.title=1">"quoted" & </figure>'
    arabic = "قطة على سطح القمر 🐈 " * 60
    async with gallery() as (host, agent):
        await agent.call_tool("generate_and_wait", {"prompt": hostile})
        view = await host.open("generate_and_wait", {"prompt": arabic}, width=360)
        await view.frame.locator("#grid .tile").nth(1).wait_for()
        prompt = view.frame.locator("#current .prompt")
        assert (await prompt.inner_text()).startswith(arabic[:200])
        assert await prompt.evaluate("node => getComputedStyle(node).direction") == "rtl"
        # A long prompt does not push the image's actions out of sight; opened large, it is whole.
        lines = "node => node.clientHeight / parseFloat(getComputedStyle(node).lineHeight)"
        assert await prompt.evaluate(lines) <= 4
        await view.frame.locator("#current button.open").click()
        whole = view.frame.locator("dialog[open] .prompt")
        await whole.wait_for()
        assert await whole.evaluate(lines) > 10
        await whole.press("Escape")
        caption = view.frame.locator("#grid .tile .caption").nth(1)
        assert await caption.inner_text() == hostile
        assert await view.frame.locator("img[src=x]").count() == 0

        await view.frame.locator("#query").fill('"quoted" &')
        await view.frame.locator("#query").press("Enter")
        await view.frame.locator("#grid .tile").nth(1).wait_for(state="detached")
        assert await view.frame.locator("#grid .tile .caption").all_inner_texts() == [hostile]
