"""A deadline for each HTTP request to arrive whole: request line, headers and body.

uvicorn has none: a connection that sends part of a request and stalls (slowloris) was kept for ever, each holding a
file descriptor and, once its headers were in, a request handler waiting for its body (checked: four such
connections still open after 90 s). Its keep-alive timeout covers only the idle time between requests, and any byte
resets it. So the gateway's HTTP protocol is uvicorn's own (httptools, what uvicorn picks when it is installed) with
a timer: armed when a connection opens and at the first byte of each request, disarmed when the request is whole.
A request still incomplete when it fires gets 408 if its headers were not all in (no handler has seen it yet) and
the connection is closed; one whose body stalled is closed, which its handler sees as the client gone (499).
TLS handshakes are bounded by asyncio itself (60 s).
"""

from __future__ import annotations

import asyncio
import json
import logging


def request_timeout_response(seconds: float) -> bytes:
    message = f"the request did not arrive whole within {seconds:g} s (request line, headers and body)"
    body = json.dumps({"error": {"code": "request_timeout", "message": message}}).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def protocol_with_read_deadline(seconds: float) -> type[asyncio.Protocol] | str:
    """uvicorn's `http=` protocol, with `seconds` for each request to arrive whole; uvicorn's own ("auto"), with a
    warning, where httptools is missing."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError as error:
        logging.getLogger("resnet.server").warning(
            "requests have no deadline to arrive (--request-read-timeout-s needs httptools): %s", error
        )
        return "auto"
    timeout_response = request_timeout_response(seconds)

    class ReadDeadlineProtocol(HttpToolsProtocol):
        _deadline: asyncio.TimerHandle | None = None
        _headers_in = False

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._headers_in = False
            self._arm()

        def on_headers_complete(self) -> None:
            self._headers_in = True
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if (
                self._deadline is None
            ):  # from the connection's start for its first request, not its first byte
                self._deadline = self.loop.call_later(seconds, self._too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _too_slow(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            if not self._headers_in:
                self.transport.write(timeout_response)
            self.transport.close()

    return ReadDeadlineProtocol
