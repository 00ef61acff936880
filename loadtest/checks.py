"""Checks of gateway answers, shared by the Locust users and the CLI (no Locust import: that patches gevent in).

A wrong or empty prediction is a failure, not only a non-2xx status.
"""

from __future__ import annotations

import json
import ssl
import urllib.parse
import urllib.request
from dataclasses import dataclass

import numpy as np

from server.kserve_index import ModelIndex
from server.spec import PIPELINE_SUFFIX

# Nothing from the `cli` package: Locust puts loadtest/ first on sys.path while it imports the locustfile, and
# there loadtest/cli.py is `cli`.
GRPC_TLS_SCHEME = "grpcs://"  # a gRPC target written with it is dialled over TLS

API_KEY_HEADER = "X-API-Key"
DEFAULT_GRPC_PORT = 8081


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a load test's TLS connections: the authorities to trust (`ca_cert`; "" for the system's) and
    the client certificate to present to a server that requires one (`client_cert` with `client_key`; "" for
    none)."""

    ca_cert: str = ""
    client_cert: str = ""
    client_key: str = ""

    @classmethod
    def of(cls, options) -> TlsFiles:
        """From the CLI's arguments (paths or None) or Locust's parsed options (strings; None when Locust runs
        without its parser)."""
        if options is None:
            return cls()
        return cls(*(str(getattr(options, name) or "") for name in ("ca_cert", "client_cert", "client_key")))

    def https_context(self) -> ssl.SSLContext | None:
        """urllib's context for an https:// URL; None for the system's authorities and no client certificate."""
        if not (self.ca_cert or self.client_cert):
            return None
        context = ssl.create_default_context(cafile=self.ca_cert or None)
        if self.client_cert:
            context.load_cert_chain(self.client_cert, self.client_key)
        return context

    def grpc_options(self) -> dict[str, str | None]:
        """tritonclient.grpc's TLS arguments (file paths; it reads them)."""
        return {
            "root_certificates": self.ca_cert or None,
            "certificate_chain": self.client_cert or None,
            "private_key": self.client_key or None,
        }


def auth_headers(api_key: str) -> dict[str, str]:
    return {API_KEY_HEADER: api_key} if api_key else {}


def listed_names(listing: object) -> list[str]:
    """Model names in a GET /v1/models answer: {"models": [{"name": ...}, ...]} (or a bare list); ValueError for
    an answer of another shape (another server at that port)."""
    models = listing.get("models") if isinstance(listing, dict) else listing
    names = (
        [m.get("name") if isinstance(m, dict) else m for m in models] if isinstance(models, list) else None
    )
    if names is None or not all(isinstance(name, str) for name in names):
        raise ValueError(f"not a model listing: {json.dumps(listing)[:80]}")
    return names


def gateway_models(base_url: str, api_key: str = "", tls: TlsFiles = TlsFiles()) -> list[str]:
    """The models the gateway lists (GET /v1/models), in its order; at least one."""
    request = urllib.request.Request(base_url.rstrip("/") + "/v1/models", headers=auth_headers(api_key))
    with urllib.request.urlopen(request, timeout=10, context=tls.https_context()) as response:
        names = listed_names(json.load(response))
    if not names:
        raise RuntimeError(f"{base_url} lists no models")
    return names


def kserve_index(base_url: str, api_key: str = "", tls: TlsFiles = TlsFiles()) -> ModelIndex:
    """The repository index of a KServe v2 server (the gateway's /v2, or Triton) over HTTP: every model it lists,
    with why each one not ready is not (Triton lists the models of its repository it has not loaded too)."""
    request = urllib.request.Request(
        base_url.rstrip("/") + "/v2/repository/index",
        data=b"{}",
        headers=auth_headers(api_key),
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10, context=tls.https_context()) as response:
        index = json.load(response)
    if not isinstance(index, list):
        raise ValueError(f"not a KServe repository index: {json.dumps(index)[:80]}")
    return ModelIndex.of([entry for entry in index if isinstance(entry, dict) and "name" in entry])


def grpc_index(
    target: str, api_key: str = "", tls: TlsFiles = TlsFiles(), timeout_s: float = 10
) -> ModelIndex:
    """The same index from a KServe v2 gRPC server (the gateway's, or Triton's)."""
    headers = {API_KEY_HEADER.lower(): api_key} if api_key else None  # gRPC metadata keys are lower case
    with grpc_client(target, tls) as client:
        return ModelIndex.of(client.get_model_repository_index(headers=headers, client_timeout=timeout_s))


def kserve_models(base_url: str, api_key: str = "", tls: TlsFiles = TlsFiles()) -> list[str]:
    """The classifiers a KServe v2 server serves with a `_pipeline` ready; at least one."""
    return ready_pipelines(kserve_index(base_url, api_key, tls).ready, base_url)


def grpc_models(
    target: str, api_key: str = "", tls: TlsFiles = TlsFiles(), timeout_s: float = 10
) -> list[str]:
    """The same over gRPC, so a gRPC load test needs no HTTP port (Triton's included)."""
    return ready_pipelines(grpc_index(target, api_key, tls, timeout_s).ready, grpc_url(target))


