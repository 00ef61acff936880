"""A port the server about to start cannot bind, as one line before it starts (uvicorn, gRPC and tritonserver
report it only from inside their start-up: a traceback, or after loading every model)."""

from __future__ import annotations

import errno
import socket

from cli.errors import ResnetError


def check_port_free(
    host: str,
    port: int,
    what: str,
    flag: str,
    error_type: type[ResnetError] = ResnetError,
    host_flag: str = "--host",
) -> None:
    """Raise `error_type` naming `flag` (the port's) or `host_flag` when `host:port` cannot be bound; port 0 (off,
    or any) always can."""
    if not port:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # as uvicorn, gRPC and tritonserver bind: an earlier server's connections in TIME_WAIT do not count
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            # In use or privileged is the port's fault; anything else (not this machine's address, a name that
            # does not resolve) is the host's.
            remedy = (
                f"choose another with {flag}"
                if error.errno in (errno.EADDRINUSE, errno.EACCES)
                else f"{host_flag} must be an address of this machine (0.0.0.0 for all interfaces)"
            )
            raise error_type(
                f"cannot bind the {what} port {host}:{port} ({error.strerror}); {remedy}"
            ) from None
