"""`resnet bench`: the benchmark suite; regenerates docs/benchmarks.md, docs/benchmarks.json and docs/img/.

One run, one model, one machine, in this order:
1. Runtime comparison: PyTorch eager, ONNX Runtime FP32 and INT8 (export.benchmark) and the bundled Triton
   (the same FP32 ONNX in its Python backend) at several batch sizes, one request at a time.
2. Gateway efficiency: end-to-end images/s through the gateway (JPEG in, top-5 JSON out, an async HTTP
   client keeping --concurrency requests in flight) against the raw runtime: the same photos decoded,
   preprocessed (the gateway's own `server.preprocessing`) and inferred in-process by an ONNX Runtime session
   with the same threads, at its best batch size. Batching on and off, and a sweep of the batching delay.
3. Naive baseline: FastAPI + PyTorch eager, one forward per request (loadtest/naive_server.py), same client,
   same concurrency, same photos.
4. gRPC vs HTTP: the same gateway process answering the same photos over both protocols
   (server.grpc_bench), at several concurrencies.
5. Load test: a Locust ramp against the gateway (skipped with --quick).
Every figure in docs/benchmarks.md comes from this command (rendered by loadtest/bench_report.py); sections
of the page that other parts of the project own are kept as they are.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shlex
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

import cli.files
import cli.processes
from cli.errors import ResnetError, raise_terminated
from cli.help import HelpFormatter
from cli.limits import MAX_THREADS
from cli.ports import free_port, free_ports
from loadtest.bench_report import efficiency, plot_delay_sweep, write_markdown
from loadtest.images import IMAGES_SENT, check_folder, load_images

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLED_MODEL = "resnet20_cifar10"
LOADTEST_USERS = 32  # Locust's own CPU use grows with users; on 2 shared cores 32 already passes the knee
TRITON_VERSION = [""]  # filled from the server's own metadata when the runtime comparison starts it
ARCH_MODEL_NAMES = {"resnet20": BUNDLED_MODEL, "resnet50": "resnet50_imagenet"}


class BenchError(ResnetError):
    pass


@dataclass
class BenchPlan:
    arch: str
    quick: bool
    concurrency: int
    threads: int
    seconds: float  # measurement window of each HTTP point
    warmup_s: float
    runtime_seconds: float  # per runtime x batch cell
    raw_window_s: float  # raw-runtime windows measured beside each server
    batch_sizes: tuple[int, ...]
    delays_ms: tuple[float, ...]
    loadtest_s: float

    @classmethod
    def make(cls, args: argparse.Namespace) -> BenchPlan:
        threads = args.threads or max(1, os.cpu_count() or 1)
        if args.quick:
            return cls(
                args.arch, True, args.concurrency or 16, threads, 3.0, 1.0, 0.4, 1.0, (1, 8), (2.0,), 0.0
            )
        return cls(
            args.arch,
            False,
            args.concurrency or 64,
            threads,
            12.0,
            3.0,
            3.0,
            3.0,
            (1, 8, 32),
            (0.5, 2.0, 5.0, 10.0),
            64.0,
        )


@dataclass
class LoadResult:
    label: str
    concurrency: int
    requests: int
    errors: int
    images_per_s: float
    p50_ms: float
    p99_ms: float
    client_cores: float = 0.0  # CPU the load generator itself used, in cores
    extra: dict = field(default_factory=dict)


# --- the model under test ----------------------------------------------------------------------------------


@dataclass
class ModelUnderTest:
    repository: Path
    name: str
    arch: str
    onnx: Path
    checkpoint: Path | None
    source: str  # what the weights are, for the report


def latest_onnx(model_dir: Path) -> Path | None:
    versions = (
        sorted((int(p.name), p) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
        if model_dir.is_dir()
        else []
    )
    for _, folder in reversed(versions):
        if (folder / "model.onnx").is_file():
            return folder / "model.onnx"
    return None


def prepare_model(arch: str, repository: Path, scratch: Path, threads: int) -> ModelUnderTest:
    """The bundled repository's model when it has one for `arch`; otherwise a random-weight export in scratch."""
    import shutil

    name = ARCH_MODEL_NAMES.get(arch, arch)
    onnx = latest_onnx(repository / name)
    if onnx is not None:
        # A snapshot: a publish or re-export into the repository during the run must not change what is measured.
        snapshot = scratch / "model_repository" / name
        shutil.copytree(repository / name, snapshot, ignore=shutil.ignore_patterns(".partial-*"))
        checkpoint = next(iter(sorted(snapshot.glob("*.pt"))), None)
        return ModelUnderTest(
            snapshot.parent,
            name,
            arch,
            latest_onnx(snapshot),
            checkpoint,
            f"bundled `{repository.name}/{name}`, version {latest_onnx(snapshot).parent.name}",
        )
    from export.source import from_arch
    from export.workflow import ExportOptions, export_to_repository

    target = scratch / "model_repository"
    export_to_repository(
        from_arch(arch, "random"),
        ExportOptions(name=name, repository=target, cpu_threads=threads, measure_latency=False),
    )
    return ModelUnderTest(
        target, name, arch, latest_onnx(target / name), None, "random weights, exported for this run"
    )


