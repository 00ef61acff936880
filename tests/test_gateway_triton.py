"""The gateway in front of a real Triton Inference Server (the CPU build from nvidia-pytriton): classify over gRPC
and HTTP, answer 503 while Triton is down, and recover by itself when Triton comes back on the same address."""

from __future__ import annotations

import contextlib
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from cli.main import main as resnet
from server.registry import HEALTH_INTERVAL_S
from tests.gateway_models import LABELS, color_image, write_colors_model, write_misfit_model
from tests.grpc_support import gateway_process
from tests.support import free_ports, metric, models_served, requests_meanwhile, running_gateway, wait_until

pytestmark = [pytest.mark.triton, pytest.mark.slow]
JPEG = {"content-type": "image/jpeg"}


@pytest.fixture(scope="module")
def triton_server():
    pytest.importorskip("pytriton", reason="nvidia-pytriton (the bundled tritonserver) is not installed")
    from export.triton_server import TritonServer

    return TritonServer


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("triton-repository")
    write_colors_model(root)
    return root


@contextmanager
def gateway(tmp_path: Path, triton_url: str, *flags: str):
    # An empty --repository: labels and configs must come from Triton itself.
    serve_flags = ("--backend", "triton", "--triton-url", triton_url, "--repository", str(tmp_path), *flags)
    with running_gateway(*serve_flags, timeout=60, log_path=tmp_path / "gateway.log") as (url, _):
        yield url


def classify(url: str, color: str, model: str = "colors") -> httpx.Response:
    return httpx.post(
        f"{url}/v1/models/{model}/classify?top_k=2", content=color_image(color), headers=JPEG, timeout=30
    )


def load_on_triton(triton, model: str) -> httpx.Response:
    """Triton's model control API: load (or reload) `model`."""
    return httpx.post(f"{triton.http_url}/v2/repository/models/{model}/load", timeout=60)


def kserve_classify(url: str, color: str) -> httpx.Response:
    """The same photo through the gateway's KServe v2 HTTP API (`/v2`, binary tensor data, as tritonclient sends)."""
    import numpy as np
    import tritonclient.http as httpclient

    image = httpclient.InferInput("image", [1, 1], "BYTES")
    image.set_data_from_numpy(np.array([[color_image(color)]], dtype=np.object_))
    wanted = [httpclient.InferRequestedOutput("logits", class_count=1, binary_data=False)]
    body, json_size = httpclient.InferenceServerClient.generate_request_body([image], outputs=wanted)
    headers = {"Inference-Header-Content-Length": str(json_size)}
    return httpx.post(f"{url}/v2/models/colors_pipeline/infer", content=body, headers=headers, timeout=30)


def test_kill_triton_mid_run_then_recover(triton_server, repository, tmp_path, capsys):
    ports = dict(zip(("http_port", "grpc_port", "metrics_port"), free_ports(3), strict=True))
    triton = triton_server(repository, log_path=tmp_path / "triton.log", **ports).start()
    try:
        with gateway(tmp_path, triton.grpc_url) as url:
            model = httpx.get(f"{url}/v1/models").json()["models"][0]
            assert (model["name"], model["backend"], model["num_classes"]) == ("colors", "triton", 3)
            for color in LABELS:
                response = classify(url, color)
                assert response.status_code == 200 and response.json()["predictions"][0]["label"] == color
                over_v2 = kserve_classify(url, color)
                assert over_v2.status_code == 200 and over_v2.json()["outputs"][0]["data"][0].endswith(color)

            triton.stop()
            down = classify(url, "red")
            assert down.status_code == 503, down.text
            assert (
                down.json()["error"]["code"] == "backend_unavailable"
                and "Triton" in down.json()["error"]["message"]
            )
            v2_down = kserve_classify(url, "red")
            assert v2_down.status_code == 503 and "Triton" in v2_down.json()["error"], v2_down.text
            wait_until(
                lambda: httpx.get(f"{url}/readyz").status_code == 503, 10, what="gateway reports not ready"
            )
            assert httpx.get(f"{url}/v2/health/ready").status_code == 400  # KServe: 4xx = not ready
            assert httpx.get(f"{url}/healthz").status_code == 200
            # the client reads the index, which lists the models UNAVAILABLE with the reason: it says that
            (tmp_path / "red.jpg").write_bytes(color_image("red"))
            args = ["client", "classify", str(tmp_path / "red.jpg"), "--url", url, "--server", "triton"]
            assert resnet(args) == 1
            assert capsys.readouterr().err.startswith(
                f"resnet: error: {url} has no model ready (colors: Triton at {triton.grpc_url} (grpc) is not ready"
            )

            triton = triton_server(repository, log_path=tmp_path / "triton2.log", **ports).start()
            wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200, 30, what="gateway ready again")
            again = classify(url, "blue")
            assert again.status_code == 200 and again.json()["predictions"][0]["label"] == "blue"
            assert kserve_classify(url, "green").json()["outputs"][0]["data"][0].endswith(":green")
    finally:
        triton.stop()


