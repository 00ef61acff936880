"""The gateway as a real uvicorn process on loopback: end to end, shared batches, overload, deadlines, shutdown."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import json
import re
import shutil
import signal
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from export.errors import RepositoryError
from export.repository import Publication, publish_version, read_config, versions
from tests.gateway_models import LABELS, color_image, noise_jpeg, write_colors_model
from tests.support import (
    REPO_ROOT,
    free_port,
    json_log,
    metric,
    models_served,
    path_prefix_proxy,
    requests_meanwhile,
    running_gateway,
    wait_until,
)

pytestmark = pytest.mark.slow
JPEG = {"content-type": "image/jpeg"}


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("repository")
    write_colors_model(root)
    return root


@contextmanager
def gateway(repository: Path, tmp_path: Path, *flags: str):
    serve_flags = ("--repository", str(repository), "--intra-op-threads", "1", *flags)
    with running_gateway(*serve_flags, timeout=60, log_path=tmp_path / "gateway.log") as (url, process):
        yield url, process


def classify(url: str, color: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/models/colors/classify", content=color_image(color), headers=JPEG, timeout=30
    )


async def classify_many(url: str, colors: list[str]) -> list[httpx.Response]:
    async with httpx.AsyncClient(
        base_url=url, timeout=30, limits=httpx.Limits(max_connections=len(colors))
    ) as client:
        return await asyncio.gather(
            *(
                client.post(
                    f"/v1/models/colors/classify?top_k={1 + i % 3}", content=color_image(color), headers=JPEG
                )
                for i, color in enumerate(colors)
            )
        )


def test_many_clients_get_their_own_answers_from_shared_batches(repository, tmp_path):
    colors = [LABELS[i % 3] for i in range(60)]
    with gateway(repository, tmp_path, "--max-delay-ms", "25", "--max-batch-size", "16") as (url, _):
        responses = asyncio.run(classify_many(url, colors))
        assert [r.status_code for r in responses] == [200] * len(colors)
        for i, (color, response) in enumerate(zip(colors, responses, strict=True)):
            predictions = response.json()["predictions"]
            assert predictions[0]["label"] == color and len(predictions) == 1 + i % 3
        text = httpx.get(f"{url}/metrics").text
    batches = metric(text, 'resnet_batch_size_count{model="colors"}')
    images = metric(text, 'resnet_batch_size_sum{model="colors"}')
    assert images == len(colors)
    assert batches < len(colors) / 2, f"{len(colors)} concurrent images ran as {batches:.0f} batches"
    assert metric(text, 'resnet_queue_depth{model="colors"}') == 0


def open_file_limits(pid: int) -> tuple[int, int]:
    [line] = [
        line
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines()
        if line.startswith("Max open files")
    ]
    soft, hard = line.split()[3:5]
    return int(soft), int(hard)


async def classify_at_once(url: str, clients: int) -> list[int | str]:
    """`clients` requests at once, each on its own connection: each status, or the transport error's name."""

    async def one() -> int | str:
        async with httpx.AsyncClient(timeout=30) as client:
            try:
                response = await client.post(
                    f"{url}/v1/models/colors/classify", content=color_image("red"), headers=JPEG
                )
            except httpx.TransportError as error:
                return type(error).__name__
            return response.status_code

    return await asyncio.gather(*(one() for _ in range(clients)))


def test_a_gateway_raises_its_open_file_limit_and_says_when_it_cannot(repository, tmp_path):
    # At a soft limit of 256 (a shell's or systemd's 1024 is the same story at four times the clients), 400 clients
    # at once had 161 connections reset and 239 good images answered 400 "cannot read image header: [Errno 24] Too
    # many open files: '.../PIL/BmpImagePlugin.py'"
    log_path = tmp_path / "gateway.log"
    flags = ("--repository", str(repository), "--intra-op-threads", "1")
    with running_gateway(*flags, log_path=log_path, timeout=60, open_files=(256, 8192)) as (_, process):
        assert open_file_limits(process.pid) == (8192, 8192)
    assert "open-file limit raised from 256 to 8192" in log_path.read_text()
    with running_gateway(*flags, log_path=log_path, timeout=60, open_files=(256, 256)) as (url, process):
        statuses = asyncio.run(classify_at_once(url, 400))
        # past the limit libuv resets what it accepts; every image the gateway took is classified
        assert 400 not in statuses and 200 in statuses, collections.Counter(statuses)
    assert (
        "open files limited to 256 (ulimit -n; systemd LimitNOFILE=): connections past about that many clients at once "
        "are reset"
    ) in log_path.read_text()