# --- 1. runtimes -----------------------------------------------------------------------------------------


def bench_runtimes(plan: BenchPlan, model: ModelUnderTest, scratch: Path) -> list[dict]:
    from export.benchmark import benchmark_runtimes

    rows = [
        asdict(r)
        for r in benchmark_runtimes(
            plan.arch, plan.batch_sizes, plan.threads, plan.runtime_seconds, workdir=scratch
        )
    ]
    rows += bench_triton(plan, model)
    return rows


def bench_triton(plan: BenchPlan, model: ModelUnderTest) -> list[dict]:
    """The classifier in the bundled Triton (Python backend running ONNX Runtime), over gRPC on loopback."""
    import tritonclient.grpc as grpcclient

    from export.triton_server import TritonServer
    from server.spec import INPUT_NAME, OUTPUT_NAME

    crop = _crop(model)
    rng = np.random.default_rng(0)
    rows = []
    with TritonServer(model.repository, models=[model.name]) as triton:
        client = grpcclient.InferenceServerClient(triton.grpc_url)
        TRITON_VERSION[0] = client.get_server_metadata().version
        for batch in plan.batch_sizes:
            inputs = rng.standard_normal((batch, 3, crop, crop), dtype=np.float32)
            tensor = grpcclient.InferInput(INPUT_NAME, list(inputs.shape), "FP32")
            tensor.set_data_from_numpy(inputs)
            wanted = [grpcclient.InferRequestedOutput(OUTPUT_NAME)]
            timings = _time_calls(
                lambda t=tensor, w=wanted: client.infer(model.name, [t], outputs=w), plan.runtime_seconds
            )
            rows.append(
                {
                    "runtime": "Triton (CPU, Python backend + ORT FP32)",
                    "batch": batch,
                    "images_per_s": batch / float(np.mean(timings)),
                    "p50_ms": float(np.median(timings)) * 1000,
                }
            )
        client.close()
    return rows


def _time_calls(call, min_seconds: float, min_repeats: int = 3) -> list[float]:
    call()  # warm-up
    timings: list[float] = []
    deadline = time.perf_counter() + min_seconds
    while len(timings) < min_repeats or time.perf_counter() < deadline:
        start = time.perf_counter()
        call()
        timings.append(time.perf_counter() - start)
    return timings


def _crop(model: ModelUnderTest) -> int:
    import onnx

    shape = onnx.load(str(model.onnx), load_external_data=False).graph.input[0].type.tensor_type.shape
    return int(shape.dim[2].dim_value)


# --- 2. raw runtime and gateway ----------------------------------------------------------------------------


def _spec(model: ModelUnderTest):
    from export.repository import read_config
    from server.spec import PreprocessSpec

    config = read_config(model.repository / model.name)
    return PreprocessSpec.from_parameters({k: v.string_value for k, v in config.parameters.items()})


