"""`resnet client classify` against real servers on loopback: the gateway over HTTP and gRPC, and a real Triton over
gRPC and HTTP, giving the same answers for the same images; user errors end in one line and a non-zero exit."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli.main import main as resnet
from server.client import ClientError, GatewayHttp, collect_images
from server.kserve_index import NOT_LOADED
from server.scores import NAN_SCORES
from tests.gateway_models import (
    LABELS,
    color_image,
    grey_image,
    noise_jpeg,
    write_broken_model,
    write_colors_model,
)
from tests.grpc_support import API_KEY, UNLOADED_MODEL, gateway_process
from tests.support import OTHER_SERVERS, REPO_ROOT, free_port, other_web_server, path_prefix_proxy


@pytest.fixture(scope="module")
def gateway(pipeline_repository, tmp_path_factory):
    with gateway_process(
        tmp_path_factory.mktemp("client-logs"),
        "--repository",
        str(pipeline_repository),
        "--api-keys",
        API_KEY,
    ) as running:
        yield running


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Five images (JPEG and PNG, sorted by name) and their expected top class."""
    folder = tmp_path_factory.mktemp("photos")
    expected = {}
    for number, color in enumerate([*LABELS, "green", "red"]):
        fmt = "PNG" if number % 2 else "JPEG"
        path = folder / f"{number}-{color}.{fmt.lower()}"
        path.write_bytes(color_image(color, fmt=fmt))
        expected[str(path)] = color
    (folder / "notes.txt").write_text("not an image: skipped when the folder is expanded")
    return folder, expected


