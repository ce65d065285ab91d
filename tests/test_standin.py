"""The stand-in GPTunnel behaves like the documented API, and every knob does what it says.

One server serves the whole module (starting and stopping costs a few hundred milliseconds);
each test gets it back with default knobs, fresh counters and the test key.
"""

from __future__ import annotations

import io
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from PIL import Image

from .standin import ASPECT_RATIOS, Behaviour, StandIn, Stats, render_image

KEY = "test-key-123"
MODEL = "gpt-image-1-low"


@pytest.fixture(scope="module")
def server() -> Iterator[StandIn]:
    with StandIn(api_key=KEY) as standin:
        yield standin


@pytest.fixture
def standin(server: StandIn) -> StandIn:
    server.api_key = KEY
    server.behaviour = Behaviour(generation_seconds=0.0)
    server.stats = Stats()
    return server


@pytest.fixture(scope="module")
def module_client(server: StandIn) -> Iterator[httpx.Client]:
    # Shared because building an httpx.Client (its SSL context) costs ~50 ms.
    with httpx.Client(base_url=server.url, headers={"Authorization": KEY}, timeout=5.0) as http:
        yield http


@pytest.fixture
def client(standin: StandIn, module_client: httpx.Client) -> httpx.Client:
    return module_client


@pytest.fixture(scope="module")
def storage() -> Iterator[httpx.Client]:
    """A client without Authorization, as for object storage."""
    with httpx.Client(timeout=5.0) as http:
        yield http


def create(client: httpx.Client, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "prompt": "a red fox in the snow", **fields}
    response = client.post("/v1/media/create", json=body)
    assert response.status_code == 200
    result: dict[str, Any] = response.json()
    return result


def result(client: httpx.Client, task_id: str) -> dict[str, Any]:
    response = client.post("/v1/media/result", json={"task_id": task_id})
    assert response.status_code == 200
    answer: dict[str, Any] = response.json()
    return answer


def sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.time()))


# -- the happy path ------------------------------------------------------------------------------


def test_lifecycle_idle_processing_done_then_download(
    storage: httpx.Client, standin: StandIn, client: httpx.Client
) -> None:
    standin.behaviour.generation_seconds = 0.6
    before = time.time()
    task = create(client)
    after = time.time()
    assert re.fullmatch(r"[0-9a-f]{24}", task["id"])
    assert task == {
        "code": 0,
        "id": task["id"],
        "model": MODEL,
        "prompt": "a red fox in the snow",
        "created_at": task["created_at"],
        "status": "idle",
        "url": None,
    }
    assert isinstance(task["created_at"], int)
    assert int(before) <= task["created_at"] <= after

    assert result(client, task["id"])["status"] == "idle"
    sleep_until(after + 0.25)
    processing = result(client, task["id"])
    assert processing["status"] == "processing"
    assert processing["url"] is None
    sleep_until(after + 0.65)
    done = result(client, task["id"])
    assert done["status"] == "done"
    assert done["code"] == 0
    assert done["url"] == f"{standin.url}/files/{task['id']}-{MODEL}-original.webp"
    assert before + 0.6 <= standin.stats.task_done_at[task["id"]] <= after + 0.6

    download = storage.get(done["url"])  # no Authorization: files live on object storage
    assert download.status_code == 200
    assert download.headers["content-type"] == "image/webp"
    assert int(download.headers["content-length"]) == len(download.content)
    assert download.content == standin.image_bytes(task["id"])
    with Image.open(io.BytesIO(download.content)) as image:
        assert image.format == "WEBP"
        assert image.size == (1024, 1024)
    assert standin.task_ids()[-1] == task["id"]


def test_result_by_get_matches_post(client: httpx.Client) -> None:
    task = create(client)
    response = client.get("/v1/media/result", params={"task_id": task["id"]})
    assert response.status_code == 200
    assert response.json() == result(client, task["id"])
    assert response.json()["status"] == "done"