class RawRuntime:
    """Decode + preprocess + infer in this process, no HTTP, no queue, with the gateway's thread budget.

    As in the gateway: decoding on a pool of one thread per core (Pillow releases the GIL), ONNX Runtime with
    the same intra-op threads, and the next batches decoded while the current one runs, so this is the best the
    same work gets on these cores.
    """

    def __init__(self, model: ModelUnderTest, images: list[bytes], threads: int):
        import concurrent.futures

        import onnxruntime as ort

        # The gateway's session options (server/backends.py), so that only HTTP, queueing and batching differ.
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(model.onnx), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.spec, self.images, self.threads = _spec(model), images, threads
        self.decoders = os.cpu_count() or 1
        self.pool = concurrent.futures.ThreadPoolExecutor(self.decoders)

    def _decode(self, start: int, batch: int) -> list:
        from server.preprocessing import preprocess_batch

        # Spread over the pool, as concurrent requests spread over the gateway's decoding pool.
        chunk = [self.images[(start + i) % len(self.images)] for i in range(batch)]
        parts = [chunk[k :: self.decoders] for k in range(self.decoders) if chunk[k :: self.decoders]]
        return [self.pool.submit(preprocess_batch, part, self.spec) for part in parts]

    def images_per_s(self, batch: int, seconds: float) -> float:
        from collections import deque

        run = self.session.run
        run(None, {self.input_name: np.concatenate([f.result() for f in self._decode(0, batch)])})  # warm-up
        # Keep one batch per decoding thread queued ahead, so that every decoder stays busy even at batch 1.
        pending = deque(self._decode(i * batch, batch) for i in range(self.decoders))
        done, next_index = 0, self.decoders * batch
        started = time.perf_counter()
        while done < 3 * batch or time.perf_counter() - started < seconds:
            tensors = np.concatenate([f.result() for f in pending.popleft()])
            pending.append(self._decode(next_index, batch))
            next_index += batch
            run(None, {self.input_name: tensors})
            done += batch
        elapsed = time.perf_counter() - started
        for futures in pending:
            for future in futures:
                future.result()
        return done / elapsed

    def infer_only_images_per_s(self, batch: int, seconds: float) -> float:
        from server.preprocessing import preprocess_batch

        tensors = preprocess_batch([self.images[i % len(self.images)] for i in range(batch)], self.spec)
        timings = _time_calls(lambda: self.session.run(None, {self.input_name: tensors}), seconds)
        return batch / float(np.mean(timings))

    def close(self) -> None:
        self.pool.shutdown()


def bench_raw(plan: BenchPlan, raw: RawRuntime) -> dict:
    """Images/s at each batch size; the best batch is the one the adjacent measurements use."""
    per_batch = {batch: raw.images_per_s(batch, plan.runtime_seconds) for batch in plan.batch_sizes}
    best = max(per_batch, key=per_batch.get)
    return {
        "images_per_s": per_batch[best],
        "best_batch": best,
        "per_batch": per_batch,
        "decode_threads": raw.decoders,
        "infer_only_images_per_s": raw.infer_only_images_per_s(best, plan.runtime_seconds),
        "threads": raw.threads,
    }


def adjacent_raw(plan: BenchPlan, raw: RawRuntime, best_batch: int, measure):
    """Run `measure()` between two raw-runtime windows; returns (its result, mean raw img/s around it).

    The machine's load changes from minute to minute, so each server is compared with the raw runtime
    measured right beside it rather than with one figure taken minutes earlier.
    """
    before = raw.images_per_s(best_batch, plan.raw_window_s)
    result = measure()
    after = raw.images_per_s(best_batch, plan.raw_window_s)
    return result, (before + after) / 2


