"""Addresses from command lines and settings, checked before anything dials them: a gRPC client dials port 443 for
a bare host and takes a port past 65535 modulo 65536, and an HTTP base URL with a trailing '/' or the API's own /v1
doubles the path every request appends."""

from __future__ import annotations

from urllib.parse import SplitResult, urlsplit


def host_and_port(value: str) -> str:
    """`value` when it is host:port with a port from 1 to 65535, else ValueError saying why: gRPC clients dial
    port 443 for a bare host and take a port past 65535 modulo 65536."""
    try:
        parts = urlsplit(f"//{value}")
        port = parts.port
    except ValueError as error:
        raise ValueError(f"{value!r} is not host:port: {error}") from None
    if not parts.hostname or not port or parts.path or parts.query:
        raise ValueError(f"{value!r} is not host:port (e.g. 127.0.0.1:8001)")
    return value


def split_base_url(url: str, schemes: tuple[str, ...]) -> SplitResult:
    """`url` (http:// when it names no scheme) as parts, its path without a trailing '/', or ValueError saying
    why. The path may be a reverse proxy's prefix, but not the API's own /v1 or /v2: callers append those."""
    try:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        parts.port  # noqa: B018 - raises for a port past 65535, which gRPC would quietly take modulo 65536
    except ValueError as error:
        raise ValueError(f"{url!r}: {error}") from None
    if parts.query or parts.fragment:
        raise ValueError(f"{url!r}: a base URL has no query or fragment")
    if parts.scheme not in schemes or not parts.hostname:
        raise ValueError(f"{url!r}: use {' or '.join(f'{scheme}://HOST:PORT' for scheme in schemes)}")
    path = parts.path.rstrip("/")
    if path.endswith(("/v1", "/v2")):
        raise ValueError(f"{url!r}: give the server's base URL, without {path[-3:]}")
    return parts._replace(path=path)
