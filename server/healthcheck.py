"""`python -m server.healthcheck`: the gateway image's HEALTHCHECK. Exit 0 when the gateway this container runs
answers GET /healthz, else 1 with the reason; it reads the same `RESNET_*` settings as `resnet serve`, so a gateway
serving TLS is probed over HTTPS."""

from __future__ import annotations

import ssl
import sys
import urllib.request

from pydantic import ValidationError

from cli.tls import closed_before_answer
from server.settings import Settings, settings_problems

TIMEOUT_S = 2
OWN_CERTIFICATE_REFUSED = (
    " (the gateway requires client certificates and closed the connection on its own: have the --ssl-client-ca "
    "authority issue the gateway's certificate for client use too, or give the container a health check of its own)"
)


def liveness_url(settings: Settings) -> str:
    # a gateway bound to every interface is probed on loopback; one bound to an address, at that address
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(settings.host, settings.host)
    host = f"[{host}]" if ":" in host else host
    scheme = "https" if settings.ssl_certfile else "http"
    return f"{scheme}://{host}:{settings.port}/healthz"  # a reverse proxy's --root-path is not on this side


def probe_context(settings: Settings) -> ssl.SSLContext | None:
    """No check of the server's certificate: it names the public host, not loopback, and the gateway loaded it at
    start-up; this asks only whether the process answers. A gateway that requires client certificates is shown its
    own, which it accepts when its client CA issued it for client use as well (docs/deployment.md)."""
    if not settings.ssl_certfile:
        return None
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if settings.ssl_client_ca:
        context.load_cert_chain(settings.ssl_certfile, settings.ssl_keyfile)
    return context


def main() -> int:
    try:
        settings = Settings()
    except ValidationError as error:  # the gateway would not have started either
        print(f"invalid settings: {settings_problems(error)}", file=sys.stderr)
        return 1
    url = liveness_url(settings)
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S, context=probe_context(settings)):
            return 0
    except OSError as error:  # URLError, HTTPError (a 5xx), a refused or timed-out connection
        refused = settings.ssl_client_ca and closed_before_answer(str(error))
        print(f"{url}: {error}{OWN_CERTIFICATE_REFUSED if refused else ''}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