def classify_json(capsys, *args: str) -> list[dict]:
    assert resnet(["client", "classify", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def assert_same_answers(first: list[dict], second: list[dict]) -> None:
    assert [r["image"] for r in first] == [r["image"] for r in second]
    for a, b in zip(first, second, strict=True):
        assert [(p["index"], p["label"]) for p in a["predictions"]] == [
            (p["index"], p["label"]) for p in b["predictions"]
        ]
        assert [p["score"] for p in a["predictions"]] == pytest.approx(
            [p["score"] for p in b["predictions"]], abs=1e-5
        )


def test_http_and_grpc_to_the_gateway_agree_in_batches(gateway, photos, capsys):
    folder, expected = photos
    over_http = classify_json(
        capsys, str(folder), "--url", gateway.http_url, "--top-k", "2", "--api-key", API_KEY
    )
    over_grpc = classify_json(
        capsys,
        str(folder),
        "--url",
        gateway.grpc_url,
        "--top-k",
        "2",
        "--batch-size",
        "2",
        "--api-key",
        API_KEY,
        "--model",
        "colors_pipeline",  # the name a Triton repository shows: the same model
    )
    over_kserve_http = classify_json(  # the gateway's /v2, as a Triton client would use it
        capsys,
        str(folder),
        "--url",
        gateway.http_url,
        "--server",
        "triton",
        "--api-key",
        API_KEY,
        "--top-k",
        "2",
    )
    assert {r["image"]: r["predictions"][0]["label"] for r in over_http} == expected
    assert all(len(r["predictions"]) == 2 and r["model"] == "colors" for r in over_http)
    assert 0.5 < over_http[0]["predictions"][0]["score"] <= 1.0  # probabilities, not logits
    assert_same_answers(over_http, over_grpc)
    assert_same_answers(over_http, over_kserve_http)
    assert {r["model"] for r in over_grpc} == {"colors"}


def test_table_output_names_model_and_server(gateway, photos, capsys, monkeypatch):
    folder, _ = photos
    monkeypatch.setenv("RESNET_API_KEY", API_KEY)
    monkeypatch.setenv("COLUMNS", "160")
    assert (
        resnet(["client", "classify", str(folder / "0-red.jpeg"), "--url", gateway.grpc_url, "--top-k", "3"])
        == 0
    )
    out = capsys.readouterr().out
    assert "colors on the gateway (grpc)" in out
    # auto: the gateway answers GET /v2 too, by its own name, and is then used through its /v1 API
    assert resnet(["client", "classify", str(folder / "0-red.jpeg"), "--url", gateway.http_url]) == 0
    assert "colors on the gateway (http /v1)" in capsys.readouterr().out
    assert all(label in out for label in LABELS) and "0-red.jpeg" in out


def folder_with_bad_images(photos, folder):
    """Three good photos and two files no server can decode: the third of five and the last."""
    folder.mkdir()
    good = sorted(photos[0].glob("*-*.*"))[:3]
    for path in good:
        (folder / path.name).write_bytes(path.read_bytes())
    bad = [folder / "1-zz-broken.jpeg", folder / "9-truncated.png"]
    bad[0].write_bytes(b"not a JPEG at all")
    bad[1].write_bytes(color_image("red", fmt="PNG")[:40])
    return [str(folder / path.name) for path in good], [str(path) for path in bad]


def assert_bad_named_and_rest_classified(capsys, args, photos, good, bad) -> None:
    assert resnet([*args, "--json"]) == 1
    captured = capsys.readouterr()
    classified = {r["image"]: r["predictions"][0]["label"] for r in json.loads(captured.out)}
    assert list(classified) == good  # in the folder's order, none lost to the bad files beside them
    expected = {Path(path).name: label for path, label in photos[1].items()}
    assert all(label == expected[Path(path).name] for path, label in classified.items())
    lines = [line for line in captured.err.splitlines() if line.startswith("resnet")]  # not tqdm's bar
    assert len(lines) == 2, captured.err
    for line, path in zip(lines, bad, strict=True):
        assert line.startswith(f"resnet: error: {path}: ") and "not a decodable image" in line
    assert " of 5" not in captured.err


@pytest.mark.parametrize("protocol", ["http", "grpc", "http /v2"])
def test_bad_images_are_named_by_file_and_the_rest_classified(gateway, photos, tmp_path, capsys, protocol):
    good, bad = folder_with_bad_images(photos, tmp_path / "mixed")
    url = gateway.grpc_url if protocol == "grpc" else gateway.http_url
    server = ["--server", "triton"] if protocol == "http /v2" else []
    args = ["client", "classify", str(tmp_path / "mixed"), "--url", url, "--api-key", API_KEY, *server]
    assert_bad_named_and_rest_classified(capsys, [*args, "--timeout", "5"], photos, good, bad)


def test_an_image_the_model_has_no_scores_for_costs_only_itself(tmp_path, capsys):
    # NaN scores: the gateway's /v1 answered 500 for the whole request, which ended the run; over KServe the client
    # printed nan for every class
    repository, photos = tmp_path / "repository", tmp_path / "photos"
    write_colors_model(repository, scale=3e38, nan_when_overflowing=True)
    photos.mkdir()
    (photos / "0-grey.png").write_bytes(grey_image())
    (photos / "1-red.jpeg").write_bytes(color_image("red"))
    (photos / "2-grey.png").write_bytes(grey_image())
    with gateway_process(tmp_path, "--repository", str(repository)) as gateway:
        for url, server in (
            (gateway.http_url, "auto"),
            (gateway.grpc_url, "auto"),
            (gateway.http_url, "triton"),
        ):
            assert (
                resnet(["client", "classify", str(photos), "--url", url, "--server", server, "--json"]) == 1
            )
            captured = capsys.readouterr()
            assert [result["image"] for result in json.loads(captured.out)] == [
                str(photos / "0-grey.png"), str(photos / "2-grey.png")
            ]  # fmt: skip
            [line] = [line for line in captured.err.splitlines() if line.startswith("resnet")]
            assert line.startswith(f"resnet: error: {photos / '1-red.jpeg'}: ") and NAN_SCORES in line, line


def test_only_bad_images_print_no_table(gateway, photos, tmp_path, capsys):
    _, bad = folder_with_bad_images(photos, tmp_path / "mixed")
    args = ["client", "classify", *bad, "--url", gateway.http_url, "--api-key", API_KEY]
    assert resnet(args) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 2


@pytest.fixture(scope="module")
def small_body_gateway(pipeline_repository, tmp_path_factory):
    """A gateway that takes request bodies of up to 100 kB."""
    flags = ["--repository", str(pipeline_repository), "--max-body-bytes", "100000"]
    with gateway_process(tmp_path_factory.mktemp("small-body-logs"), *flags) as running:
        yield running


@pytest.mark.parametrize("protocol", ["http", "grpc", "http /v2"])
def test_a_batch_too_large_together_is_split_and_an_image_too_large_alone_refused(
    small_body_gateway, tmp_path, capsys, protocol
):
    for number in range(6):  # about 22 kB each: six fit one by one (and three together), not all six
        (tmp_path / f"{number}.jpg").write_bytes(noise_jpeg(number, (150, 150)))
    (tmp_path / "9-huge.jpg").write_bytes(noise_jpeg(9, (400, 400)))  # about 144 kB: over the limit alone
    url = small_body_gateway.grpc_url if protocol == "grpc" else small_body_gateway.http_url
    server = ["--server", "triton"] if protocol == "http /v2" else []
    assert resnet(["client", "classify", str(tmp_path), "--url", url, *server, "--json"]) == 1
    captured = capsys.readouterr()
    assert [r["image"] for r in json.loads(captured.out)] == [str(tmp_path / f"{n}.jpg") for n in range(6)]
    error = captured.err.strip()
    assert error.startswith(f"resnet: error: {tmp_path / '9-huge.jpg'}: ") and "\n" not in error
    assert "over the limit of 100000" in error or "larger than max" in error


def test_a_file_that_cannot_be_read_costs_only_itself(gateway, photos, capsys):
    folder, expected = photos
    first, second = sorted(expected)[:2]
    unreadable = "/proc/self/mem"  # a regular file whose read fails with EIO, even for root
    args = ["client", "classify", first, unreadable, second, "--url", gateway.grpc_url, "--api-key", API_KEY]
    assert resnet([*args, "--json"]) == 1
    captured = capsys.readouterr()
    assert [r["image"] for r in json.loads(captured.out)] == [first, second]
    assert captured.err.strip() == f"resnet: error: {unreadable}: cannot read it: Input/output error"


def revoke_key(self) -> None:
    self.http.headers["Authorization"] = "Bearer revoked"


def interrupt(self) -> None:
    raise KeyboardInterrupt  # Ctrl-C while the second batch is sent


@pytest.mark.parametrize(
    ("after_the_first_batch", "status", "last_line"),
    [
        (revoke_key, 1, "resnet: error: {url} answered 401: "),
        (interrupt, 130, "resnet: interrupted ("),
    ],
)
def test_a_stop_mid_run_keeps_the_answers_so_far(
    gateway, photos, capsys, monkeypatch, after_the_first_batch, status, last_line
):
    send = GatewayHttp.classify
    sent: list[int] = []

    def classify(self, model, images, top_k):
        sent.append(len(images))
        if len(sent) > 1:
            after_the_first_batch(self)
        return send(self, model, images, top_k)

    monkeypatch.setattr(GatewayHttp, "classify", classify)
    folder, expected = photos
    monkeypatch.setenv("RESNET_API_KEY", API_KEY)
    args = ["client", "classify", str(folder), "--url", gateway.http_url, "--batch-size", "2"]
    assert resnet([*args, "--json"]) == status
    captured = capsys.readouterr()
    assert [r["image"] for r in json.loads(captured.out)] == sorted(expected)[:2]
    error = captured.err.strip().splitlines()[-1]
    assert error.startswith(last_line.format(url=gateway.http_url))
    assert error.endswith("(stopped after 2 of 5 images, answered above)") and len(sent) == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--timeout", "0"], "--timeout must be more than 0 and at most 86400 seconds, got 0.0"),
        (["--timeout", "inf"], "--timeout must be more than 0 and at most 86400 seconds, got inf"),
        (["--top-k", "0"], "at least 1"),
    ],
)
def test_bad_flags_are_one_line(photos, capsys, args, message):
    assert resnet(["client", "classify", str(photos[0]), *args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("resnet: error: ") and message in err and "\n" not in err


@pytest.mark.parametrize("url", ["http", "grpc"])
def test_dash_classifies_the_image_piped_to_stdin(gateway, photos, url):
    folder, expected = photos
    first = sorted(expected)[0]
    command = [sys.executable, "-m", "cli", "client", "classify", "-", first, "--json", "--api-key", API_KEY]
    command += ["--url", {"http": gateway.http_url, "grpc": gateway.grpc_url}[url], "--top-k", "1"]
    result = subprocess.run(
        command, input=Path(first).read_bytes(), capture_output=True, timeout=60, cwd=REPO_ROOT
    )
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)
    assert [answer["image"] for answer in answers] == ["-", first]
    assert {answer["predictions"][0]["label"] for answer in answers} == {expected[first]}


def test_dash_is_one_image_and_needs_a_pipe():
    with pytest.raises(ClientError, match=r"standard input\) holds one image; give it once"):
        collect_images([Path("-"), Path("-")])
    terminal, keyboard = os.openpty()  # reading would wait for someone to type an image
    command = [sys.executable, "-m", "cli", "client", "classify", "-"]
    try:
        result = subprocess.run(
            command, stdin=terminal, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT
        )
    finally:
        os.close(terminal)
        os.close(keyboard)
    assert result.returncode == 1
    assert result.stderr.startswith("resnet: error: - reads an image from standard input: pipe one in")


def test_a_folder_of_class_folders_names_the_way_in(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "1.jpg").write_bytes(b"")
    with pytest.raises(ClientError, match=f"sub-folders are not searched: name them, e.g. {tmp_path}/"):
        collect_images([tmp_path])
    assert collect_images([tmp_path / "cat"]) == [tmp_path / "cat" / "1.jpg"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.jpg"], "image not found: missing.jpg"),
        (["{photo}", "--url", "ftp://host:1"], "bad --url"),
        (["{photo}", "--url", "grpc://127.0.0.1:{wrapped}"], "Port out of range 0-65535"),  # not port - 65536
        (["{photo}", "--url", "http://[::1"], "bad --url 'http://[::1': Invalid IPv6 URL"),
        (["{photo}", "--url", "grpc://127.0.0.1:1/resnet"], "a gRPC address is grpc://HOST:PORT, no path"),
        (["{photo}", "--url", "grpc://127.0.0.1"], "a gRPC address is grpc://HOST:PORT"),
        (["{photo}", "--url", "http://127.0.0.1:1/v1/"], "give the server's base URL, without /v1"),
        (["{photo}", "--url", "{grpc}", "--api-key", "wrong"], "invalid API key"),
        (["{photo}", "--url", "{http}", "--api-key", "wrong"], "401"),
        (
            ["{photo}", "--url", "{grpc}", "--api-key", API_KEY, "--model", "nope"],
            "serves no nope_pipeline, the ensemble that takes encoded images",
        ),
        (["{photo}", "--url", "{http}", "--api-key", API_KEY, "--model", "nope"], "'nope' not found"),
        (["{photo}", "--url", "grpc://127.0.0.1:{dead}"], "grpc://127.0.0.1:"),
        (["{photo}", "--url", "http://127.0.0.1:{dead}"], "cannot reach"),
        # a port of the other protocol: each client reads the other's bytes, and the hint names the fix
        (["{photo}", "--url", "{grpc_as_http}"], "(if that is a gRPC port, use grpc://HOST:PORT;"),
        (["{photo}", "--url", "{grpc_as_http}", "--server", "gateway"], "use grpc://HOST:PORT"),
        (["{photo}", "--url", "{grpc_as_http}", "--server", "triton"], "use grpc://HOST:PORT"),
        (["{photo}", "--url", "{http_as_grpc}"], "(if that is an HTTP port, use http://HOST:PORT;"),
    ],
)
def test_errors_are_one_line_and_exit_non_zero(gateway, photos, capsys, args, message):
    folder, _ = photos
    values = {
        "photo": str(folder / "0-red.jpeg"),
        "grpc": gateway.grpc_url,
        "http": gateway.http_url,
        "dead": free_port(),
        "wrapped": 65536 + int(gateway.grpc_url.rsplit(":", 1)[1]),
        "grpc_as_http": gateway.grpc_url.replace("grpc://", "http://"),
        "http_as_grpc": gateway.http_url.replace("http://", "grpc://"),
    }
    assert resnet(["client", "classify", *(arg.format(**values) for arg in args), "--timeout", "5"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("resnet: error: ") and "\n" not in err and message in err, err


@pytest.mark.parametrize("server", ["auto", "triton"])  # the gateway's /v1, or its KServe v2 HTTP at /v2
def test_a_gateway_under_a_path_prefix_is_reached_through_it(gateway, photos, capsys, server):
    folder, expected = photos
    with path_prefix_proxy(gateway.http_url, "/resnet") as proxy:
        args = [str(folder), "--url", f"{proxy}/resnet/", "--server", server, "--api-key", API_KEY]
        answers = classify_json(capsys, *args)
    assert {r["image"]: r["predictions"][0]["label"] for r in answers} == expected


@pytest.mark.parametrize("server", ["auto", "gateway", "triton"])
@pytest.mark.parametrize("answer", OTHER_SERVERS, ids=list(OTHER_SERVERS))
def test_a_server_that_is_neither_is_named_in_one_line(photos, capsys, answer, server):
    folder, _ = photos
    with other_web_server(*OTHER_SERVERS[answer]) as url:
        assert (
            resnet(["client", "classify", str(folder / "0-red.jpeg"), "--url", url, "--server", server]) == 1
        )
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"resnet: error: {url}") and "\n" not in err, err
    assert "is --url the" in err, err


def test_console_script_help_and_exit_code(gateway):
    help_text = subprocess.run(
        [sys.executable, "-m", "cli.main", "client", "classify", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "grpc://HOST:PORT" in help_text and "RESNET_CLIENT_URL" in help_text
    failed = subprocess.run(
        [sys.executable, "-m", "cli.main", "client", "classify", "nowhere.png"],
        capture_output=True,
        text=True,
    )
    assert failed.returncode == 1 and failed.stderr.strip() == "resnet: error: image not found: nowhere.png"


@pytest.mark.triton
@pytest.mark.slow
def test_triton_grpc_and_http_answer_like_the_gateway(gateway, pipeline_triton, photos, capsys):
    folder, expected = photos
    reference = classify_json(
        capsys, str(folder), "--url", gateway.http_url, "--api-key", API_KEY, "--top-k", "3"
    )
    grpc_url = f"grpc://{pipeline_triton.grpc_url}"
    over_grpc = classify_json(capsys, str(folder), "--url", grpc_url, "--top-k", "3")
    over_http = classify_json(
        capsys, str(folder), "--url", pipeline_triton.http_url, "--top-k", "3", "--batch-size", "3"
    )
    assert {r["image"]: r["predictions"][0]["label"] for r in over_grpc} == expected
    assert_same_answers(reference, over_grpc)
    assert_same_answers(reference, over_http)


@pytest.mark.triton
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_model_triton_has_not_loaded_is_named_so(pipeline_triton, photos, capsys, protocol):
    # Triton's index lists it (with no state): the client used to send it the images, and print Triton's "unknown
    # model"
    url = f"grpc://{pipeline_triton.grpc_url}" if protocol == "grpc" else pipeline_triton.http_url
    args = ["client", "classify", str(photos[0] / "0-red.jpeg"), "--url", url, "--model", UNLOADED_MODEL]
    assert resnet(args) == 1
    assert capsys.readouterr().err.strip() == (
        f"resnet: error: {url} lists {UNLOADED_MODEL}_pipeline, but it is not ready: {NOT_LOADED}"
    )


def test_a_model_the_gateway_could_not_load_is_named_so(pipeline_repository, photos, tmp_path, capsys):
    repository = tmp_path / "repository"
    shutil.copytree(pipeline_repository, repository)
    write_broken_model(repository)
    with gateway_process(tmp_path, "--repository", str(repository)) as gateway:
        for url in (gateway.http_url, gateway.grpc_url):
            args = ["client", "classify", str(photos[0] / "0-red.jpeg"), "--url", url, "--model", "broken"]
            assert resnet(args) == 1
            error = capsys.readouterr().err.strip()
            assert "failed to load: [ONNXRuntimeError]" in error and "\n" not in error, error
            assert error.startswith(
                f"resnet: error: {url} answered 404: model 'broken' failed to load"
                if url.startswith("http")
                else f"resnet: error: {url} lists broken_pipeline, but it is not ready: failed to load"
            ), error


@pytest.mark.triton
@pytest.mark.slow
def test_triton_which_does_not_say_which_image_is_bad_gets_halves_of_the_batch(
    pipeline_triton, photos, tmp_path, capsys
):
    # Triton's preprocessing model refuses the whole request without naming the image: the client sends each half
    # of that batch again, down to the one image that is refused
    good, bad = folder_with_bad_images(photos, tmp_path / "mixed")
    for url in (f"grpc://{pipeline_triton.grpc_url}", pipeline_triton.http_url):
        args = ["client", "classify", str(tmp_path / "mixed"), "--url", url, "--batch-size", "4"]
        assert_bad_named_and_rest_classified(capsys, args, photos, good, bad)


@pytest.mark.parametrize("server", ["auto", "gateway", "triton"])
def test_a_server_that_never_answers_is_given_up_after_timeout(photos, capsys, server):
    # tritonclient.http waited its own 60 s whatever --timeout said
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # connections complete in the backlog; nothing ever reads or answers them
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        args = [str(photos[0] / "0-red.jpeg"), "--url", url, "--server", server, "--timeout", "1"]
        assert resnet(["client", "classify", *args]) == 1
        waited = time.monotonic() - started
    assert capsys.readouterr().err.strip() == f"resnet: error: cannot reach {url}: timed out"
    assert waited < 30, f"gave up after {waited:.0f} s, not --timeout's 1 s"


def test_a_server_fault_names_the_request_id_to_quote(photos, capsys, tmp_path):
    # a gateway whose Triton is gone answers 503 backend_unavailable: a fault to report, with its request's ID
    flags = ["--backend", "triton", "--triton-url", f"127.0.0.1:{free_port()}"]
    with gateway_process(tmp_path, *flags, ready_path="/healthz") as broken:
        args = [str(photos[0] / "0-red.jpeg"), "--url", broken.http_url, "--model", "colors"]
        assert resnet(["client", "classify", *args]) == 1
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(
        rf"resnet: error: {broken.http_url} answered 503: .* \(request [0-9a-f]{{32}}\)", err
    ), err
