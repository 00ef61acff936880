"""The FastAPI gateway: `create_app(settings)`.

Routes: `GET /v1/models`, `GET /v1/models/{name}`, `POST /v1/models/{name}/classify`, `GET /healthz`, `/readyz`,
`/metrics`, the OpenAPI docs at `/docs`, the demo page at `/`, and Triton's KServe v2 HTTP API under `/v2`
(server/kserve_http.py). Every error, ours or FastAPI's, leaves as `{"error": {"code", "message", "request_id"}}`
with a 4xx/5xx status that says what happened; under `/v2` as KServe's `{"error": "<message>"}`, so Triton clients
read it. Every answer carries `X-Request-ID`: the client's own when it sent a plausible one, else a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import grpc_service, kserve_http
from server.certificates import ServingCertificates, watch
from server.disconnect import unless_disconnected
from server.errors import (
    ClientClosedRequest,
    GatewayError,
    InvalidInput,
    PayloadTooLarge,
    Unauthorized,
    UnsupportedMediaType,
)
from server.http_protocol import Refusal
from server.logs import CURRENT_REQUEST_ID, REQUEST_ID_HEADER, log_access, request_id_from
from server.metrics import Metrics
from server.registry import ModelRegistry, Prediction
from server.settings import Settings

log = logging.getLogger("resnet.server")
STATIC_DIR = Path(__file__).with_name("static")
MAX_TOP_K = 1000
MAX_FILES = 64
RAW_CONTENT_TYPES = ("application/octet-stream", "")
# The demo page loads only its own script and style and shows the picked image from a blob: URL: a policy that allows
# nothing else keeps an injected script or a framing page (clickjacking) from running with the user's API key.
# Not on /docs, whose Swagger UI FastAPI loads from a CDN.
DEMO_PAGE_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "referrer-policy": "no-referrer",
}


class PredictionOut(BaseModel):
    index: int
    label: str
    score: float


class Classification(BaseModel):
    model: str
    version: str
    predictions: list[PredictionOut]


class ModelOut(BaseModel):
    name: str
    versions: list[str]
    input_shape: list[int]
    num_classes: int
    max_batch_size: int
    backend: str
    preprocess: dict


class ModelList(BaseModel):
    models: list[ModelOut]


class ErrorBody(BaseModel):
    code: str
    message: str
    request_id: str | None = None  # also the X-Request-ID header: quote it when reporting a 5xx


class ErrorOut(BaseModel):
    error: ErrorBody


ERROR_RESPONSES = {status: {"model": ErrorOut} for status in (400, 401, 404, 413, 415, 422, 503, 504)}


KSERVE_PREFIX = "/v2"


def is_kserve_path(path: str) -> bool:
    return path == KSERVE_PREFIX or path.startswith(KSERVE_PREFIX + "/")


def route_path(scope: Scope) -> str:
    """The path the routes match: without the --root-path prefix, which uvicorn puts in front of every path."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, scope: Scope | None = None
) -> JSONResponse:
    """The gateway's error shape with the request's ID, or KServe's for a request to /v2 (`scope`: the request's)."""
    if scope is not None and is_kserve_path(route_path(scope)):
        # KServe v2 / Triton: a bare message, and 400 for a request the server cannot use.
        return JSONResponse({"error": message}, status_code=400 if status == 422 else status, headers=headers)
    error = {"code": code, "message": message}
    if scope is not None and request_id_of(scope):
        error["request_id"] = request_id_of(scope)
    return JSONResponse({"error": error}, status_code=status, headers=headers)


# --- request IDs: the client's X-Request-ID (a proxy's, or its own) or a new one, on every answer and error line ---


def assign_request_id(scope: Scope) -> str:
    """The request's ID (`request_id_from` its X-Request-ID), kept in its state for the error handlers."""
    offered = dict(scope["headers"]).get(REQUEST_ID_HEADER.encode(), b"")
    request_id = request_id_from(offered.decode("latin-1"))
    scope.setdefault("state", {})["request_id"] = request_id
    return request_id


