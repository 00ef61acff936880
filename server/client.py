"""`resnet client classify`: one client for the gateway (HTTP or gRPC) and for a Triton server (gRPC or HTTP).

    resnet client classify photos/ --url grpc://127.0.0.1:8081 --top-k 3
    resnet client classify cat.jpg --url http://127.0.0.1:8000 --model resnet50 --json   # a Triton server

Over HTTP the gateway's own API (`POST /v1/models/{name}/classify`, multipart) is used; a KServe v2 server (Triton)
is recognized by its `GET /v2` metadata (`--server triton` speaks KServe v2 HTTP to the gateway's `/v2` too).
Over gRPC the gateway and Triton speak the same protocol: the client sends encoded images to `<model>_pipeline`
and asks for every class through Triton's classification extension (`class_count` = number of classes), then
applies softmax, so every path prints the same probabilities.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import ssl
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from cli.addresses import split_base_url
from cli.errors import ResnetError
from cli.help import HelpFormatter
from cli.tls import add_client_arguments, client_context, handshake_hint, load_key_pair, tls_hint
from server.errors import GRPC_AT_HTTP_PORT
from server.kserve_index import ModelIndex
from server.scores import NAN_SCORES, softmax, unscored_rows
from server.spec import PIPELINE_SUFFIX

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}
IMAGE_INPUT = "image"
LOGITS_OUTPUT = "logits"
MAX_GATEWAY_FILES = 64  # the gateway's multipart limit per request
STDIN = Path("-")  # e.g. `curl -s URL | resnet client classify -`
MAX_TIMEOUT_S = 86_400  # a day: longer than any request should wait
T = TypeVar("T")
GATEWAY_NAME = "resnet-gateway"  # what the gateway calls itself in KServe server metadata (Triton: "triton")


class ClientError(ResnetError):
    """The server refused or could not be reached; the message says which and why."""


class ImageRejected(ClientError):
    """The server refused the request's images, not the request: one it cannot use (undecodable, unsupported, too
    large), or all of them together too large. Fewer can be sent again."""


# what each API answers for images it cannot use (gateway /v1: the error's code; KServe: the status)
GATEWAY_IMAGE_ERRORS = {
    "invalid_image",
    "unsupported_media_type",
    "payload_too_large",
    "unclassifiable_image",
}
KSERVE_IMAGE_STATUSES = {"400", "413", "StatusCode.INVALID_ARGUMENT"}
GRPC_TOO_LARGE = "Received message larger than max"  # gRPC's own words; its status is also an overload's
# A wrong port's answers: an HTTP client at a gRPC port reads HTTP/2 frames (httpx: "illegal request line"), a gRPC
# client at an HTTP port reads a status line (server.errors.GRPC_AT_HTTP_PORT), tritonclient.http a web page it
# cannot decode.
NOT_HTTP1_HINT = " (if that is a gRPC port, use grpc://HOST:PORT; if it speaks TLS, https://HOST:PORT)"
NOT_GRPC_HINT = " (if that is an HTTP port, use http://HOST:PORT; if it speaks TLS, grpcs://HOST:PORT)"
KSERVE_UNDECODABLE = "while decoding the response"
NOT_GATEWAY_HINT = "is --url the resnet-serving gateway? (Triton's HTTP port: --server triton)"
NOT_KSERVE_HINT = "is --url the HTTP port of Triton (8000 by default) or of the gateway?"


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    score: float


@dataclass(frozen=True)
class Result:
    image: str
    model: str
    predictions: list[Prediction]


@dataclass(frozen=True)
class Refused:
    """An image that was not classified (unreadable, or the server would not), and why."""

    image: str
    reason: str


@dataclass
class Classified:
    """What a run printed: each image's predictions or reason; `stopped`, what ended it before the last."""

    results: list[Result]
    refused: list[Refused]
    server: str
    total: int
    stopped: ClientError | KeyboardInterrupt | None = None


@dataclass(frozen=True)
class ImageFile:
    path: Path
    data: bytes


# --- images ---------------------------------------------------------------------------------------------------


