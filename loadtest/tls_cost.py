"""`python -m loadtest.tls_cost`: what serving TLS itself costs the gateway. One gateway at a time answers the same
photos at the same concurrency over HTTP and over HTTPS (a throwaway certificate from trustme), alternating
plain, TLS, plain, TLS so that the machine's changing load falls on both; per run it reports throughput, latency
and the gateway's CPU time per image (its user + system time from /proc over the images its /metrics counted),
the figure that holds on a shared machine. Writes the "TLS cost" section of docs/benchmarks.md. With
--new-connections every request opens its own connection, so HTTPS pays a full handshake per request (clients
without keep-alive, or a load balancer that does not pool): its own section.

    python -m loadtest.tls_cost --rounds 3 --seconds 15
    python -m loadtest.tls_cost --rounds 3 --seconds 15 --new-connections --key-type rsa
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import ssl
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cli.help import HelpFormatter
from cli.ports import free_port
from loadtest.bench import BenchError, gateway_command, http_load, serving
from loadtest.bench_report import replace_section
from loadtest.images import IMAGES_SENT, check_folder, load_images

SECTION = "TLS cost (gateway)"
NEW_CONNECTIONS_SECTION = "TLS cost (gateway, a new connection per request)"
DEFAULT_DELAY_MS = 2.0  # the gateway's own default batching delay


@dataclass
class Run:
    transport: str
    images_per_s: float
    p50_ms: float
    p99_ms: float
    cpu_ms_per_image: float
    requests: int
    connections: int


def throwaway_certificate(folder: Path, key_type: str) -> tuple[Path, Path, ssl.SSLContext]:
    """A certificate for 127.0.0.1 from a CA made here (trustme; an `rsa` or `ecdsa` key), its key, and a client
    context trusting it."""
    try:
        import trustme
    except ImportError:
        raise BenchError("needs trustme for a throwaway certificate: pip install trustme") from None
    key = trustme.KeyType.RSA if key_type == "rsa" else trustme.KeyType.ECDSA
    authority = trustme.CA(key_type=key)
    issued = authority.issue_cert("127.0.0.1", key_type=key)
    certfile, keyfile = folder / "cert.pem", folder / "key.pem"
    issued.cert_chain_pems[0].write_to_path(str(certfile))
    issued.private_key_pem.write_to_path(str(keyfile))
    client = ssl.create_default_context()
    authority.configure_trust(client)
    return certfile, keyfile, client


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def images_counted(base_url: str, context: ssl.SSLContext | None) -> float:
    """The gateway's own count of images classified (`resnet_images_total`, every model)."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=10, context=context) as response:
        text = response.read().decode()
    return sum(
        float(value) for value in re.findall(r"^resnet_images_total\{[^}]*\} ([0-9.e+]+)$", text, re.M)
    )


def measure(
    args: argparse.Namespace, images: list[bytes], tls_files, client: ssl.SSLContext | None, log: Path
) -> Run:
    transport = "HTTPS" if client else "HTTP"
    port = free_port()
    command, env = gateway_command(args.repository, port, args.threads, True, DEFAULT_DELAY_MS)
    if client:
        env |= {"RESNET_SSL_CERTFILE": str(tls_files[0]), "RESNET_SSL_KEYFILE": str(tls_files[1])}
    with serving(command, port, log, env, tls=client) as (base, process):
        counted, cpu = images_counted(base, client), cpu_seconds(process.pid)
        load = http_load(
            transport,
            base,
            args.model,
            images,
            args.concurrency,
            args.seconds,
            1.0,
            client,
            args.new_connections,
        )
        served = images_counted(base, client) - counted
        spent = cpu_seconds(process.pid) - cpu
    per_image_ms = spent / served * 1000
    connections = load.extra["connections"]
    return Run(
        transport, load.images_per_s, load.p50_ms, load.p99_ms, per_image_ms, load.requests, connections
    )


