// A test host for MCP Apps views, built on the official host bridge (AppBridge) the way chat
// hosts use it: the model's tool call, the view's resource read, a sandboxed frame, the
// ui/initialize handshake, host context, tool input and result, and the view's own requests
// proxied to the server. Tests drive it through window.testHost and read what the view asked
// for from the records it keeps.

import {
  AppBridge,
  PostMessageTransport,
  RESOURCE_MIME_TYPE,
  getToolUiResourceUri,
  isToolVisibilityAppOnly,
  isToolVisibilityModelOnly,
} from "@modelcontextprotocol/ext-apps/app-bridge";
import { Client, StreamableHTTPClientTransport } from "@modelcontextprotocol/client";
import { z } from "zod";

const HOST_INFO = { name: "gptunnel-mcp-test-host", version: "1.0.0" };
const APPS_EXTENSION = "io.modelcontextprotocol/ui";

// Hosts hand their fonts over as CSS; a network font would break under the view's policy
// here, so this one is a local face under a host-specific family name.
const FONTS = '@font-face { font-family: "Host Sans"; src: local("DejaVu Sans"), local("Liberation Sans"); }';

const SHARED_STYLES = {
  "--font-sans": '"Host Sans", system-ui, sans-serif',
  "--font-mono": "ui-monospace, monospace",
  "--font-weight-normal": "400",
  "--font-weight-medium": "500",
  "--font-weight-semibold": "600",
  "--font-weight-bold": "700",
  "--font-text-xs-size": "12px",
  "--font-text-sm-size": "14px",
  "--font-text-md-size": "16px",
  "--font-text-lg-size": "18px",
  "--font-heading-sm-size": "16px",
  "--font-heading-md-size": "20px",
  "--font-heading-lg-size": "24px",
  "--font-text-sm-line-height": "20px",
  "--font-text-md-line-height": "24px",
  "--border-radius-sm": "4px",
  "--border-radius-md": "8px",
  "--border-radius-lg": "12px",
  "--border-radius-full": "9999px",
  "--border-width-regular": "1px",
};

const THEME_STYLES = {
  light: {
    "--color-background-primary": "#ffffff",
    "--color-background-secondary": "#f5f4ef",
    "--color-background-tertiary": "#ebe9e1",
    "--color-background-inverse": "#1f1f1f",
    "--color-background-danger": "#fde8e8",
    "--color-text-primary": "#1f1f1f",
    "--color-text-secondary": "#5f5e5a",
    "--color-text-tertiary": "#8a8984",
    "--color-text-inverse": "#ffffff",
    "--color-text-danger": "#b42318",
    "--color-text-success": "#1a7f37",
    "--color-border-primary": "#d9d7ce",
    "--color-border-secondary": "#e8e6de",
    "--color-ring-primary": "#2f6feb",
    "--shadow-sm": "0 1px 2px rgba(0, 0, 0, 0.08)",
  },
  dark: {
    "--color-background-primary": "#1f1f1f",
    "--color-background-secondary": "#2a2a28",
    "--color-background-tertiary": "#353532",
    "--color-background-inverse": "#f5f4ef",
    "--color-background-danger": "#4a1d1a",
    "--color-text-primary": "#ececec",
    "--color-text-secondary": "#b5b3ac",
    "--color-text-tertiary": "#8a8984",
    "--color-text-inverse": "#1f1f1f",
    "--color-text-danger": "#ff8a80",
    "--color-text-success": "#6fdc8c",
    "--color-border-primary": "#44443f",
    "--color-border-secondary": "#353532",
    "--color-ring-primary": "#7aa7ff",
    "--shadow-sm": "0 1px 2px rgba(0, 0, 0, 0.5)",
  },
};

let client = null;
const tools = new Map();
const views = [];

