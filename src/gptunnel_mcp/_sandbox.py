"""The sandbox's upstream: a fake GPTunnel media API that runs inside the server process.

:class:`Sandbox` is a small Starlette app reached through an ASGI transport, so sandbox mode needs
no thread, no port and no network. It answers like GPTunnel (see the project's notes on the
upstream media API): ``POST /v1/media/create``, ``POST``/``GET /v1/media/result``,
``GET /v1/balance``, HTTP 200 with ``code`` 99 for any other ``/v1`` path, and the finished
pictures under ``/files/<id>.png`` on the same origin. Any Authorization header is accepted.

A task's status is a function of the clock (``idle`` for the first 20 % of its generation time,
``processing`` until its end, then ``done``), so a task record never changes once written. Each
record is one JSON file in ``state_dir``, which is how tasks survive a restart of the server.

:func:`render_image` draws the picture: a background derived from the prompt and the prompt itself
as text, in the vendored DejaVu Sans subset (Latin and Cyrillic), at the size of the task's ``ar``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio.to_thread
import httpx2 as httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

if TYPE_CHECKING:
    from PIL import ImageFont

__all__ = ["ASPECT_SIZES", "FONT_PATH", "Sandbox", "render_image"]

#: Pixel size of the picture for each ``ar`` the endpoint accepts; every ratio is exact.
ASPECT_SIZES: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "16:9": (1344, 756),
    "9:16": (756, 1344),
    "4:3": (1152, 864),
    "3:4": (864, 1152),
    "21:9": (1512, 648),
    "9:21": (648, 1512),
}

#: DejaVu Sans cut down to Latin, Cyrillic, punctuation and a few symbols (licence beside it).
FONT_PATH: Path = Path(__file__).parent / "fonts" / "DejaVuSans-subset.ttf"

_DEFAULT_SIZE = ASPECT_SIZES["1:1"]
_TASK_ID = re.compile(r"[0-9a-f]{24}")
_FILE_NAME = re.compile(r"([0-9a-f]{24})\.png")
# Longer prompts could not fit on the picture anyway, and wrapping cost grows with the length.
_MAX_DRAWN_CHARS = 1000
_random = secrets.SystemRandom()


@dataclass(frozen=True)
class _Task:
    id: str
    model: str
    prompt: str
    ar: str | None
    created: float
    duration: float

    def status(self, now: float) -> str:
        elapsed = now - self.created
        if elapsed >= self.duration:
            return "done"
        return "idle" if elapsed < 0.2 * self.duration else "processing"


class Sandbox:
    """A fake GPTunnel whose tasks are kept in ``state_dir`` and finish ``generation_seconds`` after
    they were created, give or take ``jitter`` (a fraction of it)."""

    base_url: str = "http://sandbox.gptunnel.invalid"

    def __init__(self, state_dir: Path, *, generation_seconds: float = 3.0, jitter: float = 0.3) -> None:
        self._state_dir = state_dir
        self._generation_seconds = max(0.0, generation_seconds)
        self._jitter = max(0.0, jitter)
        self._app = Starlette(
            routes=[
                Route("/v1/media/create", self._create, methods=["POST"]),
                Route("/v1/media/result", self._result, methods=["GET", "POST"]),
                Route("/v1/balance", self._balance, methods=["GET"]),
                Route(
                    "/v1/{rest:path}",
                    self._unknown_method,
                    methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
                ),
                Route("/files/{name}", self._file, methods=["GET"]),
            ]
        )

    def transport(self) -> httpx.ASGITransport:
        # A failure in the fake should look like a broken upstream (HTTP 500), which the client
        # is built to survive, not an exception raised out of the client's request.
        return httpx.ASGITransport(app=self._app, raise_app_exceptions=False)

    # --- Task records ------------------------------------------------------------------------

    def _path(self, task_id: str) -> Path:
        return self._state_dir / f"{task_id}.json"

    def _save(self, task: _Task) -> None:
        path = self._path(task.id)
        # Private whatever the umask, like the rest of the home: the records hold the prompts.
        self._state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Ids are unique, so is the temporary name; the replace means another process reading
        # the folder sees either no record or a whole one.
        temporary = path.with_name(f".{task.id}.tmp")
        with os.fdopen(
            os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8"
        ) as file:
            file.write(json.dumps(asdict(task), ensure_ascii=False))
        os.replace(temporary, path)

    def _load(self, task_id: str) -> _Task | None:
        # Checked before the id goes near a path: "../x" must not name a file outside the folder.
        if not _TASK_ID.fullmatch(task_id):
            return None
        try:
            record = json.loads(self._path(task_id).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        return _Task(**record)

    # --- Endpoints ---------------------------------------------------------------------------

    async def _create(self, request: Request) -> Response:
        body = await _json_body(request)
        issues = _create_issues(body)
        if issues:
            return _error(3, "invalid input: check the request schema", issues)
        created = time.time()
        spread = self._generation_seconds * self._jitter
        task = _Task(
            # Shaped like upstream ids (MongoDB ObjectIds): a hex timestamp, then random bytes.
            id=f"{int(created):08x}{secrets.token_hex(8)}",
            model=body["model"],
            prompt=body["prompt"],
            ar=body.get("ar"),
            created=created,
            duration=max(
                0.0, _random.uniform(self._generation_seconds - spread, self._generation_seconds + spread)
            ),
        )
        await anyio.to_thread.run_sync(self._save, task)
        return JSONResponse(self._task_body(task, "idle"))

    async def _result(self, request: Request) -> Response:
        if request.method == "GET":
            task_id: object = request.query_params.get("task_id")
        else:
            body = await _json_body(request)
            task_id = body.get("task_id") if isinstance(body, dict) else None
        if not isinstance(task_id, str) or not task_id:
            return _error(3, "invalid input: check the request schema", [_issue(["task_id"], "Required")])
        task = await anyio.to_thread.run_sync(self._load, task_id)
        if task is None:
            return _error(4, "record not found")
        return JSONResponse(self._task_body(task, task.status(time.time())))

    async def _balance(self, request: Request) -> Response:
        return JSONResponse(
            {"object": "balance", "balance": 100.0, "creditLimit": 0.0, "orgId": "org-sandbox"}
        )

    async def _unknown_method(self, request: Request) -> Response:
        return _error(99, "API method not found")

    async def _file(self, request: Request) -> Response:
        match = _FILE_NAME.fullmatch(request.path_params["name"])
        task = await anyio.to_thread.run_sync(self._load, match.group(1)) if match else None
        if task is None or task.status(time.time()) != "done":
            return Response("not found", 404, media_type="text/plain")
        size = ASPECT_SIZES.get(task.ar or "", _DEFAULT_SIZE)
        png = await anyio.to_thread.run_sync(render_image, task.prompt, size)
        return Response(png, media_type="image/png")

    def _task_body(self, task: _Task, status: str) -> dict[str, Any]:
        return {
            "code": 0,
            "id": task.id,
            "model": task.model,
            "prompt": task.prompt,
            "created_at": int(task.created),
            "status": status,
            "url": f"{self.base_url}/files/{task.id}.png" if status == "done" else None,
        }


async def _json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except ValueError:  # not JSON, or not UTF-8
        return None


def _issue(path: list[str | int], message: str) -> dict[str, Any]:
    return {"path": path, "message": message}


def _error(code: int, message: str, issues: list[dict[str, Any]] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "error": message}
    if issues is not None:
        body["issues"] = issues
    return JSONResponse(body)


def _create_issues(body: Any) -> list[dict[str, Any]]:
    """What is wrong with a create request, in the shape of GPTunnel's ``issues``; empty if nothing."""
    if not isinstance(body, dict):
        return [_issue([], "Expected a JSON object as the request body")]
    issues = [
        _issue([name], "Expected a non-empty string")
        for name in ("model", "prompt")
        if not isinstance(body.get(name), str) or not body[name]
    ]
    images = body.get("images")
    if images is not None and not (
        isinstance(images, list)
        and all(isinstance(url, str) and url.startswith(("http://", "https://")) for url in images)
    ):
        issues.append(_issue(["images"], "Expected an array of http(s) URLs"))
    ar = body.get("ar")
    if ar is not None and ar not in ASPECT_SIZES:
        issues.append(_issue(["ar"], f"Expected one of {', '.join(ASPECT_SIZES)}, received {json.dumps(ar)}"))
    return issues