@pytest.mark.parametrize(
    ("fmt", "ext", "content_type"),
    [("PNG", "png", "image/png"), ("JPEG", "jpg", "image/jpeg"), ("WEBP", "webp", "image/webp")],
)
def test_image_formats_and_sizes(
    storage: httpx.Client, standin: StandIn, client: httpx.Client, fmt: str, ext: str, content_type: str
) -> None:
    standin.behaviour.image_format = fmt
    standin.behaviour.image_size = (96, 64)
    url = result(client, create(client)["id"])["url"]
    assert url.endswith(f"-original.{ext}")
    download = storage.get(url)
    assert download.headers["content-type"] == content_type
    with Image.open(io.BytesIO(download.content)) as image:
        assert image.format == fmt
        assert image.size == (96, 64)


def test_knobs_that_shape_a_task_are_read_at_create(standin: StandIn, client: httpx.Client) -> None:
    standin.behaviour.generation_seconds = 30.0
    slow = create(client)
    standin.behaviour.generation_seconds = 0.0
    assert result(client, slow["id"])["status"] == "idle"
    assert result(client, create(client)["id"])["status"] == "done"


def test_jitter_spreads_generation_times(standin: StandIn, client: httpx.Client) -> None:
    standin.behaviour.generation_seconds = 0.2
    standin.behaviour.generation_jitter = 0.5
    start = time.time()
    ids = [create(client)["id"] for _ in range(6)]
    end = time.time()
    time.sleep(0.35)
    for task_id in ids:
        assert result(client, task_id)["status"] == "done"
    done_at = [standin.stats.task_done_at[task_id] for task_id in ids]
    assert all(start + 0.1 <= moment <= end + 0.3 for moment in done_at)
    assert max(done_at) - min(done_at) > 0.01


def test_render_image_is_deterministic() -> None:
    first = render_image("a cat", (128, 96), "PNG")
    assert first == render_image("a cat", (128, 96), "PNG")
    assert first != render_image("a dog", (128, 96), "PNG")
    with Image.open(io.BytesIO(render_image("кошка на крыше", (64, 64), "WEBP"))) as image:
        assert image.size == (64, 64)
    with pytest.raises(ValueError, match="unsupported image format"):
        render_image("a cat", (64, 64), "GIF")


# -- validation and error codes ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ({"model": MODEL}, ["prompt"]),
        ({"model": MODEL, "prompt": ""}, ["prompt"]),
        ({"model": MODEL, "prompt": 5}, ["prompt"]),
        ({"prompt": "a fox"}, ["model"]),
        ({"model": "", "prompt": "a fox"}, ["model"]),
        ({"model": MODEL, "prompt": "a fox", "ar": "2:1"}, ["ar"]),
        ({"model": MODEL, "prompt": "a fox", "images": "https://x.test/a.png"}, ["images"]),
        ({"model": MODEL, "prompt": "a fox", "images": ["file:///etc/passwd"]}, ["images", 0]),
        ([1, 2], []),
    ],
)
def test_create_validation_is_code_3_with_issues(client: httpx.Client, body: Any, path: list[Any]) -> None:
    response = client.post("/v1/media/create", json=body)
    assert response.status_code == 200
    answer = response.json()
    assert answer["code"] == 3
    assert isinstance(answer["error"], str)
    assert path in [issue["path"] for issue in answer["issues"]]
    assert all(isinstance(issue["message"], str) for issue in answer["issues"])


def test_create_rejects_a_body_that_is_not_json(client: httpx.Client) -> None:
    response = client.post("/v1/media/create", content=b"prompt=fox")
    assert response.json()["code"] == 3


@pytest.mark.parametrize("ar", ASPECT_RATIOS)
def test_create_accepts_every_aspect_ratio_and_images(client: httpx.Client, ar: str) -> None:
    assert create(client, ar=ar, images=["https://example.test/ref.png"])["code"] == 0


@pytest.mark.parametrize("code", [1, 3, 5, 6, 7, 500, 1001, 1002])
def test_create_code_knob(standin: StandIn, client: httpx.Client, code: int) -> None:
    standin.behaviour.create_code = code
    tasks_before = len(standin.task_ids())
    response = client.post("/v1/media/create", json={"model": MODEL, "prompt": "a fox"})
    assert response.status_code == 200
    answer = response.json()
    assert answer["code"] == code
    assert isinstance(answer["error"], str)
    assert answer["error"]
    if code == 3:
        assert answer["issues"][0]["path"] == ["prompt"]
    assert len(standin.task_ids()) == tasks_before


