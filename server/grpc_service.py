"""The gateway's gRPC API: Triton's (KServe v2) `inference.GRPCInferenceService`, plus standard health checking.

It runs in the gateway process on the same `ModelRegistry` (and so the same batchers) as the HTTP API. Every
classifier `<name>` is served twice, as Triton would serve our exported repository:

- `<name>`: the tensor model, FP32 "input" [N, 3, H, W] (normalized NCHW) -> FP32 "logits" [N, C];
- `<name>_pipeline`: the ensemble, BYTES "image" [N, 1] (encoded images) -> "logits", the gateway preprocessing.

Asking for "logits" with the `classification` parameter (tritonclient's `class_count`) returns Triton's
classification strings `score:index:label`, byte for byte as Triton formats them (its `AddClassResults`: raw
output values sorted high to low, `std::to_string` floats). `ModelStatistics` reports both names' statistics
(server/statistics.py) with the meaning of Triton's statistics extension. So `tritonclient.grpc` code written for
Triton runs against the gateway unchanged. Typed `GatewayError`s become gRPC status codes at this one boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from server import errors
from server.batching import Inference
from server.certificates import ServingCertificates, grpc_client_certificate
from server.logs import CURRENT_REQUEST_ID, REQUEST_ID_HEADER, log_access, request_id_from
from server.metrics import Metrics
from server.registry import ModelRegistry, ServedModel
from server.settings import Settings
from server.spec import IMAGE_INPUT_NAME, INPUT_NAME, OUTPUT_NAME, PIPELINE_SUFFIX, ROLE_KEY, Role
from server.statistics import BatchStatistics, Duration, ModelStatistics

log = logging.getLogger("resnet.server")
SERVICE_NAME = "inference.GRPCInferenceService"
SERVER_NAME = "resnet-gateway"  # Triton answers "triton": `resnet client` tells them apart by this
EXTENSIONS = ["classification", "model_configuration", "statistics"]  # as Triton names them in ServerMetadata
CLASSIFICATION_PARAMETER = "classification"
HEALTH_POLL_S = 0.5
# Probes answer without an API key, like /healthz and /readyz over HTTP.
OPEN_METHODS = frozenset(
    {
        f"/{SERVICE_NAME}/ServerLive",
        f"/{SERVICE_NAME}/ServerReady",
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
    }
)

STATUS_OF: dict[type[errors.GatewayError], grpc.StatusCode] = {
    errors.ModelNotFound: grpc.StatusCode.NOT_FOUND,
    errors.InvalidImage: grpc.StatusCode.INVALID_ARGUMENT,
    errors.UnsupportedMediaType: grpc.StatusCode.INVALID_ARGUMENT,
    errors.PayloadTooLarge: grpc.StatusCode.INVALID_ARGUMENT,
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.BackendUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Unauthorized: grpc.StatusCode.UNAUTHENTICATED,
}


def status_of(error: errors.GatewayError) -> grpc.StatusCode:
    for kind in type(error).__mro__:
        if kind in STATUS_OF:
            return STATUS_OF[kind]
    return grpc.StatusCode.INTERNAL


# --- Triton's classification extension -----------------------------------------------------------------------


def classification_strings(logits: np.ndarray, class_count: int, labels: list[str]) -> np.ndarray:
    """Triton's `score:index:label` strings, [N, min(C, class_count)] of bytes, best first (raw values, not
    probabilities: Triton ranks whatever the output holds). `%f` is what C++ `std::to_string(float)` prints."""
    count = min(class_count, logits.shape[1])
    best = np.argsort(-logits, axis=1, kind="stable")[:, :count]
    rows = [
        [f"{float(row[i]):f}:{int(i)}:{labels[i]}".encode() for i in indexes]
        for row, indexes in zip(logits, best, strict=True)
    ]
    return np.array(rows, dtype=np.object_).reshape(len(rows), count)


# --- requests -> arrays -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """A name a client can ask for: a classifier as a tensor model, or its `_pipeline` taking encoded images."""

    model: ServedModel
    pipeline: bool

    @property
    def name(self) -> str:
        return self.model.name + (PIPELINE_SUFFIX if self.pipeline else "")

    @property
    def input_name(self) -> str:
        return IMAGE_INPUT_NAME if self.pipeline else INPUT_NAME

    @property
    def input_datatype(self) -> str:
        return "BYTES" if self.pipeline else "FP32"

    @property
    def input_dims(self) -> list[int]:
        return [1] if self.pipeline else list(self.model.input_shape)

    @property
    def statistics(self) -> ModelStatistics:
        return self.model.image_statistics if self.pipeline else self.model.tensor_statistics


async def resolve(registry: ModelRegistry, name: str, version: str = "") -> Endpoint:
    """What `name` (a classifier, or its pipeline) at `version` ("": the one served) is served by, looked for again
    after a look at the backend's models where it is not (`ModelRegistry.current`)."""
    return await registry.current(lambda: endpoint_now(registry, name, version))


