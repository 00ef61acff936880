"""`resnet loadtest`: a headless Locust scenario against the gateway, with files, plots and pass/fail thresholds.

Locust runs as a subprocess (`python -m locust -f loadtest/locustfile.py --headless ...`): its gevent monkey
patching stays out of this process, and the run is exactly what a user gets typing the locust command.
Writes into --out: locust_stats.csv, locust_stats_history.csv, locust_failures.csv, locust_exceptions.csv,
report.html (Locust's own), timeline.png, latency_vs_throughput.png, summary.json and locust.log.
Exit status: 0 when every threshold holds, 3 when one breaks (each broken one is printed), 1 on other errors.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
from dataclasses import asdict
from pathlib import Path

import cli.files
import cli.processes
from cli.addresses import host_and_port, split_base_url
from cli.errors import ResnetError, Terminated, raise_terminated
from cli.help import HelpFormatter
from cli.tls import add_client_arguments, check_authorities, check_key_pair, handshake_hint
from loadtest import report, shapes
from loadtest.checks import (
    GRPC_TLS_SCHEME,
    TlsFiles,
    gateway_models,
    grpc_index,
    grpc_models,
    grpc_target,
    grpc_url,
    kserve_index,
    kserve_models,
    unready_reason,
)
from server.spec import PIPELINE_SUFFIX

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s?)?$")


class LoadTestError(ResnetError):
    """The load test could not run (unreachable gateway, Locust crashed, bad flag)."""


class ThresholdError(ResnetError):
    """The run completed but broke a threshold."""

    exit_code = 3


def parse_duration(text: str) -> float:
    """'90', '90s', '2m', '1h30m', '1m30s' -> seconds."""
    match = _DURATION.match(text.strip())
    if not text.strip() or not match or not any(match.groups()):
        raise argparse.ArgumentTypeError(f"bad duration {text!r}: use e.g. 30s, 2m, 1m30s")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise argparse.ArgumentTypeError("duration must be positive")
    return total


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"RESNET_{name}", default)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Run a headless Locust scenario against the gateway; write CSV stats, Locust's HTML report and "
        "plots; exit 3 when a threshold breaks. Flags default to RESNET_* environment variables.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--url",
        type=base_url,
        default=_env("LOADTEST_URL", "http://127.0.0.1:8080"),
        help="gateway base URL, http(s)://HOST:PORT plus a reverse proxy's path prefix if any (RESNET_LOADTEST_URL)",
    )
    parser.add_argument(
        "--scenario",
        choices=shapes.SCENARIOS,
        default=_env("LOADTEST_SCENARIO", "steady"),
        help="steady: hold --users; ramp: staircase up to --users (finds the knee); "
        "spike: users/5, then --users for 20%% of the run, then back",
    )
    parser.add_argument(
        "--users",
        type=int,
        default=int(_env("LOADTEST_USERS", "10")),
        help="concurrent users (peak for ramp/spike); users send back-to-back requests",
    )
    parser.add_argument(
        "--spawn-rate", type=float, default=None, help="users started per second (default: all at once)"
    )
    parser.add_argument(
        "--duration",
        type=parse_duration,
        default=parse_duration(_env("LOADTEST_DURATION", "30s")),
        help="run time (30s, 2m, 1m30s; RESNET_LOADTEST_DURATION), in seconds",
    )
    protocol = parser.add_mutually_exclusive_group()
    protocol.add_argument(
        "--grpc", action="store_true", help="use the gRPC user (tritonclient, KServe v2) instead of HTTP"
    )
    protocol.add_argument(
        "--kserve",
        action="store_true",
        help="use the KServe v2 HTTP user (Triton's HTTP API, /v2/models/<model>_pipeline/infer) instead of the "
        "gateway's /v1 API; --url may then be a Triton server's HTTP port too",
    )
    parser.add_argument(
        "--grpc-url",
        type=grpc_address,
        default=_env("GRPC_URL", ""),
        help="gRPC host:port of the gateway or Triton, grpcs://host:port for TLS; --grpc lists its models there "
        "(RESNET_GRPC_URL; default: --url's host, port 8081, over TLS when --url is https://)",
    )
    parser.add_argument(
        "--model",
        default=_env("MODEL", ""),
        help="model name (default: the first the server lists); with --kserve or --grpc, Triton's NAME_pipeline "
        "is taken for NAME",
    )
    parser.add_argument(
        "--images",
        default=_env("LOADTEST_IMAGES", ""),
        help="folder of photos to send (default: ../shared/data/imagenet-samples, else generated)",
    )
    parser.add_argument("--api-key", default=_env("API_KEY", ""), help="API key, if the gateway requires one")
    add_client_arguments(parser)
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(_env("LOADTEST_OUT", "loadtest-results")),
        help="folder for the CSVs, report.html, plots and summary.json",
    )
    parser.add_argument(
        "--max-fail-ratio", type=float, default=0.01, help="fail when failures/requests exceed this"
    )
    parser.add_argument(
        "--max-p95-ms", type=float, default=None, help="fail when the overall p95 latency exceeds this"
    )
    parser.add_argument(
        "--max-p99-ms", type=float, default=None, help="fail when the overall p99 latency exceeds this"
    )
    return parser


def locust_command(args: argparse.Namespace, model: str, csv_prefix: Path, html: Path) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        args.url,
        "--users",
        str(args.users),
        "--spawn-rate",
        str(args.spawn_rate or args.users),
        "--run-time",
        f"{max(1, round(args.duration))}s",
        "--stop-timeout",
        "10",
        "--csv",
        str(csv_prefix),
        "--csv-full-history",
        "--html",
        str(html),
        "--only-summary",
        # Thresholds decide the exit status, not Locust's "any failure -> 1".
        "--exit-code-on-error",
        "0",
        "--scenario",
        args.scenario,
        "--model",
        model,
    ]
    for flag, value in (
        ("--grpc-host", args.grpc_url),
        ("--images", args.images),
        ("--ca-cert", args.ca_cert),
        ("--client-cert", args.client_cert),
        ("--client-key", args.client_key),
    ):
        if value:
            command += [flag, str(value)]
    command.append(user_class(args))
    return command


def user_class(args: argparse.Namespace) -> str:
    return "GrpcUser" if args.grpc else "KServeHttpUser" if args.kserve else "ClassifyUser"


def protocol_name(args: argparse.Namespace) -> str:
    return "gRPC" if args.grpc else "KServe HTTP" if args.kserve else "HTTP"


def run_locust(command: list[str], duration: float, log_path: Path, api_key: str = "") -> None:
    """Run Locust with a progress bar over the planned duration; its output goes to `log_path`."""
    from tqdm import tqdm

    with (
        open(log_path, "wb") as log,
        tqdm(total=round(duration), unit="s", desc="load test", leave=False) as bar,
    ):
        # The key travels in the environment (the locustfile reads RESNET_API_KEY), not on a visible command line.
        env = {**os.environ, "RESNET_API_KEY": api_key} if api_key else None
        process = subprocess.Popen(
            cli.processes.ending_with_this_process(command), stdout=log, stderr=subprocess.STDOUT, env=env
        )
        start = time.monotonic()
        # stopped (SIGTERM, Ctrl-C), it stops Locust too: one left running loads the service to the end of its run
        try:
            while process.poll() is None:
                time.sleep(0.5)
                bar.n = min(round(duration), int(time.monotonic() - start))
                bar.refresh()
        except BaseException:
            _stop(process)
            raise
    if process.returncode != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise LoadTestError(f"locust exited with {process.returncode}: {tail[0]} (full log: {log_path})")


def _stop(process: subprocess.Popen) -> None:
    """Locust stops its users and writes its files on SIGTERM; one that does not within 10 s is killed."""
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def base_url(value: str) -> str:
    """--url as scheme://host:port[/prefix] without a trailing '/': Locust appends each request's /v1/... to it."""
    if value.startswith("grpc://"):
        raise argparse.ArgumentTypeError(f"{value!r} is a gRPC address: give it as --grpc-url with --grpc")
    try:
        return split_base_url(value, ("http", "https")).geturl()
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def grpc_address(value: str) -> str:
    """--grpc-url as host:port ("grpc://" before it is allowed), or grpcs://host:port for TLS; empty: derived from
    --url."""
    if not value:
        return value
    tls = value.startswith(GRPC_TLS_SCHEME)
    try:
        address = host_and_port(value.removeprefix(GRPC_TLS_SCHEME).removeprefix("grpc://"))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return GRPC_TLS_SCHEME + address if tls else address