def request_id_of(scope: Scope) -> str | None:
    return scope.get("state", {}).get("request_id")


# --- middleware: metrics and the body limit, in plain ASGI (no per-request task like BaseHTTPMiddleware) ---------


class GatewayMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        max_body_bytes: int,
        access_log: bool = False,
        revocations: ServingCertificates | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.access_log = access_log
        # OpenSSL checks the revocation lists at the handshake only: a keep-alive connection opened before its
        # certificate was revoked would be served for as long as it stays open
        self.revocations = revocations

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        request_id = assign_request_id(scope)
        current = CURRENT_REQUEST_ID.set(request_id)

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (REQUEST_ID_HEADER.encode(), request_id.encode()),
                    # a browser reads each answer as the type it names, never guessing a page from a body
                    (b"x-content-type-options", b"nosniff"),
                ]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            length = dict(scope["headers"]).get(b"content-length")
            if refusal := self._certificate_refusal(scope):
                response = error_response(401, "client_certificate_refused", refusal, scope=scope)
                await response(scope, receive, send_with_status)
            elif length is not None and length.isdigit() and int(length) > self.max_body_bytes:
                error = PayloadTooLarge(
                    f"request body of {int(length)} bytes is over the limit of {self.max_body_bytes}"
                )
                response = error_response(error.http_status, error.code, error.message, scope=scope)
                await response(scope, receive, send_with_status)
            else:
                await self.app(scope, self._limited(receive), send_with_status)
        finally:
            self.metrics.in_flight.dec()
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            elapsed = time.perf_counter() - started
            self.metrics.requests.labels(label, scope["method"], str(status)).inc()
            self.metrics.latency.labels(label).observe(elapsed)
            if self.access_log:
                client = ":".join(map(str, scope["client"])) if scope.get("client") else "-"
                certificate = scope.get("extensions", {}).get("tls", {}).get("client_cert_name")
                log_access(scope["method"], scope["path"], status, elapsed, client, request_id, certificate)
            CURRENT_REQUEST_ID.reset(current)

    def _certificate_refusal(self, scope: Scope) -> str | None:
        if self.revocations is None:
            return None
        chain = scope.get("extensions", {}).get("tls", {}).get("client_cert_chain")
        problem = self.revocations.refusal(chain[0].encode()) if chain else None
        return f"client certificate refused: {problem}" if problem else None

    def _limited(self, receive: Receive) -> Receive:
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise PayloadTooLarge(f"request body is over the limit of {self.max_body_bytes} bytes")
            return message

        return limited_receive


def refusal_recorder(app: FastAPI) -> Callable[[Refusal], None]:
    """What the HTTP protocol answers itself (400, 408, 431; server/http_protocol.py) is counted under the route
    `unread` and logged as the middleware does for the requests the app sees. Not timed: a 408's time is the
    deadline."""
    metrics: Metrics = app.state.metrics
    access_log: bool = app.state.settings.access_log

    def record(refusal: Refusal) -> None:
        metrics.requests.labels("unread", refusal.method, str(refusal.status)).inc()
        if access_log:
            log_access(
                refusal.method,
                refusal.path,
                refusal.status,
                refusal.seconds,
                refusal.client,
                refusal.request_id,
                refusal.certificate,
            )

    return record


# --- error handlers ----------------------------------------------------------------------------------------


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, error: GatewayError) -> JSONResponse:
        return error_response(error.http_status, error.code, error.message, error.headers(), request.scope)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, error: ClientDisconnect) -> JSONResponse:
        # Routine (a client timing out mid-upload), not a server fault: counted as 499, no traceback in the log.
        gone = ClientClosedRequest("the client closed the connection while sending the request")
        return error_response(gone.http_status, gone.code, gone.message, scope=request.scope)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())
        return error_response(422, InvalidInput.code, problems or "invalid request", scope=request.scope)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}
        message = error.detail if isinstance(error.detail, str) else str(error.detail)
        if error.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
            if is_kserve_path(route_path(request.scope)):
                message += f" ({kserve_http.SERVED})"
        code = codes.get(error.status_code, "http_error")
        return error_response(error.status_code, code, message, error.headers, request.scope)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        # Starlette answers this one outside every middleware: the ID comes from the request's state
        request_id = request_id_of(request.scope)
        log.exception(
            "unhandled error on %s %s (request %s)",
            request.method,
            request.url.path,
            request_id,
            extra={"request_id": request_id},
        )
        message = f"internal error ({type(error).__name__}); see the gateway log"
        headers = {"X-Request-ID": request_id} if request_id else None
        return error_response(500, "internal", message, headers, request.scope)