def collect_images(paths: list[Path]) -> list[Path]:
    """Files as given, directories expanded to their image files (sorted, not recursive), `-` for stdin."""
    images: list[Path] = []
    for path in paths:
        if path == STDIN:
            if STDIN in images:
                raise ClientError("- (standard input) holds one image; give it once")
            if sys.stdin is None or sys.stdin.isatty():  # reading would wait for a terminal to type bytes
                raise ClientError(
                    "- reads an image from standard input: pipe one in (e.g. curl -s URL | resnet client classify -)"
                )
            images.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                subfolders = any(p.is_dir() for p in path.iterdir())
                hint = f"; sub-folders are not searched: name them, e.g. {path}/*" if subfolders else ""
                raise ClientError(
                    f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in directory {path}{hint}"
                )
            images += found
        elif path.is_file():
            images.append(path)
        else:
            raise ClientError(f"image not found: {path}")
    return images


def chunks(items: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def top_k_from_logits(scored: list[tuple[float, int, str]], k: int) -> list[Prediction] | str:
    """Softmax over every class's (logit, index, label), best k first (ties: lower index first); why not, for
    logits that give no scores."""
    probabilities = softmax(np.array([value for value, _, _ in scored], dtype=np.float64))
    if unscored_rows(probabilities):
        return NAN_SCORES
    order = sorted(range(len(scored)), key=lambda i: (-probabilities[i], scored[i][1]))[:k]
    return [Prediction(scored[i][1], scored[i][2], float(probabilities[i])) for i in order]


def parse_classification(item: bytes | str) -> tuple[float, int, str]:
    """Triton's classification string `score:index:label` (label optional, may contain ':')."""
    text = item.decode() if isinstance(item, bytes) else item
    parts = text.split(":", 2)
    return float(parts[0]), int(parts[1]), parts[2] if len(parts) > 2 else parts[1]


# --- transports -----------------------------------------------------------------------------------------------


class GatewayHttp:
    """The gateway's JSON API."""

    def __init__(self, url: str, api_key: str | None, timeout: float, tls: Tls | None) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url, headers=headers, timeout=timeout, verify=verify(tls))
        self.url = url
        self.tls = tls
        self.kind = f"the gateway ({url.partition('://')[0]} /v1)"

    def _call(self, method: str, path: str, read: Callable[[Any], T], **kwargs) -> T:
        """`read` applied to the JSON answer; the gateway's error, or an answer it would not give, raised."""
        import httpx

        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            raise unreachable(self.url, error, self.tls) from None
        try:
            body = response.json()
        except ValueError:
            raise self._not_gateway(response, "") from None
        if response.status_code >= 400:
            error = body.get("error") if isinstance(body, dict) else None
            if not (isinstance(error, dict) and "message" in error):
                raise self._not_gateway(response, response.text)
            kind = ImageRejected if error.get("code") in GATEWAY_IMAGE_ERRORS else ClientError
            # a server fault: the ID finds the gateway's log line
            request = (
                f" (request {error['request_id']})"
                if response.status_code >= 500 and "request_id" in error
                else ""
            )
            raise kind(f"{self.url} answered {response.status_code}: {error['message']}{request}")
        try:
            return read(body)
        except (KeyError, IndexError, TypeError, ValueError):
            raise self._not_gateway(response, response.text) from None

    def _not_gateway(self, response, json_text: str) -> ClientError:
        """Another server answered (another service at that port, Triton's metrics port): say what it sent."""
        request = response.request
        sent = " ".join(json_text.split())[:80] or (
            f"{response.headers.get('content-type', 'no content type')}, {len(response.content)} bytes"
        )
        return ClientError(
            f"{self.url} answered {request.method} {request.url.path} with {response.status_code} ({sent}), not "
            f"the gateway's JSON: {NOT_GATEWAY_HINT}"
        )

    def pick_model(self, asked: str | None) -> str:
        """The model asked for (the gateway names the ones it has if it is not one), else the only one served."""
        if asked:
            return asked
        names = self._call("GET", "/v1/models", lambda body: [str(m["name"]) for m in body["models"]])
        return only_model(names, self.url)

    def batch_limit(self, model: str) -> int:
        return min(
            MAX_GATEWAY_FILES, self._call("GET", f"/v1/models/{model}", lambda b: int(b["max_batch_size"]))
        )

    def classify(self, model: str, images: list[ImageFile], top_k: int) -> list[list[Prediction] | str]:
        files = [("file", (image.path.name, image.data, "application/octet-stream")) for image in images]
        return self._call(
            "POST", f"/v1/models/{model}/classify", gateway_predictions, params={"top_k": top_k}, files=files
        )

    def close(self) -> None:
        self.http.close()


