"""`resnet loadtest` and the Locust users against a real gateway (`resnet serve`) on loopback."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest import report, shapes
from loadtest.checks import check_classification, check_prediction, grpc_target, http_failure
from loadtest.cli import LOCUSTFILE, LoadTestError, check_flags, get_args_parser, parse_duration
from loadtest.images import generate, load_images
from server.kserve_index import NOT_LOADED
from tests.gateway_models import write_colors_model, write_misfit_model
from tests.grpc_support import UNLOADED_MODEL
from tests.support import (
    OTHER_SERVERS,
    REPO_ROOT,
    free_port,
    free_ports,
    other_web_server,
    path_prefix_proxy,
    running_process,
    wait_until,
)

# --- schedules, parsing, checks (no processes) --------------------------------------------------------------


def test_steady_holds_users_until_the_run_time():
    assert shapes.users_at("steady", 0, 10, 2, 30) == (10, 2)
    assert shapes.users_at("steady", 29.9, 10, 2, 30) == (10, 2)
    assert shapes.users_at("steady", 30, 10, 2, 30) is None


def test_ramp_is_a_rising_staircase_that_reaches_the_peak():
    counts = [shapes.users_at("ramp", t / 10, 16, 1, 80)[0] for t in range(800)]
    assert counts == sorted(counts)
    assert counts[0] == 2 and counts[-1] == 16
    assert sorted(set(counts)) == shapes.ramp_steps(16)


def test_spike_jumps_to_the_peak_in_the_middle_only():
    at = {t: shapes.users_at("spike", t, 20, 1, 100)[0] for t in (0, 39, 40, 59, 60, 99)}
    assert at == {0: 4, 39: 4, 40: 20, 59: 20, 60: 4, 99: 4}


def test_unknown_scenario_is_refused():
    with pytest.raises(ValueError, match="unknown scenario"):
        shapes.users_at("tsunami", 0, 1, 1, 10)


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("2m", 120), ("1m30s", 90), ("1h", 3600)]
)
def test_durations_parse(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "0s", "5x"])
def test_bad_durations_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--users", "0"], "--users must be at least 1"),
        (["--spawn-rate", "0"], "--spawn-rate is users started per second: more than 0, got 0.0"),
        (["--max-fail-ratio", "2"], "--max-fail-ratio is a fraction in [0, 1], got 2.0"),
        (["--max-p95-ms", "-5"], "--max-p95-ms must be more than 0 ms, got -5.0"),
        (["--max-p99-ms", "0"], "--max-p99-ms must be more than 0 ms, got 0.0"),
        (["--out", __file__], f"--out {__file__} is a file; give a folder"),
        (["--ca-cert", __file__], f"bad --ca-cert: {__file__} holds no PEM certificate"),
        (["--ca-cert", "/nonexistent/ca.pem"], "bad --ca-cert: /nonexistent/ca.pem is not a file"),
    ],
)
def test_flags_that_cannot_make_a_meaningful_run_are_refused(flags, message):
    with pytest.raises(LoadTestError) as refused:
        check_flags(get_args_parser().parse_args(flags))
    assert str(refused.value).startswith(message)


def test_grpc_url_is_host_and_port_with_or_without_its_scheme(capsys):
    assert get_args_parser().parse_args(["--grpc-url", "grpc://gateway:8081"]).grpc_url == "gateway:8081"
    assert get_args_parser().parse_args(["--grpc-url", "grpcs://gw:8081"]).grpc_url == "grpcs://gw:8081"
    assert get_args_parser().parse_args([]).grpc_url == ""  # --url's host, port 8081
    # tritonclient.grpc would dial port 443 for the first and 34463 for the second
    for bad, message in (
        ("gateway", "is not host:port"),
        ("gateway:99999", "Port out of range"),
        ("grpcs://gateway", "is not host:port"),
    ):
        with pytest.raises(SystemExit):
            get_args_parser().parse_args(["--grpc-url", bad])
        assert message in capsys.readouterr().err


def test_url_is_a_base_url_without_a_trailing_slash(capsys):
    def parsed(url: str) -> str:
        return get_args_parser().parse_args(["--url", url]).url

    assert parsed("127.0.0.1:8080") == "http://127.0.0.1:8080"
    assert parsed("https://ingress.example/resnet/") == "https://ingress.example/resnet"
    for bad, message in (
        ("grpc://127.0.0.1:8081", "is a gRPC address: give it as --grpc-url with --grpc"),
        ("ftp://127.0.0.1:21", "use http://HOST:PORT or https://HOST:PORT"),
        ("http://", "use http://HOST:PORT"),
        ("http://127.0.0.1:99999", "Port out of range"),  # urllib would dial 34463
        ("http://127.0.0.1:8080/v1/", "give the server's base URL, without /v1"),
        ("http://127.0.0.1:8080/?model=x", "a base URL has no query or fragment"),
    ):
        with pytest.raises(SystemExit):
            parsed(bad)
        assert message in capsys.readouterr().err, bad


def test_thresholds_name_what_broke():
    summary = report.Summary(
        requests=100, failures=5, requests_per_s=10, p50_ms=20, p95_ms=80, p99_ms=150, max_ms=200
    )
    assert report.broken_thresholds(summary, report.Thresholds(0.1, 100, 200)) == []
    broken = report.broken_thresholds(summary, report.Thresholds(0.01, 50, 100))
    assert [line.split()[0] for line in broken] == ["fail", "p95", "p99"]
    empty = report.Summary(0, 0, 0, float("nan"), float("nan"), float("nan"), float("nan"))
    assert "no request completed" in report.broken_thresholds(empty, report.Thresholds())


def test_history_gives_exact_throughput_and_per_step_medians(tmp_path):
    header = "Timestamp,User Count,Type,Name,Requests/s,Failures/s,50%,95%,99%,Total Request Count,Total Failure Count"
    rows = [header, "100,0,,Aggregated,0,0,N/A,N/A,N/A,0,0", "100,2,POST,classify 1 image,0,0,5,5,5,3,0"]
    total = 0
    for second in range(1, 9):  # 4 s at 2 users (10 req/s), then 4 s at 4 users (16 req/s, 1 failure/s)
        users, rate, fails = (2, 10, 0) if second <= 4 else (4, 16, second - 4)
        total += rate
        rows.append(
            f"{100 + second},{users},,Aggregated,99,0,{users * 10},{users * 20},{users * 30},{total},{fails}"
        )
    (tmp_path / "h.csv").write_text("\n".join(rows) + "\n")
    history = report.read_history(tmp_path / "h.csv")
    assert [row["rps"] for row in history[1:]] == [10] * 4 + [16] * 4
    assert history[-1]["fps"] == 1
    steps = report.steps_by_users(history, settle_s=2)
    assert [(s["users"], s["rps"], s["p50"], s["p99"]) for s in steps] == [(2, 10, 20, 60), (4, 16, 40, 120)]
    assert report.plot_run(history, tmp_path, "t")[-1].name == "latency_vs_throughput.png"


def test_failures_group_by_the_gateways_error_code_not_by_request():
    def overloaded(request_id: str, held: int) -> str:
        message = f"model 'colors' holds {held} images (limit 4); retry later"
        return json.dumps({"error": {"code": "overloaded", "message": message, "request_id": request_id}})

    assert (
        http_failure(503, overloaded("a1", 3))
        == http_failure(503, overloaded("b2", 4))
        == "HTTP 503 overloaded"
    )
    assert http_failure(400, json.dumps({"error": "unexpected inference input 'x'"})) == (
        "HTTP 400: unexpected inference input 'x'"  # KServe's shape: the message is the error
    )
    assert http_failure(502, "<html>Bad Gateway</html>") == "HTTP 502: <html>Bad Gateway</html>"


def test_wrong_or_empty_predictions_are_failures():
    good = {
        "model": "m",
        "version": "1",
        "predictions": [
            {"index": 3, "label": "cat", "score": 0.9},
            {"index": 5, "label": "dog", "score": 0.1},
        ],
    }
    assert check_prediction(good, "m", 5) is None
    assert "empty" in check_prediction({**good, "predictions": []}, "m", 5)
    assert "model" in check_prediction(good, "other", 5)
    assert "top_k" in check_prediction(good, "m", 1)
    assert "descending" in check_prediction({**good, "predictions": good["predictions"][::-1]}, "m", 5)
    assert "malformed" in check_prediction({**good, "predictions": [{"index": "3"}]}, "m", 5)
    import numpy as np

    assert check_classification(np.array([[b"0.9:3:cat", b"0.1:5:dog"]], dtype=object), 5) is None
    assert check_classification(np.array([], dtype=object), 5) is not None
    assert check_classification(np.array([[b"0.1:5", b"0.9:3"]], dtype=object), 5) is not None


def test_generated_images_are_realistic_jpegs(tmp_path):
    images = generate(3)
    assert all(data[:2] == b"\xff\xd8" and 5_000 < len(data) < 200_000 for _, data in images)
    (tmp_path / "a.jpg").write_bytes(images[0][1])
    (tmp_path / "notes.txt").write_text("not an image")
    assert load_images(tmp_path) == [("a.jpg", images[0][1])]
    with pytest.raises(FileNotFoundError):
        load_images(tmp_path / "missing")


API_KEY = "loadtest-key"  # the gateway under test requires it, so the users' auth path is exercised too

# --- real gateway + real Locust -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    repository = tmp_path_factory.mktemp("repository")
    write_colors_model(repository)
    write_misfit_model(repository)  # it fails to load: the gateway serves `colors` and names misfit's error
    port, grpc_port = free_ports(2)
    env = {
        "RESNET_MODEL_REPOSITORY": str(repository),
        "RESNET_PORT": str(port),
        "RESNET_GRPC_PORT": str(grpc_port),
        "RESNET_HOST": "127.0.0.1",
        "RESNET_LOG_LEVEL": "warning",
        "RESNET_INTRA_OP_THREADS": "1",
        "RESNET_API_KEYS": API_KEY,
    }
    log = tmp_path_factory.mktemp("logs") / "gateway.log"
    with running_process(
        [sys.executable, "-m", "cli", "serve"],
        ready_url=f"http://127.0.0.1:{port}/readyz",
        env=env,
        log_path=log,
        timeout=90,
    ):
        yield {"url": f"http://127.0.0.1:{port}", "grpc": f"127.0.0.1:{grpc_port}"}


def run_loadtest(*args: str, api_key: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "RESNET_API_KEY": api_key}  # the CLI's --api-key default, as a user would set it
    return subprocess.run(
        [sys.executable, "-m", "cli", "loadtest", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
        env=env,
    )


@pytest.mark.slow
def test_headless_run_passes_thresholds_and_writes_files(gateway, tmp_path):
    out = tmp_path / "run"
    result = run_loadtest(
        "--url",
        gateway["url"],
        "--scenario",
        "ramp",
        "--users",
        "4",
        "--duration",
        "5s",
        "--out",
        str(out),
        "--max-fail-ratio",
        "0",
        "--max-p99-ms",
        "20000",
        api_key=API_KEY,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for name in (
        "locust_stats.csv",
        "locust_stats_history.csv",
        "report.html",
        "timeline.png",
        "latency_vs_throughput.png",
        "summary.json",
    ):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "colors" and summary["broken"] == []
    assert summary["summary"]["requests"] > 10 and summary["summary"]["failures"] == 0
    names = (out / "locust_stats.csv").read_text()
    assert "classify 1 image" in names and "classify 4 images" in names


@pytest.mark.slow
def test_impossible_threshold_exits_non_zero_and_says_which(gateway, tmp_path):
    result = run_loadtest(
        "--url",
        gateway["url"],
        "--users",
        "2",
        "--duration",
        "3s",
        "--out",
        str(tmp_path),
        "--max-p95-ms",
        "0.001",
        api_key=API_KEY,
    )
    assert result.returncode == 3
    assert "p95 latency" in result.stderr and "resnet: error:" in result.stderr


@pytest.mark.slow
def test_results_that_cannot_be_written_still_give_the_runs_numbers_and_verdict(gateway, tmp_path):
    # A folder where the plot goes stands in for a disk that fills after minutes of load: the run's numbers and
    # its thresholds' verdict were lost behind `[Errno 28] No space left on device` (no file named), and a PNG cut
    # short was left in --out
    (tmp_path / "timeline.png").mkdir()
    plot = tmp_path / "timeline.png"
    common = ("--url", gateway["url"], "--users", "2", "--duration", "3s", "--out", str(tmp_path))
    kept = run_loadtest(*common, "--max-fail-ratio", "0", api_key=API_KEY)
    assert kept.returncode == 1, kept.stderr[-2000:]
    assert re.search(r"^\d+ requests, 0 failed \(0\.00%\), ", kept.stdout, re.M)
    assert kept.stderr.strip().splitlines()[-1] == (
        f"resnet: error: cannot write {plot}: Is a directory; the run itself kept its thresholds (its numbers "
        "are above)"
    )
    broken = run_loadtest(*common, "--max-p95-ms", "0.001", api_key=API_KEY)
    assert broken.returncode == 3
    last = broken.stderr.strip().splitlines()[-1]
    assert last.startswith("resnet: error: 1 threshold(s) broken: p95 latency ")
    assert last.endswith(f"; and cannot write {plot}: Is a directory")
    assert not [path.name for path in tmp_path.iterdir() if path.name.endswith(".tmp")]


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_stopped_load_test_stops_locust_too(gateway, tmp_path, stop):
    # docker stop, a CI job's time limit (SIGTERM), its hard limit or the OOM killer (SIGKILL): the CLI died and
    # its Locust went on loading the service to the end of the run (here a minute), then wrote its files
    command = [
        sys.executable,
        "-m",
        "cli",
        "loadtest",
        "--url",
        gateway["url"],
        "--users",
        "2",
        "--duration",
        "60s",
    ]
    out = tmp_path / "out"
    loadtest = subprocess.Popen(
        [*command, "--out", str(out)],
        cwd=REPO_ROOT,
        env={**os.environ, "RESNET_API_KEY": API_KEY},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: (out / "locust_stats_history.csv").is_file(), 60, what="Locust under way")
        loadtest.send_signal(stop)
        _, stderr = loadtest.communicate(timeout=30)
    finally:
        loadtest.kill()
    if stop == signal.SIGTERM:
        assert loadtest.returncode == 143
        assert stderr.strip().splitlines()[-1] == (
            f"resnet: error: stopped by SIGTERM; Locust stopped too, its CSVs so far are in {out}"
        )
    else:  # no last word; the kernel sends Locust SIGTERM as its parent dies
        assert loadtest.returncode == -signal.SIGKILL

    def locust_ended() -> bool:
        return not [line for line in command_lines() if "locust" in line and str(out) in line]

    wait_until(locust_ended, 20, what="Locust stopped")


def command_lines() -> list[str]:
    """The command line of every process on this machine."""
    lines = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):  # a process that ended meanwhile
            lines.append(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
    return lines


@pytest.mark.slow
def test_missing_api_key_is_a_one_line_error(gateway, tmp_path):
    result = run_loadtest("--url", gateway["url"], "--duration", "2s", "--out", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.startswith("resnet: error: cannot list models") and "401" in result.stderr


# what the gateway's index says of the model it could not load, as the load test repeats it
MISFIT = ": failed to load: model.onnx gives 3 classes, config and labels say 2; served: colors"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model", "nope"], "model 'nope' is not served at http://127.0.0.1:"),
        (["--model", "misfit"], MISFIT),
        (["--kserve", "--model", "misfit"], MISFIT),
        (["--grpc", "--grpc-url", "{grpc}", "--model", "misfit"], MISFIT),
        (["--images", "{empty}"], "holds no .bmp/.jpeg/.jpg/.png/.webp files"),
        (["--images", "{broken}"], "b.jpg cannot be decoded (every request that sends one would fail)"),
        (["--images", "{broken}/a.jpg"], "a.jpg is a file, not a folder"),
        (["--grpc", "--grpc-url", "127.0.0.1:{dead}"], "cannot list models at grpc://127.0.0.1:"),
    ],
)
def test_a_run_that_could_only_fail_or_mislead_is_refused_before_it_starts(gateway, tmp_path, flags, message):
    empty = tmp_path / "no-photos"
    empty.mkdir()
    broken = tmp_path / "one-broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(generate(1)[0][1])
    (broken / "b.jpg").write_bytes(b"not a JPEG")
    out = tmp_path / "out"
    flags = [
        flag.format(empty=empty, broken=broken, dead=free_port(), grpc=gateway["grpc"]) for flag in flags
    ]
    result = run_loadtest(
        "--url", gateway["url"], "--duration", "2s", "--out", str(out), *flags, api_key=API_KEY
    )
    assert result.returncode == 1 and not out.exists()
    assert result.stderr.startswith("resnet: error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unreachable_gateway_is_a_one_line_error(tmp_path):
    result = run_loadtest(
        "--url", f"http://127.0.0.1:{free_port()}", "--duration", "2s", "--out", str(tmp_path)
    )
    assert result.returncode == 1
    assert result.stderr.strip().startswith("resnet: error: cannot list models")
    assert len(result.stderr.strip().splitlines()) == 1


WRONG_URLS = [
    (
        "gRPC port",
        [],
        "the answer is not HTTP/1.1 (if that is a gRPC port, give it as --grpc-url with --grpc)",
    ),
    ("web page", [], "HTTP Error 404: Not Found (no /v1 API there: for Triton's HTTP port add --kserve)"),
    ("metrics port", [], "the answer is not JSON (Expecting value"),
    ("other JSON", [], 'not a model listing: {"models": "all of them"}'),
    ("other JSON", ["--kserve"], "not a KServe repository index"),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("server", "flags", "message"),
    WRONG_URLS,
    ids=[" ".join([server, *flags]) for server, flags, _ in WRONG_URLS],
)
def test_a_url_that_is_not_the_gateway_says_what_answered(gateway, tmp_path, server, flags, message):
    out = tmp_path / "out"
    with contextlib.ExitStack() as stack:
        url = (
            f"http://{gateway['grpc']}"
            if server == "gRPC port"
            else stack.enter_context(other_web_server(*OTHER_SERVERS[server]))
        )
        result = run_loadtest("--url", url, "--duration", "2s", "--out", str(out), *flags)
    assert result.returncode == 1 and not out.exists()
    assert result.stderr.startswith(f"resnet: error: cannot list models at {url}: {message}"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_grpc_user_records_successes(gateway, tmp_path):
    out = tmp_path / "grpc"
    result = run_loadtest(
        "--url",
        gateway["url"],
        "--grpc",
        "--grpc-url",
        gateway["grpc"],
        "--users",
        "2",
        "--duration",
        "3s",
        "--out",
        str(out),
        "--max-fail-ratio",
        "0",
        api_key=API_KEY,
    )
    assert result.returncode == 0, result.stderr[-2000:] + (out / "locust_failures.csv").read_text()
    stats = (out / "locust_stats.csv").read_text()
    assert "gRPC,ModelInfer 1 image" in stats
    assert json.loads((out / "summary.json").read_text())["summary"]["requests"] > 5


@pytest.mark.slow
@pytest.mark.parametrize("user", ["resnet loadtest", "resnet loadtest --kserve", "locust ClassifyUser"])
def test_a_prefixed_url_with_a_trailing_slash_reaches_the_gateway(gateway, tmp_path, user):
    # Locust joins --host and each path as strings: "http://host/" asked for //v1/..., and every request failed.
    with path_prefix_proxy(gateway["url"], "/resnet") as proxy:
        url = f"{proxy}/resnet/"
        if user.startswith("locust"):
            result = subprocess.run(
                [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", url]
                + ["-u", "2", "-t", "3s", "--exit-code-on-error", "1", "--only-summary", user.split()[1]],
                capture_output=True,
                text=True,
                timeout=120,
                env={**os.environ, "RESNET_API_KEY": API_KEY},
            )
            assert result.returncode == 0 and " 0(0.00%)" in result.stderr, result.stderr[-2000:]
            return
        out = tmp_path / "out"
        result = run_loadtest(
            "--url", url, *user.split()[2:], "--duration", "3s", "--out", str(out), api_key=API_KEY
        )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["url"] == f"{proxy}/resnet" and summary["summary"]["failures"] == 0
    assert summary["summary"]["requests"] > 5


def kserve_loadtest(url: str, out: Path, api_key: str = "") -> subprocess.CompletedProcess:
    args = ["--url", url, "--kserve", "--users", "2", "--duration", "3s", "--out", str(out)]
    return run_loadtest(*args, "--max-fail-ratio", "0", api_key=api_key)


def assert_kserve_run(result: subprocess.CompletedProcess, out: Path) -> None:
    assert result.returncode == 0, result.stderr[-2000:] + (out / "locust_failures.csv").read_text()
    assert "POST,infer 1 image (/v2)" in (out / "locust_stats.csv").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert (
        summary["protocol"] == "KServe HTTP" and summary["model"] == "colors"
    )  # found via /v2/repository/index
    assert summary["summary"]["requests"] > 5


@pytest.mark.slow
def test_kserve_http_user_records_successes_against_the_gateway(gateway, tmp_path):
    result = kserve_loadtest(gateway["url"], tmp_path / "kserve", api_key=API_KEY)
    assert_kserve_run(result, tmp_path / "kserve")


@pytest.mark.slow
@pytest.mark.triton
def test_kserve_http_and_grpc_users_load_a_real_triton_too(pipeline_triton, tmp_path):
    # Both find their model in Triton's index, which lists a model it has not loaded first: they used to load-test
    # that one (every request failed), and the gRPC user before that asked an HTTP /v1 API Triton lacks
    result = kserve_loadtest(pipeline_triton.http_url, tmp_path / "kserve")
    grpc_flags = ["--grpc", "--grpc-url", pipeline_triton.grpc_url, "--users", "2", "--duration", "3s"]
    # named as Triton names it: the load test used to refuse it (only `colors` is served with a `_pipeline`)
    grpc_flags += ["--model", "colors_pipeline"]
    over_grpc = run_loadtest(*grpc_flags, "--out", str(tmp_path / "grpc"), "--max-fail-ratio", "0")
    assert_kserve_run(result, tmp_path / "kserve")
    assert over_grpc.returncode == 0, over_grpc.stderr[-2000:]
    summary = json.loads((tmp_path / "grpc" / "summary.json").read_text())
    assert summary["protocol"] == "gRPC" and summary["model"] == "colors"
    assert summary["summary"]["requests"] > 5 and summary["summary"]["failures"] == 0


@pytest.mark.slow
@pytest.mark.triton
@pytest.mark.parametrize("protocol", ["HTTP", "gRPC"])
def test_a_model_triton_has_not_loaded_is_refused_with_its_state(pipeline_triton, tmp_path, protocol):
    if protocol == "HTTP":
        flags = ["--url", pipeline_triton.http_url, "--kserve"]
    else:
        flags = ["--grpc", "--grpc-url", pipeline_triton.grpc_url]
    result = run_loadtest(*flags, "--model", UNLOADED_MODEL, "--out", str(tmp_path / "out"))
    assert result.returncode == 1 and not (tmp_path / "out").exists()
    message = f"model '{UNLOADED_MODEL}' is not served at "
    assert result.stderr.startswith(f"resnet: error: {message}"), result.stderr
    assert result.stderr.strip().endswith(f": {NOT_LOADED}; served: colors"), result.stderr


def test_grpc_and_kserve_users_exclude_each_other(tmp_path):
    result = run_loadtest("--url", "http://127.0.0.1:1", "--grpc", "--kserve", "--out", str(tmp_path))
    assert result.returncode == 2 and "not allowed with argument" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_locustfile_lists_users_and_shape():
    result = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(Path(REPO_ROOT, "loadtest", "locustfile.py")), "--list"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert all(user in result.stdout for user in ("ClassifyUser", "GrpcUser", "KServeHttpUser"))


@pytest.mark.parametrize(
    ("images", "message"),
    [("missing", "is missing, not a folder"), ("empty", "holds no .bmp/.jpeg/.jpg/.png/.webp files")],
)
def test_locust_run_directly_refuses_a_bad_images_folder_in_one_line(tmp_path, images, message):
    # a traceback (missing) or a silent switch to generated photos (empty) before
    (tmp_path / "empty").mkdir()
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-t", "2s"]
    command += ["--host", "http://127.0.0.1:1", "--images", str(tmp_path / images), "ClassifyUser"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_cli_process_never_imports_locust():
    """Locust monkey-patches the process with gevent on import; the CLI and these tests must stay unpatched."""
    code = "import sys, loadtest.cli, loadtest.checks, loadtest.report; print('locust' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT
    )
    assert result.stdout.strip() == "False", result.stderr


@pytest.mark.parametrize(
    "url, target",
    [
        (None, "127.0.0.1:8081"),
        ("http://gw.example:8080", "gw.example:8081"),
        ("http://[::1]:8080", "[::1]:8081"),
        ("https://gw.example/resnet", "grpcs://gw.example:8081"),  # the gateway's TLS covers both ports
    ],
)
def test_the_default_grpc_target_is_the_urls_host_on_port_8081(url, target):
    assert grpc_target(url) == target
