"""A stand-in for GPTunnel's media API: a real HTTP server on 127.0.0.1 for tests, benchmarks and sandboxes.

No machine of the project can reach gptunnel.ru, so everything that talks to GPTunnel is exercised
against this server instead. It follows the API as documented (see the project's notes on the
upstream media API):

- ``POST /v1/media/create``: validates ``model``, ``prompt``, ``images`` and ``ar`` and answers at
  once with an ``idle`` task.
- ``POST /v1/media/result`` (JSON ``{"task_id": ...}``) and ``GET /v1/media/result?task_id=...``:
  the task's status follows the clock: ``idle`` for the first 20 % of its generation time,
  ``processing`` until the end, then its final status (``done`` with a file ``url``, or a failure).
- ``GET /files/<id>-<model>-original.<ext>``: the picture, like object storage: no Authorization,
  and the link can expire (:meth:`StandIn.expire_files`).
- ``GET /v1/balance``: the account balance, with the OpenAI-style HTTP 401 for a bad key.
- Anything else under ``/v1``: HTTP 200 with code 99, as GPTunnel does.

Media errors are HTTP 200 with a non-zero ``code`` and a human ``error`` message, as upstream.

Every way the real service (or a proxy in front of it) can misbehave is a knob on
:class:`Behaviour`, which tests change between calls; :class:`Stats` counts what the server saw.
Knobs that shape a task (generation time, final status, image format and size) are read when the
task is created, so changing them never rewrites tasks already in flight; the other knobs are read
on every request. For soak tests, ``fault_rate`` and ``download_fault_rate`` fail a share of
requests at random (reproducibly with ``StandIn(seed=...)``); ``Stats.faults`` counts them.

Usage in a test::

    with StandIn(api_key="test-key", behaviour=Behaviour(generation_seconds=0.3)) as standin:
        client = httpx.Client(base_url=standin.url, headers={"Authorization": "test-key"})
        ...
        standin.behaviour.transient_failures = 2

From a shell: ``python tests/standin.py --port 8765 --api-key K --generation-seconds 2``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import random
import secrets
import signal
import sys
import textwrap
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import anyio
import anyio.to_thread
import uvicorn
from PIL import Image, ImageDraw, ImageFont
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

__all__ = [
    "ASPECT_RATIOS",
    "DOWNLOAD_FAULT_KINDS",
    "TRANSIENT_KINDS",
    "Behaviour",
    "StandIn",
    "Stats",
    "main",
    "render_image",
]

#: Every ``ar`` value the endpoint accepts (21:9 and 9:21 only matter to some models upstream).
ASPECT_RATIOS: tuple[str, ...] = ("1:1", "16:9", "9:16", "4:3", "3:4", "21:9", "9:21")

#: Every value :attr:`Behaviour.transient_kind` accepts.
TRANSIENT_KINDS: tuple[str, ...] = ("http503", "http429", "code6", "code1", "code500", "html", "disconnect")

#: Every value :attr:`Behaviour.download_fault_kinds` accepts: HTTP 503, or the body cut off half-way.
DOWNLOAD_FAULT_KINDS: tuple[str, ...] = ("http503", "truncate")

# Pillow format -> (file extension, Content-Type).
_FORMATS: dict[str, tuple[str, str]] = {
    "WEBP": ("webp", "image/webp"),
    "PNG": ("png", "image/png"),
    "JPEG": ("jpg", "image/jpeg"),
}

_MESSAGES: dict[int, str] = {
    1: "internal server error",
    2: "invalid token",
    3: "invalid input: check the request schema",
    4: "record not found",
    5: "insufficient balance",
    6: "service is under heavy load, try again later",
    7: "organization restriction for this model",
    99: "API method not found",
    500: "internal exception",
    1001: "sensitive content in the request or uploaded files",
    1002: "the prompt failed the content safety check",
}

# What nginx answers when the application behind it is down: the "not JSON at all" case.
_HTML_ERROR_PAGE = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)

_NO_SUCH_KEY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    "<Error><Code>NoSuchKey</Code><Message>The specified key does not exist.</Message></Error>"
)

_API_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]

# (method, path) -> the endpoint's name in Stats.faults.
_ENDPOINTS: dict[tuple[str, str], str] = {
    ("POST", "/v1/media/create"): "create",
    ("POST", "/v1/media/result"): "result",
    ("GET", "/v1/media/result"): "result",
    ("GET", "/v1/balance"): "balance",
}


@dataclass
class Behaviour:
    """Knobs tests turn between calls. The defaults are the happy path."""

    #: Time from create until the task reaches its final status.
    generation_seconds: float = 1.0
    #: Fraction: each task's time is drawn uniformly in [mean*(1-j), mean*(1+j)].
    generation_jitter: float = 0.0
    #: Pillow format of served images: "WEBP", "PNG" or "JPEG".
    image_format: str = "WEBP"
    image_size: tuple[int, int] = (1024, 1024)
    #: Non-zero: /v1/media/create answers HTTP 200 {"code": N, "error": ...} (code 3 with "issues").
    create_code: int = 0
    #: Codes for the next creates, one each, in the order they arrive (0: made), before create_code.
    create_codes: list[int] = field(default_factory=list)
    #: The same for /v1/media/result.
    result_code: int = 0
    #: The status a task ends in: "done", or "failed"/"error" (then with an "error" field and no url).
    final_status: str = "done"
    #: The status a task reports until it ends, instead of "idle" and then "processing" (upstream's
    #: words for "still working" vary by model: "queued", "RUNNING", "in_progress", ...).
    working_status: str | None = None
    #: The next N requests under /v1 fail transiently; decremented per failure.
    transient_failures: int = 0
    #: How they fail: one of TRANSIENT_KINDS.
    transient_kind: str = "http503"
    #: Retry-After header (seconds) on "http429"; None sends no Retry-After at all.
    retry_after: float | None = None
    #: Probability that a request under /v1 fails transiently at random (after any
    #: transient_failures), for soak tests; the kind is drawn uniformly from fault_kinds. The draws
    #: come from the stand-in's random source, seeded by ``StandIn(seed=...)``.
    fault_rate: float = 0.0
    #: The kinds random faults are drawn from: values of TRANSIENT_KINDS.
    fault_kinds: tuple[str, ...] = TRANSIENT_KINDS
    #: HTTP status of file downloads (e.g. 404 as if the link expired, 500).
    download_status: int = 200
    #: Serve these bytes instead of the picture (still labelled with the image's Content-Type).
    download_bytes_override: bytes | None = None
    #: Announce the full Content-Length but send only this many bytes, then close the connection.
    download_truncate_at: int | None = None
    #: Seconds between the response headers and the body of a file download.
    download_delay: float = 0.0
    #: With download_delay: send this many bytes of the body before the delay instead of none, so
    #: the client holds part of the file while it waits.
    download_pause_at: int | None = None
    #: Probability that a file download fails transiently at random, for soak tests.
    download_fault_rate: float = 0.0
    #: The kinds download faults are drawn from: values of DOWNLOAD_FAULT_KINDS.
    download_fault_kinds: tuple[str, ...] = DOWNLOAD_FAULT_KINDS
    balance: float = 100.0
    #: Seconds added to the `created_at` GPTunnel reports (its clock, or a hostile answer).
    created_at_offset: float = 0.0
    #: Seconds a create takes to answer (after the task exists), to widen races on purpose.
    create_delay: float = 0.0
    #: The id a create answers with instead of a real one (a hostile or broken upstream).
    create_id_override: str | None = None
    #: The id every create gives its task, instead of a fresh one: as if two GPTunnel accounts met
    #: the same id. A task made again under it replaces the earlier one.
    fixed_task_id: str | None = None
    credit_limit: float = 0.0
    #: The link a done task names instead of its own: a template with ``{port}`` (the stand-in's)
    #: and ``{path}`` (the file's path), e.g. ``"http://localhost:{port}{path}"``.
    file_url_override: str | None = None
    #: File downloads answer HTTP 302 to this location (the same template as file_url_override;
    #: ``"{path}"`` redirects a link to itself, for ever).
    download_redirect_to: str | None = None
    #: Spread a file download's body over this many seconds, in small pieces (a trickling link).
    download_trickle_seconds: float = 0.0
    #: Characters of padding in every result answer (an upstream answering far too much).
    result_padding: int = 0
    #: The ``cost`` a done task's result answers report (roubles): a number, or text such as
    #: ``"12.50"`` as some answers carry it; None reports no cost at all.
    cost: float | str | None = None
    #: A ``cost`` reported on the answers for a task still being made (no price at all).
    cost_while_working: float | str | None = None
    #: The model every answer names instead of the one asked of (a provider's own name for it).
    answer_model: str | None = None
    #: Seconds a result call takes to answer, holding the request open: two polls of one task
    #: that overlap then show in Stats.max_concurrent_result_calls_by_task.
    result_delay: float = 0.0


@dataclass
class Stats:
    """What the stand-in saw. Replace it with ``Stats()`` to start counting afresh."""

    create_calls: int = 0
    result_calls: int = 0
    download_calls: int = 0
    balance_calls: int = 0
    #: Every Authorization header value received under /v1 (to check the key is sent bare).
    auth_headers: list[str] = field(default_factory=list)
    #: Every Authorization header value received on /files: should stay empty, storage needs no key.
    file_auth_headers: list[str] = field(default_factory=list)
    #: Task id -> result calls that reached the task (for polling benchmarks).
    result_calls_by_task: dict[str, int] = field(default_factory=dict)
    #: Task id -> the most result calls about it that were in flight at once (1: never two polls
    #: at the same time; see Behaviour.result_delay to widen each poll).
    max_concurrent_result_calls_by_task: dict[str, int] = field(default_factory=dict)
    #: Task id -> requests for its file.
    download_calls_by_task: dict[str, int] = field(default_factory=dict)
    #: Task id -> downloads of its file sent whole to a client still connected at the last byte.
    downloads_served_by_task: dict[str, int] = field(default_factory=dict)
    #: Task id -> time.time() at which it reached its final status (created + planned duration).
    task_done_at: dict[str, float] = field(default_factory=dict)
    #: Transient failures served (by transient_failures or at random), by "endpoint:kind", e.g.
    #: "create:http503", "result:disconnect", "download:truncate".
    faults: dict[str, int] = field(default_factory=dict)


@dataclass
class _Task:
    id: str
    model: str
    prompt: str
    ar: str | None
    images: list[str]
    created: float
    duration: float
    final_status: str
    working_status: str | None
    image_format: str
    image_size: tuple[int, int]
    cost: float | str | None = None
    expired: bool = False

    @property
    def file_name(self) -> str:
        return f"{self.id}-{self.model}-original.{_FORMATS[self.image_format][0]}"


def _format_key(fmt: str) -> str:
    key = fmt.upper()
    if key == "JPG":
        key = "JPEG"
    if key not in _FORMATS:
        raise ValueError(f"unsupported image format {fmt!r}: use one of {', '.join(_FORMATS)}")
    return key


def _font(pixels: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # A fresh font per call: rendering runs in worker threads and font objects are not documented
    # as thread-safe.
    try:
        return ImageFont.load_default(size=pixels)
    except (ImportError, OSError):  # Pillow built without FreeType: the small bitmap font.
        return ImageFont.load_default()


def render_image(prompt: str, size: tuple[int, int], fmt: str) -> bytes:
    """A picture with the prompt written on it, encoded as ``fmt``; the same inputs give the same bytes."""
    key = _format_key(fmt)
    width, height = size
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {size!r}")
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    image = Image.new("RGB", (width, height), (digest[0] // 2 + 96, digest[1] // 2 + 96, digest[2] // 2 + 96))
    draw = ImageDraw.Draw(image)
    # Some shapes, so the file is not a flat colour that compresses to nearly nothing: tests of
    # caching and truncated downloads want files of a realistic size.
    for i in range(8):
        a, b, c, d, r, g, bl = digest[3 + i * 3 : 3 + i * 3 + 7]
        x0, y0 = a * width // 256, b * height // 256
        x1, y1 = x0 + (c + 32) * width // 512, y0 + (d + 32) * height // 512
        draw.ellipse((x0, y0, x1, y1), fill=(r, g, bl))
    font = _font(max(10, min(width, height) // 24))
    margin = max(4, min(width, height) // 32)
    chars_per_line = max(8, (width - 2 * margin) * 2 // max(1, min(width, height) // 24))
    text = textwrap.fill(prompt[:600] or "(empty prompt)", width=chars_per_line)
    if not isinstance(font, ImageFont.FreeTypeFont):
        text = text.encode("latin-1", "replace").decode("latin-1")  # the bitmap font is Latin-1 only
    box = draw.multiline_textbbox((margin, margin), text, font=font)
    draw.rectangle((box[0] - 4, box[1] - 4, box[2] + 4, box[3] + 4), fill=(255, 255, 255))
    draw.multiline_text((margin, margin), text, fill=(0, 0, 0), font=font)
    buffer = io.BytesIO()
    if key == "WEBP":
        image.save(buffer, "WEBP", quality=80)
    elif key == "JPEG":
        image.save(buffer, "JPEG", quality=85)
    else:
        image.save(buffer, "PNG")
    return buffer.getvalue()


def _code_error(code: int, issues: list[dict[str, Any]] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "error": _MESSAGES.get(code, f"error {code}")}
    if code == 3:
        body["issues"] = issues if issues is not None else []
    return JSONResponse(body)


def _issue(path: list[str | int], message: str) -> dict[str, Any]:
    return {"path": path, "message": message}


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "string"


def _check_string(body: dict[str, Any], name: str, issues: list[dict[str, Any]]) -> None:
    if name not in body:
        issues.append(_issue([name], "Required"))
    elif not isinstance(body[name], str):
        issues.append(_issue([name], f"Expected string, received {_type_name(body[name])}"))
    elif not body[name]:
        issues.append(_issue([name], "String must contain at least 1 character(s)"))


def _validate_create(body: dict[str, Any]) -> list[dict[str, Any]]:
    issues: list[dict[str, Any]] = []
    _check_string(body, "model", issues)
    _check_string(body, "prompt", issues)
    if "images" in body:
        images = body["images"]
        if not isinstance(images, list):
            issues.append(_issue(["images"], f"Expected array, received {_type_name(images)}"))
        else:
            for index, url in enumerate(images):
                if not isinstance(url, str):
                    issues.append(_issue(["images", index], f"Expected string, received {_type_name(url)}"))
                elif not url.startswith(("http://", "https://")):
                    issues.append(_issue(["images", index], "Invalid url"))
    if "ar" in body and body["ar"] not in ASPECT_RATIOS:
        expected = " | ".join(f"'{ar}'" for ar in ASPECT_RATIOS)
        issues.append(
            _issue(["ar"], f"Invalid enum value. Expected {expected}, received {json.dumps(body['ar'])}")
        )
    return issues


async def _read_json(request: Request) -> tuple[Any, str | None]:
    raw = await request.body()
    try:
        return json.loads(raw.decode("utf-8")), None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, "Expected a JSON object as the request body"


def _retry_after_header(seconds: float) -> str:
    return format(seconds, "g")


async def _disconnect(receive: Receive) -> None:
    """Returns when the client closes the connection (after the request's own messages)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class _FileResponse(Response):
    """An image download that can stall before its body or stop half-way, like a flaky storage link."""

    def __init__(
        self,
        payload: bytes,
        media_type: str,
        delay: float,
        truncate_at: int | None,
        drop_connection: Callable[[Scope], Awaitable[bool]],
        pause_at: int | None = None,
        trickle_seconds: float = 0.0,
        on_served: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__(payload, 200, media_type=media_type)
        self._payload = payload
        self._delay = delay
        self._truncate_at = truncate_at
        self._drop_connection = drop_connection
        self._pause_at = pause_at
        self._trickle_seconds = trickle_seconds
        self._on_served = on_served

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        if self._trickle_seconds > 0:
            await self._trickle(scope, receive, send)
            return
        body = self._payload
        cut = self._truncate_at
        truncated = cut is not None and 0 <= cut < len(body)
        if truncated:
            body = body[:cut]
        sent = 0
        if self._delay > 0:
            sent = min(max(0, self._pause_at or 0), len(body))
            if sent:
                await send({"type": "http.response.body", "body": body[:sent], "more_body": True})
            # The delay, unless the client goes first (as a killed one does): then the download
            # failed, and a stall left running would outlive the test.
            with anyio.move_on_after(self._delay):
                await _disconnect(receive)
                return
        if truncated:
            await send({"type": "http.response.body", "body": body[sent:], "more_body": True})
            # Without our uvicorn server to close the socket on, returning early still ends the
            # connection: servers close it when a response stops short of its Content-Length.
            await self._drop_connection(scope)
            return
        # Counted before the last bytes go: a client reading Stats as soon as it has them finds it.
        self._on_served()
        await send({"type": "http.response.body", "body": body[sent:], "more_body": False})

    async def _trickle(self, scope: Scope, receive: Receive, send: Send) -> None:
        pieces = 50
        step = -(-len(self._payload) // pieces)
        for start in range(0, len(self._payload), step):
            if await Request(scope, receive).is_disconnected():
                return
            await send(
                {"type": "http.response.body", "body": self._payload[start : start + step], "more_body": True}
            )
            await anyio.sleep(self._trickle_seconds / pieces)
        self._on_served()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class _Disconnect(Response):
    """Closes the connection without a response, like a proxy dropping it."""

    def __init__(self, drop_connection: Callable[[Scope], Awaitable[bool]]) -> None:
        super().__init__()
        self._drop_connection = drop_connection

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Read the request body first: closing a socket with unread input makes the kernel send
        # a reset, and the client would see a reset or a clean close depending on timing.
        while True:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        if not await self._drop_connection(scope):
            # Not served by StandIn.start() (e.g. an in-process test client): nothing to close, so
            # degrade to the nearest transient failure rather than a hang.
            await PlainTextResponse("503 Service Temporarily Unavailable", 503)(scope, receive, send)


class StandIn:
    """The stand-in GPTunnel: a Starlette app plus a uvicorn server on a daemon thread.

    ``api_key`` None accepts any Authorization header (or none); otherwise the header must be
    exactly the key, bare, as GPTunnel's documentation sends it (a ``Bearer`` prefix is refused).
    ``seed`` seeds the random source of generation jitter and random faults.
    """

    def __init__(
        self,
        api_key: str | None = "test-key",
        behaviour: Behaviour | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        seed: int | None = None,
    ) -> None:
        self.api_key = api_key
        self.behaviour = behaviour if behaviour is not None else Behaviour()
        self.stats = Stats()
        self.host = host
        self.port = port
        # The server thread and the test thread both touch tasks, images and counters.
        self._lock = threading.Lock()
        self._tasks: dict[str, _Task] = {}
        self._images: dict[str, bytes] = {}
        # Task id -> result calls about it being answered right now.
        self._polls_in_flight: dict[str, int] = {}
        # Jitter of fake generation times and random faults, not security.
        self._random = random.Random(seed)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._url: str | None = None
        self.app = Starlette(
            routes=[
                Route("/v1/{path:path}", self._api, methods=_API_METHODS),
                Route("/files/{name:path}", self._file, methods=["GET"]),
            ]
        )

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL such as ``http://127.0.0.1:PORT``; known once :meth:`start` has returned."""
        if self._url is None:
            raise RuntimeError("StandIn.url is only known after start()")
        return self._url

    def start(self) -> None:
        """Serve on a daemon thread; return once the server accepts connections."""
        if self._thread is not None:
            raise RuntimeError("this StandIn is already running")
        config = uvicorn.Config(
            self.app,
            host=self.host,
            port=self.port,
            log_level="warning",
            # None: leave the process's logging configuration alone (tests may be capturing it).
            log_config=None,
            lifespan="off",
            # h11 and plain asyncio everywhere, so "disconnect" can find the connection it drops
            # and no event loop policy is installed process-wide.
            http="h11",
            loop="asyncio",
            access_log=False,
            proxy_headers=False,
            # A request stalled by download_delay must not hold stop() for long.
            timeout_graceful_shutdown=1,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name="gptunnel-standin", daemon=True)
        thread.start()
        deadline = time.monotonic() + 10.0
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError(f"the GPTunnel stand-in could not listen on {self.host}:{self.port}")
            if time.monotonic() > deadline:
                server.should_exit = True
                raise RuntimeError("the GPTunnel stand-in did not start within 10 s")
            time.sleep(0.005)
        port = int(server.servers[0].sockets[0].getsockname()[1])
        # A wildcard bind is not an address a client can dial: hand out the loopback instead.
        wildcard = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}
        host = wildcard.get(self.host, self.host)
        if ":" in host:
            host = f"[{host}]"
        self._server, self._thread = server, thread
        self._url = f"http://{host}:{port}"

    def stop(self, *, wait: bool = True) -> None:
        """Stop serving; with `wait`, until the thread has ended (uvicorn notices within about
        0.2 s, a cost test fixtures need not pay). Tasks and stats stay readable."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.should_exit = True
        if wait:
            thread.join(timeout=10.0)
        self._server = self._thread = None

    def __enter__(self) -> StandIn:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- helpers for tests -------------------------------------------------------------------------

    def expire_files(self) -> None:
        """From now on, the file URL of every existing task answers 404, as after GPTunnel's 48 hours."""
        with self._lock:
            for task in self._tasks.values():
                task.expired = True

    def finish(self, task_id: str | None = None) -> None:
        """End a task (or every unfinished one) now, as if its generation time were up."""
        now = time.time()
        with self._lock:
            for task in self._tasks.values():
                if task_id in (None, task.id) and now - task.created < task.duration:
                    task.duration = now - task.created

    def forget(self, task_id: str) -> None:
        """From now on GPTunnel has no such task (code 4), as after its records are purged."""
        with self._lock:
            del self._tasks[task_id]

    def task_ids(self) -> list[str]:
        """Ids of every task created so far, oldest first."""
        with self._lock:
            return list(self._tasks)

    def polls_in_flight(self, task_id: str) -> int:
        """Result calls about this task being answered at this moment."""
        with self._lock:
            return self._polls_in_flight.get(task_id, 0)

    def task_prompts(self) -> dict[str, str]:
        """Task id -> prompt of every task created so far, oldest first (to find duplicate creates)."""
        with self._lock:
            return {task_id: task.prompt for task_id, task in self._tasks.items()}

    def task_models(self) -> dict[str, str]:
        """Task id -> the model id each create named, exactly as sent, oldest first."""
        with self._lock:
            return {task_id: task.model for task_id, task in self._tasks.items()}

    def task_images(self, task_id: str) -> list[str]:
        """The reference image URLs the create of this task sent."""
        with self._lock:
            return list(self._tasks[task_id].images)

    def image_bytes(self, task_id: str) -> bytes:
        """The exact bytes the file URL of this task serves (without download_bytes_override)."""
        with self._lock:
            task = self._tasks[task_id]
        return self._image_for(task)

    # -- internals ---------------------------------------------------------------------------------

    def _image_for(self, task: _Task) -> bytes:
        with self._lock:
            cached = self._images.get(task.id)
        if cached is not None:
            return cached
        # Rendered outside the lock; rendering is deterministic, so a concurrent duplicate render
        # yields the same bytes and the first one stored wins.
        data = render_image(task.prompt, task.image_size, task.image_format)
        with self._lock:
            return self._images.setdefault(task.id, data)

    def _status(self, task: _Task, now: float) -> tuple[str, bool]:
        """The task's status at ``now`` and whether it has ended. Call with the lock held."""
        elapsed = now - task.created
        if elapsed < task.duration:
            if task.working_status is not None:
                return task.working_status, False
            return ("idle" if elapsed < 0.2 * task.duration else "processing"), False
        # The moment it was due, not the moment someone asked, so latency benchmarks measure the
        # client's polling delay rather than hide it.
        self.stats.task_done_at.setdefault(task.id, task.created + task.duration)
        return task.final_status, True

    def _task_body(self, task: _Task, status: str, ended: bool, base_url: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "code": 0,
            "id": task.id,
            "model": self.behaviour.answer_model or task.model,
            "prompt": task.prompt,
            "created_at": int(task.created + self.behaviour.created_at_offset),
            "status": status,
            "url": None,
        }
        if ended and status == "done":
            path = f"/files/{quote(task.file_name, safe='')}"
            override = self.behaviour.file_url_override
            body["url"] = f"{base_url}{path}" if override is None else self._link(override, path, base_url)
            if task.cost is not None:
                body["cost"] = task.cost
        elif ended:
            body["error"] = f"generation failed: the stand-in was told to end this task as {status!r}"
        elif self.behaviour.cost_while_working is not None:
            body["cost"] = self.behaviour.cost_while_working
        return body

    @staticmethod
    def _link(template: str, path: str, base_url: str) -> str:
        return template.format(port=urlsplit(base_url).port, path=path)

    def _base_url(self, request: Request) -> str:
        return self._url if self._url is not None else str(request.base_url).rstrip("/")

    def _authorized(self, request: Request) -> bool:
        return self.api_key is None or request.headers.get("authorization") == self.api_key

    def _take_transient(self) -> str | None:
        with self._lock:
            behaviour = self.behaviour
            if behaviour.transient_failures <= 0:
                return None
            behaviour.transient_failures -= 1
            return behaviour.transient_kind

    def _draw_fault(self, rate: float, kinds: tuple[str, ...]) -> str | None:
        """A random fault's kind with probability ``rate``, else None."""
        if rate <= 0 or not kinds:
            return None
        with self._lock:
            if self._random.random() >= rate:
                return None
            return self._random.choice(kinds)

    def _count_fault(self, endpoint: str, kind: str) -> None:
        with self._lock:
            key = f"{endpoint}:{kind}"
            self.stats.faults[key] = self.stats.faults.get(key, 0) + 1

    def _transient_response(self, kind: str) -> Response:
        if kind == "http503":
            return PlainTextResponse("503 Service Temporarily Unavailable", 503)
        if kind == "http429":
            retry_after = self.behaviour.retry_after
            headers = None if retry_after is None else {"Retry-After": _retry_after_header(retry_after)}
            return PlainTextResponse("429 Too Many Requests", 429, headers=headers)
        if kind in ("code6", "code1", "code500"):
            return _code_error(int(kind[4:]))
        if kind == "html":
            return HTMLResponse(_HTML_ERROR_PAGE, 200)
        if kind == "disconnect":
            return _Disconnect(self._drop_connection)
        raise ValueError(f"unknown transient_kind {kind!r}: use one of {', '.join(TRANSIENT_KINDS)}")

    async def _drop_connection(self, scope: Scope) -> bool:
        """Close the TCP connection that carries this request; False if it cannot be found.

        ASGI has no way to abort a connection, so this finds uvicorn's protocol object for it by
        the client address (unique per connection) and closes its transport.
        """
        server = self._server
        client = scope.get("client")
        if server is None or client is None:
            return False
        connections = server.server_state.connections
        for connection in list(connections):
            if getattr(connection, "client", None) != tuple(client):
                continue
            transport = getattr(connection, "transport", None)
            if transport is None:
                return False
            transport.close()
            # Wait until uvicorn has seen the connection go, or it would log that the app
            # "returned without completing response" and try to send a 500 down a closed socket.
            for _ in range(200):
                if connection not in connections:
                    break
                await anyio.sleep(0.005)
            return True
        return False

    # -- endpoints ---------------------------------------------------------------------------------

    async def _api(self, request: Request) -> Response:
        route = (request.method, request.url.path)
        with self._lock:
            stats = self.stats
            if route == ("POST", "/v1/media/create"):
                stats.create_calls += 1
            elif route in (("POST", "/v1/media/result"), ("GET", "/v1/media/result")):
                stats.result_calls += 1
            elif route == ("GET", "/v1/balance"):
                stats.balance_calls += 1
            header = request.headers.get("authorization")
            if header is not None:
                stats.auth_headers.append(header)
        # Transient failures come first: a proxy or an overloaded backend fails before it looks
        # at the key or the body.
        kind = self._take_transient()
        if kind is None:
            behaviour = self.behaviour
            kind = self._draw_fault(behaviour.fault_rate, behaviour.fault_kinds)
        if kind is not None:
            self._count_fault(_ENDPOINTS.get(route, "other"), kind)
            return self._transient_response(kind)
        if route == ("POST", "/v1/media/create"):
            return await self._create(request)
        if route[1] == "/v1/media/result" and route[0] in ("POST", "GET"):
            return await self._result(request)
        if route == ("GET", "/v1/balance"):
            return self._balance(request)
        return _code_error(99)

    async def _create(self, request: Request) -> Response:
        body, problem = await _read_json(request)
        if not self._authorized(request):
            return _code_error(2)
        behaviour = self.behaviour
        code = behaviour.create_codes.pop(0) if behaviour.create_codes else behaviour.create_code
        if code:
            return _code_error(code, [_issue(["prompt"], "the stand-in was told to refuse")])
        if problem is not None or not isinstance(body, dict):
            message = problem or f"Expected object, received {_type_name(body)}"
            return _code_error(3, [_issue([], message)])
        issues = _validate_create(body)
        if issues:
            return _code_error(3, issues)
        image_format = _format_key(behaviour.image_format)
        mean = max(0.0, behaviour.generation_seconds)
        jitter = max(0.0, behaviour.generation_jitter)
        with self._lock:
            duration = self._random.uniform(mean * (1 - jitter), mean * (1 + jitter)) if jitter else mean
            created = time.time()
            # Shaped like upstream ids (MongoDB ObjectIds): a hex timestamp, then random bytes.
            task_id = behaviour.fixed_task_id or f"{int(created):08x}{secrets.token_hex(8)}"
            self._images.pop(task_id, None)
            task = _Task(
                id=task_id,
                model=body["model"],
                prompt=body["prompt"],
                ar=body.get("ar"),
                images=list(body.get("images", [])),
                created=created,
                duration=max(0.0, duration),
                final_status=behaviour.final_status,
                working_status=behaviour.working_status,
                image_format=image_format,
                image_size=(int(behaviour.image_size[0]), int(behaviour.image_size[1])),
                cost=behaviour.cost,
            )
            self._tasks[task_id] = task
        if behaviour.create_delay > 0:
            await anyio.sleep(behaviour.create_delay)
        answer = self._task_body(task, task.working_status or "idle", False, self._base_url(request))
        if behaviour.create_id_override is not None:
            return JSONResponse({**answer, "id": behaviour.create_id_override})
        return JSONResponse(answer)

    async def _result(self, request: Request) -> Response:
        task_id: Any
        problem: str | None = None
        if request.method == "GET":
            task_id = request.query_params.get("task_id")
        else:
            body, problem = await _read_json(request)
            task_id = body.get("task_id") if isinstance(body, dict) else None
        if not self._authorized(request):
            return _code_error(2)
        code = self.behaviour.result_code
        if code:
            return _code_error(code, [_issue(["task_id"], "the stand-in was told to refuse")])
        if problem is not None:
            return _code_error(3, [_issue([], problem)])
        if not isinstance(task_id, str) or not task_id:
            return _code_error(3, [_issue(["task_id"], "Required")])
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None:
                return _code_error(4)
            stats = self.stats
            stats.result_calls_by_task[task_id] = stats.result_calls_by_task.get(task_id, 0) + 1
            in_flight = self._polls_in_flight[task_id] = self._polls_in_flight.get(task_id, 0) + 1
            peaks = stats.max_concurrent_result_calls_by_task
            peaks[task_id] = max(peaks.get(task_id, 0), in_flight)
            status, ended = self._status(task, time.time())
        try:
            if self.behaviour.result_delay > 0:
                await anyio.sleep(self.behaviour.result_delay)
        finally:
            with self._lock:
                self._polls_in_flight[task_id] -= 1
        body = self._task_body(task, status, ended, self._base_url(request))
        if self.behaviour.result_padding:
            body["padding"] = "x" * self.behaviour.result_padding
        return JSONResponse(body)

    def _balance(self, request: Request) -> Response:
        if not self._authorized(request):
            error = {"message": "Invalid API key", "type": "invalid_request_error", "code": "invalid_api_key"}
            return JSONResponse({"error": error}, status_code=401)
        behaviour = self.behaviour
        return JSONResponse(
            {
                "object": "balance",
                "balance": behaviour.balance,
                "creditLimit": behaviour.credit_limit,
                "orgId": "org-standin",
            }
        )

    async def _file(self, request: Request) -> Response:
        name: str = request.path_params["name"]
        behaviour = self.behaviour
        with self._lock:
            self.stats.download_calls += 1
            header = request.headers.get("authorization")
            if header is not None:
                self.stats.file_auth_headers.append(header)
            task = self._tasks.get(name[:24])
            if task is not None:
                by_task = self.stats.download_calls_by_task
                by_task[task.id] = by_task.get(task.id, 0) + 1
            ready = (
                task is not None
                and name == task.file_name
                and not task.expired
                and self._status(task, time.time()) == ("done", True)
            )
        if task is None or not ready:
            return Response(_NO_SUCH_KEY, 404, media_type="application/xml")
        if behaviour.download_redirect_to is not None:
            location = self._link(behaviour.download_redirect_to, request.url.path, self._base_url(request))
            return Response(status_code=302, headers={"Location": location})
        if behaviour.download_status != 200:
            return PlainTextResponse(f"HTTP {behaviour.download_status}", behaviour.download_status)
        override = behaviour.download_bytes_override
        # Encoding a large WebP takes tens of milliseconds: keep it off the event loop.
        payload = override if override is not None else await anyio.to_thread.run_sync(self._image_for, task)
        truncate_at = behaviour.download_truncate_at
        fault = self._draw_fault(behaviour.download_fault_rate, behaviour.download_fault_kinds)
        if fault is not None:
            self._count_fault("download", fault)
            if fault == "http503":
                return PlainTextResponse("503 Service Temporarily Unavailable", 503)
            if fault != "truncate":
                raise ValueError(
                    f"unknown download fault kind {fault!r}: use one of {', '.join(DOWNLOAD_FAULT_KINDS)}"
                )
            truncate_at = len(payload) // 2
        return _FileResponse(
            payload,
            _FORMATS[task.image_format][1],
            behaviour.download_delay,
            truncate_at,
            self._drop_connection,
            pause_at=behaviour.download_pause_at,
            trickle_seconds=behaviour.download_trickle_seconds,
            on_served=functools.partial(self._served, task.id),
        )

    def _served(self, task_id: str) -> None:
        with self._lock:
            served = self.stats.downloads_served_by_task
            served[task_id] = served.get(task_id, 0) + 1


def main(argv: list[str] | None = None) -> None:
    """Serve the stand-in in the foreground until Ctrl-C."""
    parser = argparse.ArgumentParser(
        prog="python tests/standin.py",
        description="A local stand-in for GPTunnel's media API (for tests, benchmarks and sandboxes).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port (default: 8765)")
    parser.add_argument("--api-key", default=None, help="the only key accepted (default: accept any key)")
    parser.add_argument("--generation-seconds", type=float, default=Behaviour.generation_seconds)
    parser.add_argument("--generation-jitter", type=float, default=Behaviour.generation_jitter)
    parser.add_argument("--image-format", choices=sorted(_FORMATS), default=Behaviour.image_format)
    parser.add_argument("--final-status", default=Behaviour.final_status)
    parser.add_argument(
        "--fault-rate",
        type=float,
        default=Behaviour.fault_rate,
        help="probability of a random transient fault",
    )
    parser.add_argument("--seed", type=int, default=None, help="seed of jitter and random faults")
    args = parser.parse_args(argv)
    behaviour = Behaviour(
        generation_seconds=args.generation_seconds,
        generation_jitter=args.generation_jitter,
        image_format=args.image_format,
        final_status=args.final_status,
        fault_rate=args.fault_rate,
    )
    standin = StandIn(
        api_key=args.api_key, behaviour=behaviour, host=args.host, port=args.port, seed=args.seed
    )
    # The handler goes in before the address is announced: a Ctrl-C that lands between the
    # announcement and the wait must still stop the stand-in cleanly.
    interrupted = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: interrupted.set())
    standin.start()
    try:
        print(f"GPTunnel stand-in listening on {standin.url} (Ctrl-C to stop)", file=sys.stderr, flush=True)
        interrupted.wait()
    finally:
        standin.stop()


if __name__ == "__main__":
    main()