async def _load(
    url: str,
    images: list[bytes],
    concurrency: int,
    seconds: float,
    warmup_s: float,
    headers: dict[str, str],
    tls: ssl.SSLContext | None = None,
    new_connections: bool = False,
) -> tuple[list[float], int, float, int]:
    """Keep `concurrency` single-image requests in flight: latencies (s) of those that completed in the window,
    failures in it, the window, and the connections opened (one per request with `new_connections`, each with its
    own TLS handshake; else kept alive)."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    loop = asyncio.get_running_loop()
    start = loop.time()
    window_start, window_end = start + warmup_s, start + warmup_s + seconds

    async def worker(index: int, session: aiohttp.ClientSession) -> None:
        nonlocal errors
        i = index
        while loop.time() < window_end:
            sent = loop.time()
            try:
                async with session.post(url, data=images[i % len(images)], headers=headers) as response:
                    body = await response.read()
                    ok = response.status == 200 and b'"predictions"' in body
            except aiohttp.ClientError:
                ok = False
            done = loop.time()
            i += concurrency
            # Completions inside the window count, whenever they were sent: at low throughput a request sent
            # during the warm-up may be the only one that finishes inside a short window.
            if window_start <= done <= window_end:
                if ok:
                    latencies.append(done - sent)
                else:
                    errors += 1

    connections = 0

    async def opened(*_) -> None:
        nonlocal connections
        connections += 1

    tracing = aiohttp.TraceConfig()
    tracing.on_connection_create_end.append(opened)
    connector = aiohttp.TCPConnector(limit=concurrency, ssl=tls or True, force_close=new_connections)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, trace_configs=[tracing]
    ) as session:
        await asyncio.gather(*(worker(i, session) for i in range(concurrency)))
    return latencies, errors, seconds, connections


def http_load(
    label: str,
    base_url: str,
    model_name: str,
    images: list[bytes],
    concurrency: int,
    seconds: float,
    warmup_s: float,
    tls: ssl.SSLContext | None = None,
    new_connections: bool = False,
) -> LoadResult:
    url = f"{base_url}/v1/models/{model_name}/classify?top_k=5"
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    headers = {"Content-Type": "image/jpeg"}
    latencies, errors, window, connections = asyncio.run(
        _load(url, images, concurrency, seconds, warmup_s, headers, tls, new_connections)
    )
    # The client shares the cores with the server: how much of them it took is part of the result.
    client_cores = (time.process_time() - cpu_start) / (time.perf_counter() - wall_start)
    if not latencies:
        if errors:
            raise BenchError(f"{label}: no request succeeded at {url} ({errors} failed)")
        raise BenchError(
            f"{label}: no request finished inside the {seconds:g} s window with {concurrency} in flight at {url} "
            "(lower --concurrency)"
        )
    milliseconds = np.array(latencies) * 1000
    return LoadResult(
        label,
        concurrency,
        len(latencies),
        errors,
        len(latencies) / window,
        float(np.percentile(milliseconds, 50)),
        float(np.percentile(milliseconds, 99)),
        client_cores=client_cores,
        extra={"connections": connections},
    )


def wait_http(
    url: str, process: subprocess.Popen, timeout: float, log: Path, tls: ssl.SSLContext | None = None
) -> None:
    """Until `url` answers 200 (over TLS trusting `tls`); BenchError when the process exits or time runs out."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise BenchError(f"server exited with {process.returncode}: {tail[0]} (log: {log})")
        try:
            with urllib.request.urlopen(url, timeout=2, context=tls) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise BenchError(f"{url} not ready after {timeout:.0f}s (log: {log})")


@contextlib.contextmanager
def serving(
    command: list[str],
    port: int,
    log: Path,
    env: dict[str, str] | None = None,
    ready_path: str = "/readyz",
    timeout: float = 120,
    tls: ssl.SSLContext | None = None,
) -> Iterator[tuple[str, subprocess.Popen]]:
    """Run a server process on loopback until the block ends (HTTPS trusting `tls`); yields its base URL and
    the process."""
    with open(log, "wb") as output:
        process = subprocess.Popen(
            cli.processes.ending_with_this_process(command),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
            cwd=REPO_ROOT,
        )
        try:
            base = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
            wait_http(base + ready_path, process, timeout, log, tls)
            yield base, process
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def gateway_command(
    repository: Path, port: int, threads: int, batching: bool, delay_ms: float
) -> tuple[list[str], dict]:
    """`resnet serve` on the embedded ONNX Runtime backend, configured through its RESNET_* settings."""
    command = [sys.executable, "-m", "cli", "serve"]
    env = {
        "RESNET_HOST": "127.0.0.1",
        "RESNET_PORT": str(port),
        "RESNET_GRPC_PORT": "0",
        "RESNET_MODEL_REPOSITORY": str(repository),
        "RESNET_BACKEND": "embedded",
        "RESNET_BATCHING": str(batching).lower(),
        "RESNET_MAX_DELAY_MS": f"{delay_ms:g}",
        "RESNET_INTRA_OP_THREADS": str(threads),
        "RESNET_LOG_LEVEL": "warning",
        "RESNET_API_KEYS": "",
        "RESNET_QUEUE_SIZE": "4096",
        # plain HTTP, no per-request log line, whatever the shell that runs the bench has set
        "RESNET_SSL_CERTFILE": "",
        "RESNET_SSL_KEYFILE": "",
        "RESNET_SSL_CLIENT_CA": "",
        "RESNET_ACCESS_LOG": "false",
    }
    return command, env