def gateway_predictions(body: dict | list) -> list[list[Prediction]]:
    """The gateway's /v1 classify answer: one object for one image, a list of them for several."""
    results = body if isinstance(body, list) else [body]
    return [
        [Prediction(int(p["index"]), str(p["label"]), float(p["score"])) for p in result["predictions"]]
        for result in results
    ]


class KServe:
    """Triton's protocol (gRPC or HTTP), spoken by Triton and by the gateway (gRPC, and HTTP at /v2):
    `<model>_pipeline`."""

    def __init__(
        self, module, address: str, api_key: str | None, timeout: float, scheme: str, tls: Tls | None
    ) -> None:
        self.module = module
        self.grpc = scheme.startswith("grpc")
        self.address = address
        self.url = f"{scheme}://{address}"
        self.timeout = timeout
        self.tls = tls
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else None
        self._classes: dict[str, int] = {}
        # tritonclient.http waits 60 s by default for a connection and for each answer
        options = {} if self.grpc else {"connection_timeout": timeout, "network_timeout": timeout}
        options |= tls.tritonclient_options(scheme) if tls else {}
        self.client = self._guard(lambda: module.InferenceServerClient(address, **options))
        name = self._guard(
            lambda: self.client.get_server_metadata(headers=self.headers),
            lambda metadata: metadata["name"] if isinstance(metadata, dict) else metadata.name,
        )
        api = scheme if self.grpc else f"{scheme} /v2"
        self.kind = f"{'the gateway' if name == GATEWAY_NAME else name} ({api})"

    def _guard(
        self, call: Callable[[], Any], read: Callable[[Any], T] | None = None, sends_images: bool = False
    ):
        """`read` applied to what `call` answers; its errors, or an answer no KServe server gives, raised."""
        answer = self._call(call, sends_images)
        try:
            return read(answer) if read else answer
        except (KeyError, IndexError, TypeError, ValueError, AttributeError, StopIteration) as error:
            raise ClientError(
                f"{self.url} answered what a KServe v2 server does not "
                f"({type(error).__name__}: {error}): {NOT_KSERVE_HINT}"
            ) from None

    def _call(self, call: Callable[[], Any], sends_images: bool) -> Any:
        from tritonclient.utils import InferenceServerException

        try:
            return call()
        except InferenceServerException as error:
            # the request is built here to fit the model: an invalid argument or a size limit can only be the images
            message = (error.message() or str(error)).strip()
            images_refused = error.status() in KSERVE_IMAGE_STATUSES or GRPC_TOO_LARGE in message
            kind = ImageRejected if sends_images and images_refused else ClientError
            hint = handshake_hint(message, presents_certificate(self.tls))
            if not hint and any(sign in message for sign in GRPC_AT_HTTP_PORT):
                hint = NOT_GRPC_HINT
            hint = f" ({NOT_KSERVE_HINT})" if KSERVE_UNDECODABLE in message else hint
            # tritonclient.http appends a body it cannot decode (a web server's HTML page) on the lines after
            raise kind(
                f"{self.url}: {message.splitlines()[0] if message else error.status()}{hint}"
            ) from None
        except (ConnectionError, OSError) as error:
            raise ClientError(
                f"cannot reach {self.url}: {error}{handshake_hint(str(error), presents_certificate(self.tls))}"
            ) from None
        except HTTPException as error:  # geventhttpclient's: an answer that is not HTTP/1.1, or none
            hint = NOT_HTTP1_HINT if self.tls is None else closed_over_tls_hint(str(error), self.tls)
            raise ClientError(f"cannot reach {self.url}: {error or type(error).__name__}{hint}") from None
        except ValueError as error:  # rapidjson's: not JSON (Triton's metrics port)
            raise ClientError(
                f"{self.url} answered what is not KServe v2 JSON ({error}): {NOT_KSERVE_HINT}"
            ) from None

    def pick_model(self, asked: str | None) -> str:
        """A model with a `<model>_pipeline` (given either way), else the only one served; the images go to that."""
        index = self._guard(
            lambda: self.client.get_model_repository_index(headers=self.headers), ModelIndex.of
        )
        served = sorted(n.removesuffix(PIPELINE_SUFFIX) for n in index.ready if n.endswith(PIPELINE_SUFFIX))
        if not asked:
            if not served and index.not_ready:
                name, reason = next(iter(index.not_ready.items()))
                raise ClientError(f"{self.url} has no model ready ({name}: {reason})")
            return only_model(served, self.url)
        model = asked.removesuffix(PIPELINE_SUFFIX)
        if model + PIPELINE_SUFFIX in index.not_ready:
            reason = index.not_ready[model + PIPELINE_SUFFIX]
            raise ClientError(f"{self.url} lists {model}{PIPELINE_SUFFIX}, but it is not ready: {reason}")
        if model not in served:
            choices = f"models that have one: {', '.join(served)}" if served else "no model has one"
            raise ClientError(
                f"{self.url} serves no {model}{PIPELINE_SUFFIX}, the ensemble that takes encoded images (`resnet "
                f"export` writes one per model); {choices}"
            )
        return model

    def batch_limit(self, model: str) -> int:
        return self._guard(
            lambda: self.client.get_model_config(model + PIPELINE_SUFFIX, headers=self.headers),
            max_batch_size,
        )

    def num_classes(self, model: str) -> int:
        if model not in self._classes:
            self._classes[model] = self._guard(
                lambda: self.client.get_model_metadata(model + PIPELINE_SUFFIX, headers=self.headers),
                class_count,
            )
        return self._classes[model]

    def classify(self, model: str, images: list[ImageFile], top_k: int) -> list[list[Prediction] | str]:
        num_classes = self.num_classes(model)
        data = np.array([image.data for image in images], dtype=np.object_).reshape(len(images), 1)
        tensor = self.module.InferInput(IMAGE_INPUT, list(data.shape), "BYTES")
        tensor.set_data_from_numpy(data)
        # every class, so the client can turn raw scores into probabilities the way the gateway's HTTP API does
        wanted = [self.module.InferRequestedOutput(LOGITS_OUTPUT, class_count=num_classes)]
        timeout = {"client_timeout": self.timeout} if self.grpc else {}

        def predictions(result) -> list[list[Prediction] | str]:
            rows = result.as_numpy(LOGITS_OUTPUT).reshape(len(images), -1)
            return [top_k_from_logits([parse_classification(item) for item in row], top_k) for row in rows]

        return self._guard(
            lambda: self.client.infer(
                model + PIPELINE_SUFFIX, [tensor], outputs=wanted, headers=self.headers, **timeout
            ),
            predictions,
            sends_images=True,
        )

    def close(self) -> None:
        self.client.close()