def not_ready_reason(url: str, expected: str) -> str:
    """The gateway's /readyz reason, once it holds `expected` (readiness is polled every HEALTH_INTERVAL_S)."""

    def reason() -> str:
        answer = httpx.get(f"{url}/readyz")
        assert answer.status_code == 503
        return answer.json()["error"]["message"]

    wait_until(lambda: expected in reason(), 15, what=f"{expected!r} in /readyz")
    return reason()


def test_a_wrong_triton_port_is_named_in_readiness_and_logged_once(triton_server, repository, tmp_path):
    with triton_server(repository, log_path=tmp_path / "triton.log") as triton:
        wrong_ports = [
            (triton.http_address, "grpc", "(if that is Triton's HTTP port, set --triton-protocol http;"),
            (triton.grpc_url, "http", "(if that is Triton's gRPC port, set --triton-protocol grpc)"),
            (f"{triton.host}:{triton.metrics_port}", "http", "cannot read its models: [405]"),
        ]
        for address, protocol, expected in wrong_ports:
            flags = ["--backend", "triton", "--triton-url", address, "--triton-protocol", protocol]
            with gateway_process(
                tmp_path, *flags, "--repository", str(tmp_path), ready_path="/healthz"
            ) as down:
                reason = not_ready_reason(down.http_url, expected)
                assert reason.startswith(f"Triton at {address} ({protocol}) is not ready: "), reason
                time.sleep(3 * HEALTH_INTERVAL_S)  # polls that find the same fault again
            log = (tmp_path / f"gateway-{down.http_url.rsplit(':', 1)[1]}.log").read_text()
            # aiohttp's reason alternates with "Cannot write to closing transport": each logged once, not per poll
            assert 1 <= log.count("is NOT ready: ") <= 2 and expected in log, log


def test_http_protocol_without_gateway_batching(triton_server, repository, tmp_path):
    with triton_server(repository, log_path=tmp_path / "triton.log") as triton:
        with gateway(tmp_path, triton.http_address, "--triton-protocol", "http", "--no-batching") as url:
            for color in LABELS:
                response = classify(url, color)
                assert response.status_code == 200, response.text
                assert [p["label"] for p in response.json()["predictions"]][0] == color
            text = httpx.get(f"{url}/metrics").text
            # One backend call per request, each of its one image, and no batching queue was ever waited in.
            assert metric(text, 'resnet_batch_size_count{model="colors"}') == len(LABELS)
            assert metric(text, 'resnet_batch_size_sum{model="colors"}') == len(LABELS)
            assert 'resnet_queue_seconds_count{model="colors"}' not in text