def read_until_closed(connection: socket.socket, within: float) -> bytes:
    """What the server sent before it closed the connection; fails if it is still open after `within` seconds."""
    connection.settimeout(within)
    received = b""
    while chunk := connection.recv(65536):
        received += chunk
    return received


def test_clients_that_stall_are_answered_408_and_closed(repository, tmp_path):
    # uvicorn gives a request no deadline to arrive: each of these connections was still open after 90 s, holding
    # a file descriptor (and, once its headers were in, a handler waiting for the body) for as long as it liked
    image = color_image("red")
    head = f"POST /v1/models/colors/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: {len(image)}\r\n"
    stalls = {
        "nothing": b"",
        "half a request line": b"POST /v1/models/col",
        "headers without their end": head.encode(),
        "a body cut short": head.encode() + b"\r\n" + image[:100],
    }
    flags = ("--request-read-timeout-s", "1", "--keep-alive-s", "2", "--log-format", "json", "--access-log")
    with gateway(repository, tmp_path, *flags) as (url, _):
        address = ("127.0.0.1", int(url.rsplit(":", 1)[1]))
        connections = {name: socket.create_connection(address) for name in stalls}
        for name, sent in stalls.items():
            connections[name].sendall(sent)
        slow = socket.create_connection(address)  # slow but whole within the second: answered
        for part in (head.encode(), b"\r\n" + image[:100], image[100:]):
            slow.sendall(part)
            time.sleep(0.2)
        slow.shutdown(socket.SHUT_WR)
        assert read_until_closed(slow, 5).startswith(b"HTTP/1.1 200 OK")
        started = time.monotonic()
        answers = {name: read_until_closed(connection, 5) for name, connection in connections.items()}
        assert time.monotonic() - started < 3
        with socket.create_connection(address) as kept_alive:  # the deadline holds for each request on it
            kept_alive.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            first = b""
            while not first.endswith(b'{"status":"ok"}'):
                first += kept_alive.recv(65536)
            assert first.startswith(b"HTTP/1.1 200 OK")
            kept_alive.sendall(b"GET /heal")
            answers["a second request cut short"] = read_until_closed(kept_alive, 5)
        with socket.create_connection(address) as idle:  # answered, then idle: closed after --keep-alive-s
            idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            answered = time.monotonic()
            assert read_until_closed(idle, 5).startswith(b"HTTP/1.1 200 OK")
            assert 1.5 < time.monotonic() - answered < 3.5
        assert classify(url, "blue").json()["predictions"][0]["label"] == "blue"
        refused = httpx.get(f"{url}/metrics").text
    message = "the request did not arrive whole within 1 s (request line, headers and body)"
    request_ids = {}
    for name in ("nothing", "half a request line", "headers without their end", "a second request cut short"):
        head, _, body = answers[name].partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 Request Timeout"), (name, answers[name])
        request_ids[name] = re.search(rb"\r\nx-request-id: ([0-9a-f]{32})\r\n", head).group(1).decode()
        error = {"code": "request_timeout", "message": message, "request_id": request_ids[name]}
        assert json.loads(body) == {"error": error}
    assert answers["a body cut short"] == b""  # its handler was waiting for the body: it sees the client gone
    # counted and logged as the requests a handler answers are, though none saw them
    assert metric(refused, 'resnet_requests_total{method="-",route="unread",status="408"}') == 1
    assert metric(refused, 'resnet_requests_total{method="POST",route="unread",status="408"}') == 2
    assert metric(refused, 'resnet_requests_total{method="GET",route="unread",status="408"}') == 1
    access = {record["request_id"]: record for record in json_log(tmp_path / "gateway.log", "resnet.access")}
    logged = {name: access[request_id] for name, request_id in request_ids.items()}
    assert {name: (line["method"], line["path"], line["status"]) for name, line in logged.items()} == {
        "nothing": ("-", "-", 408),
        "half a request line": ("POST", "/v1/models/col", 408),
        "headers without their end": ("POST", "/v1/models/colors/classify", 408),
        "a second request cut short": ("GET", "/heal", 408),
    }
    assert all(
        900 < line["duration_ms"] < 3000 and line["client"].startswith("127.0.0.1:")
        for line in logged.values()
    )


