"""Every way GPTunnel can answer, mapped to the right exception (unit tests over a mock transport)."""

from __future__ import annotations

import json
from collections.abc import Callable

import anyio
import pytest

from gptunnel_mcp import (
    AuthenticationError,
    ContentRefusedError,
    ImageRequest,
    InsufficientBalanceError,
    InvalidRequestError,
    ModelRestrictedError,
    TaskNotFoundError,
    TransientUpstreamError,
    UnknownCreateOutcomeError,
    UpstreamError,
)
from gptunnel_mcp._httpx import httpx
from gptunnel_mcp._upstream import GPTunnelClient, UpstreamTask

KEY = "sk-secret-key-123"
TASK_ID = "687fab1e49832bb77d34db47"
TASK = {"code": 0, "id": TASK_ID, "model": "m", "prompt": "p", "created_at": 1, "status": "idle"}

Handler = Callable[[httpx.Request], httpx.Response]


def call(handler: Handler, op: str, request: ImageRequest | None = None) -> object:
    async def run() -> object:
        client = GPTunnelClient("http://gptunnel.test", transport=httpx.MockTransport(handler))
        try:
            if op == "create":
                return await client.create(request or ImageRequest(model="m", prompt="p"), KEY)
            if op == "balance":
                return await client.balance(KEY)
            return await client.result(TASK_ID, KEY)
        finally:
            await client.aclose()

    return anyio.run(run)


def answer(status: int = 200, body: object = None, **headers: str) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.Response(status, content=content, headers=headers)

    return handler


def test_key_is_sent_bare_and_body_matches_the_api() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=TASK)

    task = call(handler, "create")
    with_options = ImageRequest(model="m", prompt="p", aspect_ratio="16:9", images=["https://x.test/a.png"])
    call(handler, "create", with_options)
    call(handler, "result")
    assert [r.headers["Authorization"] for r in seen] == [KEY, KEY, KEY]
    assert [r.url.path for r in seen] == ["/v1/media/create", "/v1/media/create", "/v1/media/result"]
    # Options left out are left out of the body, not sent as null.
    assert json.loads(seen[0].content) == {"model": "m", "prompt": "p"}
    assert json.loads(seen[1].content) == {
        "model": "m",
        "prompt": "p",
        "ar": "16:9",
        "images": ["https://x.test/a.png"],
    }
    assert json.loads(seen[2].content) == {"task_id": TASK_ID}
    assert task.id == TASK_ID  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("code", "error", "words"),
    [
        (2, AuthenticationError, "GPTUNNEL_API_KEY"),
        (3, InvalidRequestError, "invalid"),
        (5, InsufficientBalanceError, "balance"),
        (7, ModelRestrictedError, "may not use this model"),
        (1001, ContentRefusedError, "sensitive content"),
        (1002, ContentRefusedError, "safety"),
        (99, UpstreamError, "GPTUNNEL_BASE_URL"),
        (42, UpstreamError, "code 42"),
    ],
)
def test_permanent_codes_map_to_actionable_errors(code: int, error: type[UpstreamError], words: str) -> None:
    with pytest.raises(error) as info:
        call(answer(200, {"code": code, "error": "upstream says no"}), "result")
    assert words in str(info.value)
    assert info.value.code == code and not info.value.retryable


def test_code_4_is_a_task_gptunnel_does_not_know() -> None:
    with pytest.raises(TaskNotFoundError) as info:
        call(answer(200, {"code": 4, "error": "record not found"}), "result")
    assert info.value.upstream and "no task" in str(info.value)


def test_invalid_input_carries_the_upstream_issues() -> None:
    body = {"code": 3, "error": "bad", "issues": [{"path": ["ar"], "message": "Invalid enum value"}]}
    with pytest.raises(InvalidRequestError, match="Invalid enum value"):
        call(answer(200, body), "create")


@pytest.mark.parametrize("code", [1, 6, 500])
@pytest.mark.parametrize("op", ["create", "result"])
def test_transient_codes_are_retryable_even_for_create(code: int, op: str) -> None:
    with pytest.raises(TransientUpstreamError) as info:
        call(answer(200, {"code": code}), op)
    assert info.value.retryable and info.value.code == code


