"""`resnet triton serve`: run a Triton Inference Server on a model repository, and `TritonServer` for code.

The server is a `tritonserver` on PATH, else the one bundled in the nvidia-pytriton wheel (Triton 2.51 with only
the Python backend). For the bundled one this module does what the wheel leaves to the caller: puts the Python
3.11 backend stub into `backends/python/`, puts the wheel's `nvidia_pytriton.libs` on LD_LIBRARY_PATH, and sets
PYTHONPATH so the stub (an embedded system Python) imports this venv's numpy<2 and onnxruntime and our `server`
package (the preprocess model reuses `server.preprocessing`). With numpy 2 the Python backend returns empty
outputs; pyproject pins numpy<2.

    with TritonServer("model_repository") as triton:
        client = tritonclient.grpc.InferenceServerClient(triton.grpc_url)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import cli.processes
from cli.errors import Terminated, raise_terminated
from cli.ports import check_port_free, free_ports
from cli.tls import check_authorities, check_key_pair
from export.errors import TritonError
from export.repository import unfinished_publish_warning, versions

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = Path(os.environ.get("RESNET_CACHE_DIR", Path.home() / ".cache" / "resnet-serving"))
STUB_NAME = "triton_python_backend_stub"


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backend_dir: Path | None  # None: the binary's built-in default (/opt/tritonserver/backends)
    library_path: Path | None


def find_tritonserver() -> TritonInstall:
    """A `tritonserver` on PATH (e.g. NGC image), else the nvidia-pytriton wheel's, made runnable."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return TritonInstall(Path(on_path), None, None)
    try:
        import pytriton
    except ImportError as error:
        raise TritonError(
            "no tritonserver on PATH and nvidia-pytriton is not installed (pip install -e '.[triton]')"
        ) from error
    root = Path(pytriton.__file__).parent / "tritonserver"
    binary = root / "bin" / "tritonserver"
    if not binary.is_file():
        raise TritonError(f"nvidia-pytriton has no tritonserver binary at {binary}")
    return TritonInstall(
        binary, _backends_with_stub(root), Path(pytriton.__file__).parents[1] / "nvidia_pytriton.libs"
    )