def check_flags(args: argparse.Namespace) -> None:
    """Refuse flags that cannot make a meaningful run, before anything starts."""
    if args.users < 1:
        raise LoadTestError("--users must be at least 1")
    if args.spawn_rate is not None and not args.spawn_rate > 0:
        raise LoadTestError(f"--spawn-rate is users started per second: more than 0, got {args.spawn_rate}")
    if not 0 <= args.max_fail_ratio <= 1:
        raise LoadTestError(f"--max-fail-ratio is a fraction in [0, 1], got {args.max_fail_ratio}")
    for flag, limit in (("--max-p95-ms", args.max_p95_ms), ("--max-p99-ms", args.max_p99_ms)):
        if limit is not None and not limit > 0:
            raise LoadTestError(f"{flag} must be more than 0 ms, got {limit}")
    if args.out.exists() and not args.out.is_dir():
        raise LoadTestError(f"--out {args.out} is a file; give a folder for the results")
    if args.images:
        from loadtest.images import check_folder

        check_folder(Path(args.images), LoadTestError)
    check_tls_files(args)


def check_tls_files(args: argparse.Namespace) -> None:
    if args.ca_cert:
        try:
            check_authorities(args.ca_cert)
        except ValueError as error:
            raise LoadTestError(f"bad --ca-cert: {error}") from None
    if bool(args.client_cert) != bool(args.client_key):
        raise LoadTestError("--client-cert and --client-key go together: give both, or neither")
    if args.client_cert:
        try:
            check_key_pair(args.client_cert, args.client_key)
        except ValueError as error:
            raise LoadTestError(f"bad --client-cert/--client-key: {error}") from None


