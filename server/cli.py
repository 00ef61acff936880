"""`resnet serve`: run the gateway (HTTP with uvicorn, plus gRPC) on a model repository.

Every flag has a `RESNET_*` environment variable (the flag wins); bad values stop it before it binds a port.
"""

from __future__ import annotations

import argparse
import logging
import logging.config
import resource
import ssl

from pydantic import ValidationError

from cli.errors import ResnetError
from cli.ports import check_port_free
from server.logs import logging_config
from server.preprocessing import PILLOW_PIXEL_LIMIT
from server.settings import Settings, env_name, settings_problems

NOFILE_CEILING = 1 << 20  # Linux's default nr_open: the most a hard limit of "unlimited" allows
LOW_NOFILE = 4096

# flag -> (Settings field, type, help)
FLAGS: list[tuple[str, str, type, str]] = [
    ("--host", "host", str, "bind address; 0.0.0.0 for all interfaces"),
    ("--port", "port", int, "HTTP port"),
    ("--grpc-port", "grpc_port", int, "gRPC port; 0 disables the gRPC API"),
    ("--repository", "repository", str, "Triton model repository folder"),
    ("--backend", "backend", str, "embedded (ONNX Runtime in this process) or triton"),
    (
        "--repository-poll-s",
        "repository_poll_s",
        float,
        "seconds between looks at --repository (embedded backend): a version `resnet export` publishes, a new "
        "model or one removed is served or dropped without a restart; a version that does not load leaves the "
        "one served (0: read once). The Triton backend follows Triton's own models",
    ),
    (
        "--triton-url",
        "triton_url",
        str,
        "Triton host:port (its gRPC port, or HTTP port with --triton-protocol http; http:// or grpc:// before "
        "it sets the protocol, grpcs:// or https:// TLS too)",
    ),
    ("--triton-protocol", "triton_protocol", str, "grpc or http"),
    (
        "--triton-ca-cert",
        "triton_ca_cert",
        str,
        "PEM authorities to trust for a Triton reached over TLS (--triton-url grpcs://HOST:PORT)",
    ),
    (
        "--triton-client-cert",
        "triton_client_cert",
        str,
        "PEM certificate (chain) to present to a Triton that requires client certificates, with --triton-client-key",
    ),
    (
        "--triton-client-key",
        "triton_client_key",
        str,
        "PEM private key of --triton-client-cert (not encrypted)",
    ),
    ("--max-batch-size", "max_batch_size", int, "largest batch the gateway assembles"),
    ("--max-delay-ms", "max_delay_ms", float, "longest wait for a batch to fill, in ms"),
    ("--queue-size", "queue_size", int, "images queued per model before requests get 503 + Retry-After"),
    ("--request-timeout-s", "request_timeout_s", float, "per-request deadline in seconds (504 after)"),
    (
        "--request-read-timeout-s",
        "request_read_timeout_s",
        float,
        "seconds a client has to send a whole request from its first byte (or from connecting): 408 and closed "
        "after, so stalled clients cannot hold connections (slowloris); 0: no limit. gRPC: the time to finish the "
        "TLS and HTTP/2 handshakes",
    ),
    (
        "--keep-alive-s",
        "keep_alive_s",
        int,
        "seconds an idle HTTP connection is kept open for its next request; behind a load balancer, more than its "
        "idle timeout (AWS ALB: 60 s), else it may reuse a connection the gateway is closing (a 502)",
    ),
    (
        "--grpc-idle-timeout-s",
        "grpc_idle_timeout_s",
        float,
        "seconds a gRPC connection may stay open with no call in flight: GOAWAY and closed after (clients reconnect "
        "at their next call); 0: no limit",
    ),
    ("--max-body-bytes", "max_body_bytes", int, "largest request body (413 above)"),
    (
        "--max-image-pixels",
        "max_image_pixels",
        int,
        f"largest image width*height (413 above, checked before decoding; at most {PILLOW_PIXEL_LIMIT}, "
        "past which Pillow refuses any image)",
    ),
    ("--intra-op-threads", "intra_op_threads", int, "ONNX Runtime threads per model (0: all cores)"),
    ("--preprocess-threads", "preprocess_threads", int, "image decoding threads (0: number of cores)"),
    (
        "--api-keys",
        "api_keys",
        str,
        "API keys (comma-separated) for /v1, /v2 (not /v2/health), /metrics, gRPC (empty: no auth)",
    ),
    (
        "--forwarded-allow-ips",
        "forwarded_allow_ips",
        str,
        "proxies in front (IPs or CIDR networks, comma-separated; * for any) whose X-Forwarded-For and "
        "X-Forwarded-Proto name the client (default 127.0.0.1; empty: none)",
    ),
    (
        "--ssl-certfile",
        "ssl_certfile",
        str,
        "PEM certificate (chain) to serve HTTPS on --port and TLS on --grpc-port, with --ssl-keyfile",
    ),
    ("--ssl-keyfile", "ssl_keyfile", str, "PEM private key of --ssl-certfile (not encrypted)"),
    (
        "--ssl-client-ca",
        "ssl_client_ca",
        str,
        "PEM authorities to accept client certificates from: every HTTPS and gRPC client must then present one "
        "(mutual TLS; with --ssl-certfile)",
    ),
    (
        "--ssl-crl",
        "ssl_crl",
        str,
        "PEM certificate revocation lists of the --ssl-client-ca authorities: a client certificate they revoke is "
        "refused (HTTPS at the handshake, gRPC at each call), as is one whose authority has no list here or an "
        "expired one; read again when it changes (--ssl-reload-s)",
    ),
    (
        "--ssl-reload-s",
        "ssl_reload_s",
        float,
        "seconds between looks at the TLS files (--ssl-* and --triton-*): renewed ones are used for new "
        "connections without a restart (0: read once)",
    ),
    ("--log-level", "log_level", str, "critical, error, warning, info or debug"),
    (
        "--log-format",
        "log_format",
        str,
        "text, or json: one object per line with request_id and other fields",
    ),
    (
        "--root-path",
        "root_path",
        str,
        "path prefix a reverse proxy serves the gateway under (e.g. /resnet), so that /docs finds its OpenAPI "
        "schema there; the API and demo page work behind one without it",
    ),
]


