"""A real Triton (the bundled CPU build) on loopback serving a repository the exporter wrote.

One server per module: exporting ResNet-20 and starting Triton takes seconds, the tests then take milliseconds.
"""

from __future__ import annotations

import io
import re
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from export import workflow
from export.errors import TritonError
from export.onnx import session
from export.repository import Journal
from export.source import from_arch
from export.triton_server import TritonServer, find_tritonserver
from server.preprocessing import preprocess_image
from server.spec import IMAGE_INPUT_NAME, INPUT_NAME, OUTPUT_NAME
from tests.gateway_models import write_misfit_model
from tests.support import VENV_BIN, children_of, free_ports, has_ended, http_ok, wait_until

pytestmark = [pytest.mark.triton, pytest.mark.slow]

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    source = from_arch("resnet20", "random")
    source.classes = CLASSES
    root = tmp_path_factory.mktemp("model_repository")
    workflow.export_to_repository(
        source, workflow.ExportOptions(name="r20", repository=root, measure_latency=False)
    )
    return root


@pytest.fixture(scope="module")
def triton(repository, tmp_path_factory):
    try:
        find_tritonserver()
    except Exception as error:  # noqa: BLE001 - any reason the binary is unusable is a reason to skip
        pytest.skip(f"no usable tritonserver: {error}")
    log = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    with TritonServer(repository, log_path=log) as server:
        yield server


@pytest.fixture(scope="module")
def reference(repository):
    runtime = session(repository / "r20" / "1" / "model.onnx")
    return lambda batch: runtime.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]


@pytest.fixture(scope="module")
def jpeg(request) -> bytes:
    try:
        photos = request.getfixturevalue("imagenet_samples")
        return photos[0].read_bytes()
    except pytest.skip.Exception:
        buffer = io.BytesIO()
        Image.radial_gradient("L").convert("RGB").resize((300, 200)).save(buffer, format="JPEG")
        return buffer.getvalue()


def batch_of(size: int) -> np.ndarray:
    return np.random.default_rng(size).standard_normal((size, 3, 32, 32), dtype=np.float32)


def test_grpc_inference_matches_onnx_runtime(triton, reference):
    inputs = batch_of(3)
    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        assert client.is_model_ready("r20") and client.is_model_ready("r20_pipeline")
        tensor = grpcclient.InferInput(INPUT_NAME, list(inputs.shape), "FP32")
        tensor.set_data_from_numpy(inputs)
        logits = client.infer("r20", [tensor]).as_numpy(OUTPUT_NAME)
    np.testing.assert_allclose(logits, reference(inputs), rtol=1e-5, atol=1e-5)


def test_http_inference_matches_and_classification_extension_names_labels(triton, reference):
    inputs = batch_of(2)
    client = httpclient.InferenceServerClient(triton.http_address)
    try:
        tensor = httpclient.InferInput(INPUT_NAME, list(inputs.shape), "FP32")
        tensor.set_data_from_numpy(inputs)
        logits = client.infer("r20", [tensor]).as_numpy(OUTPUT_NAME)
        top = client.infer(
            "r20", [tensor], outputs=[httpclient.InferRequestedOutput(OUTPUT_NAME, class_count=2)]
        )
        top = top.as_numpy(OUTPUT_NAME)
    finally:
        client.close()
    expected = reference(inputs)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    score, index, label = top[0, 0].decode().split(":")
    assert int(index) == expected[0].argmax() and label == CLASSES[int(index)]
    assert float(score) == pytest.approx(expected[0].max(), rel=1e-4)


def test_pipeline_classifies_encoded_jpeg_like_in_process_preprocessing(triton, reference, repository, jpeg):
    from server.spec import PreprocessSpec

    image = np.array([[jpeg]], dtype=np.object_)
    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        tensor = grpcclient.InferInput(IMAGE_INPUT_NAME, [1, 1], "BYTES")
        tensor.set_data_from_numpy(image)
        result = client.infer(
            "r20_pipeline", [tensor], outputs=[grpcclient.InferRequestedOutput(OUTPUT_NAME, class_count=3)]
        ).as_numpy(OUTPUT_NAME)
        logits = client.infer("r20_pipeline", [tensor]).as_numpy(OUTPUT_NAME)
    expected = reference(preprocess_image(jpeg, PreprocessSpec.cifar10())[None])
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    entries = [entry.decode().split(":") for entry in result[0]]
    assert [label for _, _, label in entries] == [CLASSES[i] for i in np.argsort(-expected[0])[:3]]