def test_bytes_that_are_not_an_http_request_get_a_json_400_naming_the_problem(repository, tmp_path):
    # uvicorn answered each with a plain-text 400, "Invalid HTTP request received.", naming nothing, closed the
    # connection at once (the client could lose the answer to the reset) and logged a warning every time
    malformed = {
        "not HTTP": (b"HELLO\r\n\r\n", "-", "Invalid method encountered"),
        "a header name with a space": (
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header: v\r\n\r\n",
            "GET",
            "Invalid header token",
        ),
        "a body framed twice (request smuggling)": (
            b"POST /v1/models/colors/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "POST",
            "Transfer-Encoding can't be present with Content-Length",
        ),
    }
    with gateway(repository, tmp_path, "--log-format", "json", "--access-log") as (url, _):
        address = ("127.0.0.1", int(url.rsplit(":", 1)[1]))
        answers = {}
        for name, (sent, _, _) in malformed.items():
            with socket.create_connection(address) as connection:
                connection.sendall(sent)
                answers[name] = read_until_closed(connection, 10)
        assert classify(url, "red").status_code == 200
        counted = httpx.get(f"{url}/metrics").text
    access = {record["request_id"]: record for record in json_log(tmp_path / "gateway.log", "resnet.access")}
    for name, (_, method, problem) in malformed.items():
        head, _, body = answers[name].partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 Bad Request"), (name, answers[name])
        error = json.loads(body)["error"]
        assert (error["code"], error["message"]) == (
            "bad_request",
            f"not a valid HTTP/1.1 request: {problem}",
        )
        assert (access[error["request_id"]]["method"], access[error["request_id"]]["status"]) == (method, 400)
    assert metric(counted, 'resnet_requests_total{method="-",route="unread",status="400"}') == 1
    assert metric(counted, 'resnet_requests_total{method="POST",route="unread",status="400"}') == 1
    assert "Invalid HTTP request received" not in (tmp_path / "gateway.log").read_text()


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# an empty SETTINGS frame, then the ACK of the server's
HTTP2_SETTINGS_AND_ACK = bytes.fromhex("000000040000000000" + "000000040100000000")


def test_grpc_connections_that_stall_or_idle_are_closed(repository, tmp_path):
    # grpc core closed a connection that sent nothing (or half the HTTP/2 preface) after 60 s, and kept one that sent
    # its SETTINGS and no call for ever (still open after 150 s)
    import tritonclient.grpc as grpcclient

    grpc_port = free_port()
    flags = ("--grpc-port", str(grpc_port), "--request-read-timeout-s", "1", "--grpc-idle-timeout-s", "2")
    stalls = {
        "nothing": b"",
        "half the preface": HTTP2_PREFACE[:10],
        "its settings and no call": HTTP2_PREFACE + HTTP2_SETTINGS_AND_ACK,
    }
    with (
        gateway(repository, tmp_path, *flags),
        grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}") as client,
    ):
        assert client.is_model_ready("colors")
        connections = {name: socket.create_connection(("127.0.0.1", grpc_port)) for name in stalls}
        started = time.monotonic()
        for name, sent in stalls.items():
            connections[name].sendall(sent)
        closed_after = {}
        for name, connection in connections.items():
            with contextlib.suppress(ConnectionResetError):
                read_until_closed(connection, 10)
            closed_after[name] = time.monotonic() - started
        assert closed_after["nothing"] < 3 and closed_after["half the preface"] < 3, closed_after
        assert 1.5 < closed_after["its settings and no call"] < 5, closed_after
        time.sleep(2.5)  # the client's own connection has been idle: closed with a GOAWAY, and reconnected
        assert client.is_model_ready("colors")


