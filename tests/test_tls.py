"""TLS, with real processes on loopback: `resnet serve --ssl-certfile/--ssl-keyfile` serves HTTPS and gRPC over TLS
from one certificate; `resnet client` and `resnet loadtest` reach it at https:// and grpcs:// trusting a private CA
(--ca-cert); `resnet triton serve --ssl-*` serves Triton's gRPC over TLS and the gateway reaches it (grpcs://, or
https:// through a TLS proxy, with --triton-ca-cert). A certificate, key or URL that cannot work is one line naming
the fix. The CA is trustme's (the `certificates` fixture)."""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from cli.main import main as resnet
from server.settings import Settings
from tests.gateway_models import color_image
from tests.grpc_support import gateway_process
from tests.support import REPO_ROOT, other_web_server, path_prefix_proxy, tls_loadtest


@pytest.fixture(scope="module")
def tls_gateway(pipeline_repository, certificates, tmp_path_factory):
    trusted = ssl.create_default_context(cafile=certificates["ca"])
    flags = ["--repository", str(pipeline_repository)]
    flags += ["--ssl-certfile", str(certificates["cert"]), "--ssl-keyfile", str(certificates["key"])]
    with gateway_process(tmp_path_factory.mktemp("tls-logs"), *flags, tls=trusted) as running:
        yield running


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("tls-photos")
    expected = {}
    for color in ("red", "green", "blue"):
        path = folder / f"{color}.jpg"
        path.write_bytes(color_image(color))
        expected[str(path)] = color
    return expected


def classify(capsys, url: str, images, *flags: str) -> tuple[int, str, str]:
    status = resnet(["client", "classify", *images, "--url", url, "--timeout", "10", *flags])
    captured = capsys.readouterr()
    return status, captured.out, captured.err.strip()


@pytest.mark.parametrize(("port", "server"), [("http", "auto"), ("http", "triton"), ("grpc", "auto")])
def test_the_client_classifies_over_https_and_grpcs_trusting_a_private_ca(
    tls_gateway, certificates, photos, capsys, port, server
):
    url = tls_gateway.http_url if port == "http" else tls_gateway.grpc_url
    assert url.startswith(("https://", "grpcs://"))
    status, out, err = classify(
        capsys, url, list(photos), "--ca-cert", str(certificates["ca"]), "--server", server, "--json"
    )
    assert status == 0, err
    assert {r["image"]: r["predictions"][0]["label"] for r in json.loads(out)} == photos


def test_the_ca_can_come_from_the_environment(tls_gateway, certificates, photos, monkeypatch, capsys):
    monkeypatch.setenv("RESNET_CA_CERT", str(certificates["ca"]))
    status, out, err = classify(capsys, tls_gateway.grpc_url, list(photos)[:1], "--json")
    assert status == 0, err
    assert json.loads(out)[0]["predictions"][0]["label"] == "red"


def test_the_http_api_metrics_and_demo_page_answer_over_https(tls_gateway, certificates):
    with httpx.Client(
        base_url=tls_gateway.http_url, verify=ssl.create_default_context(cafile=certificates["ca"])
    ) as web:
        assert web.get("/v2/health/ready").status_code == 200
        assert web.get("/v1/models").json()["models"]
        assert "resnet_requests_total" in web.get("/metrics").text
        assert web.get("/").headers["content-type"].startswith("text/html")