def report(runs: list[Run], args: argparse.Namespace, command: str, photos: str) -> str:
    def mean(transport: str, key: str) -> float:
        values = [getattr(run, key) for run in runs if run.transport == transport]
        return sum(values) / len(values)

    rows = "\n".join(
        f"| {index // 2 + 1} | {run.transport} | {run.images_per_s:.1f} | {run.p50_ms:.1f} | {run.p99_ms:.1f} | "
        f"{run.cpu_ms_per_image:.2f} | {run.requests} | {run.connections} |"
        for index, run in enumerate(runs)
    )
    connections = (
        "each request on a connection of its own, so every HTTPS request pays a full TLS handshake"
        if args.new_connections
        else "over keep-alive connections, so a handshake is paid once per connection"
    )
    cpu_ratio = mean("HTTPS", "cpu_ms_per_image") / mean("HTTP", "cpu_ms_per_image")
    rate_ratio = mean("HTTPS", "images_per_s") / mean("HTTP", "images_per_s")
    cpu = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M) or ["unknown CPU"]
    import onnxruntime
    import uvicorn

    return (
        f"Command: `{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}). Machine: {cpu[0]}, "
        f"{os.cpu_count()} cores; Python {platform.python_version()}, uvicorn {uvicorn.__version__}, onnxruntime "
        f"{onnxruntime.__version__}, {ssl.OPENSSL_VERSION}. One gateway (`resnet serve`, embedded ONNX Runtime, "
        f"batching on) serves `{args.model}` to {args.concurrency} aiohttp clients on the same machine ({photos}, one "
        f"per request, {connections}; an {args.key_type.upper()} certificate), for {args.seconds:g} s per run, runs "
        f"alternating HTTP and HTTPS. CPU ms/image is the gateway process's user + system time over the images its "
        f"/metrics counted, which holds while other jobs share the cores; img/s and latency move with them. "
        f"Connections: those the clients opened in the run.\n\n"
        "| round | transport | img/s | p50 ms | p99 ms | gateway CPU ms/image | requests | connections |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- |\n"
        f"{rows}\n\n"
        f"**HTTPS / HTTP: gateway CPU per image x{cpu_ratio:.2f}, throughput x{rate_ratio:.2f}** (means over "
        f"{len(runs) // 2} rounds)."
    )


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.tls_cost",
        description="Measure what serving TLS costs the gateway: HTTP vs HTTPS runs, alternating, on one machine; "
        "write the 'TLS cost (gateway)' section of docs/benchmarks.md.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--repository", type=Path, default=Path("model_repository"), help="model repository")
    parser.add_argument("--model", default="resnet20_cifar10", help="model to classify with")
    parser.add_argument(
        "--images", type=Path, default=None, help="photo folder (default: ImageNet samples, else generated)"
    )
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument("--seconds", type=float, default=15.0, help="measurement window per run")
    parser.add_argument("--rounds", type=int, default=3, help="HTTP + HTTPS pairs")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: all cores)")
    parser.add_argument(
        "--new-connections",
        action="store_true",
        help="a connection (and so a TLS handshake) per request instead of keep-alive; its own section",
    )
    parser.add_argument(
        "--key-type",
        choices=("ecdsa", "rsa"),
        default="ecdsa",
        help="the throwaway certificate's key: ECDSA P-256, or RSA 2048 (slower handshakes)",
    )
    parser.add_argument(
        "--doc", type=Path, default=Path("docs/benchmarks.md"), help="page to write the section to"
    )
    return parser


def check_args(args: argparse.Namespace) -> None:
    if not args.repository.is_dir():
        raise BenchError(f"model repository {args.repository} is not a folder (set --repository)")
    for flag in ("concurrency", "rounds"):
        if getattr(args, flag) < 1:
            raise BenchError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if not 0 < args.seconds <= 3600:
        raise BenchError(f"--seconds must be more than 0 and at most 3600, got {args.seconds}")
    if args.images:
        check_folder(args.images, BenchError)


def main(args: argparse.Namespace) -> int:
    check_args(args)
    photos = load_images(args.images, limit=IMAGES_SENT)
    images = [data for _, data in photos]
    kind = "generated JPEGs" if photos[0][0].startswith("generated_") else "photos"
    described = f"{len(images)} {kind} of {sum(map(len, images)) / len(images) / 1024:.0f} KB on average"
    runs = []
    with tempfile.TemporaryDirectory(prefix="resnet-tls-cost-") as scratch_dir:
        scratch = Path(scratch_dir)
        certfile, keyfile, client = throwaway_certificate(scratch, args.key_type)
        for round_number in range(args.rounds):
            for context in (None, client):
                run = measure(
                    args, images, (certfile, keyfile), context, scratch / f"gateway-{len(runs)}.log"
                )
                print(
                    f"round {round_number + 1} {run.transport}: {run.images_per_s:.1f} img/s, "
                    f"{run.cpu_ms_per_image:.2f} CPU ms/image",
                    file=sys.stderr,
                )
                runs.append(run)
    section = report(runs, args, shlex.join(["python", "-m", "loadtest.tls_cost", *sys.argv[1:]]), described)
    print(section)
    title = NEW_CONNECTIONS_SECTION if args.new_connections else SECTION
    replace_section(args.doc, title, section)
    print(f"wrote the '{title}' section of {args.doc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from cli.main import run_script

    run_script(get_args_parser, main, "python -m loadtest.tls_cost")
