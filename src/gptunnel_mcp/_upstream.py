"""The GPTunnel media API over HTTP: one request per call, every failure mapped to one exception.

Retrying is the caller's decision (see `_engine`), made from the exception type: a
`TransientUpstreamError` may be retried, anything else may not. For create this matters for
money: a failure after which the request may have reached GPTunnel is reported as
`UnknownCreateOutcomeError`, never as transient, so nobody retries into a second charge.
"""

from __future__ import annotations

import json
import math
import re
from typing import TYPE_CHECKING, Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator

from ._exceptions import (
    AuthenticationError,
    ContentRefusedError,
    InsufficientBalanceError,
    InvalidRequestError,
    ModelRestrictedError,
    TaskNotFoundError,
    TransientUpstreamError,
    UnknownCreateOutcomeError,
    UpstreamError,
)
from ._records import TaskStatus
from ._request import ImageRequest
from ._schedule import parse_retry_after

if TYPE_CHECKING:
    from ._httpx import httpx

_FAILED_STATUSES = frozenset({"failed", "error", "cancelled", "canceled"})
#: The texts by which GPTunnel, or a model provider behind it, says a task is still being made.
_WORKING_STATUSES = frozenset(
    {"idle", "processing", "running", "queued", "pending", "in_progress", "started"}
)

#: The dearest cost believed of one task, in roubles: an image costs tens of roubles at most, and
#: a figure far beyond any price is a broken answer, which must not eat a daily budget.
MAX_TASK_COST = 100_000.0
#: A cost given as text: digits with a decimal point or comma ("12.50", "12,50"), nothing else.
_COST_TEXT = re.compile(r"\s*([0-9]{1,9})(?:[.,]([0-9]{1,9}))?\s*")


def parse_cost(value: Any) -> float | None:
    """A task's cost in roubles from GPTunnel's `cost` field (a number or numeric text), or None
    for anything that is not a plausible one: the field is undocumented, so it is trusted no
    further than a sane figure."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        matched = _COST_TEXT.fullmatch(value)
        if matched is None:
            return None
        whole, fraction = matched.groups()
        value = float(f"{whole}.{fraction or 0}")
    if not isinstance(value, (int, float)):
        return None
    try:
        cost = float(value)
    except OverflowError:  # an integer too large for a float
        return None
    return cost if math.isfinite(cost) and 0 <= cost <= MAX_TASK_COST else None


class UpstreamTask(BaseModel):
    """A task as GPTunnel's create and result calls describe it (`code` already checked)."""

    model_config = ConfigDict(extra="allow")

    id: str
    model: str | None = None
    prompt: str | None = None
    created_at: float | None = None
    status: str = "idle"
    url: str | None = None
    error: Any = None
    #: What the task cost, in roubles, when GPTunnel says (see `parse_cost`).
    cost: float | None = None

    @field_validator("cost", mode="before")
    @classmethod
    def _plausible_cost(cls, value: Any) -> float | None:
        return parse_cost(value)

    @property
    def outcome(self) -> TaskStatus:
        """What the status text means, in any case. A text not known here (GPTunnel adds models,
        and their providers' words) is pending: polling on costs nothing, while a task called
        failed that is in fact still being made would be asked for again, and paid for twice."""
        status = _normal(self.status)
        if status == "done":
            return "done"
        if status in _FAILED_STATUSES:
            return "failed"
        return "pending"

    @property
    def status_known(self) -> bool:
        return _normal(self.status) in _WORKING_STATUSES | _FAILED_STATUSES | {"done"}


def _normal(status: str) -> str:
    """A status text in one form: "In-Progress " is "in_progress"."""
    return status.strip().lower().replace("-", "_").replace(" ", "_")


class CreatePayload(BaseModel):
    """The body of `POST /v1/media/create`."""

    model: str
    prompt: str
    images: list[str] | None = None
    ar: str | None = None


TRANSIENT_CODES = frozenset({1, 6, 500})
#: Largest answer read from GPTunnel: its answers are a few KB (a task echoes its prompt), and
#: one that is not must not take the server's memory with it.
MAX_ANSWER_BYTES = 1024 * 1024
# Statuses by which a proxy or GPTunnel says it did not take the request on.
_REFUSED_HTTP = frozenset({429, 503})


def redact(text: str, secret: str | None) -> str:
    """Remove the key from text that came from elsewhere (an upstream message may echo it).
    Redact before cutting text short: a cut through the key leaves most of it unmatched."""
    return text.replace(secret, "[redacted]") if secret else text