# KServe answers: tritonclient.http gives JSON as dicts and lists, tritonclient.grpc protobuf messages


def max_batch_size(config) -> int:
    config = config["config"] if isinstance(config, dict) and "config" in config else config
    limit = config.get("max_batch_size", 0) if isinstance(config, dict) else config.config.max_batch_size
    return int(limit) or 1


def class_count(metadata) -> int:
    if not isinstance(metadata, dict):
        from google.protobuf.json_format import MessageToDict

        metadata = MessageToDict(metadata, preserving_proto_field_name=True)
    logits = next(output for output in metadata["outputs"] if output["name"] == LOGITS_OUTPUT)
    return int(logits["shape"][-1])


def only_model(names: list[str], url: str) -> str:
    if len(names) == 1:
        return names[0]
    if not names:
        raise ClientError(f"{url} serves no models")
    raise ClientError(f"{url} serves several models ({', '.join(names)}); pick one with --model")


def connect(
    url: str,
    server: str,
    api_key: str | None,
    timeout: float,
    ca_cert: Path | None = None,
    key_pair: tuple[Path, Path] | None = None,
) -> GatewayHttp | KServe:
    """A client of the server at `url`; over TLS it trusts `ca_cert` and presents `key_pair` (certificate, key)
    when given."""
    try:
        parts = split_base_url(url, ("http", "https", "grpc", "grpcs"))
    except ValueError as error:
        raise ClientError(f"bad --url {error}") from None
    path = parts.path  # a server behind a reverse proxy under a path prefix
    tls = trusted_authorities(ca_cert, key_pair) if parts.scheme in ("https", "grpcs") else None
    if parts.scheme.startswith("grpc"):
        if path or not parts.port:  # without a port gRPC dials 443, which no gateway or Triton listens on
            raise ClientError(f"bad --url {url!r}: a gRPC address is {parts.scheme}://HOST:PORT, no path")
        import tritonclient.grpc

        return KServe(tritonclient.grpc, parts.netloc, api_key, timeout, parts.scheme, tls)
    base_url = f"{parts.scheme}://{parts.netloc}{path}"
    if server == "auto":
        server = "triton" if speaks_kserve_http(base_url, timeout, tls) else "gateway"
    if server == "gateway":
        return GatewayHttp(base_url, api_key, timeout, tls)
    import tritonclient.http

    return KServe(tritonclient.http, parts.netloc + path, api_key, timeout, parts.scheme, tls)


