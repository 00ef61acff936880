"""Typed gateway errors. Raised anywhere inside `server/`, translated into one JSON shape at the HTTP (and gRPC)
boundary: `{"error": {"code": ..., "message": ...}}` with the class's HTTP status.
"""

from __future__ import annotations

# What a gRPC client says when the port it reached speaks HTTP/1.1: it read a status line where HTTP/2 frames belong
# (most servers), or the server hung up on HTTP/2's preface (Triton's HTTP port). The gateway's Triton backend and
# `resnet client` add the fix to these.
GRPC_AT_HTTP_PORT = ("Failed parsing HTTP/2", "Socket closed")


class GatewayError(Exception):
    """A request the gateway answers with an error instead of a result; `message` names the problem."""

    code = "internal"
    http_status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def headers(self) -> dict[str, str]:
        return {}

    def to_dict(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}


class ModelNotFound(GatewayError):
    code = "model_not_found"
    http_status = 404


class InvalidImage(GatewayError):
    """Empty, undecodable or truncated image bytes."""

    code = "invalid_image"
    http_status = 400


class UnsupportedMediaType(GatewayError):
    """A content type or image format the gateway does not take."""

    code = "unsupported_media_type"
    http_status = 415


class PayloadTooLarge(GatewayError):
    """Body over the byte limit, or an image over the pixel limit (checked from its header, before decoding)."""

    code = "payload_too_large"
    http_status = 413


class InvalidInput(GatewayError):
    """Bad parameters or tensors: top_k, tensor shape or dtype, missing multipart field."""

    code = "invalid_input"
    http_status = 422


class UnclassifiableImage(GatewayError):
    """An image the model computes no scores for (NaN): the others of its request can be sent again."""

    code = "unclassifiable_image"
    http_status = 422


class Overloaded(GatewayError):
    """The model's bounded queue is full: retry after `retry_after` seconds."""

    code = "overloaded"
    http_status = 503

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class DeadlineExceeded(GatewayError):
    code = "deadline_exceeded"
    http_status = 504


class BackendUnavailable(GatewayError):
    """The inference backend (Triton) cannot be reached or is not ready."""

    code = "backend_unavailable"
    http_status = 503

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class ClientClosedRequest(GatewayError):
    """The client disconnected while its request was being answered (nginx's 499; nobody reads the body)."""

    code = "client_closed_request"
    http_status = 499


class Unauthorized(GatewayError):
    code = "unauthorized"
    http_status = 401

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}
