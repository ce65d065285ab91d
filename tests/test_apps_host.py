"""The MCP Apps test host (tests/browser.py, tests/apps_host/) against a view of its own: a tiny
MCP server made here, whose view speaks the Apps protocol in plain JavaScript. Proves the harness
renders a view as hosts do, hands it the tool's input and result, carries its tool calls to the
server, follows the theme, and fails a test whose view breaks the hosts' rules."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

import pytest
import uvicorn
from mcp.server.apps import Apps, client_supports_apps
from mcp.server.mcpserver import Context, MCPServer
from playwright.async_api import Error as BrowserError
from playwright.async_api import expect

from .browser import AppHost
from .conftest import loopback_socket, running

pytestmark = pytest.mark.anyio

AppHostFactory = Callable[[str], AbstractAsyncContextManager[AppHost]]

VIEW = "ui://smoke/view.html"
CDN_VIEW = "ui://smoke/cdn-view.html"

#: A view with no SDK: the Apps handshake, its notifications and a tool call, by hand.
VIEW_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<!--head-->
<style>
  body { margin: 0; padding: 12px; font-family: var(--font-sans);
         background: var(--color-background-primary); color: var(--color-text-primary); }
</style>
</head>
<body>
<h1 id="greeting">Waiting for the result</h1>
<p>Input: <output id="input"></output></p>
<p>Origin: <output id="origin"></output></p>
<p>Width: <output id="width"></output></p>
<button id="roll">Roll a die</button> <output id="rolled"></output>
<button id="share">Share</button> <output id="shared"></output>
<script>
  const pending = new Map();
  let lastId = 0;
  const send = (message) => window.parent.postMessage({ jsonrpc: "2.0", ...message }, "*");
  const request = (method, params) => new Promise((resolve, reject) => {
    pending.set(++lastId, { resolve, reject });
    send({ id: lastId, method, params });
  });
  const show = (id, text) => { document.getElementById(id).textContent = text; };
  const applyContext = (context) => {
    if (context.theme) document.documentElement.dataset.theme = context.theme;
    if (context.containerDimensions) show("width", context.containerDimensions.width);
    for (const [name, value] of Object.entries(context.styles?.variables ?? {})) {
      document.documentElement.style.setProperty(name, value);
    }
  };
  const notifications = {
    "ui/notifications/tool-input": ({ arguments: args }) => show("input", JSON.stringify(args)),
    "ui/notifications/tool-result": ({ content }) => show("greeting", content[0].text),
    "ui/notifications/host-context-changed": applyContext,
  };
  window.addEventListener("message", ({ source, data }) => {
    if (source !== window.parent) return;
    if (data.method) return notifications[data.method]?.(data.params);
    const { resolve, reject } = pending.get(data.id);
    pending.delete(data.id);
    data.error ? reject(new Error(data.error.message)) : resolve(data.result);
  });
  document.getElementById("roll").onclick = async () => {
    const result = await request("tools/call", { name: "roll", arguments: { sides: 6 } });
    show("rolled", result.content[0].text);
  };
  document.getElementById("share").onclick = async () => {
    send({ method: "notifications/message", params: { level: "info", data: "sharing" } });
    await request("ui/update-model-context", { content: [{ type: "text", text: "Greeted the fox." }] });
    await request("ui/message", { role: "user", content: [{ type: "text", text: "Greet the badger too" }] });
    await request("ui/open-link", { url: "https://example.com/fox" });
    show("shared", "shared");
  };
  show("origin", window.origin);
  request("ui/initialize", {
    protocolVersion: "2026-01-26",
    appInfo: { name: "smoke-view", version: "1.0.0" },
    appCapabilities: {},
  }).then((result) => {
    applyContext(result.hostContext);
    send({ method: "ui/notifications/initialized", params: {} });
    send({ method: "ui/notifications/size-changed", params: { height: 240 } });
  });
</script>
</body>
</html>
"""


def smoke_server() -> MCPServer:
    apps = Apps()

    @apps.tool(resource_uri=VIEW, description="Greets someone, with a view.")
    def greet(name: str, ctx: Context) -> str:
        return f"Hello, {name}!" if client_supports_apps(ctx) else "This host draws no views."

    @apps.tool(resource_uri=VIEW, visibility=["app"], description="Rolls a loaded die, for the view only.")
    def roll(sides: int) -> str:
        return f"4 of {sides}"

    @apps.tool(resource_uri=CDN_VIEW, description="A view that loads a library from a CDN.")
    def chart() -> str:
        return "Hello, chart!"

    apps.add_html_resource(VIEW, VIEW_HTML)
    cdn_script = '<script src="https://cdn.example.com/chart.js"></script>'
    apps.add_html_resource(CDN_VIEW, VIEW_HTML.replace("<!--head-->", cdn_script))
    return MCPServer("apps-host-smoke", extensions=[apps])


@contextlib.asynccontextmanager
async def serve_smoke() -> AsyncIterator[str]:
    """The smoke server over streamable HTTP on loopback; yields its MCP URL."""
    sock = loopback_socket()
    app = smoke_server().streamable_http_app()
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="warning", lifespan="on"))
    async with running(server, sock):
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/mcp"


async def test_a_view_renders_its_result_calls_a_tool_and_follows_the_theme(app_host: AppHostFactory) -> None:
    async with serve_smoke() as url, app_host(url) as host:
        assert {"greet", "roll", "chart"} <= set(host.tools)
        view = await host.open("greet", {"name": "fox"}, theme="light", width=480)
        body = view.frame.locator("body")

        await expect(view.frame.locator("#greeting")).to_have_text("Hello, fox!")
        await expect(view.frame.locator("#input")).to_have_text('{"name":"fox"}')
        await expect(view.frame.locator("#origin")).to_have_text("null")
        await expect(view.frame.locator("#width")).to_have_text("480")
        await expect(body).to_have_css("background-color", "rgb(255, 255, 255)")
        await expect(view.element).to_have_css("height", "240px")
        assert (await view.outcome())["result"]["content"][0]["text"] == "Hello, fox!"

        await view.frame.get_by_role("button", name="Roll a die").click()
        call = await host.call_to("roll")
        assert call["view"] == 1 and call["arguments"] == {"sides": 6}
        assert call["result"]["content"][0]["text"] == "4 of 6"
        await expect(view.frame.locator("#rolled")).to_have_text("4 of 6")

        await view.frame.get_by_role("button", name="Share").click()
        await expect(view.frame.locator("#shared")).to_have_text("shared")
        text = [{"type": "text", "text": "Greet the badger too"}]
        assert await host.records() == {
            "calls": [call],
            "messages": [{"view": 1, "role": "user", "content": text}],
            "links": [{"view": 1, "url": "https://example.com/fox"}],
            "modelContext": {"view": 1, "content": [{"type": "text", "text": "Greeted the fox."}]},
            "logs": [{"view": 1, "level": "info", "data": "sharing"}],
        }

        await host.set_theme("dark")
        await expect(view.frame.locator("html")).to_have_attribute("data-theme", "dark")
        await expect(body).to_have_css("background-color", "rgb(31, 31, 31)")
        await view.screenshot()

        with pytest.raises(BrowserError, match="visible to apps only"):
            await host.open("roll", {"sides": 6})


async def test_a_view_reaching_for_a_cdn_fails_the_test(app_host: AppHostFactory) -> None:
    async with serve_smoke() as url:
        with pytest.raises(pytest.fail.Exception, match="violates the following Content Security Policy"):
            async with app_host(url) as host:
                view = await host.open("chart")
                await expect(view.frame.locator("#greeting")).to_have_text("Hello, chart!")
