"""Locust users for the gateway: HTTP clients classifying photos, and Triton-protocol clients (gRPC, KServe HTTP).

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8080                 # web UI on :8089
    locust -f loadtest/locustfile.py --headless -u 50 -t 2m --scenario ramp --host http://127.0.0.1:8080
    locust -f loadtest/locustfile.py --headless -u 20 -t 1m --host http://127.0.0.1:8080 GrpcUser
    locust -f loadtest/locustfile.py --headless -u 20 -t 1m --host http://127.0.0.1:8000 KServeHttpUser  # Triton too

`resnet loadtest` wraps the headless form with thresholds and plots. Users wait 0 s between requests, so
the user count is the number of requests in flight. Every response body is checked: a wrong model name, an
empty or malformed prediction list, or scores out of order count as failures, not just non-2xx codes.
Options below can also come from LOCUST_* / RESNET_* environment variables (Locust's convention).
"""

from __future__ import annotations

import itertools
import logging
import random
import sys
import time
import urllib.parse
from pathlib import Path

# grpcio blocks gevent's loop unless told to cooperate; this must run before any channel is created.
import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

import locust.stats  # noqa: E402
import numpy as np  # noqa: E402
from locust import HttpUser, LoadTestShape, User, constant, events, tag, task  # noqa: E402

from loadtest import shapes  # noqa: E402
from loadtest.checks import (  # noqa: E402
    API_KEY_HEADER,
    DEFAULT_GRPC_PORT,
    PIPELINE_SUFFIX,
    TlsFiles,
    auth_headers,
    check_classification,
    check_prediction,
    describe_error,
    discover_kserve_model,
    discover_model,
    grpc_client,
    grpc_models,
    grpc_target,
    http_failure,
    listed_names,
)
from loadtest.images import IMAGES_SENT, check_folder, load_images  # noqa: E402
from server.spec import IMAGE_INPUT_NAME, OUTPUT_NAME  # noqa: E402

# The per-second percentiles in the history CSV cover this many seconds (Locust's default 10 would blur
# the steps of a ramp together); read at call time by locust.stats.
locust.stats.CURRENT_RESPONSE_TIME_PERCENTILE_WINDOW = 2
BATCH_FILES = 4  # images per multipart request in the "several images" task


@events.init_command_line_parser.add_listener
def _add_options(parser) -> None:
    group = parser.add_argument_group("resnet-serving")
    group.add_argument(
        "--scenario",
        choices=shapes.SCENARIOS,
        default="steady",
        env_var="LOCUST_SCENARIO",
        help="load shape: steady, ramp (staircase to --users) or spike (default: steady)",
    )
    group.add_argument(
        "--model",
        default="",
        env_var="RESNET_MODEL",
        help="model to classify with (default: the first one GET /v1/models lists)",
    )
    group.add_argument(
        "--images",
        default="",
        env_var="RESNET_LOADTEST_IMAGES",
        help="folder of photos to send (default: ../shared/data/imagenet-samples, else generated)",
    )
    group.add_argument("--top-k", type=int, default=5, env_var="RESNET_TOP_K", help="predictions to ask for")
    group.add_argument(
        "--grpc-host",
        default="",
        env_var="RESNET_GRPC_URL",
        help=f"gateway gRPC host:port for GrpcUser, grpcs://host:port for TLS (default: --host's hostname, port "
        f"{DEFAULT_GRPC_PORT}, over TLS when --host is https://)",
    )
    group.add_argument(
        "--ca-cert",
        default="",
        env_var="RESNET_CA_CERT",
        help="PEM file of the certificate authorities to trust for https:// and grpcs:// (default: the system's)",
    )
    group.add_argument(
        "--client-cert",
        default="",
        env_var="RESNET_CLIENT_CERT",
        help="PEM certificate to present to a server that requires client certificates (with --client-key)",
    )
    group.add_argument(
        "--client-key", default="", env_var="RESNET_CLIENT_KEY", help="PEM private key of --client-cert"
    )
    group.add_argument("--api-key", default="", env_var="RESNET_API_KEY", help="sent as the X-API-Key header")


_images: list[tuple[str, bytes]] = []