@pytest.mark.parametrize(
    ("url", "flags", "message"),
    [
        ("{https}", [], "(to trust a private CA or a self-signed server, give its PEM with --ca-cert)"),
        ("{grpcs}", [], "(to trust a private CA or a self-signed server, give its PEM with --ca-cert)"),
        ("{https}", ["--server", "triton"], "give its PEM with --ca-cert"),
        # the other scheme at a TLS port reads a handshake it cannot parse; the hint names the TLS scheme
        ("{http}", [], "if it speaks TLS, https://HOST:PORT)"),
        ("{grpc}", [], "if it speaks TLS, grpcs://HOST:PORT)"),
        # each TLS scheme at the other TLS port
        (
            "{grpcs_at_https}",
            ["--ca-cert", "{ca}"],
            "(that TLS port does not speak gRPC; for an HTTPS port use https://)",
        ),
        ("{https_at_grpcs}", ["--ca-cert", "{ca}"], "; if that is a gRPC port, use grpcs://HOST:PORT)"),
        ("{https}", ["--ca-cert", "{key}"], "bad --ca-cert: {key} holds no PEM certificate"),
        ("{https}", ["--ca-cert", "{missing}"], "bad --ca-cert: {missing} is not a file"),
        ("grpcs://127.0.0.1", [], "a gRPC address is grpcs://HOST:PORT, no path"),
    ],
)
def test_a_connection_that_cannot_be_trusted_is_one_line_naming_the_fix(
    tls_gateway, certificates, photos, capsys, tmp_path, url, flags, message
):
    values = {
        "https": tls_gateway.http_url,
        "grpcs": tls_gateway.grpc_url,
        "http": tls_gateway.http_url.replace("https://", "http://"),
        "grpc": tls_gateway.grpc_url.replace("grpcs://", "grpc://"),
        "grpcs_at_https": tls_gateway.http_url.replace("https://", "grpcs://"),
        "https_at_grpcs": tls_gateway.grpc_url.replace("grpcs://", "https://"),
        "key": str(certificates["key"]),
        "ca": str(certificates["ca"]),
        "missing": str(tmp_path / "missing.pem"),
    }
    flags = [flag.format(**values) for flag in flags]
    status, _, err = classify(capsys, url.format(**values), list(photos)[:1], *flags)
    assert status == 1 and err.startswith("resnet: error: ") and "\n" not in err, err
    assert message.format(**values) in err, err
    # the refused handshakes cost the gateway nothing
    trusted = ["--ca-cert", str(certificates["ca"])]
    assert classify(capsys, tls_gateway.grpc_url, list(photos)[:1], *trusted)[0] == 0


@pytest.mark.parametrize("scheme", ["https", "grpcs"])
def test_tls_to_a_port_without_it_says_so(photos, capsys, scheme):
    with other_web_server(200, "text/plain", b"plain HTTP") as url:
        status, _, err = classify(capsys, url.replace("http", scheme, 1), list(photos)[:1])
    assert status == 1 and "\n" not in err, err
    assert err.endswith("(that port does not speak TLS: use http:// or grpc://)"), err


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (
            {"ssl_certfile": "cert"},
            "ssl_certfile and ssl_keyfile go together: give both to serve TLS, or neither",
        ),
        ({"ssl_keyfile": "key"}, "ssl_certfile and ssl_keyfile go together"),
        ({"ssl_certfile": "missing", "ssl_keyfile": "key"}, "{missing} is not a file"),
        ({"ssl_certfile": "key", "ssl_keyfile": "key"}, "{key} holds no PEM certificate"),
        ({"ssl_certfile": "cert", "ssl_keyfile": "cert"}, "{cert} holds no PEM private key"),
        (
            {"ssl_certfile": "cert", "ssl_keyfile": "other_key"},
            "{other_key} is not the private key of {cert}'s",
        ),
        # OpenSSL would otherwise ask the terminal for the passphrase, or fail in uvicorn's start-up
        (
            {"ssl_certfile": "cert", "ssl_keyfile": "encrypted_key"},
            "{encrypted_key} is encrypted; give the key",
        ),
    ],
)
def test_certificate_files_that_cannot_serve_are_refused_at_start_up(certificates, tmp_path, files, message):
    paths = {
        **{name: str(path) for name, path in certificates.items()},
        "missing": str(tmp_path / "missing.pem"),
    }
    with pytest.raises(ValidationError, match=f"(?s)Value error, {re.escape(message.format(**paths))}"):
        Settings(**{field: paths[name] for field, name in files.items()})


def test_an_unreadable_key_is_named_not_a_traceback(certificates, monkeypatch):
    # as root (CI) every file is readable: stand in for a key mounted 0600 for root into the gateway's image
    read_bytes = Path.read_bytes

    def refuse_the_key(path: Path) -> bytes:
        if path == certificates["key"]:
            raise PermissionError(13, "Permission denied")
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", refuse_the_key)
    with pytest.raises(
        ValidationError, match=f"cannot read {re.escape(str(certificates['key']))}: Permission denied"
    ):
        Settings(ssl_certfile=str(certificates["cert"]), ssl_keyfile=str(certificates["key"]))


def test_empty_certificate_variables_mean_no_tls(monkeypatch):
    monkeypatch.setenv("RESNET_SSL_CERTFILE", "")
    monkeypatch.setenv("RESNET_SSL_KEYFILE", " ")
    assert Settings().ssl_certfile is None and Settings().ssl_keyfile is None


