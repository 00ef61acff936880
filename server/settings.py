"""Gateway settings: one pydantic-settings model, `RESNET_*` environment variables, validated at start-up.

`resnet serve` flags override the environment; a bad value stops the gateway before it binds a port.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from cli.addresses import host_and_port
from cli.limits import MAX_BATCH_SIZE, MAX_THREADS
from cli.tls import check_authorities, check_key_pair, client_context, load_revocation_lists
from server.preprocessing import DEFAULT_MAX_PIXELS, PILLOW_PIXEL_LIMIT

ENV_PREFIX = "RESNET_"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", frozen=True, populate_by_name=True
    )

    # An empty host would make uvicorn bind every interface: an unset variable must not publish the gateway.
    host: str = Field("127.0.0.1", min_length=1, description="HTTP bind address (0.0.0.0 for all interfaces)")
    port: int = Field(8080, ge=0, le=65535, description="HTTP port")
    grpc_port: int = Field(8081, ge=0, le=65535, description="gRPC port; 0 disables the gRPC API")
    repository: Path = Field(
        Path("model_repository"),
        # The name `resnet export` and `resnet triton` read too; RESNET_REPOSITORY is the gateway's older name.
        validation_alias=AliasChoices("RESNET_MODEL_REPOSITORY", "RESNET_REPOSITORY"),
        description="Triton model repository to serve",
    )
    backend: Literal["embedded", "triton"] = Field(
        "embedded", description="embedded ONNX Runtime, or a Triton server"
    )
    triton_url: str = Field(
        "127.0.0.1:8001",
        description="Triton address host:port (gRPC or HTTP port per protocol; http:// or grpc:// names the protocol, "
        "https:// or grpcs:// TLS as well)",
    )
    triton_protocol: Literal["grpc", "http"] = Field("grpc", description="protocol to Triton")
    triton_tls: bool = Field(
        False, description="reach Triton over TLS (grpcs:// or https:// before triton_url says so too)"
    )
    triton_ca_cert: Path | None = Field(
        None, description="PEM authorities to trust for Triton's TLS certificate (default: the system's)"
    )
    triton_client_cert: Path | None = Field(
        None,
        description="PEM certificate (chain) the gateway presents to a Triton that requires client certificates "
        "(with triton_client_key)",
    )
    triton_client_key: Path | None = Field(None, description="PEM private key of triton_client_cert")
    batching: bool = Field(
        True,
        description="batch requests in the gateway (off: one backend call per request, "
        "leaving batching to Triton's dynamic batcher)",
    )
    max_batch_size: int = Field(
        32, ge=1, le=MAX_BATCH_SIZE, description="largest batch the gateway assembles"
    )
    max_delay_ms: float = Field(2.0, ge=0, le=10_000, description="longest wait for a batch to fill")
    queue_size: int = Field(256, ge=1, description="images waiting per model beyond which requests get 503")
    # At most a day: inf crashed the start-up (uvicorn's shutdown grace is derived from it as an int).
    request_timeout_s: float = Field(
        10.0, gt=0, le=86_400, description="per-request deadline (504 when exceeded)"
    )
    request_read_timeout_s: float = Field(
        60,
        ge=0,
        le=86_400,
        description="seconds a client has to send a whole request (line, headers and body) from its first byte, or "
        "from connecting: past it, 408 and the connection closed, so clients that stall cannot hold connections for "
        "ever (slowloris); 0: no limit. On the gRPC port: the time to finish the TLS and HTTP/2 handshakes",
    )
    keep_alive_s: int = Field(
        5,
        ge=1,
        le=3600,
        description="seconds an idle HTTP connection is kept open for its next request; behind a load balancer, "
        "more than its idle timeout (AWS ALB: 60 s), or it may send a request on a connection the gateway is "
        "closing and answer 502",
    )
    grpc_idle_timeout_s: float = Field(
        300,
        ge=0,
        le=86_400,
        description="seconds a gRPC connection may stay open with no call in flight: past it the gateway sends GOAWAY "
        "and closes it (gRPC clients reconnect by themselves at their next call); 0: no limit",
    )
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1, description="largest request body (413 above)")
    max_image_pixels: int = Field(
        DEFAULT_MAX_PIXELS, ge=1, le=PILLOW_PIXEL_LIMIT, description="largest image width*height (413 above)"
    )
    intra_op_threads: int = Field(
        0, ge=0, le=MAX_THREADS, description="ONNX Runtime intra-op threads per model (0: all cores)"
    )
    preprocess_threads: int = Field(
        0, ge=0, le=MAX_THREADS, description="image decoding threads (0: number of cores)"
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated API keys; empty: no auth"
    )
    forwarded_allow_ips: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["127.0.0.1"],
        description="proxies in front (IP addresses or CIDR networks, comma-separated; * for any) whose "
        "X-Forwarded-For and X-Forwarded-Proto name the client in the access log and to the app; empty: none",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="log level"
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="text lines, or one JSON object per line (for a log service)"
    )
    access_log: bool = Field(False, description="log every request with its ID, status and duration")
    root_path: str = Field(
        "",
        description="path prefix a reverse proxy serves the gateway under, e.g. /resnet (for /docs and OpenAPI)",
    )

    ssl_certfile: Path | None = Field(
        None, description="PEM certificate chain: serve HTTPS and gRPC over TLS (with ssl_keyfile)"
    )
    ssl_keyfile: Path | None = Field(None, description="PEM private key of ssl_certfile")
    ssl_client_ca: Path | None = Field(
        None,
        description="PEM authorities whose client certificates the gateway accepts: every HTTPS and gRPC client must "
        "then present one (mutual TLS; needs ssl_certfile)",
    )
    ssl_crl: Path | None = Field(
        None,
        description="PEM certificate revocation lists of the ssl_client_ca authorities: a client certificate they "
        "revoke is refused (HTTPS at the handshake, gRPC at each call), and so is one whose authority has no list "
        "here or an expired one, as OpenSSL rules; read again with the other TLS files (needs ssl_client_ca)",
    )
    repository_poll_s: float = Field(
        5,
        ge=0,
        le=86400,
        description="seconds between looks at the repository (embedded backend): a new version, a new model or "
        "one removed is served, or dropped, without a restart; 0: read once at start-up",
    )
    ssl_reload_s: float = Field(
        60,
        ge=0,
        le=86400,
        description="seconds between looks at the TLS files (the gateway's and the triton_* ones): changed ones (a "
        "renewed certificate) are used for new connections without a restart; 0: read once at start-up",
    )

    @field_validator(
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_client_ca",
        "ssl_crl",
        "triton_ca_cert",
        "triton_client_cert",
        "triton_client_key",
        mode="before",
    )
    @classmethod
    def _unset_when_empty(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            keys = [key.strip() for key in value.split(",") if key.strip()]
            if value.strip() and not keys:  # meant to turn auth on: serving without it would be silent
                raise ValueError(f"{value!r} holds no keys; leave it empty to serve without API keys")
            return keys
        return value

    @field_validator("forwarded_allow_ips", mode="before")
    @classmethod
    def _split_proxies(cls, value: object) -> object:
        proxies = (
            [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value
        )
        for proxy in proxies if isinstance(proxies, list) else []:
            try:
                if proxy != "*":
                    ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ValueError(f"{proxy!r} is not an IP address, a CIDR network or *") from None
        return proxies

    @model_validator(mode="before")
    @classmethod
    def _triton_scheme(cls, data: object) -> object:
        """`http://host:8000` as triton_url names the protocol too (people write URLs with schemes), `grpcs://`
        and `https://` TLS as well; a scheme that contradicts triton_protocol is refused rather than one of them
        silently winning."""
        url = data.get("triton_url") if isinstance(data, dict) else None
        if not (isinstance(url, str) and "://" in url):
            return data
        scheme, _, address = url.partition("://")
        scheme = scheme.lower()
        if scheme not in ("http", "grpc", "https", "grpcs"):
            raise ValueError(
                f"triton_url {url!r}: give host:port, with http://, grpc://, https:// or grpcs:// before it, or "
                "nothing"
            )
        protocol = data.get("triton_protocol")
        if protocol is not None and str(protocol).lower() != scheme.removesuffix("s"):
            raise ValueError(f"triton_url {url!r} is {scheme} but triton_protocol is {protocol!r}")
        tls = {"triton_tls": True} if scheme.endswith("s") else {}
        return {**data, "triton_url": address, "triton_protocol": scheme.removesuffix("s"), **tls}

    @field_validator("triton_url")
    @classmethod
    def _host_and_port(cls, value: str) -> str:
        return host_and_port(value)

    @field_validator("root_path")
    @classmethod
    def _path_prefix(cls, value: str) -> str:
        prefix = value.rstrip("/")
        if prefix and not re.fullmatch(r"(/[^/\s?#]+)+", prefix):
            raise ValueError(f"{value!r} is not a path prefix like /resnet")
        return prefix

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.grpc_port and self.grpc_port == self.port:
            raise ValueError(f"grpc_port and port must differ (both {self.port})")
        self._check_serving_tls()
        self._check_triton_tls()
        return self

    def _check_serving_tls(self) -> None:
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile go together: give both to serve TLS, or neither")
        if self.ssl_certfile is not None:
            check_key_pair(self.ssl_certfile, self.ssl_keyfile)
        if self.ssl_client_ca is not None:
            if self.ssl_certfile is None:  # client certificates are asked for only in a TLS handshake
                raise ValueError(
                    "ssl_client_ca asks clients for certificates over TLS: give ssl_certfile and ssl_keyfile too"
                )
            check_authorities(self.ssl_client_ca)
        if self.ssl_crl is not None:
            if self.ssl_client_ca is None:
                raise ValueError(
                    "ssl_crl revokes client certificates: give ssl_client_ca, the authorities it is of"
                )
            load_revocation_lists(self.ssl_crl, self.ssl_client_ca)

    def _check_triton_tls(self) -> None:
        if (self.triton_client_cert is None) != (self.triton_client_key is None):
            raise ValueError("triton_client_cert and triton_client_key go together: give both, or neither")
        given = [name for name in ("triton_ca_cert", "triton_client_cert") if getattr(self, name) is not None]
        if given and not self.triton_tls:  # TLS files for a connection that would then go out in plain text
            raise ValueError(
                f"{given[0]} is for a Triton reached over TLS: give triton_url as grpcs:// or https://"
            )
        if given:
            client_context(self.triton_ca_cert, self.triton_key_pair)

    @property
    def triton_key_pair(self) -> tuple[Path, Path] | None:
        """The client certificate and key presented to Triton, if any."""
        return (self.triton_client_cert, self.triton_client_key) if self.triton_client_cert else None


def settings_problems(error: ValidationError) -> str:
    """pydantic's errors as "field: what; ...", "what" alone for one about several fields."""
    problems = []
    for problem in error.errors():
        message = problem["msg"].removeprefix("Value error, ")
        field = ".".join(map(str, problem["loc"]))
        problems.append(f"{field}: {message}" if field else message)
    return "; ".join(problems)


def env_name(field: str) -> str:
    """The environment variable a setting is read from (the first, where it has several)."""
    alias = Settings.model_fields[field].validation_alias
    return alias.choices[0] if isinstance(alias, AliasChoices) else ENV_PREFIX + field.upper()