def listing_failure(error: Exception, kserve: bool, tls: TlsFiles | None) -> str:
    """Why the listing failed, with the likely fix where a wrong port, the wrong API or TLS (`tls`, None for a
    plain connection) explains it."""
    # before BadStatusLine: a TLS client the server refuses reads a closed socket
    if hint := handshake_hint(str(error), None if tls is None else bool(tls.client_cert)):
        return f"{error}{hint}"
    if isinstance(error, urllib.error.HTTPError) and error.code == 404 and not kserve:
        return f"{error} (no /v1 API there: for Triton's HTTP port add --kserve)"
    if isinstance(error, http.client.BadStatusLine):  # its text is the bytes that came back
        return "the answer is not HTTP/1.1 (if that is a gRPC port, give it as --grpc-url with --grpc)"
    if isinstance(error, ValueError):
        answer = (
            f"the answer is not JSON ({error})" if isinstance(error, json.JSONDecodeError) else str(error)
        )
        return f"{answer} (is --url the gateway's HTTP port{' or Triton' if kserve else ''}?)"
    return str(error)


def served_model(args: argparse.Namespace) -> str:
    """The model to load-test, once the server has shown that it serves it (else every request would fail)."""
    if args.grpc:
        target = args.grpc_url or grpc_target(args.url)
        where, served = grpc_url(target), grpc_served(target, args.api_key, TlsFiles.of(args))
    else:
        where = args.url
        list_models = kserve_models if args.kserve else gateway_models
        tls = TlsFiles.of(args) if args.url.startswith("https://") else None
        try:
            served = list_models(args.url, args.api_key, tls or TlsFiles())
        except (urllib.error.URLError, OSError, ValueError, RuntimeError, http.client.HTTPException) as error:
            failure = listing_failure(error, args.kserve, tls)
            raise LoadTestError(f"cannot list models at {args.url}: {failure}") from error
    model = args.model or served[0]
    if args.grpc or args.kserve:
        # Triton's name for the model that takes encoded images; its users add the suffix themselves
        model = model.removesuffix(PIPELINE_SUFFIX)
    if model not in served:
        reason = unserved_reason(args, model)
        said = f": {reason}" if reason else ""
        raise LoadTestError(f"model {model!r} is not served at {where}{said}; served: {', '.join(served)}")
    return model