def endpoint_now(registry: ModelRegistry, name: str, version: str) -> Endpoint:
    if not name:
        raise errors.InvalidInput("model_name is empty")
    base = name.removesuffix(PIPELINE_SUFFIX)
    try:
        endpoint = Endpoint(registry.get(name), pipeline=False)
    except errors.ModelNotFound:
        if base == name or base not in registry.names():
            served = [served for model in registry.names() for served in (model, model + PIPELINE_SUFFIX)]
            raise errors.ModelNotFound(
                f"model {name!r} {registry.unserved(base)}; available: {', '.join(served) or 'none'}"
            ) from None
        endpoint = Endpoint(registry.get(base), pipeline=True)
    if version and version != endpoint.model.version:
        raise errors.ModelNotFound(
            f"model {name!r} has no version {version!r}; serving version "
            f"{endpoint.model.version!r} (leave model_version empty for it)"
        )
    return endpoint


def input_array(endpoint: Endpoint, request: pb.ModelInferRequest) -> np.ndarray:
    """The request's one input as an array: float32 [N, 3, H, W], or object (bytes) [N] for a pipeline."""
    if len(request.inputs) != 1 or request.inputs[0].name != endpoint.input_name:
        given = ", ".join(repr(tensor.name) for tensor in request.inputs) or "none"
        raise errors.InvalidInput(
            f"{endpoint.name} takes exactly one input {endpoint.input_name!r} "
            f"({endpoint.input_datatype} [-1, {', '.join(map(str, endpoint.input_dims))}]); got {given}"
        )
    tensor = request.inputs[0]
    shape = tuple(tensor.shape)
    expected = (-1, *endpoint.input_dims)
    if (
        tensor.datatype != endpoint.input_datatype
        or len(shape) != len(expected)
        or shape[1:] != expected[1:]
        or shape[0] < 1
    ):
        raise errors.InvalidInput(
            f"input {tensor.name!r} of {endpoint.name} must be {endpoint.input_datatype} "
            f"{list(expected)} (-1: batch size >= 1); got {tensor.datatype} {list(shape)}"
        )
    if shape[0] > endpoint.model.max_batch_size:
        raise errors.InvalidInput(
            f"batch size {shape[0]} is over the maximum of {endpoint.model.max_batch_size} "
            f"for {endpoint.name}; split the request"
        )
    if len(request.raw_input_contents) not in (0, 1):  # one per input or none, as Triton requires
        raise errors.InvalidInput(
            f"{len(request.raw_input_contents)} raw_input_contents for 1 input; send one per input, or none"
        )
    raw = request.raw_input_contents[0] if request.raw_input_contents else None
    return _bytes_input(tensor, raw, shape) if endpoint.pipeline else _float_input(tensor, raw, shape)


def _float_input(
    tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None, shape: tuple[int, ...]
) -> np.ndarray:
    count = int(np.prod(shape))
    if raw is not None:
        if len(raw) != count * 4:
            raise errors.InvalidInput(
                f"input {tensor.name!r}: {len(raw)} bytes of raw content for shape {list(shape)} "
                f"(FP32 needs {count * 4})"
            )
        values = np.frombuffer(raw, dtype="<f4")
    else:
        values = np.asarray(tensor.contents.fp32_contents, dtype=np.float32)
        if values.size != count:
            raise errors.InvalidInput(
                f"input {tensor.name!r}: {values.size} fp32_contents for shape {list(shape)}"
            )
    values = values.astype(np.float32, copy=False)
    finite = np.isfinite(values)
    if not finite.all():
        # A NaN/Inf pixel makes every logit NaN (batch norm spreads it), and /v2's JSON cannot carry NaN.
        raise errors.InvalidInput(
            f"input {tensor.name!r}: {finite.size - int(finite.sum())} of {finite.size} values are NaN or "
            "infinite (or beyond FP32's range); send finite FP32 values"
        )
    return values.reshape(shape)