def test_a_rollout_on_triton_reaches_the_gateway_without_a_restart_or_a_refusal(triton_server, tmp_path):
    # docs/deployment.md section 8: a new version loaded by Triton's load API, a model loaded by name, one unloaded.
    # Triton is not ready while a model loads (--strict-readiness), though it serves: the gateway took that for
    # Triton being down and answered 503 to every request until the load was done
    repository = tmp_path / "repository"
    write_colors_model(repository)
    write_colors_model(repository, "shades")
    with triton_server(repository, log_path=tmp_path / "triton.log", models=["colors"]) as triton:
        with gateway(tmp_path, triton.grpc_url) as url:
            write_colors_model(repository)  # version 2, published atomically as `resnet export` does
            with requests_meanwhile(lambda: classify(url, "red")) as answers:
                for model in ("colors", "shades"):
                    load_on_triton(triton, model).raise_for_status()
                # asked at once, not after the gateway's next look at Triton (up to a second: 404 until then)
                shades = httpx.post(
                    f"{url}/v1/models/shades/classify?top_k=1",
                    content=color_image("blue"),
                    headers=JPEG,
                    timeout=30,
                )
                assert shades.json()["predictions"][0]["label"] == "blue", shades.text
                wait_until(
                    lambda: models_served(url) == {"colors": "2", "shades": "1"}, 15, what="both served"
                )
                wait_until(lambda: answers and answers[-1][1] == "2", 15, what="an answer from version 2")
            assert {status for status, _ in answers} == {200}, answers
            versions = [version for _, version in answers]
            assert versions == sorted(versions) and versions[0] == "1" and versions[-1] == "2", versions
            httpx.post(f"{triton.http_url}/v2/repository/models/shades/unload", timeout=60).raise_for_status()
            wait_until(lambda: models_served(url) == {"colors": "2"}, 15, what="shades gone")
            gone = httpx.post(f"{url}/v1/models/shades/classify", content=color_image("blue"), headers=JPEG)
            assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"


def status_and_error(answer: httpx.Response) -> tuple[int, str]:
    return answer.status_code, answer.json().get("error", {}).get("message", "")


def test_a_model_triton_unloads_is_not_found_rather_than_triton_unavailable(triton_server, tmp_path):
    # Requests routed to a model in the second before the gateway saw Triton unload it were answered 503 "Triton is
    # unavailable: Request for unknown model: 'shades' has no available versions" (98 of 550 over HTTP, 9 of 498
    # over gRPC, under four clients): a retry told to a client whose model is gone, with Triton up
    repository = tmp_path / "repository"
    write_colors_model(repository)
    write_colors_model(repository, "shades")
    with triton_server(repository, log_path=tmp_path / "triton.log", models=["colors", "shades"]) as triton:
        # over HTTP, where most came (over gRPC Triton's words are the same)
        with gateway(tmp_path, triton.http_address, "--triton-protocol", "http") as url:
            with contextlib.ExitStack() as senders:
                answers = [
                    senders.enter_context(
                        requests_meanwhile(lambda: classify(url, "red", "shades"), status_and_error)
                    )
                    for _ in range(4)
                ]
                wait_until(lambda: all(answers), 15, what="answers from shades")
                httpx.post(
                    f"{triton.http_url}/v2/repository/models/shades/unload", timeout=60
                ).raise_for_status()
                wait_until(lambda: models_served(url) == {"colors": "1"}, 15, what="shades gone")
    every = [answer for one_client in answers for answer in one_client]
    assert {status for status, _ in every} == {200, 404}, [
        answer for answer in every if answer[0] not in (200, 404)
    ]
    assert {message for status, message in every if status == 404} <= {
        "model 'shades' not found; available: colors",
        "Triton no longer serves model 'shades': Request for unknown model: 'shades' has no available versions",
        "Triton no longer serves model 'shades': Request for unknown model: 'shades' is not found",
    }


def version_and_score(answer: httpx.Response) -> tuple[int, str | None, float | None]:
    """A classify answer's status, the version it names and its best score."""
    body = answer.json()
    return answer.status_code, body.get("version"), body.get("predictions", [{}])[0].get("score")


