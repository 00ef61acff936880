"""Helpers for tests that run real processes on loopback: free ports, readiness polling, clean shutdown; and small
threaded web servers for what stands in front of or beside them (another service's port, a path-prefix proxy)."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import resource
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

import cli.processes
from cli.ports import free_port, free_ports
from export.repository import LOCK_FILENAME

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RESNET_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
VENV_BIN = Path(sys.executable).parent


def files_of_at_most(size: int) -> Callable[[], None]:
    """For subprocess's preexec_fn: no file of the process may grow past `size` bytes. A write past it fails with
    EFBIG as one on a full disk fails with ENOSPC (Python ignores SIGXFSZ), in real files, by the real writers."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))


def wait_until(
    predicate: Callable[[], bool], timeout: float, interval: float = 0.1, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"{what} not met within {timeout:.0f}s")


def metric(text: str, name: str, default: float | None = None) -> float:
    """One sample's value from a Prometheus text page (`default`, if given, when the sample is absent)."""
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    if match is None and default is not None:
        return default
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def revocation_list(certificates: dict[str, Path], revoked: list[str], due_in_days: float = 7) -> bytes:
    """A PEM revocation list of the `certificates` fixture's CA revoking the certificates of the `revoked` owners,
    due for renewal in `due_in_days` (below 0: expired)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    authority = x509.load_pem_x509_certificate(certificates["ca"].read_bytes())
    key = serialization.load_pem_private_key(certificates["ca_key"].read_bytes(), password=None)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(authority.subject)
        .last_update(now - datetime.timedelta(days=30))
        .next_update(now + datetime.timedelta(days=due_in_days))
    )
    for owner in revoked:
        certificate = x509.load_pem_x509_certificate(certificates[f"{owner}_cert"].read_bytes())
        revocation = x509.RevokedCertificateBuilder().serial_number(certificate.serial_number)
        builder = builder.add_revoked_certificate(revocation.revocation_date(now).build())
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)  # type: ignore[arg-type]


def json_log(path: Path, logger: str | None = None) -> list[dict]:
    """The records of a `--log-format json` log, only `logger`'s if given."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [record for record in records if logger in (None, record["logger"])]


def http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