const testHost = {
  theme: "light",
  /** Tool calls the views made: {view, name, arguments, result} or {view, name, arguments, error}. */
  calls: [],
  /** ui/message requests: {view, role, content}. */
  messages: [],
  /** ui/open-link requests: {view, url}; nothing is opened. */
  links: [],
  /** The last ui/update-model-context, which replaces any before it (as hosts keep it). */
  modelContext: null,
  /** Log notifications: {view, level, logger, data}. */
  logs: [],

  /** Connects to the MCP server at `url`; returns the names of its tools. */
  async connect(url) {
    client = new Client(HOST_INFO, {
      capabilities: { extensions: { [APPS_EXTENSION]: { mimeTypes: [RESOURCE_MIME_TYPE] } } },
    });
    await client.connect(new StreamableHTTPClientTransport(new URL(url, location.href)));
    for (const tool of (await client.listTools()).tools) {
      tools.set(tool.name, tool);
    }
    return [...tools.keys()];
  },

  /**
   * Calls `name` as the model would and renders its view in a new turn at `width` pixels.
   * Resolves with the view's number once the view is initialized and has the tool input;
   * the tool result follows whenever the call ends (see `outcome`).
   *
   * Hosts differ, and some options play one that is within the spec but unlike this one's
   * defaults: `serverTools: false` proxies no tool calls (the capability is not offered),
   * `refuse` lists tools whose calls the host refuses with a JSON-RPC error (as on a user's
   * "deny"), and `resultFirst` sends the tool result before the tool input.
   */
  async open(
    name,
    args = {},
    { theme = testHost.theme, width = 720, serverTools = true, refuse = [], resultFirst = false } = {},
  ) {
    const tool = tools.get(name);
    if (!tool) {
      throw new Error(`the server has no tool ${name} (it has: ${[...tools.keys()].join(", ")})`);
    }
    if (isToolVisibilityAppOnly(tool)) {
      throw new Error(`${name} is visible to apps only: a host never lets the model call it`);
    }
    const uri = getToolUiResourceUri(tool);
    if (!uri) {
      throw new Error(`${name} has no _meta.ui.resourceUri: hosts would show no view for it`);
    }
    testHost.setTheme(theme);
    // Hosts start the call and the view together, so a view meets its result late.
    const call = client.callTool({ name, arguments: args });
    const view = { id: views.length + 1, tool, width, serverTools, refuse, outcome: settle(call), events: [] };
    views.push(view);
    const html = await readView(uri);
    await render(view, html);
    const sendOutcome = ({ result, error }) =>
      result ? view.bridge.sendToolResult(result) : view.bridge.sendToolCancelled({ reason: error });
    if (resultFirst) {
      await sendOutcome(await view.outcome);
      view.bridge.sendToolInput({ arguments: args });
    } else {
      view.bridge.sendToolInput({ arguments: args });
      view.outcome.then(sendOutcome);
    }
    return view.id;
  },

  /** The notifications view `id` sent, in order, by method ("ui/notifications/initialized", ...). */
  events(id) {
    return views[id - 1].events;
  },

  /** Sends view `id` the request `method` as a host would: {result} or {error, code}. */
  async request(id, method, params = {}) {
    try {
      // Any answer at all: the tests judge it, not the bridge.
      return { result: await views[id - 1].bridge.request({ method, params }, z.looseObject({})) };
    } catch (error) {
      return { error: error.message, code: error.code };
    }
  },

  /** What the model's call behind view `id` ended with: {result} or {error}. */
  outcome(id) {
    return views[id - 1].outcome;
  },

  /** Switches the host's theme: every view gets ui/notifications/host-context-changed. */
  setTheme(theme) {
    if (!(theme in THEME_STYLES)) {
      throw new Error(`theme must be one of ${Object.keys(THEME_STYLES).join(", ")}, not ${theme}`);
    }
    testHost.theme = theme;
    document.body.dataset.theme = theme;
    for (const view of views.filter((v) => v.bridge)) {
      view.bridge.setHostContext(hostContext(view));
    }
  },
};

function settle(promise) {
  return promise.then(
    (result) => ({ result }),
    (error) => ({ error: error instanceof Error ? error.message : String(error) }),
  );
}

async function readView(uri) {
  const { contents } = await client.readResource({ uri });
  if (contents.length !== 1) {
    throw new Error(`${uri} has ${contents.length} contents; a view is exactly one document`);
  }
  const [content] = contents;
  if (content.mimeType !== RESOURCE_MIME_TYPE) {
    throw new Error(`${uri} is ${content.mimeType}; hosts render only ${RESOURCE_MIME_TYPE}`);
  }
  if ("text" in content) {
    return content.text;
  }
  const bytes = Uint8Array.from(atob(content.blob), (c) => c.charCodeAt(0));
  return new TextDecoder().decode(bytes);
}