def test_a_head_over_64_kib_is_431_and_a_large_body_is_not(repository, tmp_path):
    # httptools buffers a header until it ends: one that never did grew the gateway by what was sent (200 MB sent:
    # 127 -> 415 MB resident), and a few such clients would have had it killed for memory
    with gateway(repository, tmp_path) as (url, process):
        address = ("127.0.0.1", int(url.rsplit(":", 1)[1]))
        with socket.create_connection(address) as endless:
            endless.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Endless: ")
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                for _ in range(64):  # 4 MB, in the pieces a client writes
                    endless.sendall(b"a" * 65536)
            answer = read_until_closed(endless, 10)
        status, _, body = answer.partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 431 Request Header Fields Too Large"), answer[:200]
        assert json.loads(body)["error"]["code"] == "headers_too_large"
        assert json.loads(body)["error"]["message"] == "the request line and headers are over 64 KiB"
        refused = httpx.get(f"{url}/metrics").text
        assert metric(refused, 'resnet_requests_total{method="GET",route="unread",status="431"}') == 1
        cookie = {"cookie": "c=" + "x" * 48 * 1024}  # a large head, within the limit
        assert httpx.get(f"{url}/healthz", headers=cookie).status_code == 200
        photo = noise_jpeg(1, (2400, 1800))  # megabytes of body arrive in many reads after the head
        assert len(photo) > 2 * 1024 * 1024
        response = httpx.post(f"{url}/v1/models/colors/classify", content=photo, headers=JPEG, timeout=30)
        assert response.status_code == 200, response.text


def test_a_full_queue_answers_503_and_the_gateway_carries_on(repository, tmp_path):
    with gateway(
        repository, tmp_path, "--max-delay-ms", "2000", "--max-batch-size", "64", "--queue-size", "3"
    ) as (url, _):
        responses = asyncio.run(classify_many(url, LABELS * 3))
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200] * 3 + [503] * 6, statuses
        for response in responses:
            if response.status_code == 503:
                assert response.headers["retry-after"] == "1"
                assert response.json()["error"]["code"] == "overloaded"
            else:
                sent = LABELS[responses.index(response) % 3]
                assert response.json()["predictions"][0]["label"] == sent
        again = asyncio.run(classify_many(url, ["green"]))[0]
        assert again.status_code == 200 and again.json()["predictions"][0]["label"] == "green"


def test_deadline_answers_504(repository, tmp_path):
    # The batch would wait 10 s for company; only the 0.3 s deadline can answer before the client gives up at 8 s.
    with gateway(repository, tmp_path, "--max-delay-ms", "10000", "--request-timeout-s", "0.3") as (url, _):
        response = httpx.post(
            f"{url}/v1/models/colors/classify", content=color_image("red"), headers=JPEG, timeout=8
        )
        assert response.status_code == 504 and response.json()["error"]["code"] == "deadline_exceeded"
        assert httpx.get(f"{url}/healthz").status_code == 200
    # asyncio's "exception was never retrieved", once per timed-out request
    assert "never retrieved" not in (tmp_path / "gateway.log").read_text()


