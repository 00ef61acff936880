"""The gateway's routes and errors, in process (FastAPI TestClient) on a real ONNX Runtime model."""

from __future__ import annotations

import asyncio
import gzip
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from server.app import create_app
from server.backends import EmbeddedBackend
from server.errors import InvalidInput, ModelNotFound
from server.preprocessing import PILLOW_PIXEL_LIMIT
from server.registry import LOOK_AGAIN_S, ModelRegistry
from server.scores import NAN_SCORES, softmax, unscored_rows
from server.settings import Settings
from tests.gateway_models import (
    LABELS,
    color_image,
    grey_image,
    png_claiming,
    write_broken_model,
    write_colors_model,
    write_misfit_model,
)
from tests.support import free_port, metric

JPEG = {"content-type": "image/jpeg"}


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    root = tmp_path_factory.mktemp("repository")
    write_colors_model(root)
    return root


def make_client(repository, **settings) -> TestClient:
    return TestClient(create_app(Settings(repository=repository, grpc_port=0, **settings)))


@pytest.fixture(scope="module")
def client(repository):
    with make_client(repository, max_body_bytes=200_000, max_image_pixels=1_000_000) as client:
        yield client


def assert_error(response, status: int, code: str, *words: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    for word in words:
        assert word in body["error"]["message"], body
    return body


def test_lists_models(client):
    models = client.get("/v1/models").json()["models"]
    assert [m["name"] for m in models] == ["colors"]
    assert models[0] | {"preprocess": None} == {
        "name": "colors",
        "versions": ["1"],
        "input_shape": [3, 32, 32],
        "num_classes": 3,
        "max_batch_size": 32,
        "backend": "embedded",
        "preprocess": None,
    }
    assert client.get("/v1/models/colors").json()["preprocess"]["crop"] == 32


@pytest.mark.parametrize("color", LABELS)
def test_classifies_a_raw_body(client, color):
    response = client.post("/v1/models/colors/classify", content=color_image(color), headers=JPEG)
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "colors" and body["version"] == "1"
    assert [p["label"] for p in body["predictions"]][0] == color
    assert len(body["predictions"]) == 3  # top_k 5 is clamped to the 3 classes
    assert body["predictions"][0]["score"] > 0.99
    assert body["predictions"][0]["index"] == LABELS.index(color)


def test_top_k_and_other_image_types(client):
    for fmt, content_type in (
        ("PNG", "image/png"),
        ("WEBP", "image/webp"),
        ("GIF", "image/gif"),
        ("BMP", "application/octet-stream"),
    ):
        response = client.post(
            "/v1/models/colors/classify?top_k=1",
            content=color_image("blue", fmt=fmt),
            headers={"content-type": content_type},
        )
        assert response.status_code == 200, (fmt, response.text)
        assert [p["label"] for p in response.json()["predictions"]] == ["blue"]


def test_multipart_one_and_many_files(client):
    one = client.post(
        "/v1/models/colors/classify", files={"file": ("a.jpg", color_image("green"), "image/jpeg")}
    )
    assert one.status_code == 200 and one.json()["predictions"][0]["label"] == "green"
    files = [
        ("file", (f"{c}.png", color_image(c, fmt="PNG"), "image/png"))
        for c in ("red", "blue", "green", "red")
    ]
    many = client.post("/v1/models/colors/classify?top_k=2", files=files)
    assert many.status_code == 200
    assert [r["predictions"][0]["label"] for r in many.json()] == ["red", "blue", "green", "red"]
    assert all(len(r["predictions"]) == 2 for r in many.json())
    files[2] = ("file", ("notes.png", b"not pixels", "image/png"))
    one_bad = client.post("/v1/models/colors/classify", files=files)
    assert one_bad.status_code == 400
    assert one_bad.json()["error"]["message"].startswith("image 3 of 4: not a decodable image")


def test_softmax_of_overflowed_logits_is_its_limit_and_nan_stays_nan():
    inf = np.inf
    logits = np.array(
        [[1, 2, 3], [inf, -inf, 5], [inf, inf, -inf], [np.nan, 1, 2], [-inf, -inf, -inf]], np.float32
    )
    probabilities = softmax(logits)
    assert probabilities.dtype == np.float32
    assert probabilities[0] == pytest.approx(np.exp([1, 2, 3]) / np.exp([1, 2, 3]).sum())
    assert probabilities[1].tolist() == [1, 0, 0] and probabilities[2].tolist() == [0.5, 0.5, 0]
    assert unscored_rows(probabilities) == [3, 4]


def test_an_image_the_model_overflows_on_is_scored_or_refused_by_itself(tmp_path):
    # Logits past FP32's range (an FP16 model's pass 65504) gave inf - inf = NaN in the softmax, which the JSON
    # encoder refused: 500 "internal error (ValueError)" for +inf logits, and for NaN ones, whatever else the
    # request held
    write_colors_model(tmp_path, "overflowing", scale=3e38)
    write_colors_model(tmp_path, "nan", scale=3e38, nan_when_overflowing=True)
    with make_client(tmp_path) as client:
        red = client.post("/v1/models/overflowing/classify", content=color_image("red"), headers=JPEG)
        assert red.status_code == 200, red.text
        assert [(p["label"], p["score"]) for p in red.json()["predictions"]] == [
            ("red", 1.0), ("green", 0.0), ("blue", 0.0)
        ]  # fmt: skip
        refused = assert_error(
            client.post("/v1/models/nan/classify", content=color_image("red"), headers=JPEG),
            422,
            "unclassifiable_image",
        )
        assert refused["error"]["message"] == f"{NAN_SCORES} (model 'nan' version 1)"
        files = [
            ("file", ("grey.png", grey_image(), "image/png")),
            ("file", ("red.jpg", color_image("red"), "image/jpeg")),
        ]
        both = assert_error(client.post("/v1/models/nan/classify", files=files), 422, "unclassifiable_image")
        assert both["error"]["message"] == f"image 2 of 2: {NAN_SCORES} (model 'nan' version 1)"
        grey = client.post("/v1/models/nan/classify", files=files[:1])
        assert grey.status_code == 200 and grey.json()["predictions"][0]["score"] == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "body, content_type, status, code, words",
    [
        (b"", "image/jpeg", 400, "invalid_image", ["empty"]),
        (b"plain text, not pixels", "image/png", 400, "invalid_image", ["not a decodable image"]),
        (color_image("red", size=(300, 200))[:400], "image/jpeg", 400, "invalid_image", []),
        (color_image("red", fmt="TIFF"), "image/tiff", 415, "unsupported_media_type", ["TIFF"]),
        (color_image("red"), "application/json", 415, "unsupported_media_type", ["application/json"]),
        (color_image("red"), "text/plain", 415, "unsupported_media_type", ["image/*"]),
        (png_claiming(2000, 2000), "image/png", 413, "payload_too_large", ["2000x2000"]),
        (png_claiming(40000, 40000), "image/png", 413, "payload_too_large", []),
        (b"\xff" * 300_000, "image/jpeg", 413, "payload_too_large", ["200000"]),
    ],
)
def test_bad_input_gets_a_clear_error(client, body, content_type, status, code, words):
    response = client.post("/v1/models/colors/classify", content=body, headers={"content-type": content_type})
    assert_error(response, status, code, *words)


