"""Mutual TLS, with real processes on loopback: `resnet serve --ssl-client-ca` asks every HTTPS and gRPC client for a
certificate from that CA; `resnet client` and `resnet loadtest --client-cert/--client-key` present one; a client
without one, or with a stranger's, is refused and told what to try; the image's health check shows the gateway its
own certificate. `resnet triton serve --ssl-client-ca` does the same for Triton's gRPC, and the gateway presents
`--triton-client-cert`, renewed files included (the refusals of files and settings that cannot work for Triton are
in test_tls.py's tables). The CAs and certificates are trustme's (the `certificates` fixture)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from pydantic import ValidationError

from cli.main import main as resnet
from server.certificates import ServingCertificates, asgi_tls_extension
from server.healthcheck import OWN_CERTIFICATE_REFUSED
from server.settings import Settings
from tests.gateway_models import color_image
from tests.grpc_support import gateway_process
from tests.support import (
    REPO_ROOT,
    json_log,
    metric,
    renew,
    revocation_list,
    tls_loadtest,
    wait_until,
)


def client_context(certificates: dict[str, Path], owner: str = "client") -> ssl.SSLContext:
    """Trusting the gateway's CA, presenting `owner`'s certificate."""
    context = ssl.create_default_context(cafile=certificates["ca"])
    context.load_cert_chain(certificates[f"{owner}_cert"], certificates[f"{owner}_key"])
    return context


def serve_flags(certificates: dict[str, Path], client_ca: str) -> list[str]:
    flags = ["--ssl-certfile", str(certificates["cert"]), "--ssl-keyfile", str(certificates["key"])]
    return [*flags, "--ssl-client-ca", str(certificates[client_ca])]


@pytest.fixture(scope="module")
def mtls_logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mtls-logs")


@pytest.fixture(scope="module")
def mtls_gateway(pipeline_repository, certificates, mtls_logs):
    flags = ["--repository", str(pipeline_repository), *serve_flags(certificates, "ca")]
    flags += ["--access-log", "--log-format", "json"]
    with gateway_process(mtls_logs, *flags, tls=client_context(certificates)) as running:
        yield running


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("mtls-photos") / "red.jpg"
    path.write_bytes(color_image("red"))
    return str(path)


def classify(capsys, url: str, photo: str, *flags: str) -> tuple[int, str, str]:
    status = resnet(["client", "classify", photo, "--url", url, "--timeout", "10", "--json", *flags])
    captured = capsys.readouterr()
    return status, captured.out, captured.err.strip()


def tls_flags(certificates: dict[str, Path], owner: str | None = "client") -> list[str]:
    flags = ["--ca-cert", str(certificates["ca"])]
    if owner:
        flags += ["--client-cert", str(certificates[f"{owner}_cert"])]
        flags += ["--client-key", str(certificates[f"{owner}_key"])]
    return flags


@pytest.mark.parametrize(("port", "server"), [("http", "auto"), ("http", "triton"), ("grpc", "auto")])
def test_a_client_with_a_certificate_from_the_client_ca_classifies(
    mtls_gateway, certificates, photo, capsys, port, server
):
    url = mtls_gateway.http_url if port == "http" else mtls_gateway.grpc_url
    status, out, err = classify(capsys, url, photo, *tls_flags(certificates), "--server", server)
    assert status == 0, err
    assert json.loads(out)[0]["predictions"][0]["label"] == "red"


def test_the_client_certificate_can_come_from_the_environment(
    mtls_gateway, certificates, photo, capsys, monkeypatch
):
    monkeypatch.setenv("RESNET_CA_CERT", str(certificates["ca"]))
    monkeypatch.setenv("RESNET_CLIENT_CERT", str(certificates["client_cert"]))
    monkeypatch.setenv("RESNET_CLIENT_KEY", str(certificates["client_key"]))
    status, out, err = classify(capsys, mtls_gateway.grpc_url, photo)
    assert status == 0, err


@pytest.mark.parametrize(("port", "server"), [("http", "auto"), ("http", "triton"), ("grpc", "auto")])
@pytest.mark.parametrize(
    ("owner", "hint"),
    [
        (
            None,
            "(the server closed the connection: if it requires client certificates, give yours with --client-cert",
        ),
        (
            "stranger",
            "(the server closed the connection: if it requires client certificates, it did not accept yours",
        ),
    ],
    ids=["no-certificate", "stranger"],
)
def test_a_client_the_gateway_refuses_is_one_line_naming_what_to_try(
    mtls_gateway, certificates, photo, capsys, port, server, owner, hint
):
    url = mtls_gateway.http_url if port == "http" else mtls_gateway.grpc_url
    status, _, err = classify(capsys, url, photo, *tls_flags(certificates, owner), "--server", server)
    assert status == 1 and err.startswith("resnet: error: ") and "\n" not in err, err
    assert hint in err, err
    if port == "http":  # a gRPC port closes an HTTP/1.1 connection over TLS the same way
        assert err.endswith("; if that is a gRPC port, use grpcs://HOST:PORT)"), err
    # refused handshakes cost the gateway nothing
    assert classify(capsys, url, photo, *tls_flags(certificates))[0] == 0


def test_every_http_path_wants_the_client_certificate(mtls_gateway, certificates):
    refused = ssl.create_default_context(cafile=certificates["ca"])
    for path in ("/healthz", "/metrics", "/v1/models", "/"):
        with pytest.raises(httpx.HTTPError):
            httpx.get(mtls_gateway.http_url + path, verify=refused)
    with httpx.Client(base_url=mtls_gateway.http_url, verify=client_context(certificates)) as web:
        assert web.get("/v1/models").json()["models"]
        assert "resnet_requests_total" in web.get("/metrics").text


def test_the_access_log_names_the_certificate_of_each_caller(
    mtls_gateway, mtls_logs, certificates, photo, capsys
):
    # uvicorn gives an app nothing of the client's certificate (no ASGI TLS extension): who called was not logged
    with httpx.Client(base_url=mtls_gateway.http_url, verify=client_context(certificates)) as web:
        assert web.get("/healthz", headers={"x-request-id": "mtls-http"}).status_code == 200
    refused_id = request_id_of_431(mtls_gateway.http_url, client_context(certificates))
    assert classify(capsys, mtls_gateway.grpc_url, photo, *tls_flags(certificates))[0] == 0
    client_pem = certificates["client_cert"].read_bytes()
    subject = x509.load_pem_x509_certificate(client_pem).subject.rfc4514_string()
    assert "CN=client.example" in subject
    records = json_log(next(mtls_logs.glob("gateway-*.log")), "resnet.access")
    by_id = {record["request_id"]: record for record in records}
    assert by_id["mtls-http"]["client_certificate"] == subject
    assert by_id["mtls-http"]["message"].endswith(f", certificate {subject})")
    assert (by_id[refused_id]["status"], by_id[refused_id]["client_certificate"]) == (431, subject)
    grpc_calls = [record for record in records if record["method"] == "gRPC"]
    assert grpc_calls and all(call["client_certificate"] == subject for call in grpc_calls)


def request_id_of_431(url: str, context: ssl.SSLContext) -> str:
    """Sends a head over 64 KiB, which the gateway refuses before any handler reads it; the refusal's request ID."""
    with (
        socket.create_connection(("127.0.0.1", httpx.URL(url).port)) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as oversized,
    ):
        oversized.sendall(b"GET /" + b"x" * 200 * 1024)  # counted from the read after the first
        return re.search(rb"x-request-id: (\w+)", oversized.recv(65536)).group(1).decode()


