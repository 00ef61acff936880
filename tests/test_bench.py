"""`resnet bench --quick` end to end on the CPU (real Triton, real gateway, real naive server), into a tmp dir."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from loadtest.bench import BenchError, http_load
from loadtest.bench_report import OWNED_SECTIONS, split_sections
from tests.support import REPO_ROOT, QuietHandler, children_of, has_ended, threaded_http_server, wait_until

FOREIGN = "## Export: runtimes on this CPU\n\nAnother part's table | kept | verbatim |\n"


def test_sections_split_by_second_level_headings():
    head, sections = split_sections("# Benchmarks\n\nintro\n\n## A\n\nx\n### sub\ny\n\n## B\n\nz\n")
    assert head == "# Benchmarks\n\nintro\n\n"
    assert sections == [("A", "x\n### sub\ny"), ("B", "z")]


def quick_bench(docs, *flags: str) -> list[str]:
    """`resnet bench --quick` on one thread, writing into `docs`."""
    return [sys.executable, "-m", "cli", "bench", "--quick", "--docs", str(docs), "--threads", "1", *flags]


@pytest.mark.slow
@pytest.mark.triton
def test_quick_bench_runs_end_to_end_and_keeps_foreign_sections(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "benchmarks.md").write_text(
        "# Benchmarks\n\nstale\n\n## Gateway efficiency\n\nstale numbers 999\n\n" + FOREIGN
    )
    empty_repository = tmp_path / "model_repository"  # forces the random-weight export path
    empty_repository.mkdir()
    result = subprocess.run(
        quick_bench(docs, "--repository", str(empty_repository)),
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO_ROOT,
        # the gateways it starts serve plain HTTP without a per-request log line whatever the shell says
        env={
            **os.environ,
            "RESNET_SSL_CERTFILE": "/nonexistent.pem",
            "RESNET_SSL_CLIENT_CA": "/nonexistent.pem",
            "RESNET_ACCESS_LOG": "true",
        },
    )
    assert result.returncode == 0, result.stderr[-3000:]

    results = json.loads((docs / "benchmarks.json").read_text())
    runtimes = {row["runtime"] for row in results["runtimes"]}
    assert {"PyTorch eager FP32", "ONNX Runtime FP32", "ONNX Runtime INT8 (QDQ)"} <= runtimes
    assert any(name.startswith("Triton") for name in runtimes)
    assert all(row["images_per_s"] > 0 for row in results["runtimes"])
    assert results["raw"]["images_per_s"] > 0
    points = results["gateway"]["points"]
    assert [p["extra"]["batching"] for p in points] == [False, True]
    assert all(p["requests"] > 0 and p["errors"] == 0 and p["extra"]["raw_images_per_s"] > 0 for p in points)
    assert results["naive"]["requests"] > 0 and results["naive"]["errors"] == 0
    grpc_rows = results["grpc_vs_http"]
    assert {row["protocol"] for row in grpc_rows} == {"http", "http /v2", "grpc"}
    assert all(row["errors"] == 0 and row["throughput"] > 0 for row in grpc_rows)
    assert results["machine"]["tritonserver"].count(".") == 2  # the version the running server reported

    text = (docs / "benchmarks.md").read_text()
    titles = [title for title, _ in split_sections(text)[1]]
    assert titles == [*OWNED_SECTIONS, "Export: runtimes on this CPU"]
    assert FOREIGN.strip() in text and "stale" not in text
    assert "resnet bench --quick" in text and "vs raw runtime" in text
    assert (docs / "img" / "gateway_latency_throughput.png").stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_stopped_bench_stops_the_servers_it_started(tmp_path, stop):
    # docker stop or a CI job's time limit (SIGTERM) unwinds through the bench's clean-ups: the gateway under
    # measurement stopped, no scratch folder left, the page not half rewritten; SIGKILL leaves no server serving
    docs, scratch = tmp_path / "docs", tmp_path / "tmp"
    scratch.mkdir()
    bench = subprocess.Popen(
        quick_bench(docs, "--skip", "runtimes"),
        cwd=REPO_ROOT,
        env={**os.environ, "TMPDIR": str(scratch)},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: children_of(bench.pid), 120, what="the bench's first server")
        [server] = children_of(bench.pid)
        time.sleep(1)
        bench.send_signal(stop)
        _, stderr = bench.communicate(timeout=60)
    finally:
        bench.kill()
    wait_until(lambda: has_ended(server), 20, what="the server stopped")
    if stop == signal.SIGTERM:
        assert bench.returncode == 143
        assert stderr.strip().splitlines()[-1] == "resnet: error: stopped by SIGTERM"
        assert not list(scratch.glob("resnet-bench-*"))
    else:
        assert bench.returncode == -signal.SIGKILL
    assert not (docs / "benchmarks.md").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--concurrency", "-4"], "--concurrency must be at least 0 (0: the default), got -4"),
        (["--threads", "-2"], "--threads must be at least 0 (0: the default), got -2"),
        (["--threads", "99999999"], "--threads must be at most 1024, got 99999999"),
        (["--repository", "no-such-repository"], "model repository no-such-repository does not exist"),
        (["--docs", "README.md"], "--docs README.md is a file, not a folder"),
        (["--repository", "README.md"], "model repository README.md is a file, not a folder"),
        # these ran on generated photos, or measured a run of 400s
        (["--images", "model_repository"], "--images folder model_repository holds no .bmp/.jpeg/.jpg/.png"),
        (["--images", "{broken}"], "--images folder {broken}: b.jpg cannot be decoded (every request that"),
    ],
)
def test_bad_flags_are_one_line_before_any_measurement(tmp_path, flags, message):
    (tmp_path / "b.jpg").write_bytes(b"not a JPEG")
    flags, message = [flag.format(broken=tmp_path) for flag in flags], message.format(broken=tmp_path)
    command = [sys.executable, "-m", "cli", "bench", "--quick", *flags]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert result.returncode == 1
    assert result.stderr.startswith(f"resnet: error: {message}") and result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "delay_s, status, message",
    [
        (2, 200, "no request finished inside the 0.5 s window with 2 in flight at "),
        (0, 503, "no request succeeded at "),
    ],
)
def test_a_load_with_no_completed_request_says_why(delay_s, status, message):
    class Server(QuietHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(delay_s)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

    with (
        threaded_http_server(Server) as url,
        pytest.raises(BenchError, match=f"^gateway: {re.escape(message)}"),
    ):
        http_load("gateway", url, "m", [b"jpeg"], concurrency=2, seconds=0.5, warmup_s=0)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flags", "title"),
    [
        ([], "TLS cost (gateway)"),
        (["--new-connections", "--key-type", "rsa"], "TLS cost (gateway, a new connection per request)"),
    ],
)
def test_tls_cost_measures_both_transports_and_writes_its_section(tmp_path, flags, title):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n" + FOREIGN)
    command = [
        sys.executable,
        "-m",
        "loadtest.tls_cost",
        "--seconds",
        "1",
        "--rounds",
        "1",
        "--concurrency",
        "2",
    ]
    result = subprocess.run(
        [*command, *flags, "--doc", str(doc)], capture_output=True, text=True, timeout=180, cwd=REPO_ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _, sections = split_sections(doc.read_text())
    assert [title for title, _ in sections] == ["Export: runtimes on this CPU", title]
    text = dict(sections)[title]
    assert re.search(r"HTTPS / HTTP: gateway CPU per image x[0-9.]+, throughput x[0-9.]+", text)
    runs = re.findall(r"^\| 1 \| (HTTPS?) \| [0-9.]+ \|.* \| (\d+) \| (\d+) \|$", text, re.MULTILINE)
    assert [transport for transport, _, _ in runs] == ["HTTP", "HTTPS"], text
    for _, requests, connections in runs:
        # kept alive: a connection per client; else one per request (those sent in the warm-up too)
        assert int(connections) >= int(requests) if flags else int(connections) <= 2, text
    assert ("RSA certificate" if flags else "ECDSA certificate") in text


def test_tls_cost_refuses_flags_that_cannot_measure(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "loadtest.tls_cost", "--rounds", "0"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == "python -m loadtest.tls_cost: error: --rounds must be at least 1, got 0"
