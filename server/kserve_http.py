"""The gateway's KServe v2 HTTP/REST API: Triton's HTTP protocol, beside its gRPC one (server/grpc_service.py).

    GET  /v2                                         server metadata
    GET  /v2/health/live, /v2/health/ready           200, or 400 when not ready (KServe: a 4xx status means false)
    GET  /v2/models/{name}[/versions/{v}]            model metadata; `/ready`, `/config`, `/stats` below it
    GET  /v2/models/stats                            statistics of every model
    POST /v2/repository/index                        the served names and their state
    POST /v2/models/{name}[/versions/{v}]/infer      JSON tensors, or JSON + binary tensors (binary_tensor_data)

An HTTP inference request is turned into the gRPC `ModelInferRequest` and answered by the same
`InferenceService`, so both protocols share the validation, batching, statistics and Triton's classification
strings and cannot drift apart. Descriptions are the gRPC messages written as Triton writes them in JSON: every
field, 64-bit integers as numbers. Errors are KServe's `{"error": "<message>"}` (server/app.py picks that shape for
every /v2 path). Bodies may be gzip or deflate compressed both ways, as `tritonclient.http` offers. So
`tritonclient.http` code written for Triton runs against the gateway unchanged.
"""

from __future__ import annotations

import gzip
import json
import re
import time
import zlib
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from pydantic import BaseModel, Field, ValidationError
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from server import errors
from server.disconnect import unless_disconnected
from server.grpc_service import (
    CLASSIFICATION_PARAMETER,
    EXTENSIONS,
    SERVER_NAME,
    InferenceService,
    model_config,
    model_metadata,
    model_statistics,
    resolve,
)

HEADER_LENGTH = "Inference-Header-Content-Length"
HTTP_EXTENSIONS = [*EXTENSIONS, "binary_tensor_data"]
SERVED = (
    "the gateway serves KServe v2 health, metadata, configuration, statistics, repository index and inference; "
    "not Triton's repository control, shared memory, tracing or logging"
)
JSON_SEPARATORS = (",", ":")
INT64_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)
INT64_MAX = 2**63 - 1
# Smaller responses go out as they are, whatever Accept-Encoding says (aiohttp and browsers always offer gzip): a
# compressor costs ~0.25 ms to set up, more than a few hundred bytes cost to send (Starlette's GZip uses 500).
MIN_COMPRESSED_BYTES = 1024
REFUSED_QUALITY = re.compile(r"q\s*=\s*0(\.0{0,3})?")  # RFC 9110: q=0 means "not acceptable"


# --- protobuf -> JSON, as Triton writes it --------------------------------------------------------------------


def triton_json(message: Message) -> dict:
    """`message` as a dict the way Triton's HTTP API writes it: proto field names, every field (zeros and empty
    lists too), and 64-bit integers as JSON numbers (protobuf's JSON mapping would make them strings)."""
    data = MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    return _int64_as_numbers(message, data)


def _int64_as_numbers(message: Message, data: dict) -> dict:
    for field in message.DESCRIPTOR.fields:
        if field.name not in data:
            continue
        value, written = getattr(message, field.name), data[field.name]
        repeated = isinstance(written, list)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            data[field.name] = _map_as_numbers(field, value, written)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            data[field.name] = (
                [_int64_as_numbers(item, text) for item, text in zip(value, written, strict=True)]
                if repeated
                else _int64_as_numbers(value, written)
            )
        elif field.type in INT64_TYPES:
            data[field.name] = [int(item) for item in written] if repeated else int(written)
    return data


def _map_as_numbers(field: FieldDescriptor, value, written: dict) -> dict:
    value_field = field.message_type.fields_by_name["value"]
    if value_field.type == FieldDescriptor.TYPE_MESSAGE:
        return {key: _int64_as_numbers(value[_map_key(field, key)], text) for key, text in written.items()}
    if value_field.type in INT64_TYPES:
        return {key: int(text) for key, text in written.items()}
    return written


def _map_key(field: FieldDescriptor, key: str):
    return key if field.message_type.fields_by_name["key"].type == FieldDescriptor.TYPE_STRING else int(key)