def test_a_tls_connection_gives_each_request_the_asgi_tls_extension(certificates):
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(certificates["cert"], certificates["key"])
    server.load_verify_locations(certificates["ca"])
    server.verify_mode = ssl.CERT_REQUIRED
    server_end = handshake(server, client_context(certificates))
    extension = asgi_tls_extension(server_end)
    client_pem = certificates["client_cert"].read_text()
    assert extension["client_cert_chain"] == [ssl.DER_cert_to_PEM_cert(ssl.PEM_cert_to_DER_cert(client_pem))]
    assert extension["client_cert_name"].startswith("CN=client.example,")
    assert extension["tls_version"] == 0x0304 and extension["client_cert_error"] is None
    assert extension["cipher_suite"] in (0x1301, 0x1302, 0x1303)  # TLS 1.3's suites
    server.verify_mode = ssl.CERT_NONE  # plain TLS: no client certificate to name
    no_client = asgi_tls_extension(handshake(server, ssl.create_default_context(cafile=certificates["ca"])))
    assert (no_client["client_cert_chain"], no_client["client_cert_name"]) == ([], None)


def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> ssl.SSLObject:
    """A TLS handshake between two contexts in memory; the server's end."""
    client_to_server, server_to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_end = server.wrap_bio(client_to_server, server_to_client, server_side=True)
    client_in, client_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_end = client.wrap_bio(client_in, client_out, server_hostname="127.0.0.1")
    done: set[str] = set()
    for _ in range(10):
        for end, name in ((client_end, "client"), (server_end, "server")):
            with contextlib.suppress(ssl.SSLWantReadError):
                end.do_handshake()
                done.add(name)
        client_to_server.write(client_out.read())
        client_in.write(server_to_client.read())
        if len(done) == 2:
            return server_end
    raise AssertionError("the handshake did not end")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--client-cert", "{client_cert}"],
            "--client-cert and --client-key go together: give both, or neither",
        ),
        (
            ["--client-cert", "{client_cert}", "--client-key", "{ca}"],
            "bad --client-cert/--client-key: {ca} holds no PEM private key",
        ),
        (
            ["--client-cert", "{client_cert}", "--client-key", "{stranger_key}"],
            "{stranger_key} is not the private key of {client_cert}'s certificate",
        ),
        (["--client-cert", "{missing}", "--client-key", "{client_key}"], "{missing} is not a file"),
    ],
)
def test_client_certificate_files_that_cannot_work_are_one_line(
    certificates, photo, capsys, tmp_path, flags, message
):
    paths = {name: str(path) for name, path in certificates.items()} | {"missing": str(tmp_path / "gone.pem")}
    flags = [flag.format(**paths) for flag in flags]
    # checked before any connection: nothing listens at this URL
    status, _, err = classify(capsys, "https://127.0.0.1:9", photo, *flags)
    assert status == 1 and "\n" not in err, err
    assert message.format(**paths) in err, err


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"ssl_client_ca": "ca"}, "ssl_client_ca asks clients for certificates over TLS: give ssl_certfile"),
        (
            {"ssl_certfile": "cert", "ssl_keyfile": "key", "ssl_client_ca": "key"},
            "{key} holds no PEM certificate",
        ),
        (
            {"ssl_certfile": "cert", "ssl_keyfile": "key", "ssl_client_ca": "missing"},
            "{missing} is not a file",
        ),
    ],
)
def test_client_ca_settings_that_cannot_work_are_refused_at_start_up(
    certificates, tmp_path, settings, message
):
    paths = {name: str(path) for name, path in certificates.items()} | {"missing": str(tmp_path / "gone.pem")}
    with pytest.raises(ValidationError, match=message.format(**paths).replace("(", r"\(")):
        Settings(**{field: paths[name] for field, name in settings.items()})