def _bytes_input(
    tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None, shape: tuple[int, ...]
) -> np.ndarray:
    count = int(np.prod(shape))
    if raw is not None:
        try:
            items = deserialize_bytes_tensor(raw)
        except Exception as error:  # noqa: BLE001 - any framing problem is the client's
            raise errors.InvalidInput(
                f"input {tensor.name!r}: raw BYTES content is not length-prefixed "
                f"(4-byte little-endian length before each element): {error}"
            ) from None
    else:
        items = np.array(list(tensor.contents.bytes_contents), dtype=np.object_)
    if items.size != count:
        raise errors.InvalidInput(
            f"input {tensor.name!r}: {items.size} elements for shape {list(shape)}; "
            "send one encoded image per row"
        )
    return items.reshape(-1)


def requested_outputs(request: pb.ModelInferRequest) -> list[tuple[str, int]]:
    """(name, class_count) per requested output; none requested means all outputs, as raw tensors."""
    outputs = []
    for output in request.outputs:
        if output.name != OUTPUT_NAME:
            raise errors.InvalidInput(f"unknown output {output.name!r}; the only output is {OUTPUT_NAME!r}")
        count = 0
        if CLASSIFICATION_PARAMETER in output.parameters:
            parameter = output.parameters[CLASSIFICATION_PARAMETER]
            count = parameter.int64_param if parameter.WhichOneof("parameter_choice") == "int64_param" else -1
            if count < 1:
                raise errors.InvalidInput(
                    "the 'classification' parameter must be an integer >= 1 (tritonclient: "
                    "InferRequestedOutput(name, class_count=K))"
                )
        outputs.append((output.name, count))
    return outputs or [(OUTPUT_NAME, 0)]


def infer_response(
    endpoint: Endpoint, request: pb.ModelInferRequest, inference: Inference
) -> pb.ModelInferResponse:
    logits = inference.logits
    response = pb.ModelInferResponse(model_name=endpoint.name, model_version=inference.version, id=request.id)
    for name, class_count in requested_outputs(request):
        tensor = response.outputs.add(name=name)
        if class_count:
            strings = classification_strings(logits, class_count, endpoint.model.labels)
            tensor.datatype = "BYTES"
            tensor.shape.extend(strings.shape)
            serialized = serialize_byte_tensor(strings)  # a 0-d array holding the length-prefixed bytes
            response.raw_output_contents.append(serialized.item() if serialized.size else b"")
        else:
            tensor.datatype = "FP32"
            tensor.shape.extend(logits.shape)
            response.raw_output_contents.append(np.ascontiguousarray(logits, dtype="<f4").tobytes())
    return response


# --- model descriptions --------------------------------------------------------------------------------------


def model_metadata(endpoint: Endpoint) -> pb.ModelMetadataResponse:
    model = endpoint.model
    response = pb.ModelMetadataResponse(
        name=endpoint.name,
        versions=[model.version],
        platform="ensemble" if endpoint.pipeline else f"gateway_{model.backend}",
    )
    response.inputs.add(
        name=endpoint.input_name, datatype=endpoint.input_datatype, shape=[-1, *endpoint.input_dims]
    )
    response.outputs.add(name=OUTPUT_NAME, datatype="FP32", shape=[-1, len(model.labels)])
    return response


def _duration(duration: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=duration.count, ns=duration.ns)


def _batch_statistics(batch_size: int, batch: BatchStatistics) -> pb.InferBatchStatistics:
    return pb.InferBatchStatistics(
        batch_size=batch_size,
        compute_input=_duration(batch.compute_input),
        compute_infer=_duration(batch.compute_infer),
        compute_output=_duration(batch.compute_output),
    )