def test_a_compressed_body_is_inflated_or_refused_by_name(client):
    gzipped = {**JPEG, "content-encoding": "gzip"}
    response = client.post(
        "/v1/models/colors/classify", content=gzip.compress(color_image("green")), headers=gzipped
    )
    assert response.status_code == 200 and response.json()["predictions"][0]["label"] == "green"
    assert_error(
        client.post("/v1/models/colors/classify", content=color_image("green"), headers=gzipped),
        422,
        "invalid_input",
        "not valid gzip",
    )
    brotli = {**JPEG, "content-encoding": "br"}
    assert_error(
        client.post("/v1/models/colors/classify", content=b"x", headers=brotli), 415, "unsupported_media_type"
    )
    bomb = gzip.compress(b"\xff" * 300_000)  # 300 kB inflated from a few hundred bytes: over the 200 kB limit
    assert_error(
        client.post("/v1/models/colors/classify", content=bomb, headers=gzipped), 413, "payload_too_large"
    )
    multipart = client.post(
        "/v1/models/colors/classify",
        files={"file": ("a.jpg", color_image("red"), "image/jpeg")},
        headers={"content-encoding": "gzip"},
    )
    assert_error(multipart, 415, "unsupported_media_type", "multipart")


def test_body_limit_holds_without_content_length(client):
    chunks = (b"\xff" * 50_000 for _ in range(6))  # chunked transfer: no Content-Length to check up front
    assert_error(
        client.post("/v1/models/colors/classify", content=chunks, headers=JPEG), 413, "payload_too_large"
    )