def test_429_is_transient_and_carries_retry_after() -> None:
    with pytest.raises(TransientUpstreamError) as info:
        call(answer(429, {"error": "slow down"}, **{"Retry-After": "4"}), "create")
    assert info.value.retry_after == 4.0


@pytest.mark.parametrize("status", [500, 502, 504])
def test_5xx_is_transient_for_result_but_unknown_outcome_for_create(status: int) -> None:
    with pytest.raises(TransientUpstreamError):
        call(answer(status, b"oops"), "result")
    with pytest.raises(UnknownCreateOutcomeError, match="not charged twice") as info:
        call(answer(status, b"oops"), "create")
    assert not info.value.retryable


def test_503_on_create_is_safe_to_retry() -> None:
    with pytest.raises(TransientUpstreamError):
        call(answer(503, b"unavailable"), "create")


def test_non_json_body() -> None:
    with pytest.raises(TransientUpstreamError, match="not a JSON object"):
        call(answer(200, b"<html>gateway</html>"), "result")
    with pytest.raises(UnknownCreateOutcomeError):
        call(answer(200, b"<html>gateway</html>"), "create")


def test_an_answer_that_is_no_task_is_unknown_outcome_for_create() -> None:
    with pytest.raises(UnknownCreateOutcomeError, match="did not describe a task"):
        call(answer(200, {"code": 0, "status": "idle"}), "create")
    with pytest.raises(TransientUpstreamError, match="did not describe a task"):
        call(answer(200, {"code": 0, "status": "idle"}), "result")


def test_balance_reads_both_amounts() -> None:
    body = {"object": "balance", "balance": 12.5, "creditLimit": 3, "orgId": "o"}
    balance = call(answer(200, body), "balance")
    assert (balance.balance, balance.credit_limit) == (12.5, 3.0)  # type: ignore[attr-defined]


def test_openai_style_401_is_an_authentication_error() -> None:
    body = {
        "error": {"message": "Invalid API key", "type": "invalid_request_error", "code": "invalid_api_key"}
    }
    for op in ("result", "balance"):
        with pytest.raises(AuthenticationError, match="HTTP 401"):
            call(answer(401, body), op)


def test_connection_refused_is_transient_even_for_create() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(TransientUpstreamError):
        call(refuse, "create")


def test_lost_answer_after_sending_a_create_is_never_retryable() -> None:
    def timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    with pytest.raises(UnknownCreateOutcomeError):
        call(timeout, "create")
    with pytest.raises(TransientUpstreamError):
        call(timeout, "result")


def test_the_key_never_appears_in_an_error_even_when_upstream_echoes_it() -> None:
    body = {"code": 3, "error": f"token {KEY} is weird", "issues": [{"message": KEY}]}
    with pytest.raises(InvalidRequestError) as info:
        call(answer(200, body), "create")
    assert KEY not in str(info.value)
    assert "[redacted]" in str(info.value)
    for status in (400, 422):
        with pytest.raises(UpstreamError) as plain:
            call(answer(status, {"error": f"bad token {KEY}"}), "result")
        assert KEY not in str(plain.value) and f"HTTP {status}" in str(plain.value)


@pytest.mark.parametrize(
    ("cost", "read"),
    [
        (b"12", 12.0),
        (b"0.5", 0.5),
        (b"0", 0.0),
        (b'"12.50"', 12.5),
        (b'"12,50"', 12.5),
        (b'" 7 "', 7.0),
        # Hostile or broken: ignored, never an error.
        (b"-3", None),
        (b'"-3"', None),
        (b"NaN", None),
        (b"Infinity", None),
        (b"1e400", None),
        (b"1" + b"0" * 400, None),
        (b"1000000000", None),
        (b'"1e3"', None),
        (b'"12 RUB"', None),
        (b'"\\u0661\\u0662"', None),  # digits of another script
        (b'"NaN"', None),
        (b'""', None),
        (b"true", None),
        (b"null", None),
        (b"[1]", None),
        (b'{"rub": 1}', None),
    ],
)
def test_a_reported_cost_is_read_when_plausible_and_ignored_otherwise(
    cost: bytes, read: float | None
) -> None:
    body = json.dumps({**TASK, "status": "done", "url": "https://x.test/1.png"}).encode()[:-1] + b', "cost": '
    task = call(answer(200, body + cost + b"}"), "result")
    assert isinstance(task, UpstreamTask) and task.cost == read and task.outcome == "done"