def model_statistics(endpoint: Endpoint) -> pb.ModelStatistics:
    statistics = endpoint.statistics
    return pb.ModelStatistics(
        name=endpoint.name,
        version=endpoint.model.version,
        last_inference=statistics.last_inference_ms,
        inference_count=statistics.inference_count,
        execution_count=statistics.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(statistics.success),
            fail=_duration(statistics.fail),
            queue=_duration(statistics.queue),
            compute_input=_duration(statistics.compute_input),
            compute_infer=_duration(statistics.compute_infer),
            compute_output=_duration(statistics.compute_output),
        ),
        batch_stats=[_batch_statistics(size, batch) for size, batch in sorted(statistics.batches.items())],
    )


def model_config(endpoint: Endpoint) -> mc.ModelConfig:
    model = endpoint.model
    config = mc.ModelConfig(
        name=endpoint.name,
        max_batch_size=model.max_batch_size,
        platform="ensemble" if endpoint.pipeline else "",
        backend="" if endpoint.pipeline else model.backend,
    )
    data_type = mc.TYPE_STRING if endpoint.pipeline else mc.TYPE_FP32
    config.input.add(name=endpoint.input_name, data_type=data_type, dims=endpoint.input_dims)
    config.output.add(name=OUTPUT_NAME, data_type=mc.TYPE_FP32, dims=[len(model.labels)])
    config.parameters[ROLE_KEY].string_value = Role.PIPELINE if endpoint.pipeline else Role.CLASSIFIER
    for key, value in model.spec.to_parameters().items():
        config.parameters[key].string_value = value
    return config


# --- the service ---------------------------------------------------------------------------------------------


def _remaining_deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The client's gRPC deadline as the registry's absolute `time.monotonic()` deadline (None: the default)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + max(remaining, 0.0)


async def _abort(context: grpc.aio.ServicerContext, error: errors.GatewayError) -> None:
    if isinstance(error, errors.Overloaded):
        # gRPC's standard retry pushback: clients with a retry policy wait this long.
        context.set_trailing_metadata((("grpc-retry-pushback-ms", str(error.retry_after * 1000)),))
    await context.abort(status_of(error), error.message)


def translated(method):
    """Run a unary handler, turning GatewayErrors into their gRPC status and anything else into INTERNAL."""

    async def handler(self: InferenceService, request, context: grpc.aio.ServicerContext):
        try:
            return await method(self, request, context)
        except errors.GatewayError as error:
            await _abort(context, error)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:
            log.exception("unhandled error in gRPC %s", method.__name__)
            await context.abort(
                grpc.StatusCode.INTERNAL, f"internal error in {method.__name__}; see the gateway log"
            )

    handler.__name__ = method.__name__
    return handler


