"""Every way GPTunnel can answer, mapped to the right exception (unit tests over httpx.MockTransport)."""

from __future__ import annotations

import json
from collections.abc import Callable

import anyio
import httpx
import pytest

from gptunnel_mcp import (
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
from gptunnel_mcp._client import GPTunnelClient
from gptunnel_mcp._models import CreatePayload

KEY = "sk-secret-key-123"
TASK = {
    "code": 0,
    "id": "687fab1e49832bb77d34db47",
    "model": "m",
    "prompt": "p",
    "created_at": 1,
    "status": "idle",
}


def call(handler: Callable[[httpx.Request], httpx.Response], op: str) -> object:
    async def run() -> object:
        client = GPTunnelClient("http://gptunnel.test", transport=httpx.MockTransport(handler))
        try:
            if op == "create":
                return await client.create(CreatePayload(model="m", prompt="p"), KEY)
            if op == "balance":
                return await client.balance(KEY)
            return await client.result("687fab1e49832bb77d34db47", KEY)
        finally:
            await client.aclose()

    return anyio.run(run)


def answer(
    status: int = 200, body: object = None, **headers: str
) -> Callable[[httpx.Request], httpx.Response]:
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
    assert seen[0].headers["Authorization"] == KEY
    assert seen[0].url.path == "/v1/media/create"
    assert json.loads(seen[0].content) == {"model": "m", "prompt": "p"}
    assert task.id == TASK["id"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("code", "error", "words"),
    [
        (2, AuthenticationError, "GPTUNNEL_API_KEY"),
        (3, InvalidRequestError, "invalid"),
        (4, TaskNotFoundError, "no task"),
        (5, InsufficientBalanceError, "balance"),
        (7, ModelRestrictedError, "may not use this model"),
        (1001, ContentRefusedError, "sensitive content"),
        (1002, ContentRefusedError, "safety"),
        (99, UpstreamError, "GPTUNNEL_BASE_URL"),
        (42, UpstreamError, "code 42"),
    ],
)
def test_permanent_codes_map_to_actionable_errors(code: int, error: type[Exception], words: str) -> None:
    with pytest.raises(error) as info:
        call(answer(200, {"code": code, "error": "upstream says no"}), "result")
    assert words in str(info.value)
    assert not getattr(info.value, "retryable", False)


def test_invalid_input_carries_the_upstream_issues() -> None:
    body = {"code": 3, "error": "bad", "issues": [{"path": ["ar"], "message": "Invalid enum value"}]}
    with pytest.raises(InvalidRequestError, match="Invalid enum value"):
        call(answer(200, body), "create")


@pytest.mark.parametrize("code", [1, 6, 500])
@pytest.mark.parametrize("op", ["create", "result"])
def test_transient_codes_are_retryable_even_for_create(code: int, op: str) -> None:
    with pytest.raises(TransientUpstreamError):
        call(answer(200, {"code": code}), op)


def test_429_is_transient_and_carries_retry_after() -> None:
    with pytest.raises(TransientUpstreamError) as info:
        call(answer(429, {"error": "slow down"}, **{"Retry-After": "4"}), "create")
    assert info.value.retry_after == 4.0


@pytest.mark.parametrize("status", [500, 502, 504])
def test_5xx_is_transient_for_result_but_unknown_outcome_for_create(status: int) -> None:
    with pytest.raises(TransientUpstreamError):
        call(answer(status, b"oops"), "result")
    with pytest.raises(UnknownCreateOutcomeError, match="not charged twice"):
        call(answer(status, b"oops"), "create")


def test_503_on_create_is_safe_to_retry() -> None:
    with pytest.raises(TransientUpstreamError):
        call(answer(503, b"unavailable"), "create")


def test_non_json_body() -> None:
    with pytest.raises(TransientUpstreamError, match="not a JSON object"):
        call(answer(200, b"<html>gateway</html>"), "result")
    with pytest.raises(UnknownCreateOutcomeError):
        call(answer(200, b"<html>gateway</html>"), "create")


def test_balance_reads_both_amounts() -> None:
    body = {"object": "balance", "balance": 12.5, "creditLimit": 3, "orgId": "o"}
    balance = call(answer(200, body), "balance")
    assert (balance.balance, balance.credit_limit) == (12.5, 3.0)  # type: ignore[attr-defined]


def test_openai_style_401_is_an_authentication_error() -> None:
    body = {
        "error": {"message": "Invalid API key", "type": "invalid_request_error", "code": "invalid_api_key"}
    }
    for op in ("result", "balance"):
        with pytest.raises(AuthenticationError):
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
