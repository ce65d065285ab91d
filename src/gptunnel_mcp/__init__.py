"""gptunnel-mcp: an MCP server that turns GPTunnel's asynchronous media API into one tool call.

The public surface is small: the settings, the engine that runs image jobs (usable without MCP),
the MCP server factory, and the exception tree.
"""

__version__ = "0.1.0"

from ._engine import Engine, JobEvents, open_engine
from ._exceptions import (
    AuthenticationError,
    ConfigError,
    ContentRefusedError,
    DownloadError,
    GPTunnelMCPError,
    InputError,
    InsufficientBalanceError,
    InvalidRequestError,
    ModelRestrictedError,
    StorageError,
    TaskNotFoundError,
    TransientUpstreamError,
    UnknownCreateOutcomeError,
    UpstreamError,
)
from ._models import ImageRequest, ImageResult, TaskRecord
from ._server import build_server
from ._settings import Settings, load_settings
from ._store import TaskStore

__all__ = [
    "AuthenticationError",
    "ConfigError",
    "ContentRefusedError",
    "DownloadError",
    "Engine",
    "GPTunnelMCPError",
    "ImageRequest",
    "ImageResult",
    "InputError",
    "InsufficientBalanceError",
    "InvalidRequestError",
    "JobEvents",
    "ModelRestrictedError",
    "Settings",
    "StorageError",
    "TaskNotFoundError",
    "TaskRecord",
    "TaskStore",
    "TransientUpstreamError",
    "UnknownCreateOutcomeError",
    "UpstreamError",
    "__version__",
    "build_server",
    "load_settings",
    "open_engine",
]
