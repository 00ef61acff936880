"""`python -m server.healthcheck`: the gateway image's HEALTHCHECK. Exit 0 when the gateway this container runs
answers GET /healthz, else 1 with the reason; it reads the same `RESNET_*` settings as `resnet serve`, so a gateway
serving TLS is probed over HTTPS."""

from __future__ import annotations

import ssl
import sys
import urllib.request

from pydantic import ValidationError

from server.settings import Settings

TIMEOUT_S = 2


def liveness_url(settings: Settings) -> str:
    # a gateway bound to every interface is probed on loopback; one bound to an address, at that address
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(settings.host, settings.host)
    host = f"[{host}]" if ":" in host else host
    scheme = "https" if settings.ssl_certfile else "http"
    return f"{scheme}://{host}:{settings.port}/healthz"  # a reverse proxy's --root-path is not on this side


def probe_context(settings: Settings) -> ssl.SSLContext | None:
    """No certificate check: the certificate names the public host, not loopback, and the gateway loaded it at
    start-up; this asks only whether the process answers."""
    if not settings.ssl_certfile:
        return None
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def main() -> int:
    try:
        settings = Settings()
    except ValidationError as error:  # the gateway would not have started either
        print(f"invalid settings: {error.errors()[0]['msg']}", file=sys.stderr)
        return 1
    url = liveness_url(settings)
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S, context=probe_context(settings)):
            return 0
    except OSError as error:  # URLError, HTTPError (a 5xx), a refused or timed-out connection
        print(f"{url}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