def get_args_parser() -> argparse.ArgumentParser:
    defaults = Settings.model_fields
    parser = argparse.ArgumentParser(
        description="Serve the classifiers of a Triton model repository over HTTP (FastAPI) and gRPC, with dynamic "
        "batching, on an embedded ONNX Runtime (default) or a Triton server. HTTP: the gateway's API at /v1 and "
        "Triton's KServe v2 API at /v2; gRPC: Triton's protocol, so tritonclient code runs unchanged. "
        "Docs at http://HOST:PORT/docs, demo page at http://HOST:PORT/ (https:// with --ssl-certfile).",
        epilog="Each flag defaults to its RESNET_<NAME> environment variable (e.g. RESNET_PORT), then to the default "
        "shown.",
    )
    for flag, field, kind, text in FLAGS:
        default = defaults[field].get_default(call_default_factory=True)
        shown = ",".join(default) if isinstance(default, list) else default
        shown = "none" if shown in (None, "") else shown  # not 0: --intra-op-threads 0 means all cores
        env = env_name(field)
        parser.add_argument(
            flag, dest=field, type=kind, default=None, help=f"{text} (env {env}; default: {shown})"
        )
    parser.add_argument(
        "--batching",
        dest="batching",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="batch requests in the gateway; --no-batching sends each request on its own and leaves "
        "batching to Triton (env RESNET_BATCHING; default: on)",
    )
    parser.add_argument(
        "--access-log",
        action="store_true",
        default=None,
        help="log every request with its ID, status and duration (costs throughput; env RESNET_ACCESS_LOG)",
    )
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    overrides = {
        field: getattr(args, field) for _, field, _, _ in FLAGS if getattr(args, field, None) is not None
    }
    for flag in ("batching", "access_log"):
        if getattr(args, flag, None) is not None:
            overrides[flag] = getattr(args, flag)
    try:
        return Settings(**overrides)
    except ValidationError as error:
        raise ResnetError(f"invalid settings: {settings_problems(error)}") from None


def raise_open_file_limit() -> None:
    """Every connection holds a file descriptor: the soft limit goes up to the hard one, as Locust and nginx do.
    At systemd's and many shells' soft 1024 (hard 524288), a gateway limited to 256 had 161 of 400 clients at once
    reset (libuv closes what it accepts past the limit) and told good images they were unreadable."""
    log = logging.getLogger("resnet.server")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else NOFILE_CEILING
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            log.info("open-file limit raised from %d to %d", soft, wanted)
            soft = wanted
        except (ValueError, OSError) as error:  # a kernel whose nr_open is below the hard limit
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, wanted, error)
    if soft != resource.RLIM_INFINITY and soft < LOW_NOFILE:
        log.warning(
            "open files limited to %d (ulimit -n; systemd LimitNOFILE=): connections past about that many clients at "
            "once are reset",
            soft,
        )


def main(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import create_app, refusal_recorder
    from server.http_protocol import gateway_protocol

    settings = settings_from(args)
    if not settings.repository.is_dir() and settings.backend == "embedded":
        raise ResnetError(
            f"model repository not found: {settings.repository} (set --repository or {env_name('repository')})"
        )
    check_port_free(settings.host, settings.port, "HTTP", "--port")
    check_port_free(settings.host, settings.grpc_port, "gRPC", "--grpc-port (0 disables gRPC)")
    logging.config.dictConfig(logging_config(settings.log_level, settings.log_format))
    raise_open_file_limit()
    app = create_app(settings)
    # uvicorn stops accepting on SIGTERM/Ctrl-C, finishes in-flight requests (up to the grace period), then runs
    # the lifespan shutdown, which answers whatever is still queued before the backends close.
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # configured above, uvicorn's loggers included
        access_log=False,  # the gateway writes its own (settings.access_log), with request IDs
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
        timeout_keep_alive=settings.keep_alive_s,
        http=gateway_protocol(settings.request_read_timeout_s, refusal_recorder(app)),
        root_path=settings.root_path,
        proxy_headers=bool(settings.forwarded_allow_ips),
        forwarded_allow_ips=settings.forwarded_allow_ips,
        ssl_certfile=settings.ssl_certfile,
        ssl_keyfile=settings.ssl_keyfile,
        ssl_ca_certs=settings.ssl_client_ca,
        ssl_cert_reqs=ssl.CERT_REQUIRED if settings.ssl_client_ca else ssl.CERT_NONE,
        # the gateway's own, so that renewed files reach new connections (server/certificates.py)
        ssl_context_factory=app.state.certificates.uvicorn_context if app.state.certificates else None,
    )
    return 0
