"""A port the server about to start cannot bind, as one line before it starts (uvicorn, gRPC and tritonserver
report it only from inside their start-up: a traceback, or after loading every model); free ports to start on."""

from __future__ import annotations

import contextlib
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


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports free on `host` now: bound together, since one at a time the kernel may hand out the
    same port twice (it did: a gateway given one port for HTTP and gRPC refused to start)."""
    with contextlib.ExitStack() as stack:
        sockets = [
            stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)
        ]
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]