# --- The picture -----------------------------------------------------------------------------


def render_image(prompt: str, size: tuple[int, int]) -> bytes:
    """A PNG of ``size`` with ``prompt`` written on it; the same inputs give the same bytes.

    PNG rather than WebP: lossless, so the text stays crisp however small it is drawn.
    """
    from PIL import Image, ImageDraw, ImageFont

    width, height = size
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {size!r}")
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    image = Image.new("RGB", size, (digest[0] // 2 + 64, digest[1] // 2 + 64, digest[2] // 2 + 64))
    draw = ImageDraw.Draw(image)
    # Shapes, so that different prompts look different at a glance and the file is not a flat colour.
    for i in range(8):
        a, b, c, d, red, green, blue = digest[3 + i * 3 : 10 + i * 3]
        x0, y0 = a * width // 256, b * height // 256
        draw.ellipse(
            (x0, y0, x0 + (c + 32) * width // 512, y0 + (d + 32) * height // 512), fill=(red, green, blue)
        )

    # A font object per call: rendering runs in worker threads, and FreeType faces are not
    # documented as safe to share between them.
    font_size = max(12, min(width, height) // 20)
    font = ImageFont.truetype(FONT_PATH, font_size)
    margin = max(8, min(width, height) // 16)
    padding = font_size // 2
    line_height = font_size * 5 // 4
    text_width = width - 2 * (margin + padding)
    max_lines = max(1, (height - 2 * (margin + padding)) // line_height)
    lines = _wrap(prompt[:_MAX_DRAWN_CHARS], font, text_width)
    if len(lines) > max_lines or len(prompt) > _MAX_DRAWN_CHARS:
        lines = lines[:max_lines]
        lines[-1] = _fit(lines[-1], font, text_width, suffix="…")

    # The box spans the width whatever the text, so its place depends only on the number of lines.
    box_height = len(lines) * line_height + 2 * padding
    top = (height - box_height) // 2
    draw.rectangle((margin, top, width - margin, top + box_height), fill=(255, 255, 255))
    for index, line in enumerate(lines):
        draw.text((margin + padding, top + padding + index * line_height), line, fill=(0, 0, 0), font=font)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """``text`` broken into lines no wider than ``width`` pixels, at spaces where possible."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            # A word wider than a line (a URL, say) is cut wherever it overflows.
            while font.getlength(word) > width:
                head = _fit(word, font, width)
                lines.append(head)
                word = word[len(head) :]
            line = word
        lines.append(line)
    return lines


def _fit(text: str, font: ImageFont.FreeTypeFont, width: int, suffix: str = "") -> str:
    """The longest start of ``text`` (at least one character) that, followed by ``suffix``, is no
    wider than ``width``; then ``suffix``."""
    end = 1
    while end < len(text) and font.getlength(text[: end + 1] + suffix) <= width:
        end += 1
    return text[:end] + suffix