# --- the inference request: JSON header + binary tensors -------------------------------------------------------


class InputTensorJson(BaseModel):
    name: str
    shape: list[Annotated[int, Field(ge=0, le=INT64_MAX)]]  # protobuf's int64 (a larger one would be a 500)
    datatype: str
    parameters: dict[str, Any] = {}
    data: list[Any] | None = None


class OutputTensorJson(BaseModel):
    name: str
    parameters: dict[str, Any] = {}


class InferRequestJson(BaseModel):
    id: str = ""
    parameters: dict[str, Any] = {}
    inputs: list[InputTensorJson] = Field(min_length=1)
    outputs: list[OutputTensorJson] | None = None


DECOMPRESSORS = {
    "gzip": lambda: zlib.decompressobj(16 + zlib.MAX_WBITS),
    "deflate": lambda: zlib.decompressobj(),  # HTTP's "deflate" is the zlib format, as tritonclient sends it
}


def is_compressed(encoding: str) -> bool:
    """Whether a Content-Encoding header value asks for anything but the body as it is."""
    return encoding.strip().lower() not in ("", "identity")


def decompressed(body: bytes, encoding: str, limit: int) -> bytes:
    """The body per its Content-Encoding, refusing more than `limit` bytes before they are inflated."""
    if not is_compressed(encoding):
        return body
    encoding = encoding.strip().lower()
    if encoding not in DECOMPRESSORS:
        raise errors.UnsupportedMediaType(
            f"Content-Encoding {encoding!r} is not supported; send gzip, deflate or an uncompressed body"
        )
    inflater = DECOMPRESSORS[encoding]()
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as error:
        raise errors.InvalidInput(f"the body is not valid {encoding} data: {error}") from None
    if len(data) > limit:
        raise errors.PayloadTooLarge(f"the decompressed body is over the limit of {limit} bytes")
    if not inflater.eof:
        raise errors.InvalidInput(f"the {encoding} body is truncated")
    return data


def split_body(body: bytes, header_length: str | None) -> tuple[InferRequestJson, memoryview]:
    """The JSON inference header and the binary tensor data after it (binary_tensor_data extension)."""
    length = len(body)
    if header_length is not None:
        text = header_length.strip()
        if not text.isdigit() or not 0 < int(text) <= len(body):
            raise errors.InvalidInput(
                f"{HEADER_LENGTH} must be the JSON header's length in bytes, 1 to {len(body)} "
                f"(the body's length); got {header_length!r}"
            )
        length = int(text)
    view = memoryview(body)
    try:
        request = InferRequestJson.model_validate_json(bytes(view[:length]))
    except ValidationError as error:
        raise errors.InvalidInput(f"bad inference request: {_problems(error)}") from None
    return request, view[length:]


def _problems(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(map(str, problem['loc'])) or 'body'}: {problem['msg']}" for problem in error.errors()
    )


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def to_grpc_request(
    name: str, version: str, request: InferRequestJson, binary: memoryview
) -> tuple[pb.ModelInferRequest, list[bool]]:
    """The gRPC request the service answers, and for each output it will return whether to send it binary."""
    # The gateway schedules without priorities, but a mistyped one is a client bug that Triton refuses too.
    if not _count(request.parameters.get("priority", 0)):
        raise errors.InvalidInput("the 'priority' parameter must be an integer >= 0 (0: the default)")
    message = pb.ModelInferRequest(model_name=name, model_version=version, id=request.id)
    offset = 0
    for tensor in request.inputs:
        message.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        size = tensor.parameters.get("binary_data_size")
        if size is not None:
            if not _count(size):
                raise errors.InvalidInput(f"input {tensor.name!r}: binary_data_size must be an integer >= 0")
            if offset + size > len(binary):
                raise errors.InvalidInput(
                    f"input {tensor.name!r}: binary_data_size is {size} but only {len(binary) - offset} "
                    "bytes of binary data follow the JSON header"
                )
            message.raw_input_contents.append(bytes(binary[offset : offset + size]))
            offset += size
        elif tensor.data is not None:
            message.raw_input_contents.append(json_data_bytes(tensor))
        else:
            raise errors.InvalidInput(
                f"input {tensor.name!r} has neither 'data' nor a 'binary_data_size' parameter"
            )
    if offset != len(binary):
        raise errors.InvalidInput(
            f"{len(binary) - offset} bytes after the JSON header belong to no input's binary_data_size"
        )
    return message, _requested_outputs(message, request)