def test_a_client_that_leaves_frees_its_place_and_costs_no_inference(repository, tmp_path):
    # The batch waits 4 s for company; the clients give up after 0.5 s, long before it would run.
    tensor = {"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0.5] * 3072}
    with gateway(repository, tmp_path, "--max-delay-ms", "4000", "--max-batch-size", "64") as (url, _):

        async def give_up_early() -> list:
            async with httpx.AsyncClient(base_url=url, timeout=0.5) as client:
                calls = [
                    client.post("/v1/models/colors/classify", content=color_image(color), headers=JPEG)
                    for color in LABELS
                ]
                calls.append(client.post("/v2/models/colors/infer", json={"inputs": [tensor]}))
                return await asyncio.gather(*calls, return_exceptions=True)

        assert all(isinstance(outcome, httpx.ReadTimeout) for outcome in asyncio.run(give_up_early()))
        text = httpx.get(f"{url}/metrics").text
        # Released at once, while the abandoned images still wait in the queue for the batch that never runs.
        assert metric(text, 'resnet_admitted_images{model="colors"}') == 0
        assert metric(text, 'resnet_queue_depth{model="colors"}') == len(LABELS) + 1
        for route, count in (("/v1/models/{name}/classify", len(LABELS)), ("/v2/models/{name}/infer", 1)):
            sample = f'resnet_requests_total{{method="POST",route="{route}",status="499"}}'
            assert metric(text, sample) == count
        wait_until(
            lambda: metric(httpx.get(f"{url}/metrics").text, 'resnet_queue_depth{model="colors"}') == 0,
            timeout=10,
            what="the batcher to drop the abandoned images",
        )
        assert metric(httpx.get(f"{url}/metrics").text, 'resnet_batch_size_count{model="colors"}', 0) == 0
    assert "never retrieved" not in (tmp_path / "gateway.log").read_text()


def test_a_client_that_hangs_up_mid_upload_is_a_499_not_a_server_error(repository, tmp_path):
    image = color_image("red")
    uploads = {
        "/v1/models/colors/classify": ("image/jpeg", image),
        "/v2/models/colors/infer": ("application/json", b'{"inputs": [{"name": "input", '),
    }
    with gateway(repository, tmp_path) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        for path, (content_type, start) in uploads.items():
            head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
            with socket.create_connection(("127.0.0.1", port)) as connection:
                connection.sendall(f"{head}Content-Length: {len(start) + 1000}\r\n\r\n".encode() + start)
                time.sleep(0.3)  # the gateway is reading the body when the client goes

        def hung_up() -> float:
            text = httpx.get(f"{url}/metrics").text
            return sum(
                metric(text, f'resnet_requests_total{{method="POST",route="{route}",status="499"}}', 0)
                for route in ("/v1/models/{name}/classify", "/v2/models/{name}/infer")
            )

        wait_until(lambda: hung_up() == 2, timeout=10, what="two uploads counted as 499")
        again = httpx.post(f"{url}/v1/models/colors/classify", content=image, headers=JPEG)
        assert again.json()["predictions"][0]["label"] == "red"
    log = (tmp_path / "gateway.log").read_text()
    assert "Traceback" not in log and "unhandled error" not in log, log


def test_sigterm_drains_requests_in_flight(repository, tmp_path):
    with gateway(repository, tmp_path, "--max-delay-ms", "3000", "--max-batch-size", "64") as (url, process):

        async def requests_then_sigterm() -> list[httpx.Response]:
            pending = asyncio.ensure_future(classify_many(url, ["red", "blue", "green"]))
            async with httpx.AsyncClient(base_url=url) as client:
                for _ in range(100):  # until all three are queued, waiting for the batch to fill
                    text = (await client.get("/metrics")).text
                    if metric(text, 'resnet_admitted_images{model="colors"}') == 3:
                        break
                    await asyncio.sleep(0.05)
                else:
                    pytest.fail("the three requests never queued: SIGTERM would not find them in flight")
            process.send_signal(signal.SIGTERM)
            return await pending

        responses = asyncio.run(requests_then_sigterm())
        assert [r.status_code for r in responses] == [200] * 3
        assert [r.json()["predictions"][0]["label"] for r in responses] == ["red", "blue", "green"]
        # uvicorn re-raises the signal once it has shut down cleanly, so the exit status is SIGTERM's.
        assert process.wait(20) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in (tmp_path / "gateway.log").read_text()


@pytest.mark.parametrize("root_path", ["", "/resnet"])
def test_behind_a_path_prefix_proxy_the_api_works_and_docs_need_the_root_path(
    repository, tmp_path, root_path
):
    flags = ("--root-path", root_path) if root_path else ()
    with gateway(repository, tmp_path, *flags) as (url, _), path_prefix_proxy(url, "/resnet") as proxy:
        answer = httpx.post(
            f"{proxy}/resnet/v1/models/colors/classify", content=color_image("red"), headers=JPEG
        )
        assert answer.status_code == 200 and answer.json()["predictions"][0]["label"] == "red"
        kserve_error = httpx.post(f"{proxy}/resnet/v2/models/colors/infer", content=b"{not JSON")
        assert kserve_error.status_code == 400 and isinstance(
            kserve_error.json()["error"], str
        )  # KServe's shape
        docs = httpx.get(f"{proxy}/resnet/docs")
        assert docs.status_code == 200 and f"'{root_path}/openapi.json'" in docs.text
        # what the docs page then fetches, through the proxy: only found with the prefix the gateway was given
        schema = httpx.get(f"{proxy}{root_path}/openapi.json")
        assert schema.status_code == (200 if root_path else 404)
        if root_path:
            assert schema.json()["servers"] == [{"url": root_path}]


def test_bundled_repository_serves_real_photos(imagenet_samples, tmp_path):
    """What `make serve` starts: the gateway on model_repository/ with its defaults, classifying real photos."""
    bundled = REPO_ROOT / "model_repository"
    models = sorted(p.name for p in bundled.glob("*/config.pbtxt") if any(p.parent.glob("*/model.onnx")))
    if not models:
        pytest.skip("model_repository/ holds no model with a model.onnx yet")
    log = tmp_path / "gateway.log"
    with running_gateway("--repository", str(bundled), timeout=120, log_path=log) as (url, _):
        served = httpx.get(f"{url}/v1/models").json()["models"]
        assert served
        for model in served:
            labels = (bundled / model["name"] / "labels.txt").read_text().splitlines()
            files = [("file", (path.name, path.read_bytes(), "image/jpeg")) for path in imagenet_samples[:8]]
            response = httpx.post(
                f"{url}/v1/models/{model['name']}/classify?top_k=3", files=files, timeout=60
            )
            assert response.status_code == 200, response.text
            for result in response.json():
                scores = [p["score"] for p in result["predictions"]]
                assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001
                assert all(p["label"] == labels[p["index"]] for p in result["predictions"])


def test_json_logs_and_the_access_log_carry_request_ids(repository, tmp_path):
    with gateway(repository, tmp_path, "--log-format", "json", "--access-log") as (url, _):
        traced = {**JPEG, "X-Request-ID": "trace-1"}
        assert httpx.post(
            f"{url}/v1/models/colors/classify", content=color_image("red"), headers=traced
        ).is_success
        untraced = httpx.get(f"{url}/v1/models/nope").headers["x-request-id"]
    records = json_log(tmp_path / "gateway.log")
    assert any("Uvicorn running on" in record["message"] for record in records)  # uvicorn's lines too
    access = {record["request_id"]: record for record in records if record["logger"] == "resnet.access"}
    assert access["trace-1"]["path"] == "/v1/models/colors/classify" and access["trace-1"]["status"] == 200
    assert access["trace-1"]["duration_ms"] > 0 and access["trace-1"]["client"].startswith("127.0.0.1:")
    assert access[untraced]["status"] == 404 and access[untraced]["method"] == "GET"
    assert all(record["time"].endswith("+00:00") for record in records)  # ISO 8601, UTC


def test_the_text_access_log_names_the_request(repository, tmp_path):
    with gateway(repository, tmp_path, "--access-log") as (url, _):
        httpx.get(f"{url}/v1/models/nope", headers={"X-Request-ID": "trace-2"})
    log = (tmp_path / "gateway.log").read_text()
    assert re.search(
        r" INFO resnet\.access: GET /v1/models/nope 404 [0-9.]+ ms \(request trace-2, client 127\.0\.0\.1:",
        log,
    )


def test_the_access_log_names_the_client_a_trusted_proxy_forwarded(repository, tmp_path):
    # uvicorn trusted X-Forwarded-For from 127.0.0.1 only: behind an ingress every access-log line named the
    # ingress, and the gateway had no setting to say which proxies to trust
    flags = ("--access-log", "--log-format", "json", "--forwarded-allow-ips", "10.0.0.0/8, 127.0.0.1")
    with gateway(repository, tmp_path, *flags) as (url, _):
        forwarded = {"X-Forwarded-For": "203.0.113.7, 10.1.2.3", "X-Request-ID": "via-ingress"}
        assert httpx.get(f"{url}/healthz", headers=forwarded).status_code == 200
    [line] = [
        r for r in json_log(tmp_path / "gateway.log", "resnet.access") if r["request_id"] == "via-ingress"
    ]
    assert line["client"].partition(":")[0] == "203.0.113.7"  # the last address no trusted proxy added


def test_grpc_calls_are_in_the_access_log_with_their_request_id(repository, tmp_path):
    import tritonclient.grpc as grpcclient

    grpc_port = free_port()
    flags = ("--grpc-port", str(grpc_port), "--log-format", "json", "--access-log")
    with (
        gateway(repository, tmp_path, *flags),
        grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}") as client,
    ):
        assert client.is_model_ready("colors", headers={"x-request-id": "grpc-trace-1"})
        client.is_model_ready("colors", headers={"x-request-id": "not an id"})
    calls = [
        record for record in json_log(tmp_path / "gateway.log", "resnet.access") if record["method"] == "gRPC"
    ]
    assert [(call["path"], call["status"]) for call in calls] == [("ModelReady", "OK")] * 2
    assert calls[0]["request_id"] == "grpc-trace-1" and re.fullmatch(r"[0-9a-f]{32}", calls[1]["request_id"])