def test_multipart_without_file_field(client):
    response = client.post(
        "/v1/models/colors/classify", files={"image": ("a.jpg", color_image("red"), "image/jpeg")}
    )
    assert_error(response, 422, "invalid_input", "'file'")


def test_a_file_field_sent_as_text_is_refused_not_skipped(client):
    # curl -F file=@a.jpg -F file=b.jpg (no @): the second part is the text "b.jpg"; classifying only a.jpg would
    # answer one image where two were asked for
    response = client.post(
        "/v1/models/colors/classify",
        data={"file": "b.jpg"},
        files=[("file", ("a.jpg", color_image("red"), "image/jpeg"))],
    )
    assert_error(response, 422, "invalid_input", "field 'file' holds text ('b.jpg'), not an uploaded file")
    assert "-F file=@cat.jpg" in response.json()["error"]["message"]


@pytest.mark.parametrize("query", ["top_k=0", "top_k=-3", "top_k=abc", "top_k=100000"])
def test_bad_top_k_is_422(client, query):
    response = client.post(f"/v1/models/colors/classify?{query}", content=color_image("red"), headers=JPEG)
    assert_error(response, 422, "invalid_input", "top_k")


def test_unknown_model_route_and_method(client):
    assert_error(
        client.post("/v1/models/nope/classify", content=color_image("red"), headers=JPEG),
        404,
        "model_not_found",
        "nope",
        "colors",
    )
    assert_error(client.get("/v1/models/nope"), 404, "model_not_found")
    assert_error(client.get("/v3/whatever"), 404, "not_found", "/v3/whatever")
    assert_error(client.get("/v1/models/colors/classify"), 405, "method_not_allowed")


def test_a_model_that_fails_to_load_is_named_so_and_the_others_serve(tmp_path):
    # It used to be only an error line in the log: clients were told "not found", readiness and metrics said nothing
    write_colors_model(tmp_path)
    write_broken_model(tmp_path)
    with make_client(tmp_path) as client:
        readiness = client.get("/readyz")
        assert readiness.status_code == 200 and readiness.json()["models"] == ["colors"]
        reason = readiness.json()["failed"]["broken"]
        assert "INVALID_PROTOBUF" in reason and "\n" not in reason
        image = {"content": color_image("red"), "headers": JPEG}
        assert client.post("/v1/models/colors/classify", **image).status_code == 200
        refused = client.post("/v1/models/broken/classify", **image)
        assert_error(
            refused, 404, "model_not_found", f"model 'broken' failed to load: {reason}; available: colors"
        )
        for name in ("broken", "broken_pipeline"):
            over_v2 = client.get(f"/v2/models/{name}")
            assert (
                over_v2.status_code == 404 and f"model {name!r} failed to load: " in over_v2.json()["error"]
            )
        index = client.post("/v2/repository/index").json()
        unavailable = {"version": "1", "state": "UNAVAILABLE", "reason": f"failed to load: {reason}"}
        assert [e for e in index if e["name"].startswith("broken")] == [
            {"name": "broken", **unavailable},
            {"name": "broken_pipeline", **unavailable},
        ]
        assert [e["name"] for e in client.post("/v2/repository/index", json={"ready": True}).json()] == [
            "colors",
            "colors_pipeline",
        ]
        page = client.get("/metrics").text
        assert metric(page, 'resnet_model_unavailable{model="broken"}') == 1
        assert metric(page, 'resnet_model_unavailable{model="colors"}', default=0) == 0


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ({"classes": 2}, "model.onnx gives 3 classes, config and labels say 2"),
        ({"classes": 3, "crop": 40}, "model.onnx takes (3, 32, 32), config says (3, 40, 40)"),
    ],
)
def test_a_model_file_that_does_not_fit_its_config_fails_to_load_instead_of_every_request(
    tmp_path, config, reason
):
    # An older version served under a config rewritten for 2 classes answered 500 (IndexError) to every request
    write_colors_model(tmp_path)
    write_misfit_model(tmp_path, **config)
    with make_client(tmp_path) as client:
        assert client.get("/readyz").json()["failed"] == {"misfit": reason}
        refused = client.post("/v1/models/misfit/classify", content=color_image("red"), headers=JPEG)
        assert_error(refused, 404, "model_not_found", f"model 'misfit' failed to load: {reason}")