def _flag(parameters: dict[str, Any], key: str, default: bool, where: str = "") -> bool:
    """A boolean parameter; anything else is refused, as Triton does, rather than read as false."""
    value = parameters.get(key, default)
    if not isinstance(value, bool):
        raise errors.InvalidInput(
            f"the {key!r} parameter{where} must be true or false; got {json.dumps(value)[:40]}"
        )
    return value


def _requested_outputs(message: pb.ModelInferRequest, request: InferRequestJson) -> list[bool]:
    binary_default = _flag(request.parameters, "binary_data_output", False)
    binary = []
    for output in request.outputs or []:
        tensor = message.outputs.add(name=output.name)
        if CLASSIFICATION_PARAMETER in output.parameters:
            count = output.parameters[CLASSIFICATION_PARAMETER]
            parameter = tensor.parameters[CLASSIFICATION_PARAMETER]
            if isinstance(count, int) and not isinstance(count, bool):
                parameter.int64_param = max(-INT64_MAX, min(count, INT64_MAX))
            else:
                parameter.string_param = str(count)  # the service refuses it, naming what it takes
        binary.append(_flag(output.parameters, "binary_data", binary_default, f" of output {output.name!r}"))
    return binary or [binary_default]  # no outputs named: the service returns its one output


def json_data_bytes(tensor: InputTensorJson) -> bytes:
    """A JSON `data` list as the raw bytes gRPC would carry (FP32 little-endian, BYTES length-prefixed)."""
    expected = int(np.prod(tensor.shape))
    try:
        values = np.asarray(tensor.data, dtype=np.object_ if tensor.datatype == "BYTES" else None).reshape(-1)
    except ValueError:
        raise errors.InvalidInput(f"input {tensor.name!r}: 'data' is a ragged list") from None
    if values.size != expected:
        raise errors.InvalidInput(
            f"input {tensor.name!r}: 'data' holds {values.size} values for shape {tensor.shape} ({expected})"
        )
    if tensor.datatype == "BYTES":
        if not all(isinstance(item, str) for item in values):
            raise errors.InvalidInput(
                f"input {tensor.name!r}: BYTES 'data' must be strings; send encoded images as binary data "
                "(tritonclient.http: InferInput.set_data_from_numpy(array, binary_data=True))"
            )
        serialized = serialize_byte_tensor(np.array([item.encode() for item in values], dtype=np.object_))
        return serialized.item() if serialized.size else b""
    if tensor.datatype == "FP32":
        if values.size and values.dtype.kind not in "iuf":  # Triton refuses JSON booleans as FP32 too
            raise errors.InvalidInput(f"input {tensor.name!r}: FP32 'data' must hold numbers only")
        with np.errstate(over="ignore"):  # past FP32's range becomes inf, which the service refuses by name
            return values.astype("<f4").tobytes()
    return b""  # another datatype: the service refuses it, naming the one the model takes


def deadline_of(request: InferRequestJson) -> float | None:
    """Triton's `timeout` request parameter (microseconds, 0 = none) as a `time.monotonic()` deadline."""
    timeout = request.parameters.get("timeout", 0)
    if not _count(timeout):
        raise errors.InvalidInput("the 'timeout' parameter is in microseconds: an integer >= 0")
    return time.monotonic() + timeout / 1e6 if timeout else None


# --- the inference response ------------------------------------------------------------------------------------


def from_grpc_response(response: pb.ModelInferResponse, binary: list[bool]) -> tuple[bytes, int | None]:
    """The HTTP body and, when tensors follow the JSON as binary, the JSON header's length."""
    body: dict[str, Any] = {}
    if response.id:
        body["id"] = response.id
    body.update(model_name=response.model_name, model_version=response.model_version, outputs=[])
    blobs = []
    for tensor, raw, as_binary in zip(response.outputs, response.raw_output_contents, binary, strict=True):
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        if as_binary:
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = json_values(tensor.datatype, raw)
        body["outputs"].append(entry)
    header = json.dumps(body, separators=JSON_SEPARATORS, allow_nan=False).encode()
    return header + b"".join(blobs), (len(header) if blobs else None)