def bench_gateway(
    plan: BenchPlan,
    model: ModelUnderTest,
    images: list[bytes],
    scratch: Path,
    raw: RawRuntime,
    best_batch: int,
    progress,
) -> dict:
    points = [("batching off", False, 0.0)] + [
        (f"batching on, max delay {d:g} ms", True, d) for d in plan.delays_ms
    ]
    results = []
    for label, batching, delay in points:
        port = free_port()
        command, env = gateway_command(model.repository, port, plan.threads, batching, delay)
        with serving(command, port, scratch / f"gateway-{batching}-{delay:g}.log", env) as (base, _):
            result, raw_beside = adjacent_raw(
                plan,
                raw,
                best_batch,
                lambda base=base, label=label: http_load(
                    label, base, model.name, images, plan.concurrency, plan.seconds, plan.warmup_s
                ),
            )
        result.extra = {"batching": batching, "max_delay_ms": delay, "raw_images_per_s": raw_beside}
        results.append(result)
        progress(
            f"gateway {label}: {result.images_per_s:.1f} img/s, raw runtime beside it {raw_beside:.1f} img/s"
        )
    return {"points": [asdict(r) for r in results]}


def bench_grpc(plan: BenchPlan, model: ModelUnderTest, images: list[bytes], scratch: Path) -> list[dict]:
    """HTTP then gRPC against one gateway process (batching on, the sweep's first delay), same photos."""
    from server.grpc_bench import compare

    port, grpc_port = free_ports(2)
    command, env = gateway_command(model.repository, port, plan.threads, True, plan.delays_ms[0])
    env["RESNET_GRPC_PORT"] = str(grpc_port)
    concurrencies = (1, 8) if plan.quick else (1, 8, 32)
    requests = 60 if plan.quick else 400
    with serving(command, port, scratch / "gateway-grpc.log", env) as (base, _):
        rows = compare(base, f"127.0.0.1:{grpc_port}", model.name, images, concurrencies, requests)
    return [asdict(row) for row in rows]


def bench_naive(
    plan: BenchPlan,
    model: ModelUnderTest,
    images: list[bytes],
    scratch: Path,
    raw: RawRuntime,
    best_batch: int,
) -> LoadResult:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "loadtest.naive_server",
        "--arch",
        model.arch,
        "--name",
        model.name,
        "--port",
        str(port),
        "--labels",
        str(model.repository / model.name / "labels.txt"),
    ]
    if model.checkpoint:
        command += ["--checkpoint", str(model.checkpoint)]
    with serving(command, port, scratch / "naive.log", ready_path="/healthz") as (base, _):
        result, raw_beside = adjacent_raw(
            plan,
            raw,
            best_batch,
            lambda: http_load(
                "naive FastAPI + PyTorch eager",
                base,
                model.name,
                images,
                plan.concurrency,
                plan.seconds,
                plan.warmup_s,
            ),
        )
    result.extra = {"raw_images_per_s": raw_beside}
    return result