def version_one_over_grpc(grpc_address: str) -> tuple[str, str, float]:
    """Ask the gateway's gRPC API for version 1 of `colors` by name: ("answered", version, the red logit), or
    ("refused", the message, nan). A reddest image: the red logit is its version's scale."""
    import numpy as np
    import tritonclient.grpc as triton_grpc
    from tritonclient.utils import InferenceServerException

    image = np.zeros((1, 3, 32, 32), np.float32)
    image[:, 0] = 1
    tensor = triton_grpc.InferInput("input", list(image.shape), "FP32")
    tensor.set_data_from_numpy(image)
    with triton_grpc.InferenceServerClient(grpc_address) as client:
        try:
            result = client.infer("colors", [tensor], model_version="1")
        except InferenceServerException as error:
            return "refused", str(error.message()), float("nan")
    return "answered", result.get_response().model_version, float(result.as_numpy("logits")[0, 0])


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_each_answer_names_the_version_triton_computed_it_with(triton_server, tmp_path, protocol):
    # Triton serves a new version as soon as it has loaded it, and the gateway reads Triton's index once a second:
    # answers in between named the replaced version though Triton had computed them with the new one (23 of 685
    # under four clients), and a gRPC request for version 1 was answered by version 2
    repository = tmp_path / "repository"
    write_colors_model(repository)
    with triton_server(repository, log_path=tmp_path / "triton.log", models=["colors"]) as triton:
        triton_url = triton.grpc_url if protocol == "grpc" else triton.http_address
        flags = ("--backend", "triton", "--triton-url", triton_url, "--triton-protocol", protocol)
        with gateway_process(tmp_path, *flags, "--repository", str(tmp_path)) as served:
            url = served.http_url
            score_of = {"1": version_and_score(classify(url, "red"))[2]}
            write_colors_model(repository, scale=1)  # version 2: the same classes, other scores
            with (
                requests_meanwhile(lambda: classify(url, "red"), version_and_score) as answers,
                requests_meanwhile(
                    lambda: version_one_over_grpc(served.grpc_address), lambda kept: kept
                ) as asked,
            ):
                load_on_triton(triton, "colors").raise_for_status()
                wait_until(lambda: models_served(url) == {"colors": "2"}, 15, what="version 2 served")
            score_of["2"] = version_and_score(classify(url, "red"))[2]
    assert score_of["1"] != pytest.approx(score_of["2"], abs=0.01), score_of
    assert {status for status, _, _ in answers} == {200}, answers
    named_wrongly = [(v, score) for _, v, score in answers if score != pytest.approx(score_of[v], abs=1e-4)]
    assert not named_wrongly, f"{len(named_wrongly)} of {len(answers)} answers: {named_wrongly[:5]}"
    assert {"2"} <= {v for _, v, _ in answers}
    for outcome, version_or_message, red_logit in asked:
        if outcome == "answered":
            assert (version_or_message, red_logit) == ("1", pytest.approx(4)), asked
        else:
            assert (
                "has no version '1'" in version_or_message
                or "was replaced by version '2'" in version_or_message
            )


def test_models_triton_cannot_load_are_named_with_its_reason(triton_server, tmp_path):
    # The gateway read only READY entries of Triton's index: a client asking for a model that failed to load was
    # told "not found", /readyz said nothing, and a failed new version of a served model went unremarked
    repository = tmp_path / "repository"
    write_colors_model(repository)
    write_misfit_model(repository)
    with triton_server(repository, log_path=tmp_path / "triton.log", models=["colors"]) as triton:
        log_path = tmp_path / "gateway.log"
        with gateway(tmp_path, triton.grpc_url) as url:
            assert load_on_triton(triton, "misfit").status_code == 400
            reason = "Internal: TritonModelException: misfit: model.onnx gives 3 classes, config says 2"
            wait_until(
                lambda: httpx.get(f"{url}/readyz").json()["failed"] == {"misfit": reason}, 15, what="failed"
            )
            refused = httpx.post(f"{url}/v1/models/misfit/classify", content=color_image("red"), headers=JPEG)
            message = refused.json()["error"]["message"]
            assert refused.status_code == 404
            assert message == f"model 'misfit' failed to load: {reason}; available: colors"
            assert metric(httpx.get(f"{url}/metrics").text, 'resnet_model_unavailable{model="misfit"}') == 1
            broken = write_colors_model(repository) / "2" / "model.onnx"  # a new version, cut short
            broken.write_bytes(broken.read_bytes()[:200])
            assert load_on_triton(triton, "colors").status_code == 400
            warning = "Triton cannot load colors version 2, version 1 goes on serving: "
            wait_until(lambda: warning in log_path.read_text(), 15, what="the failed version logged")
            assert classify(url, "red").json()["version"] == "1"
            assert httpx.get(f"{url}/readyz").json()["failed"] == {"misfit": reason}