class InferenceService(service_pb2_grpc.GRPCInferenceServiceServicer):
    """KServe v2 / Triton gRPC on the gateway's registry. Repository control, shared memory, tracing and log
    settings are left UNIMPLEMENTED (the base class answers so)."""

    def __init__(self, registry: ModelRegistry, version: str) -> None:
        self.registry = registry
        self.version = version

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.registry.ready())

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self.version, extensions=EXTENSIONS)

    @translated
    async def ModelReady(self, request, context):
        try:
            await resolve(self.registry, request.name, request.version)
        except (errors.ModelNotFound, errors.BackendUnavailable):
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    @translated
    async def ModelMetadata(self, request, context):
        return model_metadata(await resolve(self.registry, request.name, request.version))

    @translated
    async def ModelConfig(self, request, context):
        return pb.ModelConfigResponse(
            config=model_config(await resolve(self.registry, request.name, request.version))
        )

    def endpoints(self) -> list[Endpoint]:
        """Every name served, in RepositoryIndex order: each classifier, then its pipeline."""
        models = [self.registry.models[name] for name in self.registry.names()]
        return [Endpoint(model, pipeline) for model in models for pipeline in (False, True)]

    def index(self) -> pb.RepositoryIndexResponse:
        response = pb.RepositoryIndexResponse()
        ready = self.registry.ready()
        for endpoint in self.endpoints():
            response.models.add(
                name=endpoint.name,
                version=endpoint.model.version,
                state="READY" if ready else "UNAVAILABLE",
                reason="" if ready else self.registry.not_ready_reason(),
            )
        # As Triton lists a model that failed to load: UNAVAILABLE, with the error
        for name, failure in sorted(self.registry.failures.items()):
            for served in (name, name + PIPELINE_SUFFIX):
                response.models.add(
                    name=served,
                    version=failure.version,
                    state="UNAVAILABLE",
                    reason=f"failed to load: {failure.reason}",
                )
        return response

    @translated
    async def RepositoryIndex(self, request, context):
        return self.index()

    @translated
    async def ModelStatistics(self, request, context):
        # As Triton: no name means every model (any version asked for is then ignored); a name must be served
        # and its version be "" or the one served, else NOT_FOUND.
        if request.name:
            endpoints = [await resolve(self.registry, request.name, request.version)]
        else:
            endpoints = self.endpoints()
        return pb.ModelStatisticsResponse(model_stats=[model_statistics(e) for e in endpoints])

    @translated
    async def ModelInfer(self, request, context):
        return await self.infer(request, _remaining_deadline(context))

    async def infer(self, request: pb.ModelInferRequest, deadline: float | None) -> pb.ModelInferResponse:
        endpoint = await resolve(self.registry, request.model_name, request.model_version)
        started_ns = time.perf_counter_ns()
        try:
            requested_outputs(request)  # reject a bad output request before spending compute on it
            values = input_array(endpoint, request)
        except errors.GatewayError:
            # A malformed request failed at this model, like one the model refuses (its statistics count it).
            endpoint.statistics.record_failure(time.perf_counter_ns() - started_ns)
            raise
        # From here on the model counts the request, from `started_ns`.
        if endpoint.pipeline:
            images = [bytes(item) for item in values]
            inference = await endpoint.model.infer_images(images, deadline, started_ns)
        else:
            inference = await endpoint.model.infer(values, deadline, started_ns)
        if request.model_version and inference.version != request.model_version:
            # Triton moved on to a newer version before the gateway saw it: a request for a version is answered
            # by that version or not at all, as Triton answers it
            raise errors.ModelNotFound(
                f"model {request.model_name!r} version {request.model_version!r} was replaced by version "
                f"{inference.version!r} while this request ran (leave model_version empty for the newest)"
            )
        return infer_response(endpoint, request, inference)

    async def ModelStreamInfer(self, request_iterator, context):
        """Bidirectional stream: one response per request, in order; a failed request answers with its
        `error_message` and the stream goes on, as Triton's does."""
        deadline = _remaining_deadline(context)
        async for request in request_iterator:
            try:
                yield pb.ModelStreamInferResponse(infer_response=await self.infer(request, deadline))
            except errors.GatewayError as error:
                yield pb.ModelStreamInferResponse(error_message=f"{error.code}: {error.message}")


# --- API keys ------------------------------------------------------------------------------------------------


def offered_key(metadata: dict[str, str]) -> str:
    authorization = metadata.get("authorization", "")
    if authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return metadata.get("x-api-key", "")


def key_accepted(offered: str, keys: list[str]) -> bool:
    matches = [hmac.compare_digest(offered.encode(), key.encode()) for key in keys]  # no early exit
    return bool(offered) and any(matches)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Same keys as HTTP, from `authorization: Bearer <key>` or `x-api-key` metadata; probes stay open."""

    MESSAGE = "missing or invalid API key (send metadata 'authorization: Bearer <key>' or 'x-api-key: <key>')"

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method in OPEN_METHODS:
            return handler
        metadata = {
            key: value for key, value in handler_call_details.invocation_metadata if isinstance(value, str)
        }
        if key_accepted(offered_key(metadata), self.keys):
            return handler
        return _replaced(handler, _refused_with(handler, lambda _context: self.MESSAGE))


class RevocationInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call whose client certificate `--ssl-crl` revokes (or cannot vouch for), as HTTPS refuses it at
    the handshake: gRPC's TLS (grpcio) takes no revocation list, so each call's certificate, from its auth context,
    is checked against the lists the gateway holds (reloaded with the other TLS files)."""

    def __init__(self, certificates: ServingCertificates) -> None:
        self.certificates = certificates

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return _replaced(handler, _refused_with(handler, self._refusal))

    def _refusal(self, context: grpc.aio.ServicerContext) -> str | None:
        presented = context.auth_context().get("x509_pem_cert")
        if not presented:  # grpc core asked for one (client CA): a call without one does not get this far
            return "client certificate required"
        problem = self.certificates.refusal(presented[0])
        return f"client certificate refused: {problem}" if problem else None


