"""The gateway's gRPC API with the stock `tritonclient.grpc` client, against a real gateway process on loopback:
Triton's protocol and classification strings, every error status, API keys, message size, health checking; and
the same requests answered identically by a real Triton (nvidia-pytriton's CPU build) on the same repository."""

from __future__ import annotations

import queue
import time

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

from server.grpc_service import SERVICE_NAME, classification_strings
from tests.gateway_models import LABELS, color_image, colors_onnx, noise_jpeg
from tests.grpc_support import API_KEY, gateway_process
from tests.support import free_port, wait_until

AUTH = {"authorization": f"Bearer {API_KEY}"}
QUEUE_SIZE = 8
MAX_BODY_BYTES = 200_000


def images_input(images: list[bytes]) -> triton_grpc.InferInput:
    data = np.array(images, dtype=np.object_).reshape(len(images), 1)
    tensor = triton_grpc.InferInput("image", list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    return tensor


def tensor_input(batch: np.ndarray, datatype: str = "FP32") -> triton_grpc.InferInput:
    tensor = triton_grpc.InferInput("input", list(batch.shape), datatype)
    tensor.set_data_from_numpy(batch)
    return tensor


def classes(count: int) -> list[triton_grpc.InferRequestedOutput]:
    return [triton_grpc.InferRequestedOutput("logits", class_count=count)]


def status_of(call) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value.status(), caught.value.message()


@pytest.fixture(scope="module")
def gateway(pipeline_repository, tmp_path_factory):
    with gateway_process(
        tmp_path_factory.mktemp("grpc-logs"),
        "--repository",
        str(pipeline_repository),
        "--api-keys",
        API_KEY,
        "--queue-size",
        str(QUEUE_SIZE),
        "--max-body-bytes",
        str(MAX_BODY_BYTES),
    ) as running:
        yield running


@pytest.fixture(scope="module")
def client(gateway):
    with triton_grpc.InferenceServerClient(gateway.grpc_address) as grpc_client:
        yield grpc_client


def health_status(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        return (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            .status
        )


def test_server_and_model_metadata_as_triton_reports_them(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata(headers=AUTH).name == "resnet-gateway"
    index = client.get_model_repository_index(headers=AUTH)
    assert {(m.name, m.state) for m in index.models} == {("colors", "READY"), ("colors_pipeline", "READY")}
    assert client.is_model_ready("colors_pipeline", headers=AUTH) and not client.is_model_ready(
        "nope", headers=AUTH
    )

    pipeline = client.get_model_metadata("colors_pipeline", headers=AUTH)
    assert [(t.name, t.datatype, list(t.shape)) for t in pipeline.inputs] == [("image", "BYTES", [-1, 1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in pipeline.outputs] == [("logits", "FP32", [-1, 3])]
    tensor = client.get_model_metadata("colors", headers=AUTH)
    assert [(t.name, t.datatype, list(t.shape)) for t in tensor.inputs] == [
        ("input", "FP32", [-1, 3, 32, 32])
    ]
    config = client.get_model_config("colors", headers=AUTH).config
    assert config.max_batch_size == 32 and config.parameters["preprocess.crop"].string_value == "32"


def test_pipeline_classifies_encoded_images_with_triton_classification_strings(client):
    images = [color_image(color) for color in LABELS]
    result = client.infer(
        "colors_pipeline", [images_input(images)], outputs=classes(2), headers=AUTH, request_id="r1"
    )
    strings = result.as_numpy("logits")
    assert strings.shape == (3, 2) and result.get_response().id == "r1"
    for color, row in zip(LABELS, strings, strict=True):
        score, index, label = row[0].decode().split(":")
        assert (int(index), label) == (LABELS.index(color), color) and float(score) > 0

    raw = client.infer("colors_pipeline", [images_input(images)], headers=AUTH).as_numpy("logits")
    assert raw.dtype == np.float32 and raw.shape == (3, 3)
    assert [row.tolist() for row in strings] == classification_strings(raw, 2, LABELS).tolist()


def test_tensor_model_returns_the_networks_logits(client):
    batch = np.random.default_rng(0).normal(size=(5, 3, 32, 32)).astype(np.float32)
    logits = client.infer("colors", [tensor_input(batch)], headers=AUTH).as_numpy("logits")
    expected = ort.InferenceSession(colors_onnx(), providers=["CPUExecutionProvider"]).run(
        None, {"input": batch}
    )[0]
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)


def test_stream_infer_answers_each_request_and_survives_a_bad_one(client):
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)), headers=AUTH)
    try:
        client.async_stream_infer(
            "colors_pipeline", [images_input([color_image("green")])], outputs=classes(1)
        )
        client.async_stream_infer("colors_pipeline", [images_input([b"not an image"])], outputs=classes(1))
        client.async_stream_infer(
            "colors_pipeline", [images_input([color_image("blue")])], outputs=classes(1)
        )
        got = [answers.get(timeout=30) for _ in range(3)]
    finally:
        client.stop_stream()
    assert got[0][0].as_numpy("logits")[0, 0].decode().endswith(":1:green")
    assert got[1][0] is None and "not a decodable image" in got[1][1].message()
    assert got[2][0].as_numpy("logits")[0, 0].decode().endswith(":2:blue")


def test_errors_map_to_grpc_status_codes(client, gateway):
    good = images_input([color_image("red")])
    code, message = status_of(lambda: client.infer("nope", [good], headers=AUTH))
    assert code == "StatusCode.NOT_FOUND" and "'nope' not found" in message and "colors_pipeline" in message
    code, message = status_of(lambda: client.infer("colors", [good], model_version="7", headers=AUTH))
    assert code == "StatusCode.NOT_FOUND"

    wrong_shape = tensor_input(np.zeros((1, 3, 16, 16), np.float32))
    code, message = status_of(lambda: client.infer("colors", [wrong_shape], headers=AUTH))
    assert (
        code == "StatusCode.INVALID_ARGUMENT" and "[-1, 3, 32, 32]" in message and "[1, 3, 16, 16]" in message
    )
    wrong_dtype = tensor_input(np.zeros((1, 3, 32, 32), np.float64), "FP64")
    code, message = status_of(lambda: client.infer("colors", [wrong_dtype], headers=AUTH))
    assert code == "StatusCode.INVALID_ARGUMENT" and "FP64" in message
    code, message = status_of(
        lambda: client.infer("colors_pipeline", [images_input([b"\x89PNG broken"])], headers=AUTH)
    )
    assert code == "StatusCode.INVALID_ARGUMENT" and "image" in message
    code, message = status_of(
        lambda: client.infer(
            "colors_pipeline",
            [good],
            outputs=[triton_grpc.InferRequestedOutput("probabilities")],
            headers=AUTH,
        )
    )
    assert code == "StatusCode.INVALID_ARGUMENT" and "'logits'" in message

    doubled = pb.ModelInferRequest(model_name="colors")
    doubled.inputs.add(name="input", datatype="FP32", shape=[1, 3, 32, 32])
    doubled.raw_input_contents.extend([np.zeros(3072, "<f4").tobytes()] * 2)
    with grpc.insecure_channel(gateway.grpc_address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(doubled, metadata=tuple(AUTH.items()), timeout=10)
    assert (
        caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        and "2 raw_input_contents" in caught.value.details()
    )

    too_many = images_input([color_image("red")] * (QUEUE_SIZE + 1))  # more than the model may ever hold
    code, message = status_of(lambda: client.infer("colors_pipeline", [too_many], headers=AUTH))
    assert code == "StatusCode.INVALID_ARGUMENT" and "send fewer" in message

    pixels = np.zeros((2, 3, 32, 32), np.float32)
    pixels[1, 0, :2, 0] = [np.nan, -np.inf]
    code, message = status_of(lambda: client.infer("colors", [tensor_input(pixels)], headers=AUTH))
    assert code == "StatusCode.INVALID_ARGUMENT" and "2 of 6144 values are NaN or infinite" in message

    oversized = tensor_input(np.zeros((20, 3, 32, 32), np.float32))  # 245,760 bytes > --max-body-bytes
    code, message = status_of(lambda: client.infer("colors", [oversized], headers=AUTH))
    assert code == "StatusCode.RESOURCE_EXHAUSTED" and str(MAX_BODY_BYTES) in message


def odd_infer_requests() -> list[tuple[str, pb.ModelInferRequest]]:
    """Malformed ModelInfer requests: shapes, datatypes, raw contents, outputs, names, each wrong in one way."""

    def tensor_request(shape=(1, 3, 32, 32), datatype="FP32", raw=None, name="input", output=None):
        request = pb.ModelInferRequest(model_name="colors")
        request.inputs.add(name=name, datatype=datatype, shape=list(shape))
        request.raw_input_contents.append(np.zeros(3072, "<f4").tobytes() if raw is None else raw)
        if output is not None:
            wanted = request.outputs.add(name=output[0])
            if output[1]:
                setattr(wanted.parameters["classification"], *output[1])
        return request

    cases = [(f"shape {shape}", tensor_request(shape=shape)) for shape in ODD_SHAPES]
    cases += [(f"datatype {kind!r}", tensor_request(datatype=kind)) for kind in ("", "FP16", "BYTES", "fp32")]
    cases += [(f"{len(raw)} raw bytes", tensor_request(raw=raw)) for raw in (b"", b"\0" * 3, b"\0" * 12289)]
    cases += [(f"input {name!r}", tensor_request(name=name)) for name in ("", "image", "INPUT")]
    cases += [
        (f"output {output}", tensor_request(output=output))
        for output in [
            ("logits", ("int64_param", 0)),
            ("logits", ("int64_param", -5)),
            ("logits", ("bool_param", True)),
            ("logits", ("string_param", "3")),
            ("logits", ("double_param", 2.0)),
            ("", None),
            ("probabilities", None),
        ]
    ]
    for items, shape in [([b"x"], (1, 2)), ([], (0, 1)), ([b"x", b"y"], (1, 1)), ([b""], (1, 1))]:
        request = pb.ModelInferRequest(model_name="colors_pipeline")
        request.inputs.add(name="image", datatype="BYTES", shape=list(shape))
        encoded = serialize_byte_tensor(np.array(items, dtype=np.object_))
        request.raw_input_contents.append(encoded.item() if encoded.size else b"")
        cases.append((f"pipeline {len(items)} items as {shape}", request))
    framing = pb.ModelInferRequest(model_name="colors_pipeline")
    framing.inputs.add(name="image", datatype="BYTES", shape=[1, 1])
    framing.raw_input_contents.append(b"\xff\xff\xff\x7f")  # a length prefix far past the end
    cases.append(("pipeline framing", framing))
    for name, version in [("", ""), ("colors", "x"), ("../colors", ""), ("colors_pipeline_pipeline", "")]:
        request = tensor_request()
        request.model_name, request.model_version = name, version
        cases.append((f"model {name!r} version {version!r}", request))
    return cases


ODD_SHAPES = [(), (1,), (0, 3, 32, 32), (-1, 3, 32, 32), (1, 3, 32), (1, 3, 32, 32, 1), (2**62, 3, 32, 32)]


def test_malformed_infer_requests_are_refused_with_a_client_status(gateway):
    with grpc.insecure_channel(gateway.grpc_address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        codes = {}
        for label, request in odd_infer_requests():
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfer(request, metadata=tuple(AUTH.items()), timeout=10)
            codes[label] = caught.value.code()
    assert set(codes.values()) <= {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}, codes


def test_a_request_that_does_not_parse_is_invalid_argument_and_counted(gateway):
    """grpcio alone answers UNKNOWN before any handler runs, and the call is never counted."""
    metadata = tuple(AUTH.items())
    garbage = b"\x0a\xff\xff\xff\xff"  # field 1 (model_name) claims more bytes than follow
    good = pb.ModelInferRequest(model_name="colors_pipeline")
    good.inputs.add(name="image", datatype="BYTES", shape=[1, 1])
    good.raw_input_contents.append(serialize_byte_tensor(np.array([color_image("red")], np.object_)).item())
    method = f"/{SERVICE_NAME}/ModelInfer"
    before = grpc_calls(gateway.http_url).get(("ModelInfer", "INVALID_ARGUMENT"), 0)
    with grpc.insecure_channel(gateway.grpc_address) as channel:
        raw_infer = channel.unary_unary(method)  # no serializers: bytes as they are
        with pytest.raises(grpc.RpcError) as caught:
            raw_infer(garbage, metadata=metadata, timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"not a valid message for {method}" in caught.value.details()
        with pytest.raises(grpc.RpcError) as caught:
            raw_infer(garbage, timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED  # the key is checked first

        raw_stream = channel.stream_stream(f"/{SERVICE_NAME}/ModelStreamInfer")
        answers = raw_stream(iter([good.SerializeToString(), garbage]), metadata=metadata, timeout=10)
        first = pb.ModelStreamInferResponse.FromString(next(answers))
        assert not first.error_message and first.infer_response.model_name == "colors_pipeline"
        with pytest.raises(grpc.RpcError) as caught:
            next(answers)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = grpc_calls(gateway.http_url)[("ModelInfer", "INVALID_ARGUMENT")]
    assert after - before == 1


def test_overload_is_resource_exhausted(client):
    full = images_input([color_image("green", size=(400, 300))] * QUEUE_SIZE)  # each request fills the queue
    answers: queue.Queue = queue.Queue()
    for _ in range(20):
        client.async_infer(
            "colors_pipeline", [full], callback=lambda result, error: answers.put(error), headers=AUTH
        )
    errors = [answers.get(timeout=60) for _ in range(20)]
    refused = [error for error in errors if error is not None]
    assert refused and len(refused) < 20
    assert {error.status() for error in refused} == {"StatusCode.RESOURCE_EXHAUSTED"}
    assert "retry later" in refused[0].message()


def test_api_key_from_bearer_or_x_api_key_metadata(client):
    good = images_input([color_image("blue")])
    for headers in ({}, {"authorization": "Bearer wrong"}, {"x-api-key": "wrong"}):
        code, message = status_of(
            lambda headers=headers: client.infer("colors_pipeline", [good], headers=headers)
        )
        assert code == "StatusCode.UNAUTHENTICATED" and "x-api-key" in message
    code, _ = status_of(lambda: client.get_model_repository_index())
    assert code == "StatusCode.UNAUTHENTICATED"
    answer = client.infer("colors_pipeline", [good], outputs=classes(1), headers={"x-api-key": API_KEY})
    assert answer.as_numpy("logits")[0, 0].decode().endswith(":blue")
    assert client.is_server_ready()  # probes stay open, like /readyz


def grpc_calls(http_url: str) -> dict[tuple[str, str], float]:
    """resnet_grpc_requests_total from the gateway's /metrics, by (method, code)."""
    text = httpx.get(f"{http_url}/metrics", headers=AUTH).text
    return {
        (sample.labels["method"], sample.labels["code"]): sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "resnet_grpc_requests"
        for sample in family.samples
        if sample.name == "resnet_grpc_requests_total"
    }


def test_grpc_calls_are_counted_in_prometheus_metrics_by_method_and_code(client, gateway):
    before = grpc_calls(gateway.http_url)
    good = images_input([color_image("red")])
    for _ in range(3):
        client.infer("colors_pipeline", [good], outputs=classes(1), headers=AUTH)
    status_of(lambda: client.infer("nope", [good], headers=AUTH))
    status_of(lambda: client.infer("colors_pipeline", [good]))  # no key
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put(error), headers=AUTH)
    client.async_stream_infer("colors_pipeline", [good], outputs=classes(1))
    answers.get(timeout=30)
    client.stop_stream()
    expected = {
        ("ModelInfer", "OK"): 3,
        ("ModelInfer", "NOT_FOUND"): 1,
        ("ModelInfer", "UNAUTHENTICATED"): 1,
        ("ModelStreamInfer", "OK"): 1,
    }

    def counted() -> dict:
        after = grpc_calls(gateway.http_url)
        return {key: after.get(key, 0) - before.get(key, 0) for key in expected}

    wait_until(lambda: counted() == expected, timeout=10, what=f"gRPC call counts {expected}")
    metrics = httpx.get(f"{gateway.http_url}/metrics", headers=AUTH).text
    assert 'resnet_grpc_request_latency_seconds_count{method="ModelInfer"}' in metrics


def test_health_service_serving_when_ready(gateway):
    for service in ("", SERVICE_NAME):
        assert health_status(gateway.grpc_address, service) == health_pb2.HealthCheckResponse.SERVING


def test_backend_down_is_not_serving_and_unavailable(tmp_path):
    dead_triton = f"127.0.0.1:{free_port()}"  # nothing listens there
    with gateway_process(
        tmp_path,
        "--backend",
        "triton",
        "--triton-url",
        dead_triton,
        "--repository",
        str(tmp_path),
        ready_path="/healthz",
    ) as down:
        assert health_status(down.grpc_address) == health_pb2.HealthCheckResponse.NOT_SERVING
        with triton_grpc.InferenceServerClient(down.grpc_address) as down_client:
            assert down_client.is_server_live() and not down_client.is_server_ready()
            code, message = status_of(
                lambda: down_client.infer("colors_pipeline", [images_input([color_image("red")])])
            )
            assert code == "StatusCode.UNAVAILABLE" and dead_triton in message


def test_the_gateways_own_deadline_is_deadline_exceeded(pipeline_repository, tmp_path):
    """The gateway's own deadline (the client sets none): the batch would wait 10 s, the deadline is 0.3 s."""
    flags = ("--max-delay-ms", "10000", "--max-batch-size", "64", "--request-timeout-s", "0.3")
    with gateway_process(tmp_path, "--repository", str(pipeline_repository), *flags) as running:
        with triton_grpc.InferenceServerClient(running.grpc_address) as client:
            code, message = status_of(
                lambda: client.infer("colors_pipeline", [images_input([color_image("red")])])
            )
        assert code == "StatusCode.DEADLINE_EXCEEDED" and "deadline" in message
        assert grpc_calls(running.http_url)[("ModelInfer", "DEADLINE_EXCEEDED")] == 1


# --- statistics ------------------------------------------------------------------------------------------------


@pytest.fixture(params=["--batching", "--no-batching"])
def fresh_gateway(request, pipeline_repository, tmp_path):
    """A gateway no other test has sent requests to, so its statistics can be checked exactly."""
    with gateway_process(tmp_path, "--repository", str(pipeline_repository), request.param) as running:
        yield running


def duration(stats: dict, name: str) -> tuple[int, int]:
    """(count, ns) of a StatisticDuration in tritonclient's JSON, which leaves zeros out and writes uint64 as text."""
    value = stats.get(name, {})
    return int(value.get("count", 0)), int(value.get("ns", 0))


def counter(stats: dict, name: str) -> int:
    return int(stats.get(name, 0))


def statistics_of(client, model: str) -> dict:
    [stats] = client.get_inference_statistics(model_name=model, as_json=True)["model_stats"]
    return stats


def executions_by_batch_size(stats: dict) -> dict[int, int]:
    return {
        int(batch["batch_size"]): duration(batch, "compute_infer")[0]
        for batch in stats.get("batch_stats", [])
    }


def classify_over_http(url: str, images: list[bytes]) -> None:
    files = [("file", (f"{i}.jpg", image, "image/jpeg")) for i, image in enumerate(images)]
    response = httpx.post(f"{url}/v1/models/colors/classify", files=files, timeout=30)
    assert response.status_code == 200, response.text


def test_model_statistics_count_requests_images_and_executions_as_triton_does(fresh_gateway):
    images = [color_image(color) for color in LABELS]
    with triton_grpc.InferenceServerClient(fresh_gateway.grpc_address) as client:
        assert "statistics" in client.get_server_metadata().extensions
        everything = client.get_inference_statistics(as_json=True)["model_stats"]
        assert [(m["name"], counter(m, "inference_count")) for m in everything] == [
            ("colors", 0),
            ("colors_pipeline", 0),
        ]
        before = int(time.time() * 1000)
        for count in (1, 2, 3):  # encoded images over gRPC: 6 images in 3 requests
            client.infer("colors_pipeline", [images_input(images[:count])])
        classify_over_http(fresh_gateway.http_url, images[:1])  # and over HTTP: 3 images in 2 requests
        classify_over_http(fresh_gateway.http_url, images[:2])
        for count in (4, 1):  # tensors: 5 images in 2 requests
            client.infer("colors", [tensor_input(np.zeros((count, 3, 32, 32), np.float32))])

        pipeline = statistics_of(client, "colors_pipeline")
        assert pipeline["version"] == "1"
        assert before <= counter(pipeline, "last_inference") <= time.time() * 1000
        assert counter(pipeline, "inference_count") == 9
        # As for a Triton ensemble: one execution per successful request, of the request's size.
        assert counter(pipeline, "execution_count") == 5
        assert executions_by_batch_size(pipeline) == {1: 2, 2: 2, 3: 1}

        # The classifier saw the 5 decoded requests and the 2 tensor requests: 14 images. Sent one at a time,
        # each request is a backend call of its own, with or without gateway batching.
        classifier = statistics_of(client, "colors")
        assert counter(classifier, "inference_count") == 14 and counter(classifier, "execution_count") == 7
        assert executions_by_batch_size(classifier) == {1: 3, 2: 2, 3: 1, 4: 1}

        for stats, requests in ((pipeline, 5), (classifier, 7)):
            inference = stats["inference_stats"]
            success_count, success_ns = duration(inference, "success")
            assert success_count == requests
            for stage in ("queue", "compute_input", "compute_infer", "compute_output"):
                assert duration(inference, stage)[0] == requests
            compute_ns = sum(duration(inference, stage)[1] for stage in ("compute_input", "compute_infer"))
            assert duration(inference, "compute_infer")[1] > 0 and compute_ns > 0
            assert duration(inference, "fail") == (0, 0)
            # A request lasts at least its wait for a batch plus that batch's compute.
            assert success_ns >= duration(inference, "queue")[1] + compute_ns
            # Each backend call carried one request, so the calls' compute is the requests' compute.
            batch_infer_ns = sum(duration(batch, "compute_infer")[1] for batch in stats["batch_stats"])
            assert batch_infer_ns == duration(inference, "compute_infer")[1]
        # Decoding is the pipeline's input preparation, so it is timed; the classifier gets ready tensors.
        input_ns = [
            duration(stats["inference_stats"], "compute_input")[1] for stats in (pipeline, classifier)
        ]
        assert input_ns[0] > 0 and input_ns[1] >= 0


def test_model_statistics_count_failures_where_the_request_failed(fresh_gateway):
    with triton_grpc.InferenceServerClient(fresh_gateway.grpc_address) as client:
        status_of(lambda: client.infer("colors", [tensor_input(np.zeros((1, 3, 16, 16), np.float32))]))
        status_of(lambda: client.infer("colors_pipeline", [images_input([b"not an image"])]))
        response = httpx.post(
            f"{fresh_gateway.http_url}/v1/models/colors/classify",
            content=b"not an image either",
            headers={"content-type": "image/jpeg"},
        )
        assert response.status_code == 400
        classifier, pipeline = statistics_of(client, "colors"), statistics_of(client, "colors_pipeline")
    # The wrong shape failed at the classifier; the undecodable images at the pipeline's decoding step, so they
    # never reached the classifier (as in a Triton ensemble, where the preprocessing model fails them).
    assert duration(classifier["inference_stats"], "fail")[0] == 1
    failed_count, failed_ns = duration(pipeline["inference_stats"], "fail")
    assert failed_count == 2 and failed_ns > 0
    for stats in (classifier, pipeline):
        assert duration(stats["inference_stats"], "success") == (0, 0)
        assert counter(stats, "inference_count") == 0 and counter(stats, "execution_count") == 0


def test_model_statistics_name_and_version_filter_like_triton(client):
    [stats] = client.get_inference_statistics("colors", "1", headers=AUTH).model_stats
    assert (stats.name, stats.version) == ("colors", "1")
    names = [m.name for m in client.get_inference_statistics(headers=AUTH).model_stats]
    assert names == ["colors", "colors_pipeline"]
    code, message = status_of(lambda: client.get_inference_statistics("nope", headers=AUTH))
    assert code == "StatusCode.NOT_FOUND" and "'nope' not found" in message and "colors_pipeline" in message
    code, message = status_of(lambda: client.get_inference_statistics("colors_pipeline", "7", headers=AUTH))
    assert code == "StatusCode.NOT_FOUND" and "no version '7'" in message
    code, _ = status_of(lambda: client.get_inference_statistics("colors"))
    assert code == "StatusCode.UNAUTHENTICATED"


# --- against the real Triton ---------------------------------------------------------------------------------


@pytest.mark.triton
@pytest.mark.slow
def test_gateway_and_triton_answer_byte_for_byte_alike(client, pipeline_triton):
    images = [noise_jpeg(seed, size) for seed, size in enumerate([(64, 48), (50, 90), (33, 33), (120, 80)])]
    images += [color_image(color) for color in LABELS]
    batch = np.random.default_rng(1).normal(size=(3, 3, 32, 32)).astype(np.float32)
    with triton_grpc.InferenceServerClient(pipeline_triton.grpc_url) as real:
        assert real.get_server_metadata().name == "triton"
        for class_count in (1, 3, 10):
            ours = client.infer(
                "colors_pipeline", [images_input(images)], outputs=classes(class_count), headers=AUTH
            )
            theirs = real.infer("colors_pipeline", [images_input(images)], outputs=classes(class_count))
            assert ours.get_output("logits").shape == theirs.get_output("logits").shape
            assert ours.as_numpy("logits").tolist() == theirs.as_numpy("logits").tolist()
        ours = client.infer("colors", [tensor_input(batch)], headers=AUTH).as_numpy("logits")
        theirs = real.infer("colors", [tensor_input(batch)]).as_numpy("logits")
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
        mine, real_meta = (
            client.get_model_metadata("colors_pipeline", headers=AUTH),
            real.get_model_metadata("colors_pipeline"),
        )
        assert [(t.name, t.datatype, list(t.shape)) for t in mine.inputs] == [
            (t.name, t.datatype, list(t.shape)) for t in real_meta.inputs
        ]
        assert [(t.name, t.datatype, list(t.shape)) for t in mine.outputs] == [
            (t.name, t.datatype, list(t.shape)) for t in real_meta.outputs
        ]


def test_grpc_vs_http_benchmark_runs_against_the_gateway(gateway):
    from server.grpc_bench import compare, markdown_table

    rows = compare(
        gateway.http_url,
        gateway.grpc_url,
        "colors",
        [color_image(c) for c in LABELS],
        concurrencies=(2,),
        requests=12,
        api_key=API_KEY,
    )
    assert [(r.protocol, r.requests, r.errors) for r in rows] == [
        ("http", 12, 0),
        ("http /v2", 12, 0),
        ("grpc", 12, 0),
    ]
    assert all(r.throughput > 0 and 0 < r.p50_ms <= r.p99_ms for r in rows)
    assert markdown_table(rows).count("\n") == 4