def test_a_repository_whose_models_all_fail_is_not_ready_and_says_why(tmp_path):
    write_broken_model(tmp_path)
    with make_client(tmp_path) as client:
        answer = client.get("/readyz")
        assert_error(
            answer, 503, "not_ready", "no classifier models to serve from", "; broken failed to load: "
        )


def test_health_readiness_docs_and_demo_page(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {
        "status": "ready",
        "models": ["colors"],
        "backend": "embedded",
        "failed": {},
    }
    assert "/v1/models/{name}/classify" in client.get("/openapi.json").json()["paths"]
    docs = client.get("/docs")
    assert "swagger" in docs.text.lower() and "content-security-policy" not in docs.headers  # its CDN assets
    page = client.get("/")
    assert page.status_code == 200 and '<select id="model">' in page.text
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert client.get("/static/app.js").status_code == 200
    for answer in (
        page,
        client.get("/v1/models/nope"),
        client.post("/v1/models/colors/classify", content=b""),
    ):
        assert answer.headers["x-content-type-options"] == "nosniff"


def classify_count(client: TestClient, status: int) -> float:
    text = client.get("/metrics").text
    name = f'resnet_requests_total{{method="POST",route="/v1/models/{{name}}/classify",status="{status}"}}'
    return metric(text, name, default=0.0)


def test_metrics_count_requests_batches_and_queue(client):
    before = {status: classify_count(client, status) for status in (200, 400)}
    client.post("/v1/models/colors/classify", content=color_image("red"), headers=JPEG)
    client.post("/v1/models/colors/classify", content=b"", headers=JPEG)
    assert {status: classify_count(client, status) - before[status] for status in before} == {200: 1, 400: 1}
    text = client.get("/metrics").text
    for name in (
        "resnet_request_latency_seconds_bucket",
        "resnet_queue_seconds_bucket",
        "resnet_batch_size_bucket",
        'resnet_queue_depth{model="colors"}',
        "resnet_requests_in_flight",
        "resnet_inference_seconds_count",
        'resnet_admitted_images{model="colors"} 0.0',
    ):
        assert name in text


def test_api_keys_protect_everything_but_health(repository):
    with make_client(repository, api_keys=["s3cret", "other"]) as client:
        assert_error(client.get("/v1/models"), 401, "unauthorized", "API key")
        assert_error(client.get("/v1/models", headers={"authorization": "Bearer wrong"}), 401, "unauthorized")
        assert_error(client.get("/metrics"), 401, "unauthorized")
        assert client.get("/v1/models", headers={"authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/metrics", headers={"x-api-key": "other"}).status_code == 200
        response = client.post(
            "/v1/models/colors/classify", content=color_image("red"), headers={**JPEG, "x-api-key": "s3cret"}
        )
        assert response.status_code == 200
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200


def test_a_version_number_that_comes_back_keeps_each_loads_session(tmp_path):
    # A rollback (the newest version folder removed) gives its number to the next export. Sessions were keyed by
    # (name, version): the timer freeing the first version 1 took the session of the version 1 served after the
    # rollback (500s, KeyError: ('colors', '1'), when rollbacks ran under load), and a request routed to one load of
    # version 2 ran on another's session.
    asyncio.run(roll_back_and_forth(tmp_path))


async def roll_back_and_forth(repository) -> None:
    backend = EmbeddedBackend(Settings(repository=repository, grpc_port=0, request_timeout_s=0.1))
    write_colors_model(repository)
    [first_v1] = await backend.start()
    write_colors_model(repository)
    [first_v2] = await backend.start()
    await backend.retire(first_v1)  # as the registry does at each switch: freed after the deadline + 1 s
    shutil.rmtree(repository / "colors" / "2")
    [second_v1] = await backend.start()
    await backend.retire(first_v2)
    write_colors_model(repository)
    [second_v2] = await backend.start()  # version 2 again
    assert [info.version for info in (first_v1, first_v2, second_v1, second_v2)] == ["1", "2", "1", "2"]
    await asyncio.sleep(1.3)  # the first loads' timers have run
    batch = np.zeros((1, 3, 32, 32), np.float32)
    try:
        for info in (
            second_v1,
            second_v2,
        ):  # a request routed to second_v1 just before the switch is in flight
            logits, version = await backend.infer(info, batch, time.monotonic() + 5)
            assert logits.shape == (1, 3) and version == info.version
        assert backend.sessions.keys() == {("colors", "1", second_v1.load), ("colors", "2", second_v2.load)}
    finally:
        await backend.close()


def test_served_model_interface_for_other_apis(repository):
    """What the gRPC service builds on: registry.get(), classify() and infer() with preprocessed tensors."""
    asyncio.run(exercise_registry(repository))


async def exercise_registry(repository) -> None:
    registry = ModelRegistry(Settings(repository=repository, grpc_port=0))
    await registry.start()
    try:
        assert registry.ready() and registry.names() == ["colors"]
        model = registry.get("colors")
        assert (model.backend, model.input_shape, model.labels) == ("embedded", (3, 32, 32), LABELS)
        results = await asyncio.gather(*(model.classify([color_image(c)], top_k=1) for c in ("blue", "red")))
        assert [(r.predictions[0][0].label, r.version) for r in results] == [("blue", "1"), ("red", "1")]
        logits, version = await model.infer(np.zeros((2, 3, 32, 32), np.float32))
        assert logits.shape == (2, 3) and version == "1"
        with pytest.raises(InvalidInput):
            await model.infer(np.zeros((2, 3, 16, 16), np.float32))
        with pytest.raises(ModelNotFound):
            registry.get("nope")
    finally:
        await registry.close()


def test_requests_for_what_is_not_served_share_one_look_at_the_repository(tmp_path):
    asyncio.run(ask_for_what_is_not_served(tmp_path))


async def ask_for_what_is_not_served(repository) -> None:
    write_colors_model(repository)
    registry = ModelRegistry(Settings(repository=repository, grpc_port=0, repository_poll_s=300))
    await registry.start()
    looks: list[float] = []
    models_changed = registry.backend.models_changed

    async def counted() -> bool:
        looks.append(time.monotonic())
        return await models_changed()

    registry.backend.models_changed = counted  # type: ignore[method-assign]

    async def ask(name: str, times: int = 1) -> list:
        return await asyncio.gather(
            *(registry.current(lambda: registry.get(name)) for _ in range(times)), return_exceptions=True
        )

    try:
        for _ in range(2):  # 50 requests at once share one look; the next ones, the next look
            assert all(isinstance(outcome, ModelNotFound) for outcome in await ask("nope", 50))
        assert len(looks) == 2 and looks[1] - looks[0] >= LOOK_AGAIN_S * 0.99
        write_colors_model(repository, name="shades")  # found by the next request, though a look just ran
        assert [model.version for model in await ask("shades")] == ["1"] and len(looks) == 3
        assert [model.version for model in await ask("colors")] == ["1"] and len(
            looks
        ) == 3  # served: no look
    finally:
        await registry.close()


def test_decoding_and_inference_run_off_the_event_loop(repository, monkeypatch):
    import server.backends
    import server.registry

    threads = {}

    def spy(name, real):
        def wrapper(*args, **kwargs):
            threads[name] = threading.current_thread().name
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(server.registry, "preprocess_batch", spy("decode", server.registry.preprocess_batch))
    monkeypatch.setattr(
        server.backends.EmbeddedBackend, "_run", spy("infer", server.backends.EmbeddedBackend._run)
    )
    with make_client(repository) as client:
        assert (
            client.post("/v1/models/colors/classify", content=color_image("red"), headers=JPEG).status_code
            == 200
        )
    # the gateway's own pools, not the event loop's thread
    assert threads["decode"].startswith("preprocess") and threads["infer"].startswith("ort-colors")


def test_bad_settings_stop_the_cli_with_one_line(tmp_path):
    command = [sys.executable, "-m", "cli.main", "serve", "--port", "70000", "--repository", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("resnet: error: invalid settings: port")
    missing = subprocess.run(
        [*command[:4], "--repository", str(tmp_path / "missing")], capture_output=True, text=True, timeout=60
    )
    assert missing.returncode == 1 and "model repository not found" in missing.stderr
    assert missing.stderr.strip().endswith("(set --repository or RESNET_MODEL_REPOSITORY)")
    past_pillow = [
        *command[:4],
        "--repository",
        str(tmp_path),
        "--max-image-pixels",
        str(PILLOW_PIXEL_LIMIT + 1),
    ]
    too_many_pixels = subprocess.run(past_pillow, capture_output=True, text=True, timeout=60)
    assert too_many_pixels.returncode == 1 and "max_image_pixels" in too_many_pixels.stderr


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        # ONNX Runtime started every thread: the gateway grew to 24 GB and the OOM killer ended it
        ("intra_op_threads", 99_999_999, "less than or equal to 1024"),
        ("preprocess_threads", 99_999_999, "less than or equal to 1024"),
        ("request_timeout_s", float("inf"), "less than or equal to 86400"),  # an OverflowError at start-up
    ],
)
def test_settings_that_would_kill_the_gateway_are_refused(field, value, message):
    with pytest.raises(ValidationError, match=f"{field}\n.*{message}"):
        Settings(**{field: value})


def test_trusted_proxies_are_addresses_or_networks(monkeypatch):
    monkeypatch.setenv("RESNET_FORWARDED_ALLOW_IPS", "10.0.0.0/8, 192.0.2.1")
    assert Settings().forwarded_allow_ips == ["10.0.0.0/8", "192.0.2.1"]
    assert Settings(forwarded_allow_ips="").forwarded_allow_ips == []  # trust no proxy
    with pytest.raises(ValidationError, match="'ingress' is not an IP address, a CIDR network or \\*"):
        Settings(forwarded_allow_ips="10.0.0.0/8,ingress")


def test_api_keys_of_only_commas_are_refused_not_read_as_no_auth(monkeypatch):
    monkeypatch.setenv("RESNET_API_KEYS", " , ,")
    with pytest.raises(ValidationError, match="holds no keys; leave it empty to serve without API keys"):
        Settings()
    monkeypatch.setenv("RESNET_API_KEYS", "a, ,b")
    assert Settings().api_keys == ["a", "b"]
    monkeypatch.setenv("RESNET_API_KEYS", "")
    assert Settings().api_keys == []


@pytest.mark.parametrize(
    ("url", "protocol", "message"),
    [
        ("127.0.0.1", None, "'127.0.0.1' is not host:port"),  # tritonclient.grpc would dial port 443
        ("127.0.0.1:99999", None, "Port out of range"),  # gRPC would dial port 34463 (modulo 65536)
        ("127.0.0.1:0", None, "is not host:port"),
        ("127.0.0.1:8001/triton", None, "is not host:port"),
        (
            "ftp://127.0.0.1:8000",
            None,
            "give host:port, with http://, grpc://, https:// or grpcs:// before it",
        ),
        ("http://127.0.0.1:8000", "grpc", "'http://127.0.0.1:8000' is http but triton_protocol is 'grpc'"),
    ],
)
def test_a_triton_url_that_cannot_reach_triton_is_refused_at_start_up(url, protocol, message):
    given = {"triton_url": url} | ({"triton_protocol": protocol} if protocol else {})
    with pytest.raises(ValidationError, match=re.escape(message)):
        Settings(**given)


def test_a_triton_url_scheme_names_the_protocol(monkeypatch):
    # an http:// URL used to crash the gateway's start-up: tritonclient.http.aio refuses a scheme with a NameError
    over_http = Settings(triton_url="http://triton:8000")
    assert (over_http.triton_url, over_http.triton_protocol) == ("triton:8000", "http")
    monkeypatch.setenv("RESNET_TRITON_URL", "grpc://triton:8001")
    assert (Settings().triton_url, Settings().triton_protocol) == ("triton:8001", "grpc")


def test_root_path_is_a_path_prefix():
    assert Settings(root_path="/resnet/").root_path == "/resnet" and Settings(root_path="/").root_path == ""
    for bad in ("resnet", "/a b", "/x?y=1"):
        with pytest.raises(ValidationError, match="is not a path prefix like /resnet"):
            Settings(root_path=bad)


def test_the_repository_is_read_from_the_same_variable_as_export_and_triton(monkeypatch, tmp_path):
    monkeypatch.setenv("RESNET_MODEL_REPOSITORY", str(tmp_path / "shared-name"))
    assert Settings().repository == tmp_path / "shared-name"
    monkeypatch.delenv("RESNET_MODEL_REPOSITORY")
    monkeypatch.setenv("RESNET_REPOSITORY", str(tmp_path / "older-name"))  # still read
    assert Settings().repository == tmp_path / "older-name"
    assert Settings(repository=tmp_path / "flag").repository == tmp_path / "flag"  # flags win


def test_a_taken_port_is_one_line_error(repository):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [
            sys.executable,
            "-m",
            "cli.main",
            "serve",
            "--repository",
            str(repository),
            "--port",
            str(free_port()),
            "--grpc-port",
            str(port),
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith(f"resnet: error: cannot bind the gRPC port 127.0.0.1:{port}")


def test_a_host_that_is_not_this_machines_names_the_host_not_the_port(repository):
    def serve(host: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "cli.main", "serve", "--repository", str(repository), "--host", host]
        return subprocess.run(command, capture_output=True, text=True, timeout=60)

    not_here = serve("192.0.2.1")  # TEST-NET-1: reserved for documentation, never a local address
    assert not_here.returncode == 1 and not_here.stderr.count("\n") == 1
    assert "--host must be an address of this machine" in not_here.stderr
    assert "choose another with --port" not in not_here.stderr
    empty = serve("")  # uvicorn would bind every interface
    assert empty.returncode == 1 and "invalid settings: host" in empty.stderr


def test_serve_help_lists_flags_and_env_vars():
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "serve", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    names = ("--backend", "--max-batch-size", "RESNET_MAX_DELAY_MS", "--no-batching", "RESNET_API_KEYS")
    for text in (*names, "env RESNET_MODEL_REPOSITORY"):
        assert text in " ".join(result.stdout.split())


# --- request IDs -------------------------------------------------------------------------------------------


def test_every_answer_carries_a_request_id_and_errors_repeat_it(client):
    answers = [
        client.get("/healthz"),
        client.post("/v1/models/colors/classify", content=color_image("red"), headers=JPEG),
        client.get("/v1/models/nope"),
    ]
    ids = [answer.headers["x-request-id"] for answer in answers]
    assert all(re.fullmatch(r"[0-9a-f]{32}", request_id) for request_id in ids) and len(set(ids)) == 3
    assert assert_error(answers[2], 404, "model_not_found")["error"]["request_id"] == ids[2]


@pytest.mark.parametrize(
    ("offered", "kept"),
    [
        ("4bf92f3577b34da6a3ce929d0e0e4736", True),  # a W3C trace ID
        ("Root=1-67891233-abcdef012345678912345678", True),  # AWS's X-Amzn-Trace-Id form
        ("req/2026-12-07:42", True),
        ("x" * 129, False),  # too long for a log line
        ("two words", False),
        ("", False),
    ],
)
def test_a_plausible_request_id_from_the_client_is_kept_and_others_replaced(client, offered, kept):
    answer = client.get("/v1/models/nope", headers={"X-Request-ID": offered})
    request_id = answer.headers["x-request-id"]
    assert (request_id == offered) is kept and answer.json()["error"]["request_id"] == request_id
    if not kept:
        assert re.fullmatch(r"[0-9a-f]{32}", request_id)


def test_kserve_errors_keep_their_shape_and_carry_the_id_in_the_header(client):
    answer = client.get("/v2/models/nope", headers={"X-Request-ID": "trace-7"})
    assert answer.status_code == 404 and set(answer.json()) == {"error"}
    assert isinstance(answer.json()["error"], str) and answer.headers["x-request-id"] == "trace-7"


def test_an_unexpected_error_is_logged_with_its_request_id(repository, monkeypatch, caplog):
    def broken(self, name):
        raise RuntimeError("a bug")

    monkeypatch.setattr(ModelRegistry, "get", broken)
    app = create_app(Settings(repository=repository, grpc_port=0))
    with TestClient(app, raise_server_exceptions=False) as bug_client:
        answer = bug_client.get("/v1/models/colors", headers={"X-Request-ID": "support-ticket-9"})
    body = assert_error(answer, 500, "internal", "RuntimeError")
    assert body["error"]["request_id"] == answer.headers["x-request-id"] == "support-ticket-9"
    assert "unhandled error on GET /v1/models/colors (request support-ticket-9)" in caplog.text