@pytest.mark.parametrize("code", [1, 3, 4, 6, 500])
def test_result_code_knob(standin: StandIn, client: httpx.Client, code: int) -> None:
    task = create(client)
    standin.behaviour.result_code = code
    answer = result(client, task["id"])
    assert answer["code"] == code
    assert isinstance(answer["error"], str)
    standin.behaviour.result_code = 0
    assert result(client, task["id"])["code"] == 0


def test_result_unknown_and_missing_task(client: httpx.Client) -> None:
    unknown = result(client, "0" * 24)
    assert unknown["code"] == 4
    assert isinstance(unknown["error"], str)
    assert client.post("/v1/media/result", json={}).json()["code"] == 3
    assert client.get("/v1/media/result").json()["code"] == 3


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/media/create"),
        ("POST", "/v1/media/delete"),
        ("GET", "/v1/models"),
        ("POST", "/v1/balance"),
    ],
)
def test_unknown_api_method_is_code_99(client: httpx.Client, method: str, path: str) -> None:
    response = client.request(method, path)
    assert response.status_code == 200
    assert response.json() == {"code": 99, "error": "API method not found"}


@pytest.mark.parametrize("final", ["failed", "error"])
def test_final_status_failure(standin: StandIn, client: httpx.Client, final: str) -> None:
    standin.behaviour.final_status = final
    answer = result(client, create(client)["id"])
    assert answer["code"] == 0
    assert answer["status"] == final
    assert answer["url"] is None
    assert answer["error"].startswith("generation failed")


# -- authentication ------------------------------------------------------------------------------