# --- routes ------------------------------------------------------------------------------------------------


def registry_of(request: Request) -> ModelRegistry:
    return request.app.state.registry


async def require_api_key(request: Request) -> None:
    keys: list[str] = request.app.state.settings.api_keys
    if not keys:
        return
    authorization = request.headers.get("authorization", "")
    offered = (
        authorization[7:].strip()
        if authorization.lower().startswith("bearer ")
        else request.headers.get("x-api-key", "")
    )
    # compare against every key (no early exit), each in constant time
    matches = [hmac.compare_digest(offered.encode(), key.encode()) for key in keys]
    if not offered or not any(matches):
        raise Unauthorized(
            "missing or invalid API key (send 'Authorization: Bearer <key>' or 'X-API-Key: <key>')"
        )


def result(name: str, version: str, predictions: list[Prediction]) -> dict:
    return {
        "model": name,
        "version": version,
        "predictions": [{"index": p.index, "label": p.label, "score": p.score} for p in predictions],
    }


async def read_images(request: Request, max_body_bytes: int) -> tuple[list[bytes], bool]:
    """The request's images and whether the client sent several (multipart) or one (raw body)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    encoding = request.headers.get("content-encoding", "")
    if content_type == "multipart/form-data":
        if kserve_http.is_compressed(encoding):
            raise UnsupportedMediaType(
                f"Content-Encoding {encoding!r} is not supported on a multipart body; send the form uncompressed"
            )
        form = await request.form(max_files=MAX_FILES, max_part_size=max_body_bytes)
        try:
            parts = form.getlist("file")
            texts = [item for item in parts if not isinstance(item, UploadFile)]
            if texts:  # curl -F file=cat.jpg (no @) sends the name, not the image: refused, not skipped
                raise InvalidInput(
                    f"multipart field 'file' holds text ({str(texts[0])[:40]!r}), not an uploaded file; send "
                    "each image as a file part (curl: -F file=@cat.jpg)"
                )
            if not parts:
                raise InvalidInput(
                    "multipart body has no 'file' part; send each image as a field named 'file'"
                )
            images = [await upload.read() for upload in parts]
        finally:
            await form.close()
        return images, len(images) > 1
    if content_type.startswith("image/") or content_type in RAW_CONTENT_TYPES:
        return [kserve_http.decompressed(await request.body(), encoding, max_body_bytes)], False
    raise UnsupportedMediaType(
        f"content type {content_type!r} is not accepted; send the image as the raw body with "
        "an image/* content type, or as multipart/form-data field 'file'"
    )


CLASSIFY_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                }
            },
        },
    }
}


def api_router() -> APIRouter:
    router = APIRouter(dependencies=[Depends(require_api_key)], responses=ERROR_RESPONSES)

    @router.get("/v1/models", response_model=ModelList, tags=["models"])
    async def list_models(request: Request) -> dict:
        """The models this gateway serves."""
        registry = registry_of(request)
        return {"models": [registry.models[name].describe() for name in registry.names()]}

    @router.get("/v1/models/{name}", response_model=ModelOut, tags=["models"])
    async def get_model(name: str, request: Request) -> dict:
        """One model: versions, input size, classes, preprocessing."""
        registry = registry_of(request)
        return (await registry.current(lambda: registry.get(name))).describe()

    @router.post(
        "/v1/models/{name}/classify",
        response_model=Classification | list[Classification],
        tags=["inference"],
        openapi_extra=CLASSIFY_BODY,
    )
    async def classify(
        name: str,
        request: Request,
        top_k: int = Query(5, ge=1, le=MAX_TOP_K, description="predictions per image"),
    ) -> object:
        """Classify the image in the body (any image/* type), or each `file` of a multipart form.

        Returns the top-k classes with softmax scores; a list of results when several files were sent.
        """
        registry = registry_of(request)
        model = await registry.current(lambda: registry.get(name))
        images, several = await read_images(request, request.app.state.settings.max_body_bytes)
        classification = await unless_disconnected(request, model.classify(images, top_k))
        results = [result(model.name, classification.version, p) for p in classification.predictions]
        return JSONResponse(results if several else results[0])

    @router.get("/metrics", tags=["health"], response_class=Response)
    async def metrics(request: Request) -> Response:
        """Prometheus metrics."""
        registry = registry_of(request)
        metrics = request.app.state.metrics
        for name, model in registry.models.items():
            metrics.queue_depth.labels(name).set(model.dispatcher.depth())
            metrics.admitted.labels(name).set(model.dispatcher.admitted())
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router


def health_router() -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/healthz")
    async def healthz() -> dict:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @router.get("/readyz", responses={503: {"model": ErrorOut}})
    async def readyz(request: Request) -> JSONResponse:
        """Readiness: models loaded and the backend reachable; `failed` names the models that did not load."""
        registry = registry_of(request)
        if not registry.ready():
            reason = registry.not_ready_reason()
            return error_response(503, "not_ready", reason, {"Retry-After": "1"}, request.scope)
        failed = {name: failure.reason for name, failure in sorted(registry.failures.items())}
        return JSONResponse(
            {
                "status": "ready",
                "models": registry.names(),
                "backend": registry.backend.name,
                "failed": failed,
            }
        )

    @router.get("/", include_in_schema=False)
    async def demo_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers=DEMO_PAGE_HEADERS)

    return router


# --- the app -----------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    registry = ModelRegistry(settings, app.state.metrics)
    app.state.registry = registry
    await registry.start()
    # Triton's protocol, over gRPC and over HTTP at /v2: one service on the same registry and batchers as /v1.
    app.state.inference_service = grpc_service.InferenceService(registry, grpc_service.package_version())
    log.info("HTTP: /v1 (the gateway's API), /v2 (KServe v2, Triton's HTTP API), /docs, /metrics")
    grpc_server = None
    if settings.grpc_port:
        try:
            grpc_server = await grpc_service.start(app, settings)
        except BaseException:
            await registry.close()
            raise
    watching = watch_certificates(app.state.certificates)
    try:
        yield
    finally:
        if watching is not None:
            watching.cancel()
        if grpc_server is not None:
            await grpc_service.stop(grpc_server)
        # uvicorn has finished the in-flight HTTP requests by now; answer anything still queued, then release.
        await registry.close()


def watch_certificates(certificates: ServingCertificates | None) -> asyncio.Task | None:
    """The task that serves renewed TLS files to new connections, on the event loop that makes the handshakes."""
    if certificates is None or not certificates.interval_s:
        return None
    return asyncio.create_task(
        watch(certificates.reload_if_changed, certificates.interval_s), name="tls-reload"
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(
        title="resnet-serving gateway",
        version="0.1.0",
        lifespan=lifespan,
        description="Image classification with ResNets: embedded ONNX Runtime or NVIDIA Triton behind "
        "one API, with dynamic batching.",
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.certificates = (
        ServingCertificates(settings, app.state.metrics) if settings.ssl_certfile else None
    )
    install_error_handlers(app)
    app.include_router(health_router())
    app.include_router(api_router())
    app.include_router(kserve_http.health_router())
    app.include_router(kserve_http.api_router(require_api_key))
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(
        GatewayMiddleware,
        metrics=app.state.metrics,
        max_body_bytes=settings.max_body_bytes,
        access_log=settings.access_log,
        revocations=app.state.certificates if settings.ssl_crl else None,
    )
    return app
