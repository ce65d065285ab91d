"""Fetching a finished image from GPTunnel's storage link into the images folder.

The link is GPTunnel's word, and this server may run inside a network the link must not reach.
So: http(s) only, no credentials, a few redirects at most, each hop's destination judged by the
addresses its name resolves to, and the connection made to an address that was judged (the name
is not looked up a second time, so it cannot be re-pointed in between). Links on the API's own
origin are trusted as the API is; other non-public destinations only when the operator says so
(`GPTUNNEL_ALLOW_PRIVATE_DOWNLOADS`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import anyio

from . import _netguard
from ._exceptions import DownloadError, FlakyLinkError, TransientUpstreamError
from ._files import ImageFolder
from ._records import StoredFile
from ._schedule import parse_retry_after

if TYPE_CHECKING:
    from ._httpx import httpx

_CHUNK = 64 * 1024
#: Redirects followed for one link: a download is at most this many requests, plus one.
MAX_REDIRECTS = 5
#: Longest link accepted from GPTunnel.
MAX_URL_CHARS = 4096
_DEFAULT_PORTS = {"http": 80, "https": 443}
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


class ImageDownloader:
    """Fetches storage links. Its requests carry no API key, no cookies and nothing else: the
    link is on another host, and the key must not travel anywhere but GPTunnel's API. httpx is
    imported on first use, so that starting the server does not wait for it.

    `origin` is the API's base URL: links on its scheme, host and port are allowed whatever their
    address, and go through `transport` when one is given (the sandbox's in-process app).
    """

    def __init__(
        self,
        folder: ImageFolder,
        *,
        timeout: float,
        max_bytes: int,
        origin: str,
        allow_private: bool = False,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._folder = folder
        self._own_transport = transport
        self._timeout = timeout
        self._max_bytes = max_bytes
        self._origin = origin
        self._allow_private = allow_private
        self._network: httpx.AsyncHTTPTransport | None = None

    async def aclose(self) -> None:
        if self._network is not None:
            await self._network.aclose()

    async def download(self, url: str, task_id: str, owner: str) -> StoredFile:
        """Stream `url` into the folder as `owner`'s image of `task_id`.

        Raises `TransientUpstreamError` where trying again may help (`FlakyLinkError` when the
        link itself failed), `DownloadError` where it will not (a refused or expired link, not an
        image, too large, too many redirects) and `StorageError` when the disk refuses.
        """
        from ._httpx import httpx

        if len(url) > MAX_URL_CHARS:
            raise DownloadError(
                f"GPTunnel's link to the image is {len(url)} characters long: not a usable link."
            )
        try:
            target = httpx.URL(url)
            for _ in range(MAX_REDIRECTS + 1):
                outcome = await self._fetch(target, task_id, owner)
                if isinstance(outcome, StoredFile):
                    return outcome
                target = target.join(outcome)
        except httpx.InvalidURL:
            raise DownloadError("GPTunnel's link to the image (or a redirect) is not a valid URL.") from None
        raise DownloadError(f"the image link redirected more than {MAX_REDIRECTS} times (a redirect loop?).")

    async def _fetch(self, url: httpx.URL, task_id: str, owner: str) -> StoredFile | str:
        """One request: the stored image, or where the link redirects to."""
        from ._httpx import httpx

        try:
            response = await self._open(url)
        except httpx.HTTPError as exc:
            raise TransientUpstreamError(
                f"the image server could not be reached ({type(exc).__name__})"
            ) from None
        try:
            location = _redirect(response)
            if location is not None:
                return location
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > self._max_bytes:
                raise _too_large(self._max_bytes)
            with self._folder.open_temporary(task_id, owner) as partial:
                try:
                    async for chunk in response.aiter_bytes(_CHUNK):
                        partial.write(chunk)
                        if partial.size > self._max_bytes:
                            raise _too_large(self._max_bytes)
                except httpx.HTTPError as exc:
                    raise FlakyLinkError(
                        f"the image download broke off after {partial.size} bytes ({type(exc).__name__})"
                    ) from None
                # fsync and the header parse block: off the event loop. Shielded: once the file is
                # whole, a deadline must not throw it away between its rename and the caller.
                with anyio.CancelScope(shield=True):
                    stored = await anyio.to_thread.run_sync(partial.commit)
                return stored
        finally:
            with anyio.CancelScope(shield=True):
                await response.aclose()

    async def _open(self, url: httpx.URL) -> httpx.Response:
        """Send the GET for `url` to an address judged for it (or, on the API's origin with a
        custom transport, through that transport)."""
        from ._httpx import httpx, pinned_get, ssl_context

        timeout = httpx.Timeout(self._timeout, connect=min(self._timeout, 10.0)).as_dict()
        host, port, own = self._where(url)
        if own and self._own_transport is not None:
            request = httpx.Request("GET", url, extensions={"timeout": timeout})
            return await self._own_transport.handle_async_request(request)
        try:
            addresses = await _netguard.resolve(host, port)
        except _netguard.UnresolvableError as exc:
            raise FlakyLinkError(f"cannot resolve the image server's name ({exc})") from None
        if not (own or self._allow_private):
            for address in addresses:
                if not _netguard.is_public(address):
                    raise DownloadError(
                        f"the image link points at {host[:100]}, {_netguard.describe(address)}; this server "
                        "only downloads from public addresses. If GPTunnel's storage is on your own "
                        "network, set GPTUNNEL_ALLOW_PRIVATE_DOWNLOADS=1."
                    )
        if self._network is None:
            # No keep-alive: a connection belongs to the name it was opened and verified for.
            self._network = httpx.AsyncHTTPTransport(
                verify=ssl_context(), limits=httpx.Limits(max_keepalive_connections=0)
            )
        return await pinned_get(self._network, url, addresses, timeout)

    def _where(self, url: httpx.URL) -> tuple[str, int, bool]:
        """The host and port `url` goes to, and whether they are the API's own origin; a
        `DownloadError` for a link of a form never fetched. Never shows the URL: it may carry a
        signature or (refused here) credentials."""
        from ._httpx import httpx

        if url.scheme not in _DEFAULT_PORTS:
            raise DownloadError(
                f"the image link is not an http(s) URL (scheme {url.scheme[:20]!r}); nothing else is fetched."
            )
        if url.userinfo:
            raise DownloadError("the image link carries a user name or password; none is ever sent.")
        host = url.raw_host.decode("ascii")
        if not host:
            raise DownloadError("the image link names no host.")
        port = url.port or _DEFAULT_PORTS[url.scheme]
        origin = httpx.URL(self._origin)
        own = (url.scheme, host, port) == (
            origin.scheme,
            origin.raw_host.decode("ascii"),
            origin.port or _DEFAULT_PORTS.get(origin.scheme),
        )
        return host, port, own


def keepable_link(url: str) -> bool:
    """Whether a link may be kept in the history and shown: an http(s) URL not too long to be a
    link, without a user name or password in it."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return len(url) <= MAX_URL_CHARS and parts.scheme in _DEFAULT_PORTS and "@" not in parts.netloc


def _redirect(response: httpx.Response) -> str | None:
    """Where a redirect points; None for an answer with the image. Raises for failures."""
    status = response.status_code
    if status in _REDIRECTS:
        location = response.headers.get("Location")
        if not location:
            raise DownloadError(f"the image server redirected (HTTP {status}) without saying where to.")
        return location
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
    if status >= 300:
        raise DownloadError(f"the image could not be downloaded (HTTP {status}).")
    return None


def _too_large(max_bytes: int) -> DownloadError:
    return DownloadError(
        f"the image is larger than the {max_bytes // (1024 * 1024)} MiB limit; "
        "raise GPTUNNEL_MAX_IMAGE_BYTES to accept it."
    )
