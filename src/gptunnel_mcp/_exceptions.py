"""One tree of exceptions. Every message is written for the person who has to act on it.

The MCP layer turns any `GPTunnelMCPError` into a tool error with the message as its text, so a
message must say what went wrong and what to do, and must never contain the API key.
"""

from __future__ import annotations


class GPTunnelMCPError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(GPTunnelMCPError):
    """The server's configuration is unusable (a bad environment variable, no API key, ...)."""


class InputError(GPTunnelMCPError):
    """A tool argument is invalid. Raised before any request reaches GPTunnel."""


class QuotaExceededError(GPTunnelMCPError):
    """A configured cap on images per hour or day is reached. Raised before any upstream call."""


class TaskNotFoundError(GPTunnelMCPError):
    """No task with this id, neither in the history nor upstream."""


class UpstreamError(GPTunnelMCPError):
    """GPTunnel answered with an error, or could not be reached.

    `code` is GPTunnel's numeric `code` where there was one; `retryable` tells whether the same
    request may succeed later.
    """

    retryable = False

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class AuthenticationError(UpstreamError):
    """GPTunnel refused the API key (code 2, or HTTP 401)."""


class InvalidRequestError(UpstreamError):
    """GPTunnel found the request invalid (code 3)."""


class InsufficientBalanceError(UpstreamError):
    """The account has no money left for this model (code 5)."""


class ModelRestrictedError(UpstreamError):
    """The account's organization may not use this model (code 7)."""


class ContentRefusedError(UpstreamError):
    """GPTunnel's content filter refused the prompt or the reference images (1001, 1002)."""


class TransientUpstreamError(UpstreamError):
    """A failure that may pass: network errors, timeouts, HTTP 429/5xx, codes 1, 6 and 500."""

    retryable = True

    def __init__(self, message: str, *, code: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


class UnknownCreateOutcomeError(UpstreamError):
    """A create request may or may not have reached GPTunnel; retrying it could charge twice."""


class DownloadError(GPTunnelMCPError):
    """The finished image could not be downloaded or is not an image."""


class StorageError(GPTunnelMCPError):
    """The history or an image file could not be written or read."""