def test_the_embedded_gateway_follows_its_repository_without_a_restart_or_a_refusal(tmp_path):
    # It read the repository once: a version `resnet export` published was served only after a restart
    repository = tmp_path / "repository"
    write_colors_model(repository)
    with gateway(repository, tmp_path, "--repository-poll-s", "0.2") as (url, _):
        with requests_meanwhile(lambda: classify(url, "red")) as answers:
            write_colors_model(repository)  # version 2, published atomically as `resnet export` does
            wait_until(lambda: answers and answers[-1][1] == "2", 15, what="an answer from version 2")
        assert {status for status, _ in answers} == {200}, answers
        answered = [version for _, version in answers]
        assert answered == sorted(answered) and answered[0] == "1" and answered[-1] == "2", answered

        publish_version(repository / "colors", {"model.onnx": b"not an ONNX model"})  # version 3, broken
        log = tmp_path / "gateway.log"
        wait_until(lambda: "cannot serve colors version 3" in log.read_text(), 15, what="version 3 refused")
        assert "version 2 goes on serving: [ONNXRuntimeError]" in log.read_text()
        assert classify(url, "red").json()["version"] == "2"
        assert httpx.get(f"{url}/readyz").json()["failed"] == {}

        served_so_far = requests_counted(url, "colors")
        write_colors_model(repository, "shades")
        wait_until(lambda: models_served(url) == {"colors": "2", "shades": "1"}, 15, what="shades served")
        assert requests_counted(url, "colors") == served_so_far  # colors, unchanged, kept its statistics
        shades = httpx.post(f"{url}/v1/models/shades/classify", content=color_image("blue"), headers=JPEG)
        assert shades.json()["predictions"][0]["label"] == "blue"
        shutil.rmtree(repository / "shades")
        wait_until(lambda: models_served(url) == {"colors": "2"}, 15, what="shades dropped")
        gone = httpx.post(f"{url}/v1/models/shades/classify", content=color_image("blue"), headers=JPEG)
        assert gone.status_code == 404
        gauges = httpx.get(f"{url}/metrics").text  # the counters of what shades did stay, as counters do
        assert 'resnet_queue_depth{model="shades"}' not in gauges
        assert 'resnet_admitted_images{model="shades"}' not in gauges


