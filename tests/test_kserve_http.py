"""The gateway's KServe v2 HTTP API (`/v2`) with the stock `tritonclient.http` client and raw HTTP, against a real
gateway process on loopback: the same answers as its gRPC API, binary and JSON tensors, compression both ways,
Triton's statistics, KServe error bodies for every bad request; and the same requests answered alike by a real
Triton (nvidia-pytriton's CPU build) on the same repository."""

from __future__ import annotations

import gzip
import json
import zlib
from types import MappingProxyType

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from google.protobuf.json_format import MessageToDict
from tritonclient.utils import InferenceServerException

from server.kserve_http import HEADER_LENGTH, accepted_encoding, infer_http_response, triton_json
from tests.gateway_models import LABELS, color_image, colors_onnx, noise_jpeg
from tests.grpc_support import API_KEY, gateway_process

AUTH = MappingProxyType({"authorization": f"Bearer {API_KEY}"})  # read-only: see auth()


def auth() -> dict[str, str]:
    """A fresh header dict per call: tritonclient.http writes its own headers (body length, encodings) into it."""
    return dict(AUTH)


MAX_BODY_BYTES = 200_000
IMAGES = [noise_jpeg(seed, size) for seed, size in enumerate([(64, 48), (50, 90), (33, 33)])] + [
    color_image(color) for color in LABELS
]


def images_input(images: list[bytes], binary: bool = True) -> triton_http.InferInput:
    data = np.array(images, dtype=np.object_).reshape(len(images), 1)
    tensor = triton_http.InferInput("image", list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data, binary_data=binary)
    return tensor


def tensor_input(batch: np.ndarray, binary: bool = True) -> triton_http.InferInput:
    tensor = triton_http.InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch, binary_data=binary)
    return tensor


def classes(count: int, binary: bool = True) -> list[triton_http.InferRequestedOutput]:
    return [triton_http.InferRequestedOutput("logits", binary_data=binary, class_count=count)]


@pytest.fixture(scope="module")
def gateway(pipeline_repository, tmp_path_factory):
    with gateway_process(
        tmp_path_factory.mktemp("kserve-logs"),
        "--repository",
        str(pipeline_repository),
        "--api-keys",
        API_KEY,
        "--max-body-bytes",
        str(MAX_BODY_BYTES),
    ) as running:
        yield running


@pytest.fixture(scope="module")
def client(gateway):
    with triton_http.InferenceServerClient(gateway.http_url.removeprefix("http://")) as http_client:
        yield http_client


@pytest.fixture(scope="module")
def grpc_client(gateway):
    with triton_grpc.InferenceServerClient(gateway.grpc_address) as grpc_client:
        yield grpc_client


def post_infer(gateway, model: str, body: bytes, headers: dict | None = None) -> httpx.Response:
    return httpx.post(
        f"{gateway.http_url}/v2/models/{model}/infer", content=body, headers={**AUTH, **(headers or {})}
    )