def unserved_reason(args: argparse.Namespace, model: str) -> str:
    """What the server's repository index says of `model` (a model that failed to load: its error), or "" when
    it cannot tell. The gateway's index names its failed models as Triton's does."""
    from tritonclient.utils import InferenceServerException

    tls = TlsFiles.of(args)
    try:
        if args.grpc:
            index = grpc_index(args.grpc_url or grpc_target(args.url), args.api_key, tls)
        else:
            index = kserve_index(args.url, args.api_key, tls)
    # only the better message is lost: the listing before it succeeded
    except (OSError, ValueError, http.client.HTTPException, InferenceServerException):
        return ""
    return unready_reason(index, model)


def grpc_served(target: str, api_key: str, tls: TlsFiles) -> list[str]:
    """The models a gRPC load test can use, from the gRPC server's own index: the gateway's or Triton's alike."""
    from tritonclient.utils import InferenceServerException

    try:
        return grpc_models(target, api_key, tls)
    except InferenceServerException as error:
        client_cert = bool(tls.client_cert) if target.startswith(GRPC_TLS_SCHEME) else None
        hint = (
            handshake_hint(str(error), client_cert)
            or " (is --grpc-url the gRPC port of the gateway or Triton?)"
        )
        raise LoadTestError(f"cannot list models at {grpc_url(target)}: {error}{hint}") from error
    except RuntimeError as error:  # it answered, with no model that takes encoded images
        raise LoadTestError(str(error)) from error


def write_results(
    args: argparse.Namespace,
    model: str,
    summary: report.Summary,
    history: list[dict],
    thresholds: report.Thresholds,
    broken: list[str],
) -> list[Path]:
    """The plots and summary.json of a run into --out; returns the plots."""
    protocol = protocol_name(args)
    plots = report.plot_run(history, args.out, f"{args.scenario}, {args.users} {protocol} users, {model}")
    results = {
        "url": args.url,
        "model": model,
        "protocol": protocol,
        "scenario": args.scenario,
        "users": args.users,
        "duration_s": args.duration,
        "summary": asdict(summary),
        "fail_ratio": summary.fail_ratio,
        "thresholds": asdict(thresholds),
        "broken": broken,
        "ramp_steps": report.steps_by_users(history),
    }
    cli.files.atomic_write_text(args.out / "summary.json", json.dumps(results, indent=2))
    return plots


def main(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, raise_terminated)  # unwinds through run_locust, which stops Locust
    check_flags(args)
    model = served_model(args)
    args.out.mkdir(parents=True, exist_ok=True)
    csv_prefix, html = args.out / "locust", args.out / "report.html"
    try:
        run_locust(
            locust_command(args, model, csv_prefix, html),
            args.duration,
            args.out / "locust.log",
            args.api_key,
        )
    except Terminated as stopped:
        raise Terminated(f"{stopped}; Locust stopped too, its CSVs so far are in {args.out}") from None

    summary = report.read_summary(Path(f"{csv_prefix}_stats.csv"))
    history = report.read_history(Path(f"{csv_prefix}_stats_history.csv"))
    thresholds = report.Thresholds(args.max_fail_ratio, args.max_p95_ms, args.max_p99_ms)
    broken = report.broken_thresholds(summary, thresholds)
    print(
        f"{summary.requests} requests, {summary.failures} failed ({summary.fail_ratio:.2%}), "
        f"{summary.requests_per_s:.1f} req/s, p50 {summary.p50_ms:.0f} ms, p95 {summary.p95_ms:.0f} ms, "
        f"p99 {summary.p99_ms:.0f} ms"
    )
    try:
        plots = write_results(args, model, summary, history, thresholds, broken)
    except OSError as error:  # a full disk after minutes of load: the verdict is told all the same
        unwritten = f"cannot write {error.filename or args.out}: {error.strerror or error}"
        if broken:
            verdict = f"{len(broken)} threshold(s) broken: {'; '.join(broken)}; and {unwritten}"
            raise ThresholdError(verdict) from None
        kept = "the run itself kept its thresholds (its numbers are above)"
        raise LoadTestError(f"{unwritten}; {kept}") from None
    print(f"wrote {html}, {', '.join(p.name for p in plots)} and CSVs to {args.out}")
    if broken:
        for line in broken:
            print(f"threshold broken: {line}", file=sys.stderr)
        raise ThresholdError(f"{len(broken)} threshold(s) broken: " + "; ".join(broken))
    return 0