@dataclass(frozen=True)
class Tls:
    """The certificate authorities a TLS connection trusts: `ca_cert` (PEM), else the system's; and the client
    certificate it presents, if any."""

    context: ssl.SSLContext
    ca_cert: Path | None
    key_pair: tuple[Path, Path] | None = None

    def tritonclient_options(self, scheme: str) -> dict[str, Any]:
        """tritonclient's own TLS arguments: it opens the CA file itself, and gevent wraps sockets in its own
        SSLContext class. Without `ca_cert` HTTP trusts the system's authorities, as httpx here does; gRPC its
        bundled roots."""
        ca_cert = str(self.ca_cert) if self.ca_cert else None
        cert, key = (str(path) for path in self.key_pair) if self.key_pair else (None, None)
        if scheme == "grpcs":
            return {"ssl": True, "root_certificates": ca_cert, "certificate_chain": cert, "private_key": key}
        client_pair = {"certfile": cert, "keyfile": key} if self.key_pair else {}
        return {"ssl": True, "ssl_options": {"ca_certs": ca_cert, **client_pair}}


def trusted_authorities(ca_cert: Path | None, key_pair: tuple[Path, Path] | None = None) -> Tls:
    try:
        context = client_context(ca_cert)
    except ValueError as error:
        raise ClientError(f"bad --ca-cert: {error}") from None
    if key_pair is not None:
        try:
            load_key_pair(context, *key_pair)
        except ValueError as error:
            raise ClientError(f"bad --client-cert/--client-key: {error}") from None
    return Tls(context, ca_cert, key_pair)


def presents_certificate(tls: Tls | None) -> bool | None:
    """handshake_hint's `client_cert`: None for a plain connection."""
    return None if tls is None else tls.key_pair is not None


def closed_over_tls_hint(message: str, tls: Tls) -> str:
    """What to try when an https:// connection failed: over TLS a gRPC port closes an HTTP/1.1 connection just as
    a server refusing a client certificate does."""
    other_port = "if that is a gRPC port, use grpcs://HOST:PORT"
    return handshake_hint(message, tls.key_pair is not None, other_port)


def unreachable(url: str, error: Exception, tls: Tls | None) -> ClientError:
    """httpx's error as one line; a server that answered with something other than HTTP/1.1 is likely gRPC."""
    import httpx

    if tls is not None:
        hint = closed_over_tls_hint(str(error), tls)
    else:
        hint = tls_hint(str(error)) or (
            NOT_HTTP1_HINT if isinstance(error, httpx.RemoteProtocolError) else ""
        )
    return ClientError(f"cannot reach {url}: {error}{hint}")


def verify(tls: Tls | None) -> ssl.SSLContext | bool:
    """httpx's `verify` argument: the TLS context (unused for a plain http:// URL)."""
    return tls.context if tls else True