def _redacted(value: Any, secret: str) -> Any:
    """A parsed JSON answer with the key removed from every string in it, so that no later use
    (messages, issues, a task's error, its link) can show the key, however it cuts the text."""
    if isinstance(value, str):
        return redact(value, secret)
    if isinstance(value, list):
        return [_redacted(item, secret) for item in value]
    if isinstance(value, dict):
        return {redact(k, secret): _redacted(v, secret) for k, v in value.items()}
    return value


class Balance(BaseModel):
    """The account's money, as `GET /v1/balance` reports it (roubles)."""

    balance: float
    credit_limit: float = Field(default=0.0, validation_alias=AliasChoices("creditLimit", "credit_limit"))


class GPTunnelClient:
    """Calls GPTunnel's endpoints. The key is given per call, so one connection pool serves every
    user of a multi-user server."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
        redact_keys: bool = True,
    ) -> None:
        self._base_url = base_url
        #: Off only for an upstream that never echoes a key (the sandbox): its keys are no secrets
        #: and may be plain words ("sandbox" is in its links), which redaction would mangle.
        self._redact_keys = redact_keys
        self._timeout = timeout
        self._transport = transport
        self._client: httpx.AsyncClient | None = None

    @property
    def _http(self) -> httpx.AsyncClient:
        # Made on first use: importing httpx is a tenth of the server's start-up time.
        if self._client is None:
            from ._httpx import httpx, ssl_context

            self._client = httpx.AsyncClient(
                verify=ssl_context(),
                base_url=self._base_url,
                headers={"User-Agent": _user_agent()},
                timeout=httpx.Timeout(self._timeout, connect=min(self._timeout, 10.0)),
                transport=self._transport,
                follow_redirects=False,
                # Enough connections that concurrent jobs rarely queue: httpcore re-scans its queue
                # of waiting requests on every release, which costs more than extra sockets.
                limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
            )
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def create(self, request: ImageRequest, key: str) -> UpstreamTask:
        body = CreatePayload(
            model=request.model, prompt=request.prompt, images=request.images or None, ar=request.aspect_ratio
        ).model_dump(exclude_none=True)
        return _task(await self._send("POST", "/v1/media/create", key, body, create=True), create=True)

    async def result(self, task_id: str, key: str) -> UpstreamTask:
        body = await self._send("POST", "/v1/media/result", key, {"task_id": task_id}, create=False)
        return _task(body, create=False)

    async def balance(self, key: str) -> Balance:
        body = await self._send("GET", "/v1/balance", key, None, create=False)
        try:
            return Balance.model_validate(body)
        except ValidationError:
            raise TransientUpstreamError("GPTunnel's balance answer had no balance in it") from None

    async def _send(
        self, method: str, path: str, key: str, body: dict[str, Any] | None, *, create: bool
    ) -> dict[str, Any]:
        from ._httpx import httpx

        secret = key if self._redact_keys else ""
        try:
            async with self._http.stream(method, path, json=body, headers={"Authorization": key}) as response:
                content = await _read_capped(response)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            # Nothing was sent: safe to retry, even a create.
            raise TransientUpstreamError(f"cannot reach GPTunnel ({_describe(exc, secret)})") from None
        except httpx.HTTPError as exc:
            if create:
                raise UnknownCreateOutcomeError(_unknown_create(_describe(exc, secret))) from None
            raise TransientUpstreamError(f"GPTunnel did not answer ({_describe(exc, secret)})") from None
        return _check(response, content, create=create, key=secret)


async def _read_capped(response: httpx.Response) -> bytes | None:
    """The answer's body; None, read no further, when it is larger than any GPTunnel gives."""
    declared = response.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > MAX_ANSWER_BYTES:
        return None
    content = bytearray()
    async for chunk in response.aiter_bytes():
        content += chunk
        if len(content) > MAX_ANSWER_BYTES:
            return None
    return bytes(content)


def _user_agent() -> str:
    from ._version import __version__

    return f"gptunnel-mcp/{__version__}"


def _describe(exc: httpx.HTTPError, key: str) -> str:
    # Protocol errors quote the bytes the server sent, which may echo the key.
    said = redact(str(exc), key)
    return type(exc).__name__ if not said else f"{type(exc).__name__}: {said[:200]}"