def test_bad_requests_get_errors_and_the_server_keeps_serving(triton, reference):
    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        garbage = grpcclient.InferInput(IMAGE_INPUT_NAME, [1, 1], "BYTES")
        garbage.set_data_from_numpy(np.array([[b"definitely not an image"]], dtype=np.object_))
        with pytest.raises(InferenceServerException, match="cannot preprocess image") as bad_image:
            client.infer("r20_pipeline", [garbage])
        assert bad_image.value.status() == "StatusCode.INVALID_ARGUMENT"  # the client's fault, not INTERNAL
        wrong = grpcclient.InferInput(INPUT_NAME, [1, 3, 16, 16], "FP32")
        wrong.set_data_from_numpy(np.zeros((1, 3, 16, 16), np.float32))
        with pytest.raises(InferenceServerException, match="unexpected shape|expected"):
            client.infer("r20", [wrong])
        # Triton 2.51's own checks let a batch of 2**40 through, and the model gets a [3, 32, 32] tensor: its check
        # answers, and with the client's error code
        past_triton = grpcclient.InferInput(INPUT_NAME, [1, 3, 32, 32], "FP32")
        past_triton.set_data_from_numpy(batch_of(1))
        past_triton.set_shape([2**40, 3, 32, 32])
        with pytest.raises(InferenceServerException) as huge_batch:
            client.infer("r20", [past_triton])
        assert huge_batch.value.status() == "StatusCode.INVALID_ARGUMENT"
        inputs = batch_of(1)
        good = grpcclient.InferInput(INPUT_NAME, [1, 3, 32, 32], "FP32")
        good.set_data_from_numpy(inputs)
        np.testing.assert_allclose(
            client.infer("r20", [good]).as_numpy(OUTPUT_NAME), reference(inputs), atol=1e-5
        )


def r20_inference_count(triton) -> float:
    with urllib.request.urlopen(triton.metrics_url, timeout=5) as response:
        metrics = response.read().decode()
    counts = [line for line in metrics.splitlines() if line.startswith('nv_inference_count{model="r20"')]
    assert counts, "Triton's /metrics has no nv_inference_count for r20"
    return float(counts[0].rsplit(" ", 1)[1])


def settled_r20_inference_count(triton) -> float:
    """The count once an earlier test's last request has been counted (it can land after its response)."""
    readings = [r20_inference_count(triton)]

    def unchanged_after_half_a_second() -> bool:
        time.sleep(0.5)
        readings.append(r20_inference_count(triton))
        return readings[-1] == readings[-2]

    wait_until(unchanged_after_half_a_second, timeout=30, interval=0, what="a settled inference count")
    return readings[-1]