def test_serve_with_an_encrypted_key_is_one_line_not_a_passphrase_prompt(certificates, pipeline_repository):
    command = [sys.executable, "-m", "cli.main", "serve", "--repository", str(pipeline_repository)]
    command += [
        "--ssl-certfile",
        str(certificates["cert"]),
        "--ssl-keyfile",
        str(certificates["encrypted_key"]),
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 1
    assert result.stderr.startswith("resnet: error: invalid settings: ") and "is encrypted" in result.stderr
    assert result.stderr.count("\n") == 1


@pytest.mark.slow
@pytest.mark.parametrize("user", ["http", "kserve", "grpc"])
def test_the_load_test_runs_over_tls(tls_gateway, certificates, tmp_path, user):
    flags = {"http": [], "kserve": ["--kserve"], "grpc": ["--grpc", "--grpc-url", tls_gateway.grpc_url]}[user]
    out = tmp_path / user
    result = tls_loadtest(tls_gateway.http_url, out, *flags, "--ca-cert", str(certificates["ca"]))
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())["summary"]
    assert summary["requests"] > 5 and summary["failures"] == 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ([], "(to trust a private CA or a self-signed server, give its PEM with --ca-cert)"),
        (["--grpc", "--grpc-url", "{grpcs}"], "give its PEM with --ca-cert)"),
        (["--grpc", "--grpc-url", "{grpc}"], "(is --grpc-url the gRPC port of the gateway or Triton?)"),
    ],
)
def test_a_load_test_that_cannot_trust_the_server_stops_before_it_starts(
    tls_gateway, tmp_path, flags, message
):
    values = {"grpcs": tls_gateway.grpc_url, "grpc": tls_gateway.grpc_url.replace("grpcs://", "grpc://")}
    result = tls_loadtest(tls_gateway.http_url, tmp_path, *(flag.format(**values) for flag in flags))
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("resnet: error: cannot list models at ") and message in result.stderr


# --- Triton's gRPC over TLS, and the gateway reaching it ------------------------------------------------------


@pytest.fixture(scope="module")
def tls_triton(pipeline_repository, certificates, tmp_path_factory):
    """A real Triton serving gRPC over TLS (its HTTP port stays plain: Triton has no TLS there)."""
    pytest.importorskip("pytriton", reason="nvidia-pytriton (the bundled tritonserver) is not installed")
    from export.triton_server import TritonServer

    log_path = tmp_path_factory.mktemp("triton-tls-logs") / "triton.log"
    tls = (certificates["cert"], certificates["key"])
    with TritonServer(pipeline_repository, log_path=log_path, grpc_tls=tls) as server:
        yield server


@pytest.mark.slow
@pytest.mark.triton
def test_the_client_reaches_triton_over_tls(tls_triton, certificates, photos, capsys):
    url = f"grpcs://{tls_triton.grpc_url}"
    status, out, err = classify(capsys, url, list(photos), "--ca-cert", str(certificates["ca"]), "--json")
    assert status == 0, err
    assert {r["image"]: r["predictions"][0]["label"] for r in json.loads(out)} == photos
    status, _, err = classify(capsys, f"grpc://{tls_triton.grpc_url}", list(photos)[:1])
    assert status == 1 and "if it speaks TLS, grpcs://HOST:PORT" in err, err