def json_values(datatype: str, raw: bytes) -> list:
    if datatype == "BYTES":
        items = deserialize_bytes_tensor(raw) if raw else []
        return [bytes(item).decode("utf-8", "replace") for item in items]
    values = np.frombuffer(raw, dtype="<f4")
    if not np.isfinite(values).all():
        # Finite inputs near FP32's limits can still overflow inside the network. JSON has no NaN or Infinity
        # (json.dumps would write them anyway, and strict parsers such as JavaScript's JSON.parse reject them).
        raise errors.InvalidInput(
            "the model's output for this input is NaN or infinite, which JSON cannot carry: the input values "
            "are far outside the range the model was trained on; ask for the output as binary data "
            "(parameters: binary_data true) to receive it as it is"
        )
    return values.tolist()


def accepted_encoding(accept_encoding: str) -> str | None:
    """gzip or deflate if the client accepts one (any q but 0), preferring gzip; None: send the body as it is."""
    accepted = set()
    for part in accept_encoding.lower().split(","):
        coding, _, quality = part.partition(";")
        if not REFUSED_QUALITY.fullmatch(quality.strip()):
            accepted.add(coding.strip())
    return next((coding for coding in ("gzip", "deflate") if coding in accepted), None)


def compress(content: bytes, coding: str) -> bytes:
    return gzip.compress(content, compresslevel=6) if coding == "gzip" else zlib.compress(content)


# --- routes ----------------------------------------------------------------------------------------------------


# Dependencies are `async def` so FastAPI runs them inline: a plain `def` one goes through the thread pool on every
# request (profiled: that, and compressing tiny bodies, made /v2 a third slower than /v1 on 2 cores).
async def service_of(request: Request) -> InferenceService:
    return request.app.state.inference_service


async def version_of(request: Request) -> str:
    """The `/versions/{version}` part of the path; "" (the version served) where the path has none."""
    return request.path_params.get("version", "")


Service = Annotated[InferenceService, Depends(service_of)]
Version = Annotated[str, Depends(version_of)]


def json_response(content: object, status_code: int = 200) -> Response:
    body = json.dumps(content, separators=JSON_SEPARATORS).encode()
    return Response(body, status_code=status_code, media_type="application/json")


async def readiness(service: InferenceService, name: str | None = None, version: str = "") -> Response:
    """200, or 400 with the reason (KServe's health answer); `name`: that model's, else the server's."""
    try:
        if name is not None:
            await resolve(service.registry, name, version)
    except (errors.ModelNotFound, errors.BackendUnavailable) as error:
        return json_response({"error": error.message}, 400)
    registry = service.registry
    if not registry.ready():
        return json_response({"error": registry.not_ready_reason()}, 400)
    return Response(status_code=200)


async def only_ready_asked(request: Request) -> bool:
    """The repository index request's optional body `{"ready": true}`."""
    body = (await request.body()).strip()
    try:
        asked = json.loads(body) if body else {}
    except ValueError as error:
        raise errors.InvalidInput(f"the repository index body is not valid JSON: {error}") from None
    if not isinstance(asked, dict):
        raise errors.InvalidInput('the repository index body must be a JSON object, e.g. {"ready": true}')
    only_ready = asked.get("ready", False)
    if not isinstance(only_ready, bool):  # "true" or 1 read as false would list unready models without a word
        raise errors.InvalidInput(f"the repository index's 'ready' must be true or false; got {only_ready!r}")
    return only_ready


INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": InferRequestJson.model_json_schema()},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": f"the JSON header, then the binary tensors; {HEADER_LENGTH} = the JSON's length",
            },
        },
    }
}