def test_metrics_endpoint_counts_inferences(triton):
    before = settled_r20_inference_count(triton)
    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        tensor = grpcclient.InferInput(INPUT_NAME, [4, 3, 32, 32], "FP32")
        tensor.set_data_from_numpy(batch_of(4))
        client.infer("r20", [tensor])
    # Counted as the request completes, which may be just after the response reaches us.
    wait_until(lambda: r20_inference_count(triton) - before >= 4, 10, what="the inferences counted")
    assert r20_inference_count(triton) - before == 4  # one request of 4 images counts 4 inferences


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_cli_serves_until_stopped_and_tritonserver_never_outlives_it(repository, stop):
    # Killed outright (SIGKILL, the OOM killer, a CI job's hard limit), `resnet triton serve` left its tritonserver
    # serving for good, on its ports: the next `resnet triton serve` was refused (Address already in use).
    ports = [str(port) for port in free_ports(3)]
    command = [
        str(VENV_BIN / "resnet"),
        "triton",
        "serve",
        "--repository",
        str(repository),
        "--model",
        "r20",
        "--http-port",
        ports[0],
        "--grpc-port",
        ports[1],
        "--metrics-port",
        ports[2],
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        banner = next(line for line in process.stdout if line.startswith("Triton ready"))
        assert f"HTTP http://127.0.0.1:{ports[0]}" in banner
        assert http_ok(f"http://127.0.0.1:{ports[0]}/v2/models/r20/ready")
        (tritonserver,) = children_of(process.pid)
        process.send_signal(stop)
        assert process.wait(60) == (0 if stop == signal.SIGTERM else -signal.SIGKILL)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    wait_until(lambda: has_ended(tritonserver), 30, what="tritonserver ended")  # SIGTERM from the kernel
    assert not http_ok(f"http://127.0.0.1:{ports[0]}/v2/health/live")  # tritonserver went down with it


def test_cli_missing_repository_is_one_line_error(tmp_path):
    result = subprocess.run(
        [str(VENV_BIN / "resnet"), "triton", "serve", "--repository", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == f"resnet: error: model repository not found: {tmp_path / 'nope'}"


@pytest.mark.parametrize(
    ("folders", "options", "message"),
    [
        (["notes"], {}, "holds no models (no <model>/config.pbtxt or <model>/<version>/)"),
        (["r20/1"], {"models": ["r20", "nope"]}, "no model 'nope' in {root}; it holds r20"),
        (["r20/1"], {"http_port": 18000, "grpc_port": 18000}, "ports must differ, got 18000, 18000"),
    ],
    ids=["no models", "unknown model", "one port twice"],
)
def test_what_tritonserver_would_refuse_late_is_refused_before_it_starts(tmp_path, folders, options, message):
    for folder in folders:
        (tmp_path / folder).mkdir(parents=True)
    logs_before = triton_logs()
    server = TritonServer(tmp_path, **options)
    with pytest.raises(TritonError, match=re.escape(message.format(root=tmp_path.resolve()))):
        server.start()
    assert server.process is None
    assert triton_logs() == logs_before  # one was left in /tmp by every server, refused ones too


def test_a_repository_an_export_was_killed_publishing_into_is_warned_about(tmp_path, capsys):
    # a model it left with a version and no config.pbtxt stops Triton at start-up, naming no export
    (tmp_path / "r20" / "1").mkdir(parents=True)
    Journal(holder="pid 7 on trainer-1, since 2026-12-07 21:00", versions_before={"r20": []}).save(tmp_path)
    server = TritonServer(
        tmp_path, http_port=18000, grpc_port=18000
    )  # refused after the warning, started never
    with pytest.raises(TritonError, match="ports must differ"):
        server.start()
    assert capsys.readouterr().err == (
        f"warning: an export (pid 7 on trainer-1, since 2026-12-07 21:00) is publishing into {tmp_path.resolve()}, "
        "or was killed while it did: r20 may be half published; `resnet export --repository "
        f"{tmp_path.resolve()} --undo-unfinished` undoes what a killed one left, as the next export into it does\n"
    )


def triton_logs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("tritonserver-*.log"))


def test_a_server_given_no_log_file_removes_its_temporary_one_when_it_stops(repository):
    logs_before = triton_logs()
    with TritonServer(repository) as server:
        assert server.log_path in triton_logs() - logs_before
        assert "successfully loaded 'r20'" in server.log_path.read_text()
    assert triton_logs() == logs_before


def test_a_model_file_that_does_not_fit_its_config_does_not_load(tmp_path):
    # Triton checks neither a Python-backend model's outputs against its config nor its labels: a version kept on
    # disk under a config rewritten for 2 classes loaded, and its 3 scores went out under 2 labels
    write_misfit_model(tmp_path / "repository")
    server = TritonServer(tmp_path / "repository", models=["misfit"], log_path=tmp_path / "triton.log")
    try:
        with pytest.raises(TritonError, match="misfit: model.onnx gives 3 classes, config says 2"):
            server.start()
    finally:
        server.stop()  # a server that did start (the test failing) must not outlive it


@pytest.mark.parametrize("port", ["http_port", "grpc_port", "metrics_port"])
def test_a_port_in_use_is_refused_before_tritonserver_starts(tmp_path, port):
    (tmp_path / "r20" / "1").mkdir(parents=True)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        server = TritonServer(tmp_path, **{port: taken.getsockname()[1]})
        what = {"http_port": "HTTP", "grpc_port": "gRPC", "metrics_port": "metrics"}[port]
        flag = "--" + port.replace("_", "-")
        expected = (
            f"cannot bind the {what} port 127.0.0.1:{taken.getsockname()[1]} (Address already in use); "
        )
        with pytest.raises(TritonError, match=re.escape(expected + f"choose another with {flag}")):
            server.start()
    assert server.process is None


@pytest.mark.parametrize("address", ["host", "grpc_host"])
def test_an_address_not_of_this_machine_names_its_own_flag(tmp_path, address):
    (tmp_path / "r20" / "1").mkdir(parents=True)
    ports = dict(zip(("http_port", "grpc_port", "metrics_port"), free_ports(3), strict=True))
    server = TritonServer(tmp_path, **{address: "192.0.2.1"}, **ports)  # TEST-NET-1: never this machine's
    flag = {"host": "--http-address", "grpc_host": "--grpc-address"}[address]
    with pytest.raises(TritonError, match=re.escape(f"(Cannot assign requested address); {flag} must be an")):
        server.start()
    assert server.process is None