@pytest.mark.slow
@pytest.mark.triton
@pytest.mark.parametrize(
    ("scheme", "trust", "ready", "message"),
    [
        ("grpcs", True, True, ""),
        (
            "grpcs",
            False,
            False,
            "(to trust a private CA or a self-signed server, give its PEM with --triton-ca-cert)",
        ),
        ("grpc", False, False, "if it speaks TLS, give --triton-url as grpcs://HOST:PORT)"),
    ],
)
def test_the_gateway_reaches_triton_over_tls(
    tls_triton, certificates, photos, tmp_path, capsys, scheme, trust, ready, message
):
    flags = ["--backend", "triton", "--triton-url", f"{scheme}://{tls_triton.grpc_url}"]
    flags += ["--triton-ca-cert", str(certificates["ca"])] if trust else []
    with gateway_process(tmp_path, *flags, ready_path="/healthz") as gateway:
        readiness = httpx.get(f"{gateway.http_url}/readyz", timeout=10)
        if not ready:
            assert readiness.status_code == 503 and message in readiness.json()["error"]["message"]
            return
        assert readiness.status_code == 200, readiness.text
        status, out, err = classify(capsys, gateway.http_url, list(photos), "--json")
    assert status == 0, err
    assert {r["image"]: r["predictions"][0]["label"] for r in json.loads(out)} == photos


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"triton_url": "grpc://triton:8001", "triton_ca_cert": "ca"},
            "triton_ca_cert is for a Triton reached over",
        ),
        ({"triton_url": "triton:8001", "triton_ca_cert": "ca"}, "give triton_url as grpcs:// or https://"),
        ({"triton_url": "grpcs://triton:8001", "triton_ca_cert": "key"}, "{key} holds no PEM certificate"),
        (
            {"triton_url": "grpcs://triton:8001", "triton_protocol": "http"},
            "is grpcs but triton_protocol is 'http'",
        ),
        # the gateway's client certificate for a Triton with mutual TLS (tests/test_mutual_tls.py)
        (
            {"triton_url": "grpcs://triton:8001", "triton_client_cert": "client_cert"},
            "triton_client_cert and triton_client_key go together",
        ),
        (
            {
                "triton_url": "grpc://triton:8001",
                "triton_client_cert": "client_cert",
                "triton_client_key": "client_key",
            },
            "triton_client_cert is for a Triton reached over TLS: give triton_url as grpcs:// or https://",
        ),
        (
            {
                "triton_url": "grpcs://triton:8001",
                "triton_client_cert": "client_cert",
                "triton_client_key": "stranger_key",
            },
            "{stranger_key} is not the private key of {client_cert}'s certificate",
        ),
    ],
)
def test_triton_tls_settings_that_cannot_work_are_refused(certificates, settings, message):
    paths = {name: str(path) for name, path in certificates.items()}
    given = {key: paths.get(value, value) for key, value in settings.items()}
    with pytest.raises(ValidationError, match=re.escape(message.format(**paths))):
        Settings(**given)


def test_a_tls_scheme_on_the_triton_url_turns_tls_on(monkeypatch, certificates):
    over_grpc = Settings(triton_url="grpcs://triton:8001", triton_ca_cert=str(certificates["ca"]))
    assert (over_grpc.triton_url, over_grpc.triton_protocol, over_grpc.triton_tls) == (
        "triton:8001",
        "grpc",
        True,
    )
    monkeypatch.setenv("RESNET_TRITON_URL", "https://triton:8443")
    assert (Settings().triton_protocol, Settings().triton_tls) == ("http", True)
    assert Settings(triton_url="triton:8001").triton_tls is False


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--ssl-certfile", "{cert}"], "--ssl-certfile and --ssl-keyfile go together"),
        (
            ["--ssl-certfile", "{cert}", "--ssl-keyfile", "{encrypted_key}"],
            "cannot serve gRPC over TLS: {encrypted_key} is",
        ),
        (
            ["--ssl-certfile", "{cert}", "--ssl-keyfile", "{other_key}"],
            "{other_key} is not the private key of",
        ),
        # mutual TLS (tests/test_mutual_tls.py)
        (
            ["--ssl-client-ca", "{ca}"],
            "a client CA (--ssl-client-ca) asks gRPC clients for certificates over TLS",
        ),
        (
            ["--ssl-certfile", "{cert}", "--ssl-keyfile", "{key}", "--ssl-client-ca", "{key}"],
            "cannot check client certificates: {key} holds no PEM certificate",
        ),
    ],
)
def test_triton_serve_with_tls_files_that_cannot_work_is_one_line(
    certificates, pipeline_repository, capsys, flags, message
):
    paths = {name: str(path) for name, path in certificates.items()}
    args = [
        "triton",
        "serve",
        "--repository",
        str(pipeline_repository),
        *(flag.format(**paths) for flag in flags),
    ]
    assert resnet(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("resnet: error: ") and "\n" not in err and message.format(**paths) in err, err


@pytest.mark.slow
@pytest.mark.triton
def test_the_gateway_reaches_triton_http_behind_a_tls_proxy(
    tls_triton, certificates, photos, tmp_path, capsys
):
    # Triton's HTTP port has no TLS of its own: an ingress in front of it gives it one
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(certificates["cert"], certificates["key"])
    with path_prefix_proxy(tls_triton.http_url, "", tls=server_side) as proxy:
        flags = ["--backend", "triton", "--triton-url", proxy, "--triton-ca-cert", str(certificates["ca"])]
        with gateway_process(tmp_path, *flags) as gateway:
            status, out, err = classify(capsys, gateway.http_url, list(photos), "--json")
    assert status == 0, err
    assert {r["image"]: r["predictions"][0]["label"] for r in json.loads(out)} == photos
