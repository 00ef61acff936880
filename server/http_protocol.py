"""The gateway's HTTP protocol: uvicorn's, with what it leaves out: bounds on how a request arrives (its time, the
size of its request line and headers) and, on TLS, the client's certificate in each request's scope.

A deadline for each HTTP request to arrive whole (request line, headers and body): uvicorn has none, so a connection
that sends part of a request and stalls (slowloris) was kept for ever, each holding a file descriptor and, once its
headers were in, a request handler waiting for its body (checked: four such connections still open after 90 s).
Its keep-alive timeout covers only the idle time between requests, and any byte resets it.

A limit on the request line and headers: httptools buffers a header until it ends, so one header line that never
did grew the gateway by the size sent (200 MB sent: 127 -> 415 MB resident); a few such connections would have the
gateway killed for memory. The body has its own limit (`max_body_bytes`, 413).

So the gateway's HTTP protocol is uvicorn's own (httptools, what uvicorn picks when it is installed) with both: a
timer armed when a connection opens and at the first byte of each request, disarmed when the request is whole, and
a count of what arrived while the headers were incomplete. A request past either gets 408 or 431 if its headers
were not all in (no handler has seen it yet), and the connection is closed once the client has had time to read it;
one whose body stalled is closed, which its handler sees as the client gone (499). TLS handshakes are bounded by
asyncio itself (60 s). A refusal carries a new request ID (no handler read the one it came with) and is handed to
`on_refusal`, which counts it and writes its access-log line as the middleware does for the requests it sees.

Bytes that do not parse as HTTP/1.1 get the gateway's JSON 400 `bad_request` naming what llhttp found wrong (a
request framed by both Content-Length and Transfer-Encoding, an invalid header token), counted and logged as the
other refusals; uvicorn's own answer named nothing and was logged as a warning each time.

uvicorn also leaves out ASGI's TLS extension (encode/uvicorn#745): on a TLS connection each request's
`scope["extensions"]["tls"]` here holds the client certificate the handshake verified, its subject, the TLS version
and cipher suite (server/certificates.py, read once per connection), so the access log can say who called.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Callable

from server.certificates import asgi_tls_extension
from server.logs import REQUEST_ID_HEADER, request_id_from

# nginx allows 4 x 8 KiB, Node.js 16 KiB; room for large cookies and tokens. What httptools has parsed of a head is
# not known until it ends, so a head is refused once this many bytes arrived after the read that began it.
MAX_HEAD_BYTES = 64 * 1024
# After answering a refused request, what the client still sends is read and dropped for this long before the
# connection closes: closed at once with its bytes unread, the kernel resets it, and the client may lose the answer
# (nginx's lingering close).
LINGER_S = 5.0
# what a refusal's log line keeps of the target that arrived: its path (a query may carry secrets), this long at most
LOGGED_PATH_CHARS = 200


@dataclasses.dataclass(frozen=True)
class ErrorAnswer:
    status: int
    reason: str
    code: str
    message: str

    def response(self, request_id: str) -> bytes:
        """A whole HTTP/1.1 response closing the connection, the gateway's JSON error as its body."""
        error = {"code": self.code, "message": self.message, "request_id": request_id}
        body = json.dumps({"error": error}).encode()
        head = (
            f"HTTP/1.1 {self.status} {self.reason}\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"{REQUEST_ID_HEADER}: {request_id}\r\ncontent-length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body


@dataclasses.dataclass(frozen=True)
class Refusal:
    """A request the protocol answered itself, before any handler saw it."""

    status: int
    method: str  # "-" where not even its method had arrived
    path: str  # what had arrived of its path, or "-"
    client: str
    request_id: str
    seconds: float  # from the request's first byte (or the connection's start) to its refusal
    certificate: str | None  # the subject of the client's certificate, on mutual TLS


def malformed(error: Exception) -> ErrorAnswer:
    """The answer to bytes that are not an HTTP/1.1 request, naming what httptools (llhttp) found wrong."""
    return ErrorAnswer(400, "Bad Request", "bad_request", f"not a valid HTTP/1.1 request: {error}")


HEAD_TOO_LARGE = ErrorAnswer(
    431,
    "Request Header Fields Too Large",
    "headers_too_large",
    f"the request line and headers are over {MAX_HEAD_BYTES // 1024} KiB",
)


def gateway_protocol(
    seconds: float, on_refusal: Callable[[Refusal], None] = lambda refusal: None
) -> type[asyncio.Protocol] | str:
    """uvicorn's `http=` protocol, with `seconds` for each request to arrive whole (0: no deadline), a bounded head
    and the TLS extension, each refusal handed to `on_refusal`; uvicorn's own ("auto"), with a warning, where
    httptools is missing."""
    try:
        import httptools
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError as error:
        logging.getLogger("resnet.server").warning(
            "requests have no deadline to arrive, no limit on their headers and no TLS extension (all need "
            "httptools): %s",
            error,
        )
        return "auto"
    too_slow = ErrorAnswer(
        408,
        "Request Timeout",
        "request_timeout",
        f"the request did not arrive whole within {seconds:g} s (request line, headers and body)",
    )

    class BoundedRequestProtocol(HttpToolsProtocol):
        _deadline: asyncio.TimerHandle | None = None
        _waiting_since = 0.0
        _in_request = False  # its first byte arrived, its last not yet
        _headers_in = False
        _began = False  # a request began in the bytes being fed
        _head_bytes = 0
        _refused = False
        _tls: dict[str, object] | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None:  # asyncio and uvloop call this once the handshake is done
                self._tls = asgi_tls_extension(ssl_object)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            self._began = False
            try:
                self._feed(data)
            except httptools.HttpParserError as error:
                self._refuse(malformed(error))
                return
            if self._headers_in or self.transport.is_closing():
                return
            self._head_bytes = 0 if self._began else self._head_bytes + len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(HEAD_TOO_LARGE)

        def _feed(self, data: bytes) -> None:
            """uvicorn's data_received but for its answer to a request that does not parse: a plain-text 400
            "Invalid HTTP request received." that named no problem, closed at once (the client could lose it to
            the reset) and logged as a warning each time (a scanner's probes flood the log)."""
            self._unset_keepalive_if_required()
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                if self._should_upgrade():
                    self.handle_websocket_upgrade()
                else:
                    self._unsupported_upgrade_warning()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._tls is not None:
                self.scope.setdefault("extensions", {})["tls"] = self._tls  # type: ignore[typeddict-item]
            self._headers_in, self._began, self._in_request = False, True, True
            self._arm()

        def on_headers_complete(self) -> None:
            self._headers_in = True
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._in_request = False
            self._disarm()
            super().on_message_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._deadline is None:  # from the connection's start for its first request
                self._waiting_since = self.loop.time()
                if seconds:
                    self._deadline = self.loop.call_later(seconds, self._too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _too_slow(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                self._refuse(too_slow)

        def _refuse(self, answer: ErrorAnswer) -> None:
            if self._headers_in:  # a handler has the request: closed, it sees the client gone
                self.transport.close()
                return
            self._refused = True
            refusal = self._refusal(answer.status)
            self._disarm()
            self.transport.write(answer.response(refusal.request_id))
            on_refusal(refusal)
            if not self.transport.can_write_eof():  # TLS
                self.transport.close()
                return
            self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)

        def _refusal(self, status: int) -> Refusal:
            # httptools names a method only once the target has begun; before that it says DELETE (method 0)
            arrived = self.url if self._in_request else b""
            path = arrived.partition(b"?")[0][:LOGGED_PATH_CHARS].decode("latin-1")
            return Refusal(
                status=status,
                method=self.parser.get_method().decode("ascii") if arrived else "-",
                path=path or "-",
                client=":".join(map(str, self.client)) if self.client else "-",
                request_id=request_id_from(None),
                seconds=self.loop.time() - self._waiting_since,
                certificate=self._tls["client_cert_name"] if self._tls else None,  # type: ignore[arg-type]
            )

    return BoundedRequestProtocol