def _backends_with_stub(root: Path) -> Path:
    """backends/ whose python/ holds the stub for this interpreter; a writable copy if the wheel's is read-only."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / STUB_NAME
    if not stub.is_file():
        raise TritonError(f"nvidia-pytriton has no Python backend stub for Python {version}")
    backends = root / "backends"
    for candidate in (backends, CACHE_DIR / "triton-backends"):
        target = candidate / "python" / STUB_NAME
        try:
            if candidate != backends and not (candidate / "python" / "libtriton_python.so").is_file():
                shutil.copytree(backends, candidate, dirs_exist_ok=True)
            if not target.is_file():
                partial = target.with_suffix(".partial")
                shutil.copy2(stub, partial)
                os.replace(partial, target)
            return candidate
        except OSError:
            continue
    raise TritonError(f"cannot install the Python backend stub into {backends} or {CACHE_DIR}")


def triton_environment(install: TritonInstall) -> dict[str, str]:
    env = dict(os.environ)
    if install.library_path:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            filter(None, [str(install.library_path), env.get("LD_LIBRARY_PATH")])
        )
    # The stub embeds libpython and finds its prefix through the first `python3` on PATH: put this interpreter's
    # bin/ first (without it, an unactivated venv's numpy is invisible to the stub even with PYTHONPATH set),
    # and point PYTHONPATH at the venv's packages and our repo.
    env["PATH"] = os.pathsep.join(filter(None, [str(Path(sys.executable).parent), env.get("PATH")]))
    python_path = [
        str(REPO_ROOT),
        sysconfig.get_paths()["purelib"],
        sysconfig.get_paths()["platlib"],
        env.get("PYTHONPATH"),
    ]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(filter(None, python_path)))
    return env


class TritonServer:
    """A tritonserver process on `repository`; ports default to free ones. Use as a context manager.

    Attributes after start: `http_url` ("http://host:port"), `http_address` ("host:port", what
    tritonclient.http takes), `grpc_url` ("host:port", what tritonclient.grpc takes), `metrics_url`.
    `models` limits loading to those names (explicit model control); None loads the whole repository.
    `grpc_tls` (certificate chain, key) serves gRPC over TLS; `grpc_url` stays host:port. `grpc_client_ca` (PEM
    authorities) asks every gRPC client for a certificate from them (mutual TLS).
    """

    def __init__(
        self,
        repository: str | Path,
        *,
        host: str = "127.0.0.1",
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        models: list[str] | None = None,
        startup_timeout: float = 180,
        log_path: Path | None = None,
        log_verbose: int = 0,
        stream_log: bool = False,
        grpc_host: str | None = None,
        grpc_tls: tuple[Path, Path] | None = None,
        grpc_client_ca: Path | None = None,
    ):
        self.repository = Path(repository).resolve()
        self.host = host
        self.grpc_host = grpc_host or host
        given = (http_port, grpc_port, metrics_port)
        missing = given.count(None) + given.count(0)
        # 3 more than needed: enough left whatever was given
        spare = iter([port for port in free_ports(missing + 3, host) if port not in given] if missing else [])
        self.http_port = http_port or next(spare)
        self.grpc_port = grpc_port or next(spare)
        self.metrics_port = metrics_port or next(spare)
        self.models = models
        # (certificate chain, key): gRPC over TLS; Triton's HTTP has no TLS of its own
        self.grpc_tls = grpc_tls
        self.grpc_client_ca = grpc_client_ca
        self.startup_timeout = startup_timeout
        self.log_verbose = log_verbose
        self.stream_log = stream_log
        # None: a temporary file made at start and removed at stop (a start-up failure quotes its errors); made at
        # construction and kept, one was left in /tmp by every server, even those refused before starting
        self.log_path = Path(log_path) if log_path else None
        self._temporary_log = log_path is None
        self.process: subprocess.Popen | None = None

    @property
    def http_address(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.http_address}"

    @property
    def grpc_url(self) -> str:
        return f"{self.grpc_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def command(self, install: TritonInstall) -> list[str]:
        cmd = [
            str(install.binary),
            f"--model-repository={self.repository}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.grpc_host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--exit-timeout-secs=10",
            f"--log-verbose={self.log_verbose}",
        ]
        if install.backend_dir:
            cmd.append(f"--backend-directory={install.backend_dir}")
        if self.grpc_tls:
            certfile, keyfile = self.grpc_tls
            cmd += ["--grpc-use-ssl=true", f"--grpc-server-cert={certfile}", f"--grpc-server-key={keyfile}"]
        if self.grpc_client_ca:  # preempts --grpc-use-ssl, with the same certificate and key
            cmd += ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={self.grpc_client_ca}"]
        if self.models is not None:
            cmd += ["--model-control-mode=explicit", *(f"--load-model={name}" for name in self.models)]
        return cmd

    def start(self) -> TritonServer:
        self._check_before_start()
        install = find_tritonserver()
        if not self.stream_log and self.log_path is None:
            handle, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(handle)
            self.log_path = Path(name)
        output = None if self.stream_log else open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self._log_handle = output
        self.process = subprocess.Popen(
            cli.processes.ending_with_this_process(self.command(install)),
            env=triton_environment(install),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _check_client_ca(self) -> None:
        if not self.grpc_tls:  # client certificates are asked for only in a TLS handshake
            raise TritonError(
                "a client CA (--ssl-client-ca) asks gRPC clients for certificates over TLS: give the server's own "
                "certificate and key too (--ssl-certfile, --ssl-keyfile)"
            )
        try:
            check_authorities(self.grpc_client_ca)
        except ValueError as error:
            raise TritonError(f"cannot check client certificates: {error}") from None

    def _check_before_start(self) -> None:
        """What tritonserver would refuse only after loading (or with its whole usage text), in one line."""
        if not self.repository.is_dir():
            raise TritonError(f"model repository not found: {self.repository}")
        held = sorted(folder.name for folder in self.repository.iterdir() if _is_model_folder(folder))
        if not held:
            raise TritonError(
                f"{self.repository} holds no models (no <model>/config.pbtxt or <model>/<version>/)"
            )
        unfinished = unfinished_publish_warning(self.repository)
        if unfinished:  # Triton may refuse a model a killed export left with a version and no config
            print(f"warning: {unfinished}", file=sys.stderr, flush=True)
        if self.grpc_tls:  # tritonserver would fail only after loading every model, or serve gRPC without TLS
            try:
                check_key_pair(*self.grpc_tls)
            except ValueError as error:
                raise TritonError(f"cannot serve gRPC over TLS: {error}") from None
        if self.grpc_client_ca:
            self._check_client_ca()
        missing = [name for name in self.models or [] if name not in held]
        if missing:
            raise TritonError(
                f"no model {', '.join(map(repr, missing))} in {self.repository}; it holds {', '.join(held)}"
            )
        addresses = {
            (self.host, self.http_port),
            (self.grpc_host, self.grpc_port),
            (self.host, self.metrics_port),
        }
        if len(addresses) < 3:
            raise TritonError(
                f"the HTTP, gRPC and metrics ports must differ, got {self.http_port}, {self.grpc_port} and "
                f"{self.metrics_port}"
            )
        for what, host, port, host_flag in (
            ("HTTP", self.host, self.http_port, "--http-address"),
            ("gRPC", self.grpc_host, self.grpc_port, "--grpc-address"),
            ("metrics", self.host, self.metrics_port, "--http-address"),
        ):  # tritonserver would say so only after loading every model
            check_port_free(host, port, what, f"--{what.lower()}-port", TritonError, host_flag)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TritonError(
                    f"tritonserver exited with {self.process.returncode} while starting: {self.log_tail()}"
                )
            if self.ready():
                return
            time.sleep(0.25)
        raise TritonError(f"tritonserver not ready after {self.startup_timeout:.0f}s: {self.log_tail()}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, lines: int = 5) -> str:
        if self.stream_log or self.log_path is None or not self.log_path.is_file():
            return "see its output above"
        errors = [
            line for line in self.log_path.read_text(errors="replace").splitlines() if line.startswith("E")
        ]
        return " | ".join((errors or self.log_path.read_text(errors="replace").splitlines())[-lines:])

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            # SIGTERM to tritonserver alone: it unloads its models, which stops their Python stubs. Signalling the
            # whole group kills the stubs first and Triton then waits out --exit-timeout-secs for them.
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)  # any stub left behind
        if getattr(self, "_log_handle", None):
            self._log_handle.close()
            self._log_handle = None
        if self._temporary_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
            self.log_path = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


# --- CLI ---------------------------------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="resnet triton",
        description="Run a Triton Inference Server on a model repository (the bundled CPU build unless a "
        "tritonserver is on PATH). Ctrl-C or SIGTERM shuts it down cleanly.",
    )
    commands = parser.add_subparsers(dest="action", required=True, metavar="serve")
    serve = commands.add_parser(
        "serve",
        help="start tritonserver and wait until it is ready",
        description="Start tritonserver on a model repository, print its URLs once ready, "
        "serve until Ctrl-C or SIGTERM.",
    )
    serve.add_argument(
        "--repository",
        type=Path,
        default=Path(env("RESNET_MODEL_REPOSITORY", "model_repository")),
        help="model repository folder (env RESNET_MODEL_REPOSITORY; default: %(default)s)",
    )
    serve.add_argument(
        "--http-address",
        default=env("RESNET_TRITON_HOST", "127.0.0.1"),
        help="address for HTTP and metrics; 0.0.0.0 for all interfaces "
        "(env RESNET_TRITON_HOST; default: %(default)s)",
    )
    serve.add_argument("--grpc-address", default=None, help="gRPC address (default: the --http-address)")
    serve.add_argument(
        "--http-port",
        type=port_number,
        default=int(env("RESNET_TRITON_HTTP_PORT", "8000")),
        help="HTTP/REST port (env RESNET_TRITON_HTTP_PORT; default: %(default)s)",
    )
    serve.add_argument(
        "--grpc-port",
        type=port_number,
        default=int(env("RESNET_TRITON_GRPC_PORT", "8001")),
        help="gRPC port (env RESNET_TRITON_GRPC_PORT; default: %(default)s)",
    )
    serve.add_argument(
        "--metrics-port",
        type=port_number,
        default=int(env("RESNET_TRITON_METRICS_PORT", "8002")),
        help="Prometheus metrics port (env RESNET_TRITON_METRICS_PORT; default: %(default)s)",
    )
    serve.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="NAME",
        help="load only this model (repeatable; default: every model in the repository)",
    )
    serve.add_argument(
        "--ssl-certfile",
        type=Path,
        default=env("RESNET_TRITON_SSL_CERTFILE") or None,
        help="PEM certificate (chain) to serve gRPC over TLS, with --ssl-keyfile; Triton's HTTP port stays plain "
        "(keep --http-address on loopback) (env RESNET_TRITON_SSL_CERTFILE)",
    )
    serve.add_argument(
        "--ssl-keyfile",
        type=Path,
        default=env("RESNET_TRITON_SSL_KEYFILE") or None,
        help="PEM private key of --ssl-certfile, not encrypted (env RESNET_TRITON_SSL_KEYFILE)",
    )
    serve.add_argument(
        "--ssl-client-ca",
        type=Path,
        default=env("RESNET_TRITON_SSL_CLIENT_CA") or None,
        help="PEM authorities to accept gRPC client certificates from: every gRPC client must then present one "
        "(mutual TLS; with --ssl-certfile; env RESNET_TRITON_SSL_CLIENT_CA)",
    )
    serve.add_argument(
        "--startup-timeout",
        type=positive_seconds,
        default=180,
        help="seconds to wait for readiness (default: %(default)s)",
    )
    serve.add_argument(
        "--log-verbose", type=int, default=0, help="tritonserver --log-verbose level (default: 0)"
    )
    return parser


def port_number(text: str) -> int:
    """An argparse type: a TCP port tritonserver can bind (it takes no 0 for "any free port")."""
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1-65535)")
    return port


def _is_model_folder(folder: Path) -> bool:
    """A config, or a numbered version folder (Triton can complete an ONNX model's config itself)."""
    return (folder / "config.pbtxt").is_file() or bool(versions(folder))


def positive_seconds(text: str) -> float:
    """An argparse type: a wait in seconds, more than 0."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return seconds


def main(args: argparse.Namespace) -> int:
    if (args.ssl_certfile is None) != (args.ssl_keyfile is None):
        raise TritonError("--ssl-certfile and --ssl-keyfile go together: give both to serve gRPC over TLS")
    server = TritonServer(
        args.repository,
        host=args.http_address,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        models=args.models,
        startup_timeout=args.startup_timeout,
        log_verbose=args.log_verbose,
        stream_log=True,
        grpc_host=args.grpc_address,
        grpc_tls=(args.ssl_certfile, args.ssl_keyfile) if args.ssl_certfile else None,
        grpc_client_ca=args.ssl_client_ca,
    )
    # SIGTERM (docker stop, systemd) is a normal shutdown, at any moment: unwind through TritonServer.stop().
    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        with server:
            grpc = f"grpcs://{server.grpc_url}" if server.grpc_tls else server.grpc_url
            print(
                f"Triton ready: HTTP {server.http_url}  gRPC {grpc}  metrics {server.metrics_url}", flush=True
            )
            try:
                status = server.process.wait()
            except KeyboardInterrupt:
                print("stopping Triton...", file=sys.stderr, flush=True)
                return 0
    except Terminated:
        print("stopping Triton (SIGTERM)...", file=sys.stderr, flush=True)
        return 0
    raise TritonError(f"tritonserver exited on its own with status {status}")