def test_health_metadata_and_config_as_triton_reports_them(client, gateway):
    assert client.is_server_live() and client.is_server_ready()  # probes need no key
    metadata = client.get_server_metadata(headers=auth())
    assert metadata["name"] == "resnet-gateway" and "binary_tensor_data" in metadata["extensions"]
    index = client.get_model_repository_index(headers=auth())
    assert [(m["name"], m["state"]) for m in index] == [("colors", "READY"), ("colors_pipeline", "READY")]
    assert client.is_model_ready("colors_pipeline", headers=auth())
    assert not client.is_model_ready("nope", headers=auth())
    assert not client.is_model_ready("colors", model_version="7", headers=auth())

    pipeline = client.get_model_metadata("colors_pipeline", headers=auth())
    assert pipeline["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1, 1]}]
    assert pipeline["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]}]
    versioned = client.get_model_metadata("colors", model_version="1", headers=auth())
    assert versioned["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    config = client.get_model_config("colors", headers=auth())
    assert config["max_batch_size"] == 32 and config["input"][0]["dims"] == [3, 32, 32]  # numbers, as Triton
    assert config["parameters"]["preprocess.crop"] == {"string_value": "32"}


def test_pipeline_answers_as_over_grpc_binary_or_json_compressed_or_not(client, grpc_client):
    data = np.array(IMAGES, dtype=np.object_).reshape(len(IMAGES), 1)
    grpc_images = triton_grpc.InferInput("image", list(data.shape), "BYTES")
    grpc_images.set_data_from_numpy(data)
    wanted = [triton_grpc.InferRequestedOutput("logits", class_count=2)]
    expected = grpc_client.infer("colors_pipeline", [grpc_images], outputs=wanted, headers=auth())
    expected = expected.as_numpy("logits").tolist()
    for binary_out in (True, False):
        for compression in (None, "gzip", "deflate"):
            result = client.infer(
                "colors_pipeline",
                [images_input(IMAGES)],
                outputs=classes(2, binary_out),
                headers=auth(),
                request_id="r7",
                request_compression_algorithm=compression,
                response_compression_algorithm=compression,
            )
            got = result.as_numpy("logits")
            assert got.shape == (len(IMAGES), 2) and result.get_response()["id"] == "r7"
            as_bytes = [[item.encode() if isinstance(item, str) else item for item in row] for row in got]
            assert as_bytes == expected  # JSON outputs come back as strings, binary ones as bytes
    for color, row in zip(LABELS, expected[-3:], strict=True):
        assert row[0].decode().endswith(f":{LABELS.index(color)}:{color}")


def test_tensor_model_returns_the_networks_logits_as_binary_or_json(client):
    batch = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)  # JSON: 120 kB of text
    network = ort.InferenceSession(colors_onnx(), providers=["CPUExecutionProvider"])
    expected = network.run(None, {"input": batch})[0]
    binary = client.infer("colors", [tensor_input(batch)], headers=auth())  # no outputs named: all, binary
    assert binary.get_response()["outputs"][0]["parameters"] == {"binary_data_size": expected.size * 4}
    as_json = client.infer(
        "colors",
        [tensor_input(batch, binary=False)],
        outputs=[triton_http.InferRequestedOutput("logits", binary_data=False)],
        headers=auth(),
    )
    assert "data" in as_json.get_response()["outputs"][0]
    for result in (binary, as_json):
        np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-5, atol=1e-6)


def test_an_overflowing_output_comes_back_as_binary_data(client):
    """JSON cannot carry the non-finite logits of finite pixels near FP32's limit (400 in BAD_REQUESTS); binary can."""
    overflowing = np.full((1, 3, 32, 32), 3e38, np.float32)
    result = client.infer("colors", [tensor_input(overflowing)], headers=auth())
    assert not np.isfinite(result.as_numpy("logits")).any()  # inf * 0 in the Gemm: NaN


def test_statistics_over_http_are_the_grpc_statistics_written_as_triton_does(client, grpc_client):
    client.infer("colors_pipeline", [images_input(IMAGES[:2])], headers=auth())
    over_http = client.get_inference_statistics("colors_pipeline", headers=auth())["model_stats"][0]
    over_grpc = grpc_client.get_inference_statistics("colors_pipeline", headers=auth()).model_stats[0]
    assert over_http == triton_json(over_grpc)
    assert over_http["inference_count"] >= 2 and over_http["inference_stats"]["success"]["count"] >= 1
    assert over_http["inference_stats"]["fail"] == {"count": 0, "ns": 0}  # zeros written, as integers
    every = client.get_inference_statistics(headers=auth())["model_stats"]
    assert [s["name"] for s in every] == ["colors", "colors_pipeline"]
    with pytest.raises(InferenceServerException, match="no version"):
        client.get_inference_statistics("colors", model_version="3", headers=auth())


def test_failures_count_where_they_fail_as_over_grpc(gateway, client):
    def failures() -> int:
        stats = client.get_inference_statistics("colors", headers=auth())["model_stats"][0]
        return stats["inference_stats"]["fail"]["count"]

    before = failures()
    wrong_shape = np.zeros((1, 3, 16, 16), np.float32)
    with pytest.raises(InferenceServerException, match=r"\[1, 3, 16, 16\]"):
        client.infer("colors", [tensor_input(wrong_shape)], headers=auth())
    assert failures() == before + 1  # the model refused it: counted, as over gRPC
    assert post_infer(gateway, "colors", b'{"inputs": [').status_code == 400
    assert failures() == before + 1  # not even parsed: no model saw it (Triton's HTTP frontend alike)


def test_triton_json_writes_int64_fields_as_numbers():
    message = triton_grpc.service_pb2.ModelStatistics(name="m", inference_count=2**40, last_inference=7)
    message.batch_stats.add(batch_size=3).compute_infer.ns = 2**35
    written = triton_json(message)
    assert written["inference_count"] == 2**40 and written["last_inference"] == 7
    assert written["batch_stats"][0]["compute_infer"] == {"count": 0, "ns": 2**35}
    assert MessageToDict(message)["inferenceCount"] == str(2**40)  # what protobuf's JSON mapping alone gives


def logits_response(rows: int) -> triton_grpc.service_pb2.ModelInferResponse:
    logits = np.arange(rows * 10, dtype="<f4").reshape(rows, 10)
    response = triton_grpc.service_pb2.ModelInferResponse(model_name="m", model_version="1")
    response.outputs.add(name="logits", datatype="FP32", shape=logits.shape)
    response.raw_output_contents.append(logits.tobytes())
    return response


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
def test_responses_are_compressed_when_asked_and_worth_it(coding):
    large = infer_http_response(logits_response(100), [False], f"{coding}, br")
    assert large.headers["content-encoding"] == coding
    inflated = gzip.decompress(large.body) if coding == "gzip" else zlib.decompress(large.body)
    assert json.loads(inflated)["outputs"][0]["data"] == list(range(1000))
    binary = infer_http_response(logits_response(100), [True], coding)
    header_length = int(binary.headers[HEADER_LENGTH.lower()])
    inflated = gzip.decompress(binary.body) if coding == "gzip" else zlib.decompress(binary.body)
    assert np.frombuffer(inflated[header_length:], "<f4").tolist() == list(range(1000))
    small = infer_http_response(logits_response(1), [False], coding)  # a few hundred bytes: sent as they are
    assert "content-encoding" not in small.headers and json.loads(small.body)["model_name"] == "m"
    assert "content-encoding" not in infer_http_response(logits_response(100), [False], "").headers


def test_accept_encoding_follows_quality_values():
    assert accepted_encoding("gzip") == "gzip"
    assert accepted_encoding("deflate, gzip;q=0.5") == "gzip"
    assert accepted_encoding("gzip;q=0, deflate") == "deflate"
    assert accepted_encoding("gzip; q=0.000") is None
    assert accepted_encoding("br, identity") is None and accepted_encoding("") is None


TENSOR_JSON = {"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0.5] * 3072}


def infer_json(**fields) -> bytes:
    return json.dumps({"inputs": [TENSOR_JSON], **fields}).encode()


BINARY_HEADER = json.dumps(
    {"inputs": [{**TENSOR_JSON, "data": None, "parameters": {"binary_data_size": 12288}}]}
).encode()
BAD_REQUESTS = [
    ("not JSON", "colors", b'{"inputs": [{', {}, 400, "Invalid JSON"),
    ("no inputs", "colors", b'{"inputs": []}', {}, 400, "inputs"),
    ("negative dim", "colors", infer_json(inputs=[{**TENSOR_JSON, "shape": [-1, 3, 32, 32]}]), {}, 400, "shape"),
    ("dim past int64", "colors", infer_json(inputs=[{**TENSOR_JSON, "shape": [2**70, 3, 32, 32]}]), {}, 400, "shape"),
    ("too few values", "colors", infer_json(inputs=[{**TENSOR_JSON, "data": [1, 2]}]), {}, 400, "holds 2 values"),
    ("ragged data", "colors", infer_json(inputs=[{**TENSOR_JSON, "data": [[1], [2, 3]]}]), {}, 400, "ragged"),
    ("strings as FP32", "colors", infer_json(inputs=[{**TENSOR_JSON, "data": ["a"] * 3072}]), {}, 400, "numbers"),
    ("booleans as FP32", "colors", infer_json(inputs=[{**TENSOR_JSON, "data": [True] * 3072}]), {}, 400, "numbers"),
    ("NaN", "colors", infer_json(inputs=[{**TENSOR_JSON, "data": [float("nan")] * 3072}]), {}, 400, "3072 of 3072 values are NaN or infinite"),
    ("past FP32's range", "colors", infer_json(inputs=[{**TENSOR_JSON, "data": [0.5] * 3071 + [1e39]}]), {}, 400, "1 of 3072 values are NaN"),
    ("binary infinity", "colors", BINARY_HEADER + np.full(3072, np.inf, "<f4").tobytes(), {HEADER_LENGTH: str(len(BINARY_HEADER))}, 400, "NaN or infinite"),
    ("output past JSON", "colors", infer_json(inputs=[{**TENSOR_JSON, "data": [3e38] * 3072}]), {}, 400, "JSON cannot carry"),
    ("wrong datatype", "colors", infer_json(inputs=[{**TENSOR_JSON, "datatype": "FP64"}]), {}, 400, "FP64"),
    ("wrong input name", "colors", infer_json(inputs=[{**TENSOR_JSON, "name": "x"}]), {}, 400, "'input'"),
    (
        "no data",
        "colors",
        json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32"}]}).encode(),
        {},
        400,
        "neither 'data' nor",
    ),
    ("unknown output", "colors", infer_json(outputs=[{"name": "probs"}]), {}, 400, "only output is 'logits'"),
    (
        "bad class count",
        "colors",
        infer_json(outputs=[{"name": "logits", "parameters": {"classification": "all"}}]),
        {},
        400,
        "classification",
    ),
    ("bad timeout", "colors", infer_json(parameters={"timeout": -5}), {}, 400, "microseconds"),
    ("binary_data as text", "colors", infer_json(outputs=[{"name": "logits", "parameters": {"binary_data": "true"}}]), {}, 400, "'binary_data' parameter of output 'logits' must be true or false; got \"true\""),
    ("binary_data_output as 1", "colors", infer_json(parameters={"binary_data_output": 1}), {}, 400, "'binary_data_output' parameter must be true or false; got 1"),
    ("bad priority", "colors", infer_json(parameters={"priority": "high"}), {}, 400, "'priority' parameter must be an integer >= 0"),
    ("header length past body", "colors", infer_json(), {HEADER_LENGTH: "999999"}, 400, HEADER_LENGTH),
    ("header length not a number", "colors", infer_json(), {HEADER_LENGTH: "ten"}, 400, HEADER_LENGTH),
    ("binary size past body", "colors", BINARY_HEADER, {HEADER_LENGTH: str(len(BINARY_HEADER))}, 400, "only 0 bytes"),
    ("unclaimed binary", "colors", infer_json() + b"extra", {HEADER_LENGTH: str(len(infer_json()))}, 400, "5 bytes"),
    ("text BYTES", "colors_pipeline", b'{"inputs":[{"name":"image","shape":[1,1],"datatype":"BYTES","data":[1]}]}', {}, 400, "strings"),
    ("not an image", "colors_pipeline", b'{"inputs":[{"name":"image","shape":[1,1],"datatype":"BYTES","data":["abc"]}]}', {}, 400, "decodable image"),
    ("unknown encoding", "colors", infer_json(), {"content-encoding": "br"}, 415, "gzip, deflate"),
    ("not gzip", "colors", infer_json(), {"content-encoding": "gzip"}, 400, "not valid gzip"),
    ("truncated deflate", "colors", zlib.compress(infer_json())[:-9], {"content-encoding": "deflate"}, 400, "truncated"),
    ("gzip bomb", "colors", gzip.compress(b" " * (MAX_BODY_BYTES + 1)), {"content-encoding": "gzip"}, 413, str(MAX_BODY_BYTES)),
    ("unknown model", "nope", infer_json(), {}, 404, "available: colors, colors_pipeline"),
    ("unknown version", "colors/versions/9", infer_json(), {}, 404, "no version '9'"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("model", "body", "headers", "status", "message"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_requests_get_a_kserve_error_naming_the_problem(gateway, model, body, headers, status, message):
    response = post_infer(gateway, model, body, headers)
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"} and message in response.json()["error"]


ODD_VALUES = [None, True, -1, 2**70, 1.5, "x", "", [], [1, [2]], {}, {"a": 1}, [None], ["a", 1]]


def mutated_requests() -> list[dict]:
    """A valid inference request with each of its fields, at every depth, replaced by each odd value in turn."""
    base = {
        "id": "x",
        "parameters": {"binary_data_output": True, "timeout": 10**6},
        "inputs": [{**TENSOR_JSON, "parameters": {}}],
        "outputs": [{"name": "logits", "parameters": {"classification": 2, "binary_data": False}}],
    }

    def paths(node, prefix=()):
        keys = (
            list(node)
            if isinstance(node, dict)
            else range(min(len(node), 2))
            if isinstance(node, list)
            else []
        )
        for key in keys:
            yield (*prefix, key)
            yield from paths(node[key], (*prefix, key))

    requests = []
    for path in paths(base):
        for value in ODD_VALUES:
            request = json.loads(json.dumps(base))
            parent = request
            for key in path[:-1]:
                parent = parent[key]
            parent[path[-1]] = value
            requests.append(request)
    return requests


def test_malformed_requests_never_get_a_500(gateway):
    statuses = {
        post_infer(gateway, "colors", json.dumps(request).encode()).status_code
        for request in mutated_requests()
    }
    assert statuses <= {200, 400}, statuses


def test_the_gateway_keeps_serving_after_bad_requests(gateway, client):
    for case in BAD_REQUESTS:
        post_infer(gateway, case[1], case[2], case[3])
    result = client.infer(
        "colors_pipeline", [images_input([color_image("blue")])], outputs=classes(1), headers=auth()
    )
    assert result.as_numpy("logits")[0, 0].decode().endswith(":2:blue")


def test_errors_outside_inference_are_kserve_shaped_too(gateway, client):
    with pytest.raises(InferenceServerException) as caught:
        client.get_model_metadata("nope", headers=auth())
    assert caught.value.status() == "404" and "'nope' not found" in caught.value.message()
    unsupported = httpx.get(f"{gateway.http_url}/v2/systemsharedmemory/status", headers=auth())
    assert unsupported.status_code == 404 and "shared memory" in unsupported.json()["error"]
    index = httpx.post(f"{gateway.http_url}/v2/repository/index", content=b"[1]", headers=auth())
    assert index.status_code == 400 and "JSON object" in index.json()["error"]
    ready_only = httpx.post(f"{gateway.http_url}/v2/repository/index", json={"ready": True}, headers=auth())
    assert [m["name"] for m in ready_only.json()] == ["colors", "colors_pipeline"]
    ready_as_text = httpx.post(
        f"{gateway.http_url}/v2/repository/index", json={"ready": "true"}, headers=auth()
    )
    assert (
        ready_as_text.status_code == 400 and "'ready' must be true or false" in ready_as_text.json()["error"]
    )
    too_big = post_infer(gateway, "colors", b"{" + b" " * MAX_BODY_BYTES + b"}")
    assert too_big.status_code == 413 and str(MAX_BODY_BYTES) in too_big.json()["error"]


def test_api_key_is_required_except_for_probes(gateway, client):
    for headers in ({}, {"authorization": "Bearer wrong"}, {"x-api-key": "wrong"}):
        with pytest.raises(InferenceServerException) as caught:
            client.infer("colors_pipeline", [images_input(IMAGES[:1])], headers=headers)
        assert caught.value.status() == "401" and "API key" in caught.value.message()
    denied = httpx.get(f"{gateway.http_url}/v2")
    assert denied.status_code == 401 and set(denied.json()) == {"error"}
    assert client.get_server_metadata(headers={"x-api-key": API_KEY})["name"] == "resnet-gateway"
    assert httpx.get(f"{gateway.http_url}/v2/health/live").status_code == 200
    assert httpx.get(f"{gateway.http_url}/v2/health/ready").status_code == 200


def test_not_ready_is_a_400_with_the_reason(tmp_path, pipeline_repository):
    with gateway_process(
        tmp_path,
        "--repository",
        str(pipeline_repository),
        "--backend",
        "triton",
        "--triton-url",
        "127.0.0.1:9",  # nothing listens there
        ready_path="/healthz",
    ) as down:
        ready = httpx.get(f"{down.http_url}/v2/health/ready")
        assert ready.status_code == 400 and "triton" in ready.json()["error"].lower()
        model = httpx.get(f"{down.http_url}/v2/models/colors/ready")
        assert model.status_code == 400 and model.json()["error"]
        assert httpx.get(f"{down.http_url}/v2/health/live").status_code == 200


# --- against the real Triton ---------------------------------------------------------------------------------


@pytest.mark.triton
@pytest.mark.slow
def test_gateway_and_triton_answer_http_requests_alike(gateway, client, pipeline_triton):
    batch = np.random.default_rng(2).normal(size=(2, 3, 32, 32)).astype(np.float32)
    requests = [
        ("colors", infer_json(id="a", outputs=[{"name": "logits", "parameters": {"classification": 2}}]), {}),
        ("colors", json.dumps({"inputs": [{**TENSOR_JSON, "shape": [2, 3, 32, 32], "data": batch.ravel().tolist()}]}).encode(), {}),
    ]  # fmt: skip
    with triton_http.InferenceServerClient(pipeline_triton.http_address) as real:
        assert real.get_server_metadata()["name"] == "triton"
        for images in (IMAGES, IMAGES[:1]):
            for count in (1, 3):
                wanted = classes(count, binary=False)
                ours = client.infer("colors_pipeline", [images_input(images)], outputs=wanted, headers=auth())
                theirs = real.infer("colors_pipeline", [images_input(images)], outputs=wanted)
                assert ours.get_response()["outputs"] == theirs.get_response()["outputs"]
        for name in ("colors", "colors_pipeline"):
            mine, real_meta = (
                httpx.get(f"{gateway.http_url}/v2/models/{name}", headers=auth()).json(),
                real.get_model_metadata(name),
            )
            assert (mine["inputs"], mine["outputs"]) == (real_meta["inputs"], real_meta["outputs"])
    for model, body, headers in requests:
        ours = post_infer(gateway, model, body, headers).json()
        theirs = httpx.post(
            f"{pipeline_triton.http_url}/v2/models/{model}/infer", content=body, headers=headers
        ).json()
        assert ours.pop("model_version") and theirs.pop("model_version")
        for mine, real_output in zip(ours.pop("outputs"), theirs.pop("outputs"), strict=True):
            assert {k: v for k, v in mine.items() if k != "data"} == {
                k: v for k, v in real_output.items() if k != "data"
            }
            if mine["datatype"] == "FP32":
                np.testing.assert_allclose(mine["data"], real_output["data"], rtol=1e-5, atol=1e-6)
            else:
                assert mine["data"] == real_output["data"]
        assert ours == theirs  # id and model_name
    for mistyped in ({"binary_data_output": "yes"}, {"priority": -3}):  # Triton refuses them with a 500
        body = infer_json(parameters=mistyped)
        refused = httpx.post(f"{pipeline_triton.http_url}/v2/models/colors/infer", content=body)
        assert refused.status_code >= 400 and "Unable to parse" in refused.json()["error"]
        assert post_infer(gateway, "colors", body).status_code == 400
    missing = httpx.get(f"{pipeline_triton.http_url}/v2/models/nope")
    assert missing.status_code == httpx.get(f"{gateway.http_url}/v2/models/nope", headers=auth()).status_code