def _refused_with(handler: grpc.RpcMethodHandler, refusal: Callable[[grpc.aio.ServicerContext], str | None]):
    """`handler`'s behavior, first aborting with UNAUTHENTICATED where `refusal(context)` names a reason."""
    behavior = _behavior(handler)

    async def unary(request, context):
        if message := refusal(context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        return await behavior(request, context)

    async def streaming(request, context):
        if message := refusal(context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        async for response in behavior(request, context):
            yield response

    return streaming if handler.response_streaming else unary


def _replaced(handler: grpc.RpcMethodHandler, behavior, request_deserializer=None) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as `handler` running `behavior` (and `request_deserializer`)."""
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(
        behavior,
        request_deserializer=request_deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _behavior(handler: grpc.RpcMethodHandler):
    return handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream


# --- requests that do not parse --------------------------------------------------------------------------------


@dataclass
class Undecodable:
    """A request message that did not parse, handed to the handler instead of grpcio's own error."""

    error: DecodeError


class UndecodableRequestInterceptor(grpc.aio.ServerInterceptor):
    """Answers a request message that does not parse with INVALID_ARGUMENT, naming the method.

    grpcio fails such a call itself, with UNKNOWN ("Unexpected DecodeError"), before any interceptor's behavior
    runs, so the call was neither counted in /metrics nor refused with a client-error status. Installed last
    (innermost): the API-key check still answers first, and the metrics count the INVALID_ARGUMENT."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        message = f"the request is not a valid message for {handler_call_details.method}"
        checked = _checked(_behavior(handler), handler, message)
        return _replaced(handler, checked, _tolerant(handler.request_deserializer))


def _tolerant(parse):
    def tolerant_parse(data: bytes):
        try:
            return parse(data)
        except DecodeError as error:
            return Undecodable(error)

    return tolerant_parse


def _checked(behavior, handler: grpc.RpcMethodHandler, message: str):
    async def parsed(request, context):
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{message}: {request.error}")
        return request

    async def parsed_stream(requests, context):
        async for request in requests:
            yield await parsed(request, context)

    async def validated(request, context):
        return (
            parsed_stream(request, context) if handler.request_streaming else await parsed(request, context)
        )

    async def unary(request, context):
        return await behavior(await validated(request, context), context)

    async def streaming(request, context):
        async for response in behavior(await validated(request, context), context):
            yield response

    return streaming if handler.response_streaming else unary


# --- Prometheus metrics ---------------------------------------------------------------------------------------


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every call by method and final status code, with its latency, into the gateway's /metrics, and
    gives it a request ID (its `x-request-id` metadata when plausible) for the logs and the access log.
    Installed first, so calls the API-key check refuses are counted too (UNAUTHENTICATED)."""

    def __init__(self, metrics: Metrics, access_log: bool = False) -> None:
        self.metrics = metrics
        self.access_log = access_log

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        measure = self._streaming if handler.response_streaming else self._unary
        return _replaced(handler, measure(_behavior(handler), method))

    @contextlib.contextmanager
    def _measured(self, method: str, context: grpc.aio.ServicerContext):
        started = time.perf_counter()
        offered = dict(context.invocation_metadata() or ()).get(REQUEST_ID_HEADER)
        request_id = request_id_from(offered if isinstance(offered, str) else None)
        current = CURRENT_REQUEST_ID.set(request_id)
        self.metrics.grpc_in_flight.inc()
        code = grpc.StatusCode.UNKNOWN  # what gRPC answers for an exception nothing turned into a status
        try:
            yield
            code = context.code() or grpc.StatusCode.OK
        except grpc.aio.AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        except (asyncio.CancelledError, GeneratorExit):  # the client went away (GeneratorExit: mid-stream)
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            elapsed = time.perf_counter() - started
            self.metrics.grpc_in_flight.dec()
            self.metrics.grpc_requests.labels(method, _code_name(code)).inc()
            self.metrics.grpc_latency.labels(method).observe(elapsed)
            if self.access_log:
                certificate = grpc_client_certificate(context)
                log_access(
                    "gRPC", method, _code_name(code), elapsed, context.peer() or "-", request_id, certificate
                )
            # a stream closed from another context (GeneratorExit) cannot reset it; that must not fail the call
            with contextlib.suppress(ValueError):
                CURRENT_REQUEST_ID.reset(current)

    def _unary(self, behavior, method: str):
        async def measured(request, context):
            with self._measured(method, context):
                return await behavior(request, context)

        return measured

    def _streaming(self, behavior, method: str):
        async def measured(request, context):
            with self._measured(method, context):
                async for response in behavior(request, context):
                    yield response

        return measured


def _code_name(code) -> str:
    # context.code() gives a StatusCode, or the raw integer when a handler set one that way
    if isinstance(code, grpc.StatusCode):
        return code.name
    return next((status.name for status in grpc.StatusCode if status.value[0] == code), str(code))


# --- lifecycle (called from server.app's lifespan) ---------------------------------------------------------


@dataclass
class GrpcHandle:
    server: grpc.aio.Server
    health: HealthServicer
    health_task: asyncio.Task
    port: int


def server_options(settings: Settings) -> list[tuple[str, int]]:
    # A request larger than the HTTP body limit gets RESOURCE_EXHAUSTED from gRPC itself, before any decoding.
    options = [
        ("grpc.max_receive_message_length", settings.max_body_bytes),
        ("grpc.max_send_message_length", -1),
        ("grpc.so_reuseport", 0),
    ]
    # Measured with raw connections: one that sent nothing or half the HTTP/2 preface was closed after 60 s, one
    # that sent its SETTINGS and no call was still open after 150 s, and would be for ever. The handshake timeout
    # covers TLS and the client's SETTINGS; idle is a connection with no call in flight.
    for option, seconds in (
        ("grpc.server_handshake_timeout_ms", settings.request_read_timeout_s),
        ("grpc.max_connection_idle_ms", settings.grpc_idle_timeout_s),
    ):
        if seconds:
            options.append((option, max(1, round(seconds * 1000))))
    return options


async def _set_health(health: HealthServicer, ready: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
    for service in ("", SERVICE_NAME):
        await health.set(service, status)


async def _follow_readiness(registry: ModelRegistry, health: HealthServicer, last: bool) -> None:
    """Mirror the registry's readiness (it changes when Triton goes down and comes back) into the health service."""
    while True:
        await asyncio.sleep(HEALTH_POLL_S)
        ready = registry.ready()
        if ready != last:
            await _set_health(health, ready)
            last = ready


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("resnet-serving")
    except PackageNotFoundError:
        return "0.0.0"


def transport(settings: Settings) -> str:
    if settings.ssl_client_ca:
        return " over TLS, client certificates required"
    return " over TLS" if settings.ssl_certfile else ""


async def start(app, settings: Settings) -> GrpcHandle:
    """Bind the gRPC port on `settings.host` and serve the app's registry; raises OSError if the port is taken."""
    registry: ModelRegistry = app.state.registry
    interceptors = [MetricsInterceptor(app.state.metrics, settings.access_log)]
    if settings.ssl_crl:
        interceptors.append(RevocationInterceptor(app.state.certificates))
    if settings.api_keys:
        interceptors.append(ApiKeyInterceptor(settings.api_keys))
    interceptors.append(UndecodableRequestInterceptor())
    server = grpc.aio.server(interceptors=interceptors, options=server_options(settings))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(app.state.inference_service, server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    address = (
        f"[{settings.host}]:{settings.grpc_port}"
        if ":" in settings.host
        else f"{settings.host}:{settings.grpc_port}"
    )
    try:
        port = (
            server.add_secure_port(address, app.state.certificates.grpc_credentials())
            if app.state.certificates
            else server.add_insecure_port(address)
        )
    except RuntimeError:
        port = 0
    if not port:
        raise OSError(
            f"cannot bind the gRPC port {address} (in use? set --grpc-port or RESNET_GRPC_PORT, 0 disables)"
        )
    ready = registry.ready()
    await _set_health(health, ready)  # before the first call can ask
    await server.start()
    health_task = asyncio.create_task(_follow_readiness(registry, health, ready), name="grpc-health")
    log.info("gRPC%s (KServe v2 / Triton protocol + grpc.health.v1) on %s", transport(settings), address)
    return GrpcHandle(server, health, health_task, port)


async def stop(handle: GrpcHandle, grace_s: float = 5.0) -> None:
    """NOT_SERVING first (so balancers stop sending), then let in-flight calls finish within `grace_s`."""
    handle.health_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await handle.health_task
    await handle.health.enter_graceful_shutdown()
    await handle.server.stop(grace_s)