def _unknown_create(reason: str) -> str:
    return (
        f"the request to create the image was sent but its answer was lost ({reason}). It was not "
        "retried, so you are not charged twice. The image may still be made: check your GPTunnel "
        "account before asking for it again."
    )


def _check(response: httpx.Response, content: bytes | None, *, create: bool, key: str) -> dict[str, Any]:
    """Turn any non-success answer into the matching exception; return the JSON body otherwise.
    `content` is the body, None if it was too large to read."""
    status = response.status_code
    if status in (401, 403):
        raise AuthenticationError(_bad_key(f"HTTP {status}"))
    if status in _REFUSED_HTTP or (status >= 500 and not create):
        raise TransientUpstreamError(
            f"GPTunnel is unavailable (HTTP {status})",
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
        )
    if status >= 500:
        raise UnknownCreateOutcomeError(_unknown_create(f"HTTP {status}"))
    try:
        body = None if content is None else _redacted(json.loads(content), key)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        body = None
    if not isinstance(body, dict):
        said = (
            "a body that is not a JSON object"
            if content is not None
            else f"a body over {MAX_ANSWER_BYTES // 1024} KiB"
        )
        reason = f"HTTP {status} with {said}"
        if create:
            raise UnknownCreateOutcomeError(_unknown_create(reason))
        raise TransientUpstreamError(f"GPTunnel answered {reason}")
    code = body.get("code", 0)
    if status >= 400 and not code:
        raise UpstreamError(f"GPTunnel answered HTTP {status}: {_message(body)}")
    if code:
        raise _code_error(code if isinstance(code, int) else -1, body)
    return body


def _message(body: dict[str, Any]) -> str:
    """GPTunnel's own words, from either error style it uses, cut to a readable length."""
    error = body.get("error")
    if isinstance(error, dict):
        error = error.get("message")
    text = error or body.get("message") or body.get("msg") or ""
    return str(text)[:300]


def _bad_key(reason: str) -> str:
    return (
        f"GPTunnel rejected the API key ({reason}). Set GPTUNNEL_API_KEY to a valid key from your "
        "GPTunnel account (it is sent as-is, without 'Bearer')."
    )


def _code_error(code: int, body: dict[str, Any]) -> UpstreamError | TaskNotFoundError:
    said = _message(body)
    detail = f": {said}" if said else ""
    if code in TRANSIENT_CODES:
        what = "is under heavy load" if code == 6 else "had an internal error"
        return TransientUpstreamError(f"GPTunnel {what} (code {code}){detail}", code=code)
    if code == 2:
        return AuthenticationError(_bad_key("code 2"), code=code)
    if code == 3:
        issues = body.get("issues")
        listed = f"; issues: {json.dumps(issues, ensure_ascii=False)[:500]}" if issues else ""
        return InvalidRequestError(
            f"GPTunnel rejected the request as invalid (code 3){detail}{listed}. "
            "Fix the request and try again.",
            code=code,
        )
    if code == 4:
        return TaskNotFoundError(None, upstream=True)
    if code == 5:
        return InsufficientBalanceError(
            "the GPTunnel balance is too low for this request (code 5). Top up the account, or "
            "use a cheaper model such as gpt-image-1-low.",
            code=code,
        )
    if code == 7:
        return ModelRestrictedError(
            "your GPTunnel organization may not use this model (code 7). Choose another model, or "
            "ask the organization's administrator to allow it.",
            code=code,
        )
    if code in (1001, 1002):
        what = (
            "found sensitive content in the prompt or the reference images"
            if code == 1001
            else "refused the prompt in its content safety check"
        )
        return ContentRefusedError(
            f"GPTunnel {what} (code {code}){detail}. Rephrase the prompt or use other images; "
            "asking again unchanged will be refused again.",
            code=code,
        )
    if code == 99:
        return UpstreamError(
            "GPTunnel does not know this API method (code 99). Check GPTUNNEL_BASE_URL: it should "
            "be the API's root, e.g. https://gptunnel.ru.",
            code=code,
        )
    return UpstreamError(f"GPTunnel answered with error code {code}{detail}.", code=code)


def _task(body: dict[str, Any], *, create: bool) -> UpstreamTask:
    try:
        return UpstreamTask.model_validate(body)
    except ValidationError:
        reason = f"the answer did not describe a task: {json.dumps(body)[:200]}"
        if create:
            raise UnknownCreateOutcomeError(_unknown_create(reason)) from None
        raise TransientUpstreamError(f"GPTunnel's {reason}") from None
