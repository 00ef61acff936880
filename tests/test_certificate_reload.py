"""TLS files renewed on disk reach new connections without a restart (`--ssl-reload-s`), on the HTTPS and the gRPC
port, with a real gateway on loopback: a renewed certificate is served, a pair that does not load is refused and the
one in use kept (a log line, a metric), and a replaced client CA stops trusting the clients of the old one."""

from __future__ import annotations

import re
import shutil
import socket
import ssl
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from pydantic import ValidationError

from cli.main import main as resnet
from server.settings import Settings
from tests.gateway_models import color_image
from tests.grpc_support import gateway_process
from tests.support import renew, wait_until

RELOAD_S = "0.2"


@pytest.fixture
def served(tmp_path, certificates) -> dict[str, Path]:
    """Copies of the gateway's certificate, key and client CA in a folder of their own, which the test renews."""
    folder = tmp_path / "tls"
    folder.mkdir()
    files = {name: folder / f"{name}.pem" for name in ("cert", "key", "client_ca")}
    shutil.copy(certificates["cert"], files["cert"])
    shutil.copy(certificates["key"], files["key"])
    shutil.copy(certificates["ca"], files["client_ca"])
    return files


@pytest.fixture
def renewal(certificates) -> dict[str, Path]:
    """Another certificate for 127.0.0.1 from the same CA, and its key."""
    return {"cert": certificates["renewed_cert"], "key": certificates["renewed_key"]}


def served_certificate(port: int, certificates, client: str | None = None) -> bytes:
    """The DER certificate a TLS handshake with 127.0.0.1:`port` is shown."""
    context = ssl.create_default_context(cafile=certificates["ca"])
    if client:
        context.load_cert_chain(certificates[f"{client}_cert"], certificates[f"{client}_key"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as connection:
            return connection.getpeercert(binary_form=True)


def expiry(path: Path) -> float:
    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc.timestamp()


def expiry_metric(metrics: str) -> float:
    found = re.search(r"^resnet_tls_certificate_expiry_timestamp_seconds (\S+)$", metrics, re.MULTILINE)
    assert found, "no expiry metric"
    return float(found[1])


def der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


def ports(gateway) -> tuple[int, int]:
    return int(gateway.http_url.rpartition(":")[2]), int(gateway.grpc_address.rpartition(":")[2])


def serve_flags(pipeline_repository: Path, served: dict[str, Path], *extra: str) -> list[str]:
    flags = ["--repository", str(pipeline_repository), "--ssl-reload-s", RELOAD_S]
    return [*flags, "--ssl-certfile", str(served["cert"]), "--ssl-keyfile", str(served["key"]), *extra]


def test_a_renewed_certificate_reaches_new_connections_on_both_ports(
    pipeline_repository, certificates, served, renewal, tmp_path
):
    trusted = ssl.create_default_context(cafile=certificates["ca"])
    with gateway_process(tmp_path, *serve_flags(pipeline_repository, served), tls=trusted) as gateway:
        with httpx.Client(base_url=gateway.http_url, verify=trusted) as kept_open:
            assert kept_open.get("/healthz").status_code == 200
            for port in ports(gateway):
                assert served_certificate(port, certificates) == der(certificates["cert"])
            renew(served["key"], renewal["key"])
            renew(served["cert"], renewal["cert"])
            for port in ports(gateway):
                wait_until(
                    lambda port=port: served_certificate(port, certificates) == der(renewal["cert"]),
                    10,
                    what=f"the renewed certificate on port {port}",
                )
            assert kept_open.get("/healthz").status_code == 200  # an open connection keeps its own
            metrics = kept_open.get("/metrics").text
    assert 'resnet_tls_reloads_total{outcome="reloaded"} 1.0' in metrics
    assert expiry_metric(metrics) == expiry(renewal["cert"])


def test_a_certificate_near_its_end_is_a_warning_and_its_date_a_metric(
    pipeline_repository, certificates, served, tmp_path
):
    trusted = ssl.create_default_context(cafile=certificates["ca"])
    with gateway_process(tmp_path, *serve_flags(pipeline_repository, served), tls=trusted) as gateway:

        def served_expiry() -> float:
            return expiry_metric(httpx.get(f"{gateway.http_url}/metrics", verify=trusted).text)

        assert served_expiry() == expiry(certificates["cert"])
        renew(served["key"], certificates["expiring_key"])
        renew(served["cert"], certificates["expiring_cert"])
        wait_until(
            lambda: served_expiry() == expiry(certificates["expiring_cert"]), 10, what="the new expiry"
        )
    log = next(tmp_path.glob("gateway-*.log")).read_text()
    assert f"TLS certificate {served['cert']} valid until " in log
    assert f"TLS certificate {served['cert']} expires in 4 days: renew it" in log


def test_files_that_do_not_load_are_refused_and_the_ones_in_use_kept(
    pipeline_repository, certificates, served, renewal, tmp_path
):
    trusted = ssl.create_default_context(cafile=certificates["ca"])
    with gateway_process(tmp_path, *serve_flags(pipeline_repository, served), tls=trusted) as gateway:
        http_port, grpc_port = ports(gateway)
        renew(served["cert"], renewal["cert"])  # its key not yet: a renewal half done
        with httpx.Client(base_url=gateway.http_url, verify=trusted) as web:
            wait_until(
                lambda: 'outcome="refused"} 1.0' in web.get("/metrics").text, 10, what="a refused reload"
            )
        for port in (http_port, grpc_port):
            assert served_certificate(port, certificates) == der(certificates["cert"])
        renew(served["key"], renewal["key"])  # the renewal completed
        wait_until(
            lambda: served_certificate(grpc_port, certificates) == der(renewal["cert"]), 10, what="reload"
        )
        assert served_certificate(http_port, certificates) == der(renewal["cert"])
    log = next(tmp_path.glob("gateway-*.log")).read_text()
    assert "TLS files changed but do not load, the ones in use are kept: " in log
    assert f"{served['key']} is not the private key of {served['cert']}'s certificate" in log
    assert "TLS files reloaded" in log


def test_a_replaced_client_ca_stops_trusting_the_old_ones_clients(
    pipeline_repository, certificates, served, tmp_path, capsys
):
    flags = serve_flags(pipeline_repository, served, "--ssl-client-ca", str(served["client_ca"]))
    client = ssl.create_default_context(cafile=certificates["ca"])
    client.load_cert_chain(certificates["client_cert"], certificates["client_key"])
    photo = tmp_path / "red.jpg"
    photo.write_bytes(color_image("red"))

    def classify(url: str, owner: str) -> int:
        flags = ["--ca-cert", str(certificates["ca"]), "--timeout", "5"]
        flags += [
            "--client-cert",
            str(certificates[f"{owner}_cert"]),
            "--client-key",
            str(certificates[f"{owner}_key"]),
        ]
        status = resnet(["client", "classify", str(photo), "--url", url, *flags])
        capsys.readouterr()
        return status

    with gateway_process(tmp_path, *flags, tls=client) as gateway:
        urls = (gateway.http_url, gateway.grpc_url)
        assert [classify(url, "client") for url in urls] == [0, 0]
        renew(served["client_ca"], certificates["stranger_ca"])
        for url in urls:
            wait_until(
                lambda url=url: classify(url, "client") == 1, 10, what=f"{url} refusing the old CA's client"
            )
            assert classify(url, "stranger") == 0


@pytest.mark.parametrize("value", ["-1", "86401", "soon"])
def test_a_reload_interval_that_cannot_work_is_refused(value):
    with pytest.raises(ValidationError, match="ssl_reload_s"):
        Settings(ssl_reload_s=value)