def speaks_kserve_http(url: str, timeout: float, tls: Tls | None) -> bool:
    """Whether `url` is Triton (or another KServe v2 server): it answers `GET /v2` with its metadata. The gateway
    answers it too, by its own name (or 401 when it wants a key), and is then spoken to through its /v1 API."""
    import httpx

    try:
        response = httpx.get(f"{url}/v2", timeout=timeout, verify=verify(tls))
    except httpx.HTTPError as error:
        raise unreachable(url, error, tls) from None
    try:
        metadata = response.json()
    except ValueError:
        return False
    return (
        response.status_code == 200
        and isinstance(metadata, dict)
        and "extensions" in metadata
        and metadata.get("name") != GATEWAY_NAME
    )


# --- output --------------------------------------------------------------------------------------------------


def print_table(results: list[Result], server: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{results[0].model} on {server}" if results else server)
    table.add_column("image", overflow="fold")  # a path is worth more whole than on one line
    for column, justify in (("#", "right"), ("label", "left"), ("index", "right"), ("score", "right")):
        table.add_column(column, justify=justify)
    for result in results:
        for rank, prediction in enumerate(result.predictions, 1):
            table.add_row(
                result.image if rank == 1 else "",
                str(rank),
                prediction.label,
                str(prediction.index),
                f"{prediction.score:.4f}",
                end_section=rank == len(result.predictions),
            )
    Console().print(table)


# --- CLI -----------------------------------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        description="Classify images with a served model: the gateway (HTTP or gRPC) or a Triton server (HTTP or gRPC).",
        epilog="Scores are softmax probabilities on every path. Over gRPC, and over HTTP to Triton, the client calls "
        "<model>_pipeline with Triton's classification extension.",
        formatter_class=HelpFormatter,
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="classify")
    classify = actions.add_parser(
        "classify",
        help="classify image files or directories of images",
        formatter_class=HelpFormatter,
        description="Classify images (files, or directories of .jpg/.png/... files), sent in batches. An image that "
        "cannot be read or that the server refuses is named on stderr and the others are still classified; the exit "
        "status is then 1.",
    )
    classify.add_argument(
        "images",
        nargs="+",
        type=Path,
        metavar="IMAGE",
        help="image file or directory; - reads one from stdin",
    )
    classify.add_argument(
        "--url",
        default=env("RESNET_CLIENT_URL", "http://127.0.0.1:8080"),
        help="http://HOST:PORT (gateway or Triton HTTP) or grpc://HOST:PORT (gateway or Triton "
        "gRPC); https:// and grpcs:// for TLS (env RESNET_CLIENT_URL)",
    )
    add_client_arguments(classify)
    classify.add_argument(
        "--model",
        default=env("RESNET_CLIENT_MODEL"),
        help="model name (env RESNET_CLIENT_MODEL; default: the only model served)",
    )
    classify.add_argument("--top-k", type=int, default=5, help="predictions per image")
    classify.add_argument(
        "--batch-size", type=int, default=16, help="images per request (capped by the model's maximum)"
    )
    classify.add_argument(
        "--server",
        choices=("auto", "gateway", "triton"),
        default="auto",
        help="what answers an http:// URL and so which API to use: gateway = its /v1 API, triton = KServe v2 "
        "HTTP (Triton, or the gateway's /v2); auto: triton if GET /v2 answers from a server other than the gateway",
    )
    classify.add_argument(
        "--api-key", default=env("RESNET_API_KEY"), help="gateway API key (env RESNET_API_KEY)"
    )
    classify.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    classify.add_argument(
        "--json", action="store_true", help="print JSON (one object per image) instead of a table"
    )
    return parser