function hostContext(view) {
  return {
    theme: testHost.theme,
    styles: {
      variables: { ...SHARED_STYLES, ...THEME_STYLES[testHost.theme] },
      css: { fonts: FONTS },
    },
    displayMode: "inline",
    availableDisplayModes: ["inline"],
    containerDimensions: { width: view.width },
    locale: "en-US",
    timeZone: "UTC",
    platform: "web",
    deviceCapabilities: { touch: false, hover: true },
    toolInfo: { tool: view.tool },
  };
}

async function render(view, html) {
  const turn = document.createElement("section");
  turn.className = "turn";
  const label = document.createElement("p");
  label.textContent = view.tool.name;
  const frame = document.createElement("iframe");
  frame.id = `view-${view.id}`;
  frame.title = `${view.tool.name} view`;
  // No allow-same-origin: the view runs at an opaque origin, as hosts frame untrusted views.
  frame.setAttribute("sandbox", "allow-scripts allow-forms");
  frame.style.width = `${view.width}px`;
  turn.append(label, frame);
  document.body.append(turn);
  view.frame = frame;

  view.bridge = bridge(view);
  const proxyReady = once(view.bridge, "sandboxready");
  const initialized = once(view.bridge, "initialized");
  await view.bridge.connect(new PostMessageTransport(frame.contentWindow, frame.contentWindow));
  frame.src = "sandbox.html";
  await proxyReady;
  await view.bridge.sendSandboxResourceReady({ html });
  await initialized;
}

function once(bridge, event) {
  return new Promise((resolve) => {
    const listener = (params) => {
      bridge.removeEventListener(event, listener);
      resolve(params);
    };
    bridge.addEventListener(event, listener);
  });
}

function bridge(view) {
  const appBridge = new AppBridge(
    null,
    HOST_INFO,
    {
      openLinks: {},
      ...(view.serverTools ? { serverTools: {} } : {}),
      serverResources: {},
      logging: {},
      message: { text: {} },
      updateModelContext: { text: {}, structuredContent: {} },
    },
    { hostContext: hostContext(view) },
  );

  appBridge.oncalltool = async (params) => {
    const record = { view: view.id, name: params.name, arguments: params.arguments ?? {} };
    testHost.calls.push(record);
    const tool = tools.get(params.name);
    if (!view.serverTools) {
      record.error = "this host does not call server tools for views";
      throw new Error(record.error);
    }
    if (!tool || isToolVisibilityModelOnly(tool)) {
      record.error = `${params.name} is not a tool this view may call`;
      throw new Error(record.error);
    }
    if (view.refuse.includes(params.name)) {
      record.error = `the user did not allow ${params.name}`;
      throw new Error(record.error);
    }
    try {
      record.result = await client.callTool(params);
    } catch (error) {
      record.error = error instanceof Error ? error.message : String(error);
      throw error;
    }
    return record.result;
  };
  appBridge.onreadresource = (params) => client.readResource(params);
  appBridge.onlistresources = (params) => client.listResources(params);
  appBridge.onlistresourcetemplates = (params) => client.listResourceTemplates(params);

  appBridge.onmessage = async (params) => {
    testHost.messages.push({ view: view.id, ...params });
    return {};
  };
  appBridge.onopenlink = async ({ url }) => {
    testHost.links.push({ view: view.id, url });
    return {};
  };
  appBridge.onupdatemodelcontext = async (params) => {
    testHost.modelContext = { view: view.id, ...params };
    return {};
  };
  appBridge.onloggingmessage = (params) => {
    testHost.logs.push({ view: view.id, ...params });
  };
  for (const event of ["initialized", "sizechange"]) {
    appBridge.addEventListener(event, () => view.events.push(event));
  }
  appBridge.onsizechange = ({ width, height }) => {
    // As hosts do: the view asks for its content's size, the turn's width stays the ceiling.
    if (width !== undefined) {
      view.frame.style.minWidth = `min(${width}px, 100%)`;
    }
    if (height !== undefined) {
      view.frame.style.height = `${height}px`;
    }
  };
  return appBridge;
}

window.testHost = testHost;