def test_serve_refuses_a_client_ca_without_its_own_certificate(certificates, pipeline_repository):
    command = ["serve", "--repository", str(pipeline_repository), "--ssl-client-ca", str(certificates["ca"])]
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", *command],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "resnet: error: invalid settings: ssl_client_ca asks clients for certificates over TLS: give ssl_certfile "
        "and ssl_keyfile too"
    ]


def health_check(gateway, certificates: dict[str, Path], client_ca: str) -> subprocess.CompletedProcess:
    """`python -m server.healthcheck` in the gateway's environment."""
    port = gateway.http_url.rpartition(":")[2]
    env = {
        **os.environ,
        "RESNET_HOST": "127.0.0.1",
        "RESNET_PORT": port,
        "RESNET_SSL_CERTFILE": str(certificates["cert"]),
        "RESNET_SSL_KEYFILE": str(certificates["key"]),
        "RESNET_SSL_CLIENT_CA": str(certificates[client_ca]),
    }
    return subprocess.run(
        [sys.executable, "-m", "server.healthcheck"], env=env, capture_output=True, text=True, timeout=10
    )


def test_the_health_check_shows_the_gateway_its_own_certificate(mtls_gateway, certificates):
    done = health_check(mtls_gateway, certificates, "ca")
    assert done.returncode == 0, done.stderr


