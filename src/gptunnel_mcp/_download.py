"""Fetching a finished image from GPTunnel's storage link into the images folder."""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio

from ._exceptions import DownloadError, TransientUpstreamError
from ._files import ImageFolder
from ._records import StoredFile
from ._schedule import parse_retry_after

if TYPE_CHECKING:
    from ._httpx import httpx

_CHUNK = 64 * 1024


class ImageDownloader:
    """Fetches storage links. Its HTTP client carries no API key: the link is on another host,
    and the key must not travel anywhere but GPTunnel's API. httpx is imported on first use, so
    that starting the server does not wait for it."""

    def __init__(
        self,
        folder: ImageFolder,
        *,
        timeout: float,
        max_bytes: int,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._folder = folder
        self._transport = transport
        self._timeout = timeout
        self._max_bytes = max_bytes
        self._http: httpx.AsyncClient | None = None

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()

    async def download(self, url: str, task_id: str) -> StoredFile:
        """Stream `url` into the folder as the image of `task_id`.

        Raises `TransientUpstreamError` where trying again may help, `DownloadError` where it
        will not (expired link, not an image, too large) and `StorageError` when the disk refuses.
        """
        from ._httpx import httpx, ssl_context

        if self._http is None:
            self._http = httpx.AsyncClient(
                verify=ssl_context(),
                timeout=httpx.Timeout(self._timeout, connect=min(self._timeout, 10.0)),
                follow_redirects=True,
                transport=self._transport,
            )
        try:
            async with self._http.stream("GET", url) as response:
                _check_status(response)
                declared = response.headers.get("Content-Length")
                if declared and declared.isdigit() and int(declared) > self._max_bytes:
                    raise _too_large(self._max_bytes)
                with self._folder.open_temporary(task_id) as partial:
                    async for chunk in response.aiter_bytes(_CHUNK):
                        partial.write(chunk)
                        if partial.size > self._max_bytes:
                            raise _too_large(self._max_bytes)
                    # fsync and the header parse block: keep them off the event loop.
                    return await anyio.to_thread.run_sync(partial.commit)
        except httpx.HTTPError as exc:
            raise TransientUpstreamError(f"the image download broke off ({type(exc).__name__})") from None


def _check_status(response: httpx.Response) -> None:
    status = response.status_code
    if status in (429,) or status >= 500:
        raise TransientUpstreamError(
            f"the image server is unavailable (HTTP {status})",
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
        )
    if status in (403, 404, 410):
        raise DownloadError(
            f"GPTunnel's link to the image no longer works (HTTP {status}); links expire 48 hours "
            "after the image is made. Create the image again."
        )
    if status >= 400:
        raise DownloadError(f"the image could not be downloaded (HTTP {status}).")


def _too_large(max_bytes: int) -> DownloadError:
    return DownloadError(
        f"the image is larger than the {max_bytes // (1024 * 1024)} MiB limit; "
        "raise GPTUNNEL_MAX_IMAGE_BYTES to accept it."
    )
