"""gptunnel-mcp: an MCP server that turns GPTunnel's asynchronous media API into one tool call.

The public surface is small: the settings, the engine that runs image jobs (usable without MCP),
the MCP server factory, and the exception tree. Names are imported on first use, so that
`gptunnel-mcp --version` and `--help` answer without loading the MCP SDK.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from ._engine import Engine, JobEvents, Outcome
    from ._exceptions import (
        AuthenticationError,
        BudgetExceededError,
        ConfigError,
        ContentRefusedError,
        DownloadError,
        GPTunnelMCPError,
        InputError,
        InsufficientBalanceError,
        InvalidRequestError,
        ModelRestrictedError,
        QuotaExceededError,
        StorageError,
        TaskNotFoundError,
        TransientUpstreamError,
        UnknownCreateOutcomeError,
        UpstreamError,
    )
    from ._records import StoredFile, TaskRecord
    from ._request import ImageRequest
    from ._settings import Settings, load_settings
    from ._store import TaskStore
    from ._wiring import open_engine
    from .server import build_server

_WHERE = {
    "Engine": "._engine",
    "JobEvents": "._engine",
    "Outcome": "._engine",
    "ImageRequest": "._request",
    "StoredFile": "._records",
    "TaskRecord": "._records",
    "Settings": "._settings",
    "load_settings": "._settings",
    "TaskStore": "._store",
    "open_engine": "._wiring",
    "build_server": ".server",
    **dict.fromkeys(
        [
            "AuthenticationError",
            "BudgetExceededError",
            "ConfigError",
            "ContentRefusedError",
            "DownloadError",
            "GPTunnelMCPError",
            "InputError",
            "InsufficientBalanceError",
            "InvalidRequestError",
            "ModelRestrictedError",
            "QuotaExceededError",
            "StorageError",
            "TaskNotFoundError",
            "TransientUpstreamError",
            "UnknownCreateOutcomeError",
            "UpstreamError",
        ],
        "._exceptions",
    ),
}

__all__ = [
    "AuthenticationError",
    "BudgetExceededError",
    "ConfigError",
    "ContentRefusedError",
    "DownloadError",
    "Engine",
    "GPTunnelMCPError",
    "ImageRequest",
    "InputError",
    "InsufficientBalanceError",
    "InvalidRequestError",
    "JobEvents",
    "ModelRestrictedError",
    "Outcome",
    "QuotaExceededError",
    "Settings",
    "StorageError",
    "StoredFile",
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


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value