def test_a_health_check_the_gateway_refuses_says_why(pipeline_repository, certificates, tmp_path):
    # the gateway accepts only the stranger CA's clients: its own certificate is not one of them
    flags = ["--repository", str(pipeline_repository), *serve_flags(certificates, "stranger_ca")]
    stranger = ssl.create_default_context(cafile=certificates["ca"])
    stranger.load_cert_chain(certificates["stranger_cert"], certificates["stranger_key"])
    with gateway_process(tmp_path, *flags, ready_path="/healthz", tls=stranger) as gateway:
        done = health_check(gateway, certificates, "stranger_ca")
    assert done.returncode == 1
    assert done.stderr.strip().endswith(OWN_CERTIFICATE_REFUSED), done.stderr
    log = next(tmp_path.glob("gateway-*.log")).read_text()
    assert "gRPC over TLS, client certificates required (KServe v2" in log


# --- the load test ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("user", ["http", "kserve", "grpc"])
def test_the_load_test_presents_its_client_certificate(mtls_gateway, certificates, tmp_path, user):
    flags = {"http": [], "kserve": ["--kserve"], "grpc": ["--grpc", "--grpc-url", mtls_gateway.grpc_url]}[
        user
    ]
    result = tls_loadtest(mtls_gateway.http_url, tmp_path, *flags, *tls_flags(certificates))
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())["summary"]
    assert summary["requests"] > 5 and summary["failures"] == 0


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize(
    ("owner", "hint"),
    [(None, "give yours with --client-cert)"), ("stranger", "it did not accept yours: is yours issued")],
    ids=["no-certificate", "stranger"],
)
def test_a_load_test_the_gateway_refuses_stops_before_it_starts(
    mtls_gateway, certificates, tmp_path, protocol, owner, hint
):
    flags = ["--grpc", "--grpc-url", mtls_gateway.grpc_url] if protocol == "grpc" else []
    result = tls_loadtest(mtls_gateway.http_url, tmp_path, *flags, *tls_flags(certificates, owner))
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("resnet: error: cannot list models at ") and hint in result.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--client-key", "{client_key}"], "--client-cert and --client-key go together"),
        (["--client-cert", "{ca}", "--client-key", "{client_key}"], "bad --client-cert/--client-key: "),
    ],
)
def test_load_test_client_certificate_files_that_cannot_work_are_one_line(
    certificates, tmp_path, flags, message
):
    paths = {name: str(path) for name, path in certificates.items()}
    result = tls_loadtest("https://127.0.0.1:9", tmp_path, *(flag.format(**paths) for flag in flags))
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"resnet: error: {message.format(**paths)}"), result.stderr


# --- Triton asking the gateway (and other gRPC clients) for certificates --------------------------------------


@pytest.fixture(scope="module")
def mtls_triton(pipeline_repository, certificates, tmp_path_factory):
    """A real Triton serving gRPC over mutual TLS (--grpc-use-ssl-mutual)."""
    pytest.importorskip("pytriton", reason="nvidia-pytriton (the bundled tritonserver) is not installed")
    from export.triton_server import TritonServer

    log_path = tmp_path_factory.mktemp("triton-mtls-logs") / "triton.log"
    tls = (certificates["cert"], certificates["key"])
    with TritonServer(
        pipeline_repository, log_path=log_path, grpc_tls=tls, grpc_client_ca=certificates["ca"]
    ) as server:
        yield server


@pytest.mark.slow
@pytest.mark.triton
def test_the_client_reaches_triton_with_its_certificate(mtls_triton, certificates, photo, capsys):
    url = f"grpcs://{mtls_triton.grpc_url}"
    status, out, err = classify(capsys, url, photo, *tls_flags(certificates))
    assert status == 0, err
    assert json.loads(out)[0]["predictions"][0]["label"] == "red"
    status, _, err = classify(capsys, url, photo, *tls_flags(certificates, None))
    assert status == 1 and "give yours with --client-cert)" in err, err


