"""The gateway's logs: ours and uvicorn's through one handler on stderr, as text or as one JSON object per line
(`--log-format json`, what Loki, Elasticsearch and cloud log services ingest); every line written while a request
is answered carries its ID, and the access log (`--access-log`) is the gateway's own, since uvicorn's cannot carry
the ID or the time a request took."""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar

# The ID of the request being answered in this task (set by the gateway's middleware).
CURRENT_REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)
ACCESS_LOG = logging.getLogger("resnet.access")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
REQUEST_ID_HEADER = "x-request-id"  # HTTP header and gRPC metadata key
# what an ID may hold: UUIDs, W3C trace IDs, AWS/nginx request IDs; nothing that could break a log line or header
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


def request_id_from(offered: str | None) -> str:
    """The ID a request came with when that is a plausible ID, else a new one."""
    return offered if offered and REQUEST_ID_PATTERN.fullmatch(offered) else uuid.uuid4().hex


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to the records written while a request is answered (a JSON field of its own)."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = CURRENT_REQUEST_ID.get()
        if request_id is not None and not hasattr(record, "request_id"):
            record.request_id = request_id
        return True


def logging_config(level: str, log_format: str) -> dict:
    """A `logging.config.dictConfig` for `resnet serve`: uvicorn's loggers pass their records to ours."""
    formatter = json_formatter() if log_format == "json" else {"format": TEXT_FORMAT}
    uvicorn = {"handlers": [], "propagate": True, "level": level.upper()}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIdFilter}},
        "formatters": {"default": formatter},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "default",
                "filters": ["request_id"],
            }
        },
        "loggers": {name: uvicorn for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
        "root": {"handlers": ["stderr"], "level": level.upper()},
    }


def json_formatter() -> dict:
    from pythonjsonlogger.core import RESERVED_ATTRS

    return {
        "()": "pythonjsonlogger.json.JsonFormatter",
        "fmt": "%(levelname)s %(name)s %(message)s",
        "rename_fields": {"levelname": "level", "name": "logger"},
        "timestamp": "time",  # ISO 8601 in UTC, which log services parse without a pattern
        # uvicorn's `color_message` is its message again with terminal colour codes
        "reserved_attrs": [*RESERVED_ATTRS, "color_message"],
    }


def log_access(
    method: str,
    path: str,
    status: int | str,
    seconds: float,
    client: str,
    request_id: str,
    certificate: str | None = None,
) -> None:
    """One line per answered request (HTTP: its status; gRPC: its code's name): the text says it, the fields (JSON)
    let a log service filter on them. `certificate`: the subject of the client's certificate, on mutual TLS."""
    ACCESS_LOG.info(
        "%s %s %s %.1f ms (request %s, client %s%s)",
        method,
        path,
        status,
        seconds * 1000,
        request_id,
        client,
        f", certificate {certificate}" if certificate else "",
        extra={
            "method": method,
            "path": path,
            "status": status,
            "duration_ms": round(seconds * 1000, 2),
            "client": client,
            "request_id": request_id,
            "client_certificate": certificate,
        },
    )