def bench_loadtest(plan: BenchPlan, model: ModelUnderTest, scratch: Path, img_dir: Path) -> dict:
    """A Locust ramp against the gateway (batching on, default delay) through `resnet loadtest`."""
    from loadtest import cli as loadtest_cli
    from loadtest import report

    port = free_port()
    command, env = gateway_command(
        model.repository, port, plan.threads, True, plan.delays_ms[min(1, len(plan.delays_ms) - 1)]
    )
    out = scratch / "loadtest"
    with serving(command, port, scratch / "gateway-loadtest.log", env) as (base, _):
        args = loadtest_cli.get_args_parser().parse_args(
            [
                "--url",
                base,
                "--scenario",
                "ramp",
                "--users",
                str(LOADTEST_USERS),
                "--duration",
                f"{plan.loadtest_s:g}s",
                "--model",
                model.name,
                "--out",
                str(out),
                "--max-fail-ratio",
                "1",
            ]
        )
        # Its progress bar and summary go to a log: the bench's own status line owns the terminal.
        with (
            open(scratch / "loadtest.out", "w") as log,
            contextlib.redirect_stdout(log),
            contextlib.redirect_stderr(log),
        ):
            loadtest_cli.main(args)
    for name in ("timeline.png", "latency_vs_throughput.png"):
        cli.files.atomic_copy(out / name, img_dir / f"loadtest_{name}")
    summary = json.loads((out / "summary.json").read_text())
    return {
        "summary": summary["summary"],
        "steps": report.steps_by_users(report.read_history(out / "locust_stats_history.csv")),
        "users": LOADTEST_USERS,
        "duration_s": plan.loadtest_s,
    }


# --- report ------------------------------------------------------------------------------------------------


def machine_info() -> dict:
    import onnxruntime
    import torch

    cpu = "unknown"
    with contextlib.suppress(OSError):
        names = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        cpu = names[0] if names else cpu
    triton = "not started"
    with contextlib.suppress(Exception):
        from importlib.metadata import version as package_version

        triton = f"from nvidia-pytriton {package_version('nvidia-pytriton')}"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "tritonserver": triton,
        "platform": platform.platform(),
    }