def run(args: argparse.Namespace) -> Classified:
    """Every image's outcome. An error that would fail every image the same way (auth, the server gone) stops the
    run, as does Ctrl-C; once some images are done it is returned in `stopped` with them, so their answers are not
    lost."""
    if args.top_k < 1 or args.batch_size < 1:
        raise ClientError("--top-k and --batch-size must be at least 1")
    if not 0 < args.timeout <= MAX_TIMEOUT_S:  # a socket's timeout overflows past time_t: inf was a traceback
        raise ClientError(
            f"--timeout must be more than 0 and at most {MAX_TIMEOUT_S} seconds, got {args.timeout}"
        )
    images = collect_images(args.images)
    if (args.client_cert is None) != (args.client_key is None):
        raise ClientError("--client-cert and --client-key go together: give both, or neither")
    key_pair = (args.client_cert, args.client_key) if args.client_cert else None
    client = connect(args.url, args.server, args.api_key, args.timeout, args.ca_cert, key_pair)
    try:
        model = client.pick_model(args.model)
        size = min(args.batch_size, client.batch_limit(model))
        done = Classified([], [], client.kind, len(images))
        batches = list(chunks(images, size))
        from tqdm import tqdm

        try:
            for batch in tqdm(
                batches, desc="classifying", unit="batch", disable=len(batches) < 2, file=sys.stderr
            ):
                for path, outcome in zip(
                    batch, classify_files(client, model, batch, args.top_k), strict=True
                ):
                    if isinstance(outcome, str):
                        done.refused.append(Refused(str(path), outcome))
                    else:
                        done.results.append(Result(str(path), model, outcome))
        except (ClientError, KeyboardInterrupt) as error:
            if not (done.results or done.refused):
                raise
            done.stopped = error
        return done
    finally:
        client.close()


def classify_files(
    client: GatewayHttp | KServe, model: str, paths: list[Path], top_k: int
) -> list[list[Prediction] | str]:
    """`classify_batch` of the files that can be read; a file that cannot is refused here."""
    files = [read_image(path) for path in paths]
    readable = [file for file in files if isinstance(file, ImageFile)]
    answers = iter(classify_batch(client, model, readable, top_k) if readable else [])
    return [next(answers) if isinstance(file, ImageFile) else file for file in files]


def read_image(path: Path) -> ImageFile | str:
    try:
        return ImageFile(path, sys.stdin.buffer.read() if path == STDIN else path.read_bytes())
    except OSError as error:  # gone since the folder was listed, a disk error, no permission
        return f"cannot read it: {error.strerror or error}"


def classify_batch(
    client: GatewayHttp | KServe, model: str, batch: list[ImageFile], top_k: int
) -> list[list[Prediction] | str]:
    """One outcome per image, in order: its predictions, or why the server refused it. An image the server
    refuses is left out and the others are sent again, so one bad file does not cost the rest of a folder."""
    try:
        return client.classify(model, batch, top_k)
    except ImageRejected as error:
        if len(batch) == 1:
            return [str(error)]
        named = named_image(str(error), len(batch))
        if named is None:  # the server did not say which, or the whole was too large: each half on its own
            middle = len(batch) // 2
            first = classify_batch(client, model, batch[:middle], top_k)
            return first + classify_batch(client, model, batch[middle:], top_k)
        bad, reason = named
        others = classify_batch(client, model, batch[:bad] + batch[bad + 1 :], top_k)
        return [*others[:bad], reason, *others[bad:]]


def named_image(message: str, count: int) -> tuple[int, str] | None:
    """The server's error for a request of several images names one as "image K of N": its index, and the
    message without those words."""
    which = re.search(r"image (\d+) of (\d+): ", message)
    if which and int(which.group(2)) == count and 1 <= int(which.group(1)) <= count:
        return int(which.group(1)) - 1, message.replace(which.group(0), "")
    return None


def main(args: argparse.Namespace) -> int:
    """Prints what was classified; each image that was not is one line on stderr, and makes the exit 1."""
    done = run(args)
    try:
        if args.json:
            print(json.dumps([asdict(result) for result in done.results], indent=2))
        elif done.results:
            print_table(done.results, done.server)
        sys.stdout.flush()
    except BrokenPipeError:  # `| head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    for image in done.refused:
        print(f"resnet: error: {image.image}: {image.reason}", file=sys.stderr)
    if done.stopped is not None:
        answered = (
            f"stopped after {len(done.results) + len(done.refused)} of {done.total} images, answered above"
        )
        if isinstance(done.stopped, KeyboardInterrupt):
            print(f"resnet: interrupted ({answered})", file=sys.stderr)
            return 130
        raise ClientError(f"{done.stopped} ({answered})")
    return 1 if done.refused else 0