def publish(repository: Path, step: int) -> None:
    write_colors_model(repository)  # a new version, as `resnet export` publishes one


def publish_then_roll_back(repository: Path, step: int) -> None:
    if (
        step % 2
    ):  # the documented rollback: the newest version folder removed, its number taken again next time
        shutil.rmtree(repository / "colors" / str(max(versions(repository / "colors"))))
    else:
        write_colors_model(repository)


@pytest.mark.parametrize(
    ("rollout", "served_at_the_end"),
    [(publish, "16"), (publish_then_roll_back, "1")],
    ids=["publish", "rollback"],
)
def test_rollouts_under_load_refuse_nothing_and_leave_no_request_waiting(
    tmp_path, rollout, served_at_the_end
):
    # A request routed to a model version that was replaced while its image was being decoded reached a batcher
    # whose workers had stopped: it waited out its deadline (504), and one that arrived as the batcher closed was
    # refused with 503 "the gateway is shutting down" (15 rollouts under load: 7 504s and 3 503s in 74). With
    # rollbacks, a version's number came back and the old version's timer freed the new one's session: 500s
    # (KeyError: ('colors', '2')), and a request could run on another load of its version.
    repository = tmp_path / "repository"
    write_colors_model(repository)
    photo = noise_jpeg(0, (2400, 1800))  # decoded for tens of milliseconds: rollouts land mid-decode
    flags = ("--repository", str(repository), "--repository-poll-s", "0.05", "--intra-op-threads", "1")
    env = {"RESNET_REQUEST_TIMEOUT_S": "3"}  # a freed session's timer: the deadline + 1 s
    with running_gateway(*flags, env=env, log_path=tmp_path / "gateway.log") as (url, _):
        statuses: list[int] = []
        done = threading.Event()

        def client() -> None:
            with httpx.Client(base_url=url, timeout=30) as session:
                while not done.is_set():
                    answer = session.post("/v1/models/colors/classify", content=photo, headers=JPEG)
                    statuses.append(answer.status_code)

        clients = [threading.Thread(target=client) for _ in range(4)]
        for thread in clients:
            thread.start()
        try:
            for step in range(15 if rollout is publish else 16):
                time.sleep(0.3)
                rollout(repository, step)
            time.sleep(4)  # the freed sessions' timers run while the clients still send
        finally:
            done.set()
            for thread in clients:
                thread.join()
        assert models_served(url) == {"colors": served_at_the_end}
    assert statuses and set(statuses) == {200}, collections.Counter(statuses)