# --- CLI ---------------------------------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Run the benchmark suite (runtimes, gateway vs raw runtime, naive baseline, Locust ramp) and "
        "regenerate docs/benchmarks.md, docs/benchmarks.json and docs/img/.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--arch",
        default=os.environ.get("RESNET_BENCH_ARCH", "resnet20"),
        choices=sorted(ARCH_MODEL_NAMES),
        help="resnet20: the bundled CIFAR-10 model; resnet50: an ImageNet-size model (random weights)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="short measurement windows, fewer points, no Locust run"
    )
    parser.add_argument(
        "--repository",
        type=Path,
        default=Path(os.environ.get("RESNET_MODEL_REPOSITORY", "model_repository")),
        help="model repository holding the model to measure (one with no model for --arch: a random-weight "
        "one is exported)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=0, help="HTTP requests in flight (default: 64; 16 with --quick)"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="intra-op threads for every runtime (default: all cores)"
    )
    parser.add_argument(
        "--images",
        type=Path,
        default=None,
        help="photo folder (default: ../shared/data/imagenet-samples, else generated images)",
    )
    parser.add_argument(
        "--docs", type=Path, default=Path("docs"), help="folder for benchmarks.md, benchmarks.json and img/"
    )
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=["runtimes", "naive", "grpc", "loadtest"],
        help="leave a part out (repeatable)",
    )
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Refuse what would otherwise fail minutes in (or measure something else) before any model is prepared."""
    for flag in ("concurrency", "threads"):
        if getattr(args, flag) < 0:
            raise BenchError(f"--{flag} must be at least 0 (0: the default), got {getattr(args, flag)}")
    if args.threads > MAX_THREADS:
        raise BenchError(f"--threads must be at most {MAX_THREADS}, got {args.threads}")
    if not args.repository.is_dir():
        # A typo must not quietly turn a benchmark of the user's model into one of random weights.
        what = "is a file, not a folder" if args.repository.exists() else "does not exist"
        raise BenchError(f"model repository {args.repository} {what} (set --repository)")
    if args.docs.exists() and not args.docs.is_dir():
        raise BenchError(f"--docs {args.docs} is a file, not a folder")
    if args.images:
        check_folder(args.images, BenchError)


def main(args: argparse.Namespace) -> int:
    # OpenMP threads that spin while waiting collapse when another process holds a core (PyTorch eager ResNet-20
    # on this shared 2-core machine: 3 ms per image with 1 thread, 300-600 ms with 2 spinning ones, 7 ms with
    # passive waiting). Set before torch loads, here and in the servers started below; override from the shell.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # the servers started below (each in its own session) stop in their context managers' clean-up: stopped
    # where it stood, a bench left its gateway running, holding its port, for good
    signal.signal(signal.SIGTERM, raise_terminated)
    from rich.console import Console

    console = Console(stderr=True)
    check_args(args)
    plan = BenchPlan.make(args)
    started = time.monotonic()
    photos = load_images(args.images, limit=IMAGES_SENT)
    images = [data for _, data in photos]
    kind = "generated images" if photos[0][0].startswith("generated_") else "real photos"
    img_dir = args.docs / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"arch": plan.arch, "plan": asdict(plan), "images": {"count": len(images), "kind": kind}}
    with tempfile.TemporaryDirectory(prefix="resnet-bench-") as scratch_dir:
        scratch = Path(scratch_dir)
        with console.status("preparing the model..."):
            model = prepare_model(plan.arch, args.repository, scratch, plan.threads)
        console.log(f"model {model.name} from {model.source}")
        results.update(model=model.name, weights=model.source, machine=machine_info())
        results["runtimes"] = []
        if "runtimes" not in args.skip:
            with console.status("runtime comparison (PyTorch, ONNX Runtime FP32/INT8, Triton)..."):
                results["runtimes"] = bench_runtimes(plan, model, scratch)
            results["machine"]["tritonserver"] = TRITON_VERSION[0] or results["machine"]["tritonserver"]
            console.log("runtime comparison done")
        raw = RawRuntime(model, images, plan.threads)
        try:
            with console.status("raw runtime (in-process)..."):
                results["raw"] = bench_raw(plan, raw)
            best_batch = results["raw"]["best_batch"]
            console.log(f"raw runtime: {results['raw']['images_per_s']:.1f} img/s at batch {best_batch}")
            with console.status("gateway: batching off, then a sweep of max delays..."):
                results["gateway"] = bench_gateway(plan, model, images, scratch, raw, best_batch, console.log)
            if "naive" not in args.skip:
                with console.status("naive FastAPI + PyTorch baseline..."):
                    results["naive"] = asdict(bench_naive(plan, model, images, scratch, raw, best_batch))
                console.log(f"naive baseline: {results['naive']['images_per_s']:.1f} img/s")
        finally:
            raw.close()
        if "grpc" not in args.skip:
            with console.status("gRPC vs HTTP on one gateway..."):
                results["grpc_vs_http"] = bench_grpc(plan, model, images, scratch)
            console.log("gRPC vs HTTP done")
        if not plan.quick and "loadtest" not in args.skip:
            with console.status(f"Locust ramp ({plan.loadtest_s:g} s)..."):
                results["loadtest"] = bench_loadtest(plan, model, scratch, img_dir)
    plot_delay_sweep(
        results["gateway"], results.get("naive"), results["raw"], img_dir / "gateway_latency_throughput.png"
    )
    argv = ["resnet", "bench", *sys.argv[2:]] if sys.argv[1:2] == ["bench"] else ["resnet", "bench"]
    results.update(
        command=shlex.join(argv),
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        elapsed_s=time.monotonic() - started,
        json_name="benchmarks.json",
    )
    cli.files.atomic_write_text(args.docs / "benchmarks.json", json.dumps(results, indent=2, default=str))
    write_markdown(results, args.docs / "benchmarks.md", "img/")
    best = max(results["gateway"]["points"], key=efficiency)
    console.log(
        f"gateway best {best['images_per_s']:.1f} img/s = {efficiency(best):.2f} x the raw runtime beside it; "
        f"wrote {args.docs / 'benchmarks.md'}"
    )
    return 0