def health_router() -> APIRouter:
    """The probes, open without an API key like /healthz and /readyz (and gRPC's ServerLive/ServerReady)."""
    router = APIRouter(prefix="/v2/health", tags=["kserve-v2"])

    @router.get("/live")
    async def server_live() -> Response:
        """200 while the process answers."""
        return Response(status_code=200)

    @router.get("/ready")
    async def server_ready(service: Service) -> Response:
        """200 when every model can answer, else 400 with the reason."""
        return await readiness(service)

    return router


def api_router(require_api_key) -> APIRouter:
    router = APIRouter(prefix="/v2", tags=["kserve-v2"], dependencies=[Depends(require_api_key)])

    @router.get("")
    async def server_metadata(service: Service) -> Response:
        """Name, version and the protocol extensions served."""
        return json_response({"name": SERVER_NAME, "version": service.version, "extensions": HTTP_EXTENSIONS})

    @router.post("/repository/index")
    async def repository_index(request: Request, service: Service) -> Response:
        """Every served name with its state; the body `{"ready": true}` lists only those ready."""
        only_ready = await only_ready_asked(request)
        entries = [
            {
                "name": m.name,
                "version": m.version,
                "state": m.state,
                **({"reason": m.reason} if m.reason else {}),
            }
            for m in service.index().models
        ]
        return json_response([e for e in entries if e["state"] == "READY" or not only_ready])

    @router.get("/models/stats")
    async def all_statistics(service: Service) -> Response:
        """Triton's statistics extension for every served name."""
        return json_response({"model_stats": [triton_json(model_statistics(e)) for e in service.endpoints()]})

    # Each model route also answers under /versions/{version}; only the plain one is listed in the docs.
    for prefix, documented in (("/models/{name}", True), ("/models/{name}/versions/{version}", False)):
        _add_model_routes(router, prefix, documented)
    return router


def _add_model_routes(router: APIRouter, prefix: str, documented: bool) -> None:
    @router.get(prefix, include_in_schema=documented)
    async def metadata(name: str, version: Version, service: Service) -> Response:
        """Inputs and outputs with their datatypes and shapes."""
        return json_response(triton_json(model_metadata(await resolve(service.registry, name, version))))

    @router.get(prefix + "/ready", include_in_schema=documented)
    async def model_ready(name: str, version: Version, service: Service) -> Response:
        """200 when the model can answer, else 400 with the reason."""
        return await readiness(service, name, version)

    @router.get(prefix + "/config", include_in_schema=documented)
    async def config(name: str, version: Version, service: Service) -> Response:
        """The model's configuration, as Triton gives its config.pbtxt."""
        return json_response(triton_json(model_config(await resolve(service.registry, name, version))))

    @router.get(prefix + "/stats", include_in_schema=documented)
    async def statistics(name: str, version: Version, service: Service) -> Response:
        """Triton's statistics extension for this name."""
        endpoint = await resolve(service.registry, name, version)
        return json_response({"model_stats": [triton_json(model_statistics(endpoint))]})

    @router.post(prefix + "/infer", include_in_schema=documented, openapi_extra=INFER_BODY)
    async def infer(name: str, version: Version, request: Request, service: Service) -> Response:
        """Inference: JSON tensors, or binary ones after the JSON header (tritonclient.http's default)."""
        limit = request.app.state.settings.max_body_bytes
        body = decompressed(await request.body(), request.headers.get("content-encoding", ""), limit)
        parsed, binary = split_body(body, request.headers.get(HEADER_LENGTH))
        message, binary_outputs = to_grpc_request(name, version, parsed, binary)
        response = await unless_disconnected(request, service.infer(message, deadline_of(parsed)))
        return infer_http_response(response, binary_outputs, request.headers.get("accept-encoding", ""))


def infer_http_response(
    response: pb.ModelInferResponse, binary: list[bool], accept_encoding: str
) -> Response:
    content, header_length = from_grpc_response(response, binary)
    headers = {} if header_length is None else {HEADER_LENGTH: str(header_length)}
    coding = accepted_encoding(accept_encoding) if len(content) >= MIN_COMPRESSED_BYTES else None
    if coding:
        content, headers["Content-Encoding"] = compress(content, coding), coding
    media_type = "application/json" if header_length is None else "application/octet-stream"
    return Response(content, media_type=media_type, headers=headers)