@contextlib.contextmanager
def running_process(
    cmd: list[str],
    ready_url: str | None = None,
    timeout: float = 60,
    env: dict[str, str] | None = None,
    log_path: Path | None = None,
    tls: ssl.SSLContext | None = None,
) -> Iterator[subprocess.Popen]:
    """Start `cmd`, wait until `ready_url` answers 2xx (an https:// one trusting `tls`), yield the process, then
    SIGTERM (SIGKILL after 10 s)."""
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL
    process = subprocess.Popen(
        cli.processes.ending_with_this_process(cmd),
        env={**os.environ, **(env or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        if ready_url:

            def ready() -> bool:
                if process.poll() is not None:
                    raise RuntimeError(f"{cmd[0]} exited with {process.returncode} before it was ready")
                return http_ok(ready_url, tls)

            wait_until(ready, timeout, what=f"{ready_url} ready")
        yield process
    finally:
        stop_process(process)
        if log_path:
            log.close()


def repository_tree(folder: Path) -> dict[str, bytes | None]:
    """Every file and folder under a model repository, with the files' contents; but its lock file, which the first
    export makes and every export keeps (no server reads it)."""
    return {
        str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
        for p in folder.rglob("*")
        if p.name != LOCK_FILENAME
    }


def permission_denied(path, *args, **kwargs):
    """In place of a file operation (monkeypatched): what a folder another user owns answers."""
    raise PermissionError(13, "Permission denied", str(path))


def killed_when_ready(script: str, *args: str, ready: str) -> int:
    """Run `script` (Python) until it prints `ready`, then SIGKILL it, as the OOM killer would; its pid."""
    process = subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO_ROOT, stdout=subprocess.PIPE)
    try:
        assert process.stdout.readline().decode() == f"{ready}\n"
    finally:
        process.kill()
        process.wait(10)
    return process.pid


def children_of(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def has_ended(pid: int) -> bool:
    """Whether process `pid` has exited (a zombie no one has reaped yet has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def stop_process(process: subprocess.Popen, grace: float = 10) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def running_gateway(
    *flags: str,
    log_path: Path | None = None,
    timeout: float = 120,
    env: dict[str, str] | None = None,
    open_files: tuple[int, int] | None = None,
) -> Iterator[tuple[str, subprocess.Popen]]:
    """A real `resnet serve` on a free loopback port (gRPC off unless `flags` set it); yields (base URL, process).
    `open_files`: its (soft, hard) limit of open files, as a shell's `ulimit -n` or systemd's LimitNOFILE= set it."""
    taken = int(flags[flags.index("--grpc-port") + 1]) if "--grpc-port" in flags else None
    port = next(port for port in free_ports(2) if port != taken)
    limit = ["prlimit", f"--nofile={open_files[0]}:{open_files[1]}"] if open_files else []
    command = [*limit, sys.executable, "-m", "cli.main", "serve", "--host", "127.0.0.1", "--port", str(port)]
    if "--grpc-port" not in flags:
        command += ["--grpc-port", "0"]
    url = f"http://127.0.0.1:{port}"
    with running_process(
        command + list(flags), ready_url=f"{url}/readyz", timeout=timeout, env=env, log_path=log_path
    ) as process:
        yield url, process


def models_served(url: str) -> dict[str, str]:
    """A gateway's models and the version of each, from GET /v1/models."""
    return {model["name"]: model["versions"][0] for model in httpx.get(f"{url}/v1/models").json()["models"]}


def status_and_version(answer: httpx.Response) -> tuple[int, str | None]:
    return answer.status_code, answer.json().get("version")


@contextlib.contextmanager
def requests_meanwhile(
    send: Callable[[], Any], read: Callable[[Any], Any] = status_and_version
) -> Iterator[list]:
    """`send` a classify request after another in a thread while the block runs: what `read` takes from each
    answer, by default (status, version)."""
    answers: list = []
    done = threading.Event()

    def send_until_done() -> None:
        while not done.is_set():
            answers.append(read(send()))

    thread = threading.Thread(target=send_until_done)
    thread.start()
    try:
        yield answers
    finally:
        done.set()
        thread.join()


def torchrun_train_command(processes: int = 2) -> list[str]:
    """`torchrun ... resnet train` on one node over loopback (gloo on CPU); append the train flags."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(processes),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "cli.main", "train",
    ]  # fmt: skip


@contextlib.contextmanager
def threaded_http_server(
    handler: type[BaseHTTPRequestHandler], tls: ssl.SSLContext | None = None
) -> Iterator[str]:
    """`handler` serving on a free loopback port in a thread (over TLS with `tls`, a server context); its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if tls:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def other_web_server(status: int, content_type: str, body: bytes) -> Iterator[str]:
    """A web server that is neither the gateway nor Triton, answering every request alike; its URL."""

    class Handler(QuietHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET

    with threaded_http_server(Handler) as url:
        yield url


# what a URL that is neither the gateway nor Triton may answer (another service at that port)
OTHER_SERVERS = {
    "web page": (404, "text/html", b"<!DOCTYPE html>\n<html><p>Nothing matches the given URI.</p></html>\n"),
    # Triton's metrics port, on any path but /metrics
    "metrics port": (200, "text/plain; charset=utf-8", b""),
    "other JSON": (200, "application/json", b'{"models": "all of them"}'),
}


@contextlib.contextmanager
def path_prefix_proxy(target: str, prefix: str, tls: ssl.SSLContext | None = None) -> Iterator[str]:
    """A reverse proxy that serves `target` under `prefix` (over TLS with `tls`), as an ingress does; its URL."""
    hop_by_hop = {"host", "content-length", "transfer-encoding", "connection", "content-encoding"}

    class Proxy(QuietHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as tritonclient.http expects

        def do_GET(self) -> None:
            if not self.path.startswith(f"{prefix}/"):
                self.send_error(404)
                return
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            headers = {key: value for key, value in self.headers.items() if key.lower() not in hop_by_hop}
            reply = httpx.request(
                self.command, target + self.path[len(prefix) :], content=body, headers=headers
            )
            self.send_response(reply.status_code)
            for key, value in reply.headers.items():
                if key.lower() not in hop_by_hop:  # httpx has inflated the body
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(reply.content)))
            self.end_headers()
            self.wfile.write(reply.content)

        do_POST = do_GET

    with threaded_http_server(Proxy, tls) as url:
        yield url


def tls_loadtest(url: str, out: Path, *flags: str) -> subprocess.CompletedProcess:
    """A 3-second `resnet loadtest` of the gateway at `url` that fails on any failed request, with only the TLS
    files `flags` name (none from this shell's RESNET_* variables)."""
    command = [sys.executable, "-m", "cli", "loadtest", "--url", url, "--users", "2"]
    command += ["--duration", "3s", "--max-fail-ratio", "0", "--out", str(out), *flags]
    tls_variables = ("RESNET_CA_CERT", "RESNET_CLIENT_CERT", "RESNET_CLIENT_KEY")
    env = {key: value for key, value in os.environ.items() if key not in tls_variables}
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, env=env)


def renew(target: Path, source: Path) -> None:
    """Replace `target` with a copy of `source` in one step, as cert-manager and certbot do (write aside, rename
    over)."""
    aside = target.with_suffix(".new")
    shutil.copy(source, aside)
    os.replace(aside, target)