@pytest.mark.slow
@pytest.mark.triton
@pytest.mark.parametrize(
    ("owner", "message"),
    [
        ("client", ""),
        (
            None,
            "(the server closed the connection: if it requires client certificates, give yours with --triton-client-cert)",
        ),
        ("stranger", "it did not accept yours"),
    ],
    ids=["client", "no-certificate", "stranger"],
)
def test_the_gateway_presents_its_certificate_to_triton(
    mtls_triton, certificates, photo, tmp_path, capsys, owner, message
):
    flags = ["--backend", "triton", "--triton-url", f"grpcs://{mtls_triton.grpc_url}"]
    flags += ["--triton-ca-cert", str(certificates["ca"])]
    if owner:
        flags += ["--triton-client-cert", str(certificates[f"{owner}_cert"])]
        flags += ["--triton-client-key", str(certificates[f"{owner}_key"])]
    with gateway_process(tmp_path, *flags, ready_path="/healthz") as gateway:
        readiness = httpx.get(f"{gateway.http_url}/readyz", timeout=10)
        if message:
            assert readiness.status_code == 503 and message in readiness.json()["error"]["message"], (
                readiness.text
            )
            return
        assert readiness.status_code == 200, readiness.text
        status, out, err = classify(capsys, gateway.http_url, photo)
    assert status == 0, err
    assert json.loads(out)[0]["predictions"][0]["label"] == "red"


@pytest.mark.slow
@pytest.mark.triton
def test_the_gateway_picks_up_renewed_client_files_for_triton(mtls_triton, certificates, tmp_path):
    files = {"cert": tmp_path / "client.pem", "key": tmp_path / "client-key.pem"}
    for part, path in files.items():
        shutil.copy(certificates[f"client_{part}"], path)
    flags = [
        "--backend",
        "triton",
        "--triton-url",
        f"grpcs://{mtls_triton.grpc_url}",
        "--ssl-reload-s",
        "0.2",
    ]
    flags += ["--triton-ca-cert", str(certificates["ca"])]
    flags += ["--triton-client-cert", str(files["cert"]), "--triton-client-key", str(files["key"])]

    def readiness(gateway) -> tuple[int, str]:
        answer = httpx.get(f"{gateway.http_url}/readyz", timeout=10)
        return answer.status_code, answer.text

    with gateway_process(tmp_path, *flags, ready_path="/readyz") as gateway:
        # a certificate from an authority Triton does not trust: the new client is refused, so it is in use
        for part in ("key", "cert"):
            renew(files[part], certificates[f"stranger_{part}"])
        wait_until(lambda: readiness(gateway)[0] == 503, 15, what="the stranger's certificate in use")
        assert "it did not accept yours" in readiness(gateway)[1]
        for part in ("key", "cert"):
            renew(files[part], certificates[f"client_{part}"])
        wait_until(lambda: readiness(gateway)[0] == 200, 15, what="the client certificate back in use")
    log = next(tmp_path.glob("gateway-*.log")).read_text()
    assert log.count("Triton's TLS files reloaded") >= 2


# --- certificate revocation lists (--ssl-crl) -------------------------------------------------------------------


def https_health(gateway, certificates: dict[str, Path], owner: str) -> int | str:
    """The status of /healthz for a client presenting `owner`'s certificate, or the name of the error it got."""
    try:
        return httpx.get(
            f"{gateway.http_url}/healthz", verify=client_context(certificates, owner)
        ).status_code
    except httpx.HTTPError as error:
        return type(error).__name__