@pytest.mark.parametrize("header", [None, "wrong-key", f"Bearer {KEY}"])
def test_bad_key_is_code_2_and_401_on_balance(standin: StandIn, header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    tasks_before = len(standin.task_ids())
    with httpx.Client(base_url=standin.url, headers=headers) as http:
        create_answer = http.post("/v1/media/create", json={"model": MODEL, "prompt": "a fox"})
        assert create_answer.status_code == 200
        assert create_answer.json() == {"code": 2, "error": "invalid token"}
        assert http.get("/v1/media/result", params={"task_id": "0" * 24}).json()["code"] == 2
        balance = http.get("/v1/balance")
        assert balance.status_code == 401
        assert balance.json() == {
            "error": {
                "message": "Invalid API key",
                "type": "invalid_request_error",
                "code": "invalid_api_key",
            }
        }
        for response in (create_answer, balance):
            assert KEY not in response.text
            assert header is None or header not in response.text
    assert len(standin.task_ids()) == tasks_before
    assert standin.stats.create_calls == 1
    assert standin.stats.auth_headers == ([] if header is None else [header] * 3)


def test_no_api_key_accepts_anything(standin: StandIn) -> None:
    standin.api_key = None
    with httpx.Client(base_url=standin.url) as http:
        assert http.post("/v1/media/create", json={"model": MODEL, "prompt": "a fox"}).json()["code"] == 0
        assert http.get("/v1/balance").status_code == 200


def test_balance(standin: StandIn, client: httpx.Client) -> None:
    standin.behaviour.balance = 42.5
    standin.behaviour.credit_limit = 10.0
    response = client.get("/v1/balance")
    assert response.status_code == 200
    assert response.json() == {
        "object": "balance",
        "balance": 42.5,
        "creditLimit": 10.0,
        "orgId": "org-standin",
    }
    assert standin.stats.balance_calls == 1


# -- transient failures --------------------------------------------------------------------------


def test_transient_http503_then_success(standin: StandIn, client: httpx.Client) -> None:
    standin.behaviour.transient_failures = 2
    for _ in range(2):
        response = client.post("/v1/media/create", json={"model": MODEL, "prompt": "a fox"})
        assert response.status_code == 503
        assert response.headers["content-type"].startswith("text/plain")
    assert standin.behaviour.transient_failures == 0
    assert create(client)["code"] == 0
    assert standin.stats.create_calls == 3


@pytest.mark.parametrize(("retry_after", "header"), [(2.0, "2"), (0.5, "0.5"), (None, None)])
def test_transient_http429(
    standin: StandIn, client: httpx.Client, retry_after: float | None, header: str | None
) -> None:
    standin.behaviour.transient_failures = 1
    standin.behaviour.transient_kind = "http429"
    standin.behaviour.retry_after = retry_after
    response = client.get("/v1/balance")
    assert response.status_code == 429
    assert response.headers.get("retry-after") == header
    assert client.get("/v1/balance").status_code == 200


@pytest.mark.parametrize(("kind", "code"), [("code6", 6), ("code1", 1), ("code500", 500)])
def test_transient_codes(standin: StandIn, client: httpx.Client, kind: str, code: int) -> None:
    task = create(client)
    standin.behaviour.transient_failures = 1
    standin.behaviour.transient_kind = kind
    response = client.post("/v1/media/result", json={"task_id": task["id"]})
    assert response.status_code == 200
    assert response.json()["code"] == code
    assert isinstance(response.json()["error"], str)
    assert result(client, task["id"])["code"] == 0
    assert standin.stats.result_calls == 2


def test_transient_html_body(standin: StandIn, client: httpx.Client) -> None:
    standin.behaviour.transient_failures = 1
    standin.behaviour.transient_kind = "html"
    response = client.post("/v1/media/create", json={"model": MODEL, "prompt": "a fox"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    with pytest.raises(ValueError, match="Expecting value"):
        response.json()


def test_transient_disconnect(standin: StandIn, client: httpx.Client) -> None:
    standin.behaviour.transient_failures = 1
    standin.behaviour.transient_kind = "disconnect"
    # A clean close reads as RemoteProtocolError; a reset (possible with any real proxy) as ReadError.
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        client.post("/v1/media/create", json={"model": MODEL, "prompt": "a fox"})
    assert create(client)["code"] == 0


def test_transient_failures_come_before_auth(standin: StandIn) -> None:
    standin.behaviour.transient_failures = 1
    with httpx.Client(base_url=standin.url, headers={"Authorization": "wrong"}) as http:
        assert http.get("/v1/balance").status_code == 503
        assert http.get("/v1/balance").status_code == 401


# -- downloads -----------------------------------------------------------------------------------


def test_expire_files(storage: httpx.Client, standin: StandIn, client: httpx.Client) -> None:
    old_url = result(client, create(client)["id"])["url"]
    assert storage.get(old_url).status_code == 200
    standin.expire_files()
    assert storage.get(old_url).status_code == 404
    new_url = result(client, create(client)["id"])["url"]
    assert storage.get(new_url).status_code == 200


def test_file_for_unfinished_or_unknown_task_is_404(
    storage: httpx.Client, standin: StandIn, client: httpx.Client
) -> None:
    standin.behaviour.generation_seconds = 30.0
    task = create(client)
    assert storage.get(f"{standin.url}/files/{task['id']}-{MODEL}-original.webp").status_code == 404
    assert storage.get(f"{standin.url}/files/{'0' * 24}-{MODEL}-original.webp").status_code == 404


def test_download_bytes_override(storage: httpx.Client, standin: StandIn, client: httpx.Client) -> None:
    url = result(client, create(client)["id"])["url"]
    standin.behaviour.download_bytes_override = b"<html>not an image</html>"
    response = storage.get(url)
    assert response.status_code == 200
    assert response.content == b"<html>not an image</html>"


@pytest.mark.parametrize("status", [404, 500, 403])
def test_download_status(storage: httpx.Client, standin: StandIn, client: httpx.Client, status: int) -> None:
    url = result(client, create(client)["id"])["url"]
    standin.behaviour.download_status = status
    assert storage.get(url).status_code == status


def test_download_truncated(storage: httpx.Client, standin: StandIn, client: httpx.Client) -> None:
    task = create(client)
    url = result(client, task["id"])["url"]
    standin.behaviour.download_truncate_at = 100
    with storage.stream("GET", url) as response:
        assert int(response.headers["content-length"]) == len(standin.image_bytes(task["id"]))
        with pytest.raises(httpx.RemoteProtocolError):
            response.read()


def test_download_delay(storage: httpx.Client, standin: StandIn, client: httpx.Client) -> None:
    url = result(client, create(client)["id"])["url"]
    standin.behaviour.download_delay = 0.3
    with pytest.raises(httpx.ReadTimeout):
        storage.get(url, timeout=httpx.Timeout(5.0, read=0.05))
    start = time.monotonic()
    assert storage.get(url).status_code == 200
    assert time.monotonic() - start >= 0.3


def test_result_delay_holds_polls_open_and_overlapping_ones_are_recorded(standin: StandIn) -> None:
    task_id = create_with_new_client(standin)
    standin.behaviour.result_delay = 0.3
    barrier = threading.Barrier(2)

    def poll() -> None:
        with httpx.Client(base_url=standin.url, headers={"Authorization": KEY}, timeout=5.0) as http:
            barrier.wait(timeout=5)
            http.post("/v1/media/result", json={"task_id": task_id})

    started = time.monotonic()
    threads = [threading.Thread(target=poll) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert time.monotonic() - started >= 0.3
    assert standin.stats.max_concurrent_result_calls_by_task == {task_id: 2}
    assert standin.polls_in_flight(task_id) == 0


def test_polls_one_after_another_are_never_concurrent(standin: StandIn, client: httpx.Client) -> None:
    task_id = create(client)["id"]
    for _ in range(3):
        result(client, task_id)
    assert standin.stats.result_calls_by_task == {task_id: 3}
    assert standin.stats.max_concurrent_result_calls_by_task == {task_id: 1}


def test_downloads_are_counted_by_task_and_only_whole_ones_as_served(
    storage: httpx.Client, standin: StandIn, client: httpx.Client
) -> None:
    task_id = create(client)["id"]
    url = result(client, task_id)["url"]
    # A client that gives up while the download stalls: a call, but nothing served.
    standin.behaviour.download_delay = 0.3
    standin.behaviour.download_pause_at = 100
    impatient = httpx.Timeout(5.0, read=0.1)
    with pytest.raises(httpx.ReadTimeout), storage.stream("GET", url, timeout=impatient) as response:
        response.read()
    # Stalled longer than the abandoned one took to be noticed: when it is through, so is that.
    assert storage.get(url).content == standin.image_bytes(task_id)
    assert standin.stats.download_calls_by_task == {task_id: 2}
    assert standin.stats.downloads_served_by_task == {task_id: 1}


def create_with_new_client(standin: StandIn) -> str:
    with httpx.Client(base_url=standin.url, headers={"Authorization": KEY}, timeout=5.0) as http:
        return str(create(http)["id"])


# -- counters, concurrency, lifecycle ------------------------------------------------------------


def test_stats_count_every_call(storage: httpx.Client, standin: StandIn, client: httpx.Client) -> None:
    task = create(client)
    result(client, task["id"])
    client.get("/v1/media/result", params={"task_id": task["id"]})
    client.get("/v1/balance")
    storage.get(result(client, task["id"])["url"])
    stats = standin.stats
    assert (stats.create_calls, stats.result_calls, stats.balance_calls, stats.download_calls) == (1, 3, 1, 1)
    assert stats.auth_headers == [KEY] * 5
    assert stats.file_auth_headers == []
    assert task["id"] in stats.task_done_at


def test_concurrent_creates(standin: StandIn) -> None:
    ids: list[str] = []

    def worker() -> None:
        with httpx.Client(base_url=standin.url, headers={"Authorization": KEY}) as http:
            for _ in range(5):
                ids.append(http.post("/v1/media/create", json={"model": MODEL, "prompt": "x"}).json()["id"])

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(ids)) == 20
    assert standin.stats.create_calls == 20


def test_url_before_start_and_stop_is_idempotent() -> None:
    standin = StandIn()
    with pytest.raises(RuntimeError):
        _ = standin.url
    standin.stop()


def test_command_line_serves_until_interrupted(
    storage: httpx.Client,
) -> None:
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("standin.py")), "--port", "0", "--api-key", "K"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        line = process.stderr.readline()
        match = re.search(r"http://127\.0\.0\.1:\d+", line)
        assert match, line
        response = storage.get(f"{match.group(0)}/v1/balance", headers={"Authorization": "K"})
        assert response.json()["object"] == "balance"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=5) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