def unready_reason(index: ModelIndex, model: str) -> str:
    """Why the index says `model` is not ready, its classifier first (a failed load's error), else its `_pipeline`;
    "" when it lists neither."""
    return index.not_ready.get(model) or index.not_ready.get(model + PIPELINE_SUFFIX, "")


def grpc_client(target: str, tls: TlsFiles = TlsFiles()):
    """tritonclient.grpc's client of `target`: host:port, or grpcs://host:port for TLS (trusting `tls.ca_cert`,
    else gRPC's own roots)."""
    import tritonclient.grpc as grpcclient

    if target.startswith(GRPC_TLS_SCHEME):
        address = target.removeprefix(GRPC_TLS_SCHEME)
        return grpcclient.InferenceServerClient(address, ssl=True, **tls.grpc_options())
    return grpcclient.InferenceServerClient(target)


def grpc_url(target: str) -> str:
    return target if target.startswith(GRPC_TLS_SCHEME) else f"grpc://{target}"


def ready_pipelines(ready: list[str], where: str) -> list[str]:
    pipelines = [name.removesuffix(PIPELINE_SUFFIX) for name in ready if name.endswith(PIPELINE_SUFFIX)]
    if not pipelines:
        raise RuntimeError(f"{where} has no <model>{PIPELINE_SUFFIX} (encoded images in) ready to load-test")
    return pipelines


def grpc_target(http_host: str | None) -> str:
    """The gateway's gRPC host:port by default: the HTTP URL's host name, port 8081; over TLS (grpcs://) when the
    URL is https://, as the gateway serves both ports with one certificate."""
    parts = urllib.parse.urlsplit(http_host or "http://127.0.0.1")
    hostname = parts.hostname or "127.0.0.1"
    address = f"[{hostname}]:{DEFAULT_GRPC_PORT}" if ":" in hostname else f"{hostname}:{DEFAULT_GRPC_PORT}"
    return GRPC_TLS_SCHEME + address if parts.scheme == "https" else address


def discover_model(base_url: str, api_key: str = "", tls: TlsFiles = TlsFiles()) -> str:
    """The first model the gateway lists."""
    return gateway_models(base_url, api_key, tls)[0]


def discover_kserve_model(base_url: str, api_key: str = "", tls: TlsFiles = TlsFiles()) -> str:
    """The first classifier a KServe v2 server serves with a `_pipeline`."""
    return kserve_models(base_url, api_key, tls)[0]


def http_failure(status: int, text: str) -> str:
    """A failed answer as Locust's failure table shows it, which counts identical strings as one row: the gateway's
    error code (its messages hold request IDs and queue counts: one row per request), else the body's start."""
    try:
        error = json.loads(text).get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        return f"HTTP {status} {error['code']}"
    return f"HTTP {status}: {(error if isinstance(error, str) else text)[:200]}"  # KServe's: the message


def check_prediction(body: object, model: str, top_k: int) -> str | None:
    """Why a classification body is wrong, or None when it is a valid top-k answer from `model`."""
    if not isinstance(body, dict):
        return f"expected a JSON object, got {type(body).__name__}"
    if body.get("model") != model:
        return f"answered by model {body.get('model')!r}, asked {model!r}"
    predictions = body.get("predictions")
    if not isinstance(predictions, list) or not predictions:
        return "empty prediction list"
    if len(predictions) > top_k:
        return f"{len(predictions)} predictions for top_k={top_k}"
    scores = []
    for p in predictions:
        if not (
            isinstance(p, dict)
            and isinstance(p.get("index"), int)
            and isinstance(p.get("label"), str)
            and isinstance(p.get("score"), int | float)
        ):
            return f"malformed prediction {p!r}"
        scores.append(float(p["score"]))
    if scores != sorted(scores, reverse=True):
        return f"scores not in descending order: {scores}"
    return None


class PredictionError(Exception):
    pass


def check_classification(values: np.ndarray | None, top_k: int) -> PredictionError | None:
    """Triton's classification extension answers "score:index[:label]" strings, best first."""
    if values is None or values.size == 0:
        return PredictionError("empty classification output")
    entries = [v.decode() if isinstance(v, bytes) else str(v) for v in values.reshape(-1)]
    if len(entries) > top_k:
        return PredictionError(f"{len(entries)} classes for class_count={top_k}")
    try:
        scores = [float(entry.split(":", 2)[0]) for entry in entries]
        [int(entry.split(":", 2)[1]) for entry in entries]
    except (ValueError, IndexError):
        return PredictionError(f"malformed classification {entries[:2]}")
    if scores != sorted(scores, reverse=True):
        return PredictionError(f"scores not in descending order: {scores}")
    return None


def describe_error(error: Exception) -> Exception:
    """tritonclient's exceptions print empty; give Locust's failure table the gRPC status and message."""
    status, message = getattr(error, "status", None), getattr(error, "message", None)
    if callable(status) and callable(message):
        return PredictionError(f"{status()}: {message()}")
    return error