def grpc_health(gateway, certificates: dict[str, Path], owner: str) -> str:
    """ "ready" for a gRPC client presenting `owner`'s certificate, or the status and message it was answered."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(
        gateway.grpc_url.partition("://")[2],
        ssl=True,
        root_certificates=str(certificates["ca"]),
        private_key=str(certificates[f"{owner}_key"]),
        certificate_chain=str(certificates[f"{owner}_cert"]),
    )
    try:
        return "ready" if client.is_server_ready() else "not ready"
    except InferenceServerException as error:
        return f"{error.status()}: {error.message()}"
    finally:
        client.close()


def issuer_of(certificate: Path) -> str:
    return x509.load_pem_x509_certificate(certificate.read_bytes()).issuer.rfc4514_string()


def test_a_revoked_client_certificate_is_refused_on_both_ports_and_a_new_list_is_picked_up(
    certificates, pipeline_repository, tmp_path
):
    # uvicorn and grpcio have no setting for a revocation list: a client whose certificate its CA had revoked was
    # served until the certificate expired
    crl, renewal = tmp_path / "crl.pem", tmp_path / "renewal.pem"
    crl.write_bytes(revocation_list(certificates, ["revoked"]))
    flags = ["--repository", str(pipeline_repository), *serve_flags(certificates, "ca")]
    flags += ["--ssl-crl", str(crl), "--ssl-reload-s", "0.2"]
    issuer = issuer_of(certificates["client_cert"])
    refused = (
        f"StatusCode.UNAUTHENTICATED: client certificate refused: it is revoked by its authority {issuer}"
    )
    with gateway_process(tmp_path, *flags, tls=client_context(certificates)) as gateway:
        assert https_health(gateway, certificates, "client") == 200
        assert grpc_health(gateway, certificates, "client") == "ready"
        assert https_health(gateway, certificates, "revoked") != 200  # the handshake fails
        assert grpc_health(gateway, certificates, "revoked") == refused
        metrics = httpx.get(f"{gateway.http_url}/metrics", verify=client_context(certificates)).text
        due = metric(metrics, "resnet_tls_crl_next_update_timestamp_seconds")
        assert 6.9 * 86400 < due - time.time() < 7.1 * 86400
        with httpx.Client(base_url=gateway.http_url, verify=client_context(certificates)) as kept_alive:
            assert kept_alive.get("/healthz").status_code == 200
            # the client's certificate revoked in turn
            renewal.write_bytes(revocation_list(certificates, ["revoked", "client"]))
            renew(crl, renewal)
            # on the connection it opened before, its next request (OpenSSL checks only at the handshake)
            wait_until(lambda: kept_alive.get("/healthz").status_code == 401, 15, what="the new list in use")
            error = kept_alive.get("/v1/models").json()["error"]
            assert (error["code"], error["message"]) == (
                "client_certificate_refused",
                refused.partition(": ")[2],
            )
        assert https_health(gateway, certificates, "client") != 200  # a new connection: at the handshake
        assert grpc_health(gateway, certificates, "client") == refused  # its next call


def test_what_the_revocation_lists_refuse_and_why(certificates, tmp_path, caplog):
    crl, renewal = tmp_path / "crl.pem", tmp_path / "renewal.pem"
    crl.write_bytes(revocation_list(certificates, ["revoked"], due_in_days=-1))
    settings = Settings(
        ssl_certfile=certificates["cert"],
        ssl_keyfile=certificates["key"],
        ssl_client_ca=certificates["ca"],
        ssl_crl=crl,
        grpc_port=0,
    )
    served = ServingCertificates(settings)
    issuer = issuer_of(certificates["client_cert"])
    pem = {owner: certificates[f"{owner}_cert"].read_bytes() for owner in ("client", "revoked", "stranger")}
    # as OpenSSL rules: past its next update a list vouches for no one
    assert served.refusal(pem["client"]).startswith(
        f"the revocation list of its authority {issuer} expired on "
    )
    assert "its clients are refused until a new one is in place" in caplog.text
    renewal.write_bytes(revocation_list(certificates, ["revoked"]))
    renew(crl, renewal)
    assert served.reload_if_changed()
    assert served.refusal(pem["client"]) is None
    assert served.refusal(pem["revoked"]) == f"it is revoked by its authority {issuer}"
    stranger = issuer_of(certificates["stranger_cert"])
    assert (
        served.refusal(pem["stranger"])
        == f"no revocation list of its authority {stranger} is loaded (--ssl-crl)"
    )


def test_revocation_lists_that_cannot_work_are_refused_at_start_up(certificates, tmp_path):
    crl = tmp_path / "crl.pem"
    crl.write_bytes(revocation_list(certificates, []))
    serving = {"ssl_certfile": certificates["cert"], "ssl_keyfile": certificates["key"]}
    ca, stranger_ca = certificates["ca"], certificates["stranger_ca"]
    for settings, message in [
        (
            {"ssl_crl": crl},
            "ssl_crl revokes client certificates: give ssl_client_ca, the authorities it is of",
        ),
        ({"ssl_client_ca": ca, "ssl_crl": ca}, f"{ca} holds no PEM certificate revocation list"),
        ({"ssl_client_ca": ca, "ssl_crl": tmp_path / "gone.pem"}, f"{tmp_path / 'gone.pem'} is not a file"),
        (
            {"ssl_client_ca": stranger_ca, "ssl_crl": crl},
            f"{crl}: the revocation list of {issuer_of(certificates['client_cert'])} is not signed by an authority "
            f"in {stranger_ca}",
        ),
    ]:
        with pytest.raises(ValidationError, match=re.escape(message)):
            Settings(**serving, **settings)
    assert Settings(**serving, ssl_client_ca=ca, ssl_crl=crl).ssl_crl == crl