def test_an_export_undone_after_the_gateway_took_its_version_serves_the_one_before_again(tmp_path):
    # An export that fails half-way (a full disk at its last model) is undone; a gateway that loaded the new
    # version of its first model in the meantime must go back to the version before, refusing nothing
    repository = tmp_path / "repository"
    model_dir = write_colors_model(repository)
    files = {name: model_dir / "1" / name for name in ("model.onnx", "model.py")}
    with gateway(repository, tmp_path, "--repository-poll-s", "0.2") as (url, _):
        with requests_meanwhile(lambda: classify(url, "red")) as answers:
            publication = Publication(repository)
            with (
                pytest.raises(RepositoryError, match="No space left on device; nothing of this export"),
                publication,
            ):
                publication.add(model_dir, files, read_config(model_dir), LABELS)
                wait_until(lambda: answers and answers[-1][1] == "2", 15, what="an answer from version 2")
                raise OSError(errno.ENOSPC, "No space left on device")
            wait_until(lambda: answers[-1][1] == "1", 15, what="version 1 served again")
        assert {status for status, _ in answers} == {200}, answers
        assert httpx.get(f"{url}/readyz").json()["failed"] == {}


def requests_counted(url: str, model: str) -> int:
    """Successful requests in the model's Triton-style statistics (those of its classifier)."""
    statistics = httpx.get(f"{url}/v2/models/{model}/stats").json()["model_stats"][0]
    return int(statistics["inference_stats"]["success"]["count"])


def test_with_no_repository_polling_the_gateway_serves_what_it_read_at_start_up(tmp_path):
    repository = tmp_path / "repository"
    write_colors_model(repository)
    with gateway(repository, tmp_path, "--repository-poll-s", "0") as (url, _):
        write_colors_model(repository)
        time.sleep(1)
        assert models_served(url) == {"colors": "1"}
        assert httpx.get(f"{url}/v2/models/colors/versions/2/ready").status_code == 400  # not even when asked


def test_a_version_or_model_just_published_is_served_to_the_first_request_naming_it(tmp_path):
    # The gateway looks at its repository every --repository-poll-s (5 s by default): a deployment that published
    # version 2 and asked for it at once was answered 404 (400 from KServe's ready) until the next look, and so was
    # a request for a model just exported
    repository = tmp_path / "repository"
    write_colors_model(repository)
    with gateway(repository, tmp_path, "--repository-poll-s", "300") as (url, _):
        assert httpx.get(f"{url}/v2/models/colors/versions/2/ready").status_code == 400
        write_colors_model(repository)
        assert httpx.get(f"{url}/v2/models/colors/versions/2/ready").status_code == 200
        write_colors_model(repository, name="shades")
        answer = httpx.post(f"{url}/v1/models/shades/classify", content=color_image("red"), headers=JPEG)
        assert (answer.status_code, answer.json()["version"]) == (200, "1"), answer.text
        assert models_served(url) == {"colors": "2", "shades": "1"}
        missing = httpx.get(f"{url}/v2/models/colors/versions/7/ready")
        assert missing.json() == {
            "error": "model 'colors' has no version '7'; serving version '2' (leave "
            "model_version empty for it)"
        }
        assert httpx.get(f"{url}/v1/models/nope").status_code == 404