@events.init.add_listener
def _load_images(environment, **_kwargs) -> None:
    options = environment.parsed_options
    folder = Path(options.images) if options and options.images else None
    if folder is not None:
        try:
            check_folder(folder, ValueError)
        except ValueError as error:  # one line and exit 1, as Locust does for its own bad options
            logging.getLogger(__name__).error("%s", error)
            sys.exit(1)
    _images[:] = load_images(folder, limit=IMAGES_SENT)


def _options(user: User):
    return user.environment.parsed_options


def _prepare_http_client(user: HttpUser) -> TlsFiles:
    """The user's Locust client made ready; the TLS files it uses.

    Locust prefixes each request's path with --host as given: `http://host:8080/` would ask for //v1/... (404)."""
    user.client.base_url = user.client.base_url.rstrip("/")
    tls = TlsFiles.of(_options(user))
    if tls.ca_cert:
        user.client.verify = tls.ca_cert  # requests' own setting; the system's authorities otherwise
    if tls.client_cert:
        user.client.cert = (tls.client_cert, tls.client_key)
    return tls


class ClassifyUser(HttpUser):
    """An HTTP client of the gateway: mostly one photo per request, sometimes several, sometimes a listing."""

    wait_time = constant(0)

    def on_start(self) -> None:
        tls = _prepare_http_client(self)
        options = _options(self)
        self.top_k = options.top_k if options else 5
        self.headers = auth_headers(options.api_key if options else "")
        self.model = (options.model if options else "") or discover_model(
            self.host, self.headers.get(API_KEY_HEADER, ""), tls
        )
        self.path = f"/v1/models/{urllib.parse.quote(self.model)}/classify?top_k={self.top_k}"
        self.photos = itertools.cycle(random.sample(_images, len(_images)))

    @tag("classify")
    @task(8)
    def classify_one(self) -> None:
        _, data = next(self.photos)
        with self.client.post(
            self.path,
            data=data,
            headers={**self.headers, "Content-Type": "image/jpeg"},
            name="classify 1 image",
            catch_response=True,
        ) as response:
            self._validate(response, expected=1)

    @tag("classify")
    @task(2)
    def classify_several(self) -> None:
        files = [
            ("file", (name, data, "image/jpeg")) for name, data in itertools.islice(self.photos, BATCH_FILES)
        ]
        with self.client.post(
            self.path,
            files=files,
            headers=self.headers,
            name=f"classify {BATCH_FILES} images",
            catch_response=True,
        ) as response:
            self._validate(response, expected=BATCH_FILES)

    @task(1)
    def list_models(self) -> None:
        with self.client.get(
            "/v1/models", headers=self.headers, name="list models", catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(http_failure(response.status_code, response.text))
                return
            try:
                missing = self.model not in listed_names(response.json())
            except ValueError as error:  # not JSON, or JSON of another shape
                response.failure(str(error))
                return
            if missing:
                response.failure(f"model {self.model!r} missing from the listing")

    def _validate(self, response, expected: int) -> None:
        if response.status_code != 200:
            response.failure(http_failure(response.status_code, response.text))
            return
        try:
            body = response.json()
        except ValueError:
            response.failure("response is not JSON")
            return
        bodies = body if isinstance(body, list) else [body]
        if len(bodies) != expected:
            response.failure(f"{len(bodies)} results for {expected} images")
            return
        for item in bodies:
            if problem := check_prediction(item, self.model, self.top_k):
                response.failure(problem)
                return
        response.success()


class GrpcUser(User):
    """A tritonclient gRPC client of a KServe v2 endpoint, the gateway's or Triton's (`<model>_pipeline`, encoded
    images in); without --model, the first such model its gRPC repository index lists.

    Reports each call to Locust's statistics through the `request` event, like HttpUser does, so CSVs,
    percentiles and failure ratios cover gRPC the same way.
    """

    wait_time = constant(0)

    def on_start(self) -> None:
        import tritonclient.grpc as grpcclient

        options = _options(self)
        self.top_k = options.top_k if options else 5
        api_key = options.api_key if options else ""
        tls = TlsFiles.of(options)
        # gRPC metadata keys must be lower case.
        self.headers = {API_KEY_HEADER.lower(): api_key} if api_key else {}
        target = (options.grpc_host if options else "") or grpc_target(self.host)
        target = target.removeprefix("grpc://")
        model = (options.model if options else "") or grpc_models(target, api_key, tls)[0]
        self.model = model if model.endswith(PIPELINE_SUFFIX) else model + PIPELINE_SUFFIX
        self.grpcclient = grpcclient
        self.client = grpc_client(target, tls)
        self.photos = itertools.cycle(random.sample(_images, len(_images)))

    def on_stop(self) -> None:
        self.client.close()

    @task
    def classify_one(self) -> None:
        _, data = next(self.photos)
        image = self.grpcclient.InferInput(IMAGE_INPUT_NAME, [1, 1], "BYTES")
        image.set_data_from_numpy(np.array([[data]], dtype=np.object_))
        wanted = [self.grpcclient.InferRequestedOutput(OUTPUT_NAME, class_count=self.top_k)]
        start = time.perf_counter()
        exception, length = None, 0
        try:
            result = self.client.infer(self.model, [image], outputs=wanted, headers=self.headers or None)
            length = result.get_response().ByteSize()
            exception = check_classification(result.as_numpy(OUTPUT_NAME), self.top_k)
        except Exception as error:  # a failed call is a data point, not a crash of the user
            exception = describe_error(error)
        self.environment.events.request.fire(
            request_type="gRPC",
            name="ModelInfer 1 image",
            response_time=(time.perf_counter() - start) * 1000,
            response_length=length,
            exception=exception,
            context={},
        )


class KServeHttpUser(HttpUser):
    """A KServe v2 HTTP client (Triton's HTTP API): one encoded photo per request to `<model>_pipeline/infer`,
    binary tensor data, `class_count` = top-k. It speaks to the gateway's `/v2` and to a Triton server alike.

    Bodies are built and parsed by tritonclient.http's own `generate_request_body` / `parse_response_body`, and
    sent with Locust's HTTP client, so its statistics and failure checks are Locust's own."""

    wait_time = constant(0)

    def on_start(self) -> None:
        import tritonclient.http as httpclient

        tls = _prepare_http_client(self)
        options = _options(self)
        self.top_k = options.top_k if options else 5
        self.headers = auth_headers(options.api_key if options else "")
        model = (options.model if options else "") or discover_kserve_model(
            self.host, self.headers.get(API_KEY_HEADER, ""), tls
        )
        model = model if model.endswith(PIPELINE_SUFFIX) else model + PIPELINE_SUFFIX
        self.path = f"/v2/models/{urllib.parse.quote(model)}/infer"
        self.httpclient = httpclient
        self.photos = itertools.cycle(random.sample(_images, len(_images)))

    @task
    def infer_one(self) -> None:
        _, data = next(self.photos)
        image = self.httpclient.InferInput(IMAGE_INPUT_NAME, [1, 1], "BYTES")
        image.set_data_from_numpy(np.array([[data]], dtype=np.object_))
        wanted = [self.httpclient.InferRequestedOutput(OUTPUT_NAME, class_count=self.top_k)]
        body, json_size = self.httpclient.InferenceServerClient.generate_request_body([image], outputs=wanted)
        # identity: uncompressed answers, as tritonclient asks by default (requests would offer gzip)
        headers = {
            **self.headers,
            "Inference-Header-Content-Length": str(json_size),
            "Accept-Encoding": "identity",
        }
        with self.client.post(
            self.path, data=body, headers=headers, name="infer 1 image (/v2)", catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(http_failure(response.status_code, response.text))
                return
            length = response.headers.get("Inference-Header-Content-Length")
            result = self.httpclient.InferenceServerClient.parse_response_body(
                response.content, header_length=int(length) if length else None
            )
            problem = check_classification(result.as_numpy(OUTPUT_NAME), self.top_k)
            if problem:
                response.failure(str(problem))
            else:
                response.success()


class ScenarioShape(LoadTestShape):
    """Steady, ramp or spike (`--scenario`), scaled by --users, --spawn-rate and --run-time."""

    use_common_options = True

    def tick(self):
        options = self.runner.environment.parsed_options
        run_time = float(options.run_time or shapes.DEFAULT_RUN_TIME_S)
        return shapes.users_at(
            options.scenario,
            self.get_run_time(),
            int(options.num_users or 1),
            float(options.spawn_rate or 1),
            run_time,
        )
