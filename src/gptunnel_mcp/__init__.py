"""gptunnel-mcp: an MCP server that turns GPTunnel's asynchronous media API into one tool call."""

__version__ = "0.1.0"
