"""The reproduction report (table, Fig. 6, claim check) on fake runs, and the runner on a fake trainer."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import REPO_ROOT, files_of_at_most, has_ended, wait_until
from training import reproduce
from training.errors import RunFolderError
from training.reproduce import (
    TABLE_BEGIN,
    TABLE_END,
    ReproduceError,
    RunResult,
    check_claims,
    collect_runs,
    error_axis_top,
    read_metrics,
    render_table,
    report,
)
from training.utils import hold_run_folder

# Final (train, test) error % per net, shaped like the paper: plain nets degrade, residual nets improve.
PAPER_LIKE = {
    "resnet20": (3.0, 8.8),
    "resnet32": (2.0, 7.5),
    "resnet44": (1.5, 7.2),
    "resnet56": (1.0, 7.0),
    "resnet110": (0.5, 6.5),
    "plain20": (4.0, 9.5),
    "plain32": (6.0, 10.5),
    "plain44": (8.0, 12.0),
    "plain56": (10.0, 13.5),
}


def write_fake_run(runs: Path, arch: str, train_error: float, test_error: float, points: int = 8) -> None:
    """A metrics.jsonl in the trainer's format (`MetricsWriter`: kind + iteration + values) and a run.json."""
    folder = runs / arch
    folder.mkdir(parents=True)
    lines = []
    for i in range(1, points + 1):
        iteration = i * 8000
        decay = (points - i) / points
        train = train_error + 40 * decay**2
        test = test_error + 30 * decay**2
        lines.append(
            {"kind": "train", "iteration": iteration, "loss": 0.1 + decay, "error": train, "lr": 0.1}
        )
        lines.append(
            {"kind": "eval", "iteration": iteration, "epoch": i, "top1": 100 - test, "top5": 99.0, "n": 10000}
        )
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (folder / "run.json").write_text(
        json.dumps(
            {
                "arch": arch,
                "wall_s": 1800 + len(arch),
                "gpu": "NVIDIA H100",
                "commit": "0123456789abcdef",
                "returncode": 0,
            }
        )
    )


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    for arch, (train, test) in PAPER_LIKE.items():
        write_fake_run(tmp_path / "runs", arch, train, test)
    return tmp_path / "runs"


def test_read_metrics_accepts_accuracy_percent_fraction_and_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [
        {"kind": "train", "iteration": 10, "acc1": 40.0},
        {"kind": "eval", "iteration": 10, "acc1": 0.55},
        {"kind": "train", "iteration": 20, "train_error": 30.0},
        {"split": "test", "step": 20, "error": 25.0},
        {"kind": "checkpoint", "iteration": 20, "path": "x.pth"},
        {"iteration": 30, "train_acc1": 80.0, "val_acc1": 78.0},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    train, test = read_metrics(path)
    assert train == [(10, 60.0), (20, 30.0), (30, 20.0)]
    assert [(i, round(e, 6)) for i, e in test] == [(10, 45.0), (20, 25.0), (30, 22.0)]
    path.write_text("{not json\n")
    with pytest.raises(ReproduceError, match="not JSON"):
        read_metrics(path)


def test_claims_hold_on_paper_like_runs(runs):
    results = collect_runs(runs)
    assert set(results) == set(PAPER_LIKE)
    assert results["resnet56"].test_error == pytest.approx(7.0)
    assert results["plain56"].train_error == pytest.approx(10.0)
    claims = check_claims(results)
    assert len(claims) == 5 and all(holds for _, holds, _ in claims), claims


def test_claims_fail_when_depth_hurts_residual_nets(tmp_path):
    for arch, (train, test) in {**PAPER_LIKE, "resnet56": (1.0, 14.0)}.items():
        write_fake_run(tmp_path, arch, train, test)
    verdicts = {claim: holds for claim, holds, _ in check_claims(collect_runs(tmp_path))}
    assert verdicts["ResNet test error falls with depth (20 -> 56)"] is False
    assert verdicts["ResNets beat plain nets of the same depth (test error)"] is False


@pytest.mark.parametrize(
    ("changed", "claim", "holds"),
    [
        # A step back within noise (0.5 points) keeps a trend; a bigger one breaks it even when the ends agree.
        ({"resnet44": (1.5, 7.9)}, "ResNet test error falls with depth (20 -> 56)", True),
        ({"resnet32": (2.0, 9.4)}, "ResNet test error falls with depth (20 -> 56)", False),
        ({"plain44": (5.6, 12.0)}, "plain nets get worse with depth (training error, 20 -> 56)", True),
        ({"plain32": (3.0, 10.5)}, "plain nets get worse with depth (training error, 20 -> 56)", False),
        (
            {"resnet110": (0.5, 7.4)},
            "ResNet-110 at least as good as ResNet-56 (test error, within 0.5 points)",
            True,
        ),
        (
            {"resnet110": (0.5, 7.6)},
            "ResNet-110 at least as good as ResNet-56 (test error, within 0.5 points)",
            False,
        ),
    ],
)
def test_claims_allow_noise_between_neighbours_but_not_more(tmp_path, changed, claim, holds):
    for arch, (train, test) in {**PAPER_LIKE, **changed}.items():
        write_fake_run(tmp_path, arch, train, test)
    verdicts = {label: verdict for label, verdict, _ in check_claims(collect_runs(tmp_path))}
    assert verdicts[claim] is holds
    assert sum(verdict is False for verdict in verdicts.values()) == (0 if holds else 1)


def test_claims_not_checked_without_enough_runs(tmp_path):
    write_fake_run(tmp_path, "resnet20", 3.0, 8.8)
    assert [holds for _, holds, _ in check_claims(collect_runs(tmp_path))] == [None] * 5


def test_an_unfinished_run_is_shown_but_left_out_of_the_claims(runs, tmp_path):
    stopped = runs / "plain56"
    shutil.rmtree(stopped)
    write_fake_run(runs, "plain56", 10.0, 13.5, points=4)  # evaluated every 8k, stopped after 32k
    (stopped / "run.json").write_text(json.dumps({"arch": "plain56", "wall_s": 900, "returncode": 143}))
    (stopped / "config.json").write_text(json.dumps({"arch": "plain56", "iterations": 64000}))
    results = collect_runs(runs)
    assert not results["plain56"].finished and results["resnet20"].finished
    evidence = {claim: text for claim, _, text in check_claims(results)}
    assert "plain56" not in evidence["plain nets get worse with depth (training error, 20 -> 56)"]
    assert "plain44" in evidence["plain nets get worse with depth (training error, 20 -> 56)"]
    table = render_table(results)
    assert "| plain56 | Fig. 6 only | 13.50% | 10.00% | 32,000 of 64,000 (unfinished) | 15 min |" in table
    assert "Not finished yet, so left out of the claims: plain56 (" in table
    (stopped / "config.json").unlink()
    (stopped / "run.json").unlink()  # the first segment is still running: no run.json yet
    assert "| plain56 | Fig. 6 only | 13.50% | 10.00% | 32,000 (unfinished) | n/a |" in render_table(
        collect_runs(runs)
    )
    (stopped / "config.json").write_text("{oops")
    with pytest.raises(ReproduceError, match="config.json is not JSON"):
        collect_runs(runs)


def test_table_lists_paper_and_ours(runs):
    table = render_table(collect_runs(runs))
    row = next(line for line in table.splitlines() if line.startswith("| resnet20 "))
    assert "8.75%" in row and "8.80%" in row and "3.00%" in row and "64,000" in row and "NVIDIA H100" in row
    assert "| 012345678 |" in row and "30 min" in row
    assert "| plain56 | Fig. 6 only | 13.50% |" in table
    assert table.index("| resnet20 ") < table.index("| resnet110 ") < table.index("| plain20 ")
    # the measure behind the training-error column is named right under the rows
    rows_end = table.index("\n\n")
    assert table[rows_end:].startswith("\n\nTraining error in this table is the last value logged")


def test_nets_evaluated_at_different_steps_line_up_at_equal_iterations():
    # A GPU run evaluates every epoch (390 iterations), the CPU runs every 4k: each row takes the last
    # evaluation at or shortly before its mark, and leaves a net blank where it has none.
    every_epoch = RunResult("plain20", test_curve=[(i, 50 - i / 1000) for i in range(390, 9000, 390)])
    every_4k = RunResult("resnet20", test_curve=[(4000, 30.0), (8000, 20.0), (12000, 15.0)])
    lines = reproduce.render_equal_iterations({"resnet20": every_4k, "plain20": every_epoch})
    assert lines[2:] == [
        "| iteration | plain20 | resnet20 |",
        "| ---: | ---: | ---: |",
        "| 4k | 46.10% | 30.00% |",
        "| 8k | 42.20% | 20.00% |",
        "| 12k |  | 15.00% |",
    ]
    assert (
        reproduce.render_equal_iterations({"resnet20": RunResult("resnet20", test_curve=[(1000, 60.0)])})
        == []
    )


def test_training_error_is_compared_as_the_mean_of_each_window_before_a_mark():
    # Logged every 50 iterations: the row at 4k averages 3,050..4,000 only, not the whole run.
    logged = RunResult(
        "resnet110", train_curve=[(i, 50.0 if i <= 3000 else 10.0) for i in range(50, 8001, 50)]
    )
    sparse = RunResult("resnet56", train_curve=[(3900, 12.0), (4000, 14.0)])
    lines = reproduce.render_training_windows({"resnet110": logged, "resnet56": sparse})
    assert lines[0].startswith("Training error at equal iterations")
    assert lines[2:] == [
        "| iteration | resnet56 | resnet110 |",
        "| ---: | ---: | ---: |",
        "| 4k | 13.00% | 10.00% |",
        "| 8k |  | 10.00% |",
    ]
    assert (
        reproduce.render_training_windows({"resnet56": RunResult("resnet56", test_curve=[(4000, 20.0)])})
        == []
    )


def test_a_training_window_an_unfinished_run_has_not_reached_is_left_blank():
    # Stopped at 7,350: its 7k-8k window holds only the lowest values so far, so 8k stays empty.
    unfinished = RunResult("resnet110", train_curve=[(i, 20.0 - i / 1000) for i in range(50, 7351, 50)])
    lines = reproduce.render_training_windows({"resnet110": unfinished})
    assert lines[4:] == ["| 4k | 16.48% |"]  # mean of 3,050..4,000


def test_report_rewrites_only_the_table_block_and_draws_the_figure(runs, tmp_path):
    doc = tmp_path / "docs" / "reproduction.md"
    doc.parent.mkdir()
    doc.write_text(f"# Reproduction\n\nintro\n\n{TABLE_BEGIN}\nold table\n{TABLE_END}\n\nafter\n")
    figure = tmp_path / "docs" / "img" / "fig6.png"
    report(runs, doc, figure)
    text = doc.read_text()
    assert text.startswith("# Reproduction\n\nintro\n") and text.endswith("\n\nafter\n")
    assert "old table" not in text and text.count(TABLE_BEGIN) == 1
    assert "| resnet56 | 6.97% | 7.00% |" in text and "![Fig. 6 reproduced](img/fig6.png)" in text
    assert figure.read_bytes().startswith(b"\x89PNG") and figure.stat().st_size > 10_000
    report(runs, doc, figure)  # idempotent
    assert doc.read_text() == text


def test_error_axis_keeps_the_papers_frame_and_widens_for_short_runs(runs, tmp_path):
    assert error_axis_top(collect_runs(runs)) == 20
    write_fake_run(tmp_path, "plain56", train_error=48.0, test_error=51.5)
    assert error_axis_top(collect_runs(tmp_path)) == 70


def test_error_axis_is_not_widened_by_a_net_stopped_early_in_its_schedule(tmp_path):
    write_fake_run(tmp_path, "resnet20", train_error=1.4, test_error=12.3)
    write_fake_run(tmp_path, "plain44", train_error=32.0, test_error=41.8, points=1)
    (tmp_path / "plain44" / "run.json").write_text(json.dumps({"arch": "plain44", "returncode": 143}))
    results = collect_runs(tmp_path)
    assert not results["plain44"].finished and results["plain44"].test_error > 40
    assert error_axis_top(results) == 20
    assert error_axis_top({"plain44": results["plain44"]}) == 60  # nothing finished: show what there is


def _report_cli(runs: Path, doc: Path, *extra: str, **popen) -> subprocess.CompletedProcess:
    command = ["report", "--runs-dir", str(runs), "--doc", str(doc), "--figure", str(doc.with_suffix(".png"))]
    return subprocess.run(
        [sys.executable, "-m", "training.reproduce", *command, *extra],
        capture_output=True,
        text=True,
        timeout=120,
        **popen,
    )


def test_report_without_runs_is_a_clear_error(tmp_path):
    result = _report_cli(tmp_path, tmp_path / "r.md")
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        == f"resnet: error: no runs under {tmp_path} or {tmp_path / 'r-runs'} (expected "
        "<arch>/metrics.jsonl with test evaluations)"
    )
    result = _report_cli(tmp_path, tmp_path / "r.md", "--records", "")
    assert result.returncode == 1 and f"no runs under {tmp_path} (expected" in result.stderr


def _run_cli(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    doc = tmp_path / "r.md"
    command = [
        "run",
        "--runs-dir",
        str(tmp_path / "runs"),
        "--doc",
        str(doc),
        "--figure",
        str(tmp_path / "r.png"),
    ]
    return subprocess.run(
        [sys.executable, "-m", "training.reproduce", *command, "--archs", "resnet20", "plain20", *flags],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--data", "no-such-data"], "--data no-such-data is not a folder (`make cifar` extracts"),
        (["--data", "README.md"], "--data README.md is not a folder"),
        (["--data", ".", "--train-args", "'--amp"], '--train-args "\'--amp": No closing quotation'),
        (
            ["--data", ".", "--runs-dir", "README.md"],
            "--runs-dir README.md is a file; give a folder",
        ),  # a traceback
        (["--data", ".", "--records", "README.md"], "--records README.md is a file; give a folder"),
        (["--data", ".", "--doc", "docs"], "--doc docs is a folder; give a file"),
    ],
)
def test_run_refuses_what_every_trainer_would_fail_on_before_starting_one(tmp_path, flags, message):
    result = _run_cli(tmp_path, *flags)
    assert result.returncode == 1 and result.stderr.startswith(f"resnet: error: {message}")
    assert not (tmp_path / "runs").exists()


def test_trainers_that_all_fail_are_reported_with_the_first_ones_error(tmp_path):
    result = _run_cli(tmp_path, "--data", ".", "--train-args", "--bogus 1")  # the real `resnet train`
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "resnet: error: training failed for resnet20, plain20 (see their train.log; resnet20's ends: "
        "resnet train: error: unrecognized arguments: --bogus 1 (see `resnet train --help`))"
    )


def test_report_keeps_records_beside_the_doc_so_a_fresh_clone_rebuilds_it(runs, tmp_path):
    doc = tmp_path / "docs" / "reproduction.md"
    doc.parent.mkdir()
    assert _report_cli(runs, doc).returncode == 0
    records = tmp_path / "docs" / "reproduction-runs"
    assert sorted(p.name for p in records.iterdir()) == sorted(PAPER_LIKE)
    assert (records / "resnet56" / "metrics.jsonl").read_bytes() == (
        runs / "resnet56" / "metrics.jsonl"
    ).read_bytes()
    table = doc.read_text()
    shutil.rmtree(runs)  # a fresh clone: the run folders (checkpoints, logs) are not in git, the records are
    rebuilt = _report_cli(runs, doc)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert doc.read_text() == table
    no_records = tmp_path / "other.md"
    assert _report_cli(records, no_records, "--records", "").returncode == 0
    assert not (tmp_path / "other-runs").exists() and "| resnet56 | 6.97% | 7.00% |" in no_records.read_text()


def test_a_report_that_cannot_write_its_figure_names_it_and_leaves_no_temporary_file(runs, tmp_path):
    # files may not pass 20 kB in that process (the figure is larger): its write fails as on a full disk, and it
    # left a .r.tmp.png beside the doc, as the records' copies and the table's rewrite left theirs
    doc = tmp_path / "docs" / "r.md"
    doc.parent.mkdir()
    doc.write_text("# Reproduction\n")
    result = _report_cli(runs, doc, preexec_fn=files_of_at_most(20_000))
    assert result.returncode == 1
    assert result.stderr.strip() == f"resnet: error: [Errno 27] File too large: '{doc.with_suffix('.png')}'"
    assert doc.read_text() == "# Reproduction\n"
    assert sorted(p.name for p in doc.parent.iterdir()) == ["r-runs", "r.md"]
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_a_record_names_its_source_under_the_table(runs):
    info = json.loads((runs / "resnet20" / "run.json").read_text())
    (runs / "resnet20" / "run.json").write_text(json.dumps({**info, "source": "the model card"}))
    assert "Where the resnet20 row comes from: the model card." in render_table(collect_runs(runs))


def test_runner_runs_each_net_and_records_wall_time_and_commit(tmp_path, monkeypatch):
    """The runner with a stand-in trainer that writes a metrics file, so no training is needed here."""
    fake_trainer = tmp_path / "fake_train.py"
    fake_trainer.write_text(
        "import json, sys, pathlib\n"
        "args = sys.argv[1:]\n"
        "arch, out = args[args.index('--arch') + 1], pathlib.Path(args[args.index('--output-dir') + 1])\n"
        "if arch == 'plain56': sys.exit(3)\n"
        "error = {'resnet20': 9.0, 'resnet32': 8.0}.get(arch, 10.0)\n"
        "(out / 'metrics.jsonl').write_text(json.dumps({'kind': 'eval', 'iteration': 5, 'acc1': 100 - error}))\n"
    )

    def command(arch, data, output_dir, extra):
        return [sys.executable, str(fake_trainer), "--arch", arch, "--output-dir", str(output_dir), *extra]

    monkeypatch.setattr(reproduce, "train_command", command)
    monkeypatch.setattr(reproduce.time, "sleep", lambda _: None)
    failed = reproduce.run_all(["resnet20", "resnet32", "plain56"], "unused", tmp_path / "runs", 2, [])
    assert failed == ["plain56"]
    info = json.loads((tmp_path / "runs" / "resnet32" / "run.json").read_text())
    assert info["returncode"] == 0 and info["wall_s"] >= 0 and info["arch"] == "resnet32"
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", info["commit"]) and info["gpu"]
    assert json.loads((tmp_path / "runs" / "plain56" / "run.json").read_text())["returncode"] == 3
    results = collect_runs(tmp_path / "runs")
    assert sorted(results) == ["resnet20", "resnet32"]
    assert results["resnet32"].test_error == pytest.approx(8.0)


def test_a_second_study_into_the_same_runs_dir_is_refused_before_it_starts_a_net(tmp_path, monkeypatch):
    # it started each net's trainer again, beside the running one, and wrote a failed segment into its run.json
    monkeypatch.setattr(reproduce, "train_command", lambda *_: pytest.fail("a trainer was started"))
    runs = tmp_path / "runs"
    runs.mkdir()
    held = hold_run_folder(runs)  # as the first study holds it
    try:
        with pytest.raises(RunFolderError) as refused:
            reproduce.run_all(["resnet20"], "unused", runs, 1, [])
    finally:
        held.close()
    assert str(refused.value).startswith(f"{runs} is in use by another run (pid {os.getpid()} on ")
    assert str(refused.value).endswith("then run the same command again; or give another --runs-dir")
    assert sorted(path.name for path in runs.iterdir()) == [".lock"]


REAL_TRAIN_COMMAND = reproduce.train_command


def _fake_trainer(tmp_path: Path, body: str) -> callable:
    """A stand-in `resnet train` (script `body`) given the real command's resume flags."""
    script = tmp_path / "fake_train.py"
    script.write_text(
        "import json, os, signal, sys, time, pathlib\n"
        "args = sys.argv[1:]\n"
        "arch, out = args[args.index('--arch') + 1], pathlib.Path(args[args.index('--output-dir') + 1])\n"
        "(out / 'calls').open('a').write(' '.join(args) + '\\n')\n" + body
    )
    return lambda arch, data, output_dir, extra: [
        sys.executable,
        str(script),
        "--arch",
        arch,
        "--output-dir",
        str(output_dir),
        *REAL_TRAIN_COMMAND(arch, data, output_dir, extra)[-2:],
    ]


def test_a_signal_stops_every_run_at_a_checkpoint_and_a_rerun_continues(tmp_path, monkeypatch):
    # The trainer asks its runner to stop (as `timeout` or Ctrl-C would), then waits for the forwarded SIGTERM.
    stopping = _fake_trainer(
        tmp_path,
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))\n"
        "os.kill(os.getppid(), signal.SIGTERM)\n"
        "time.sleep(60)\n",
    )
    monkeypatch.setattr(reproduce, "train_command", stopping)
    real_sleep = reproduce.time.sleep
    monkeypatch.setattr(reproduce.time, "sleep", lambda _: real_sleep(0.05))
    runs = tmp_path / "runs"
    with pytest.raises(reproduce.ReproduceInterrupted, match="run the same command again to continue"):
        reproduce.run_all(["resnet20", "resnet32"], "unused", runs, 1, [])
    stopped = json.loads((runs / "resnet20" / "run.json").read_text())
    assert stopped["returncode"] == 143 and stopped["segments"] == 1
    assert not (runs / "resnet32").exists()  # never started once the stop was asked for

    finishing = _fake_trainer(
        tmp_path,
        "(out / 'metrics.jsonl').write_text(json.dumps({'kind': 'eval', 'iteration': 5, 'acc1': 91.0}))\n",
    )
    monkeypatch.setattr(reproduce, "train_command", finishing)
    assert reproduce.run_all(["resnet20", "resnet32"], "unused", runs, 1, []) == []
    resumed = json.loads((runs / "resnet20" / "run.json").read_text())
    assert resumed["returncode"] == 0 and resumed["segments"] == 2 and resumed["wall_s"] >= stopped["wall_s"]
    assert [segment["returncode"] for segment in resumed["history"]] == [143, 0]
    assert resumed["history"][0] == stopped["history"][0]
    assert all(
        line.endswith("--resume auto") for line in (runs / "resnet20" / "calls").read_text().splitlines()
    )

    assert reproduce.run_all(["resnet20", "resnet32"], "unused", runs, 1, []) == []  # both finished: skipped
    assert len((runs / "resnet32" / "calls").read_text().splitlines()) == 1


def test_a_stopped_net_continues_on_another_machine_from_its_record(tmp_path, monkeypatch):
    """Machine A stops a net at a checkpoint; its record (with that checkpoint) lets machine B finish it."""
    trainer = _fake_trainer(
        tmp_path,
        "metrics = out / 'metrics.jsonl'\n"
        "if (out / 'checkpoint-0000005.pt').is_file():\n"
        "    metrics.open('a').write(json.dumps({'kind': 'eval', 'iteration': 10, 'acc1': 92.0}) + '\\n')\n"
        "    (out / 'checkpoint-0000010.pt').write_text('final')\n"
        "    sys.exit(0)\n"
        "metrics.write_text(json.dumps({'kind': 'eval', 'iteration': 5, 'acc1': 80.0}) + '\\n')\n"
        "(out / 'checkpoint-0000002.pt').write_text('older')\n"
        "(out / 'checkpoint-0000005.pt').write_text('state at 5')\n"
        "sys.exit(143)\n",
    )
    monkeypatch.setattr(reproduce, "train_command", trainer)
    monkeypatch.setattr(reproduce.time, "sleep", lambda _: None)
    records = tmp_path / "records"
    assert reproduce.run_all(["plain20"], "unused", tmp_path / "a", 1, [], records) == []
    record = records / "plain20"
    assert sorted(p.name for p in record.iterdir()) == ["checkpoint-0000005.pt", "metrics.jsonl", "run.json"]
    assert json.loads((record / "run.json").read_text())["returncode"] == 143

    machine_b = tmp_path / "b"
    assert reproduce.run_all(["plain20"], "unused", machine_b, 1, [], records) == []
    assert (machine_b / "plain20" / "checkpoint-0000005.pt").read_text() == "state at 5"  # resumed from it
    finished = json.loads((record / "run.json").read_text())
    assert finished["returncode"] == 0 and finished["segments"] == 2
    assert sorted(p.name for p in record.iterdir()) == [
        "metrics.jsonl",
        "run.json",
    ]  # no checkpoint once done
    assert collect_runs(records)["plain20"].test_error == pytest.approx(8.0)

    # A machine that starts the net over does not overwrite the further-along record with its shorter run.
    (tmp_path / "c" / "plain20").mkdir(parents=True)
    (tmp_path / "c" / "plain20" / "metrics.jsonl").write_text(
        json.dumps({"kind": "eval", "iteration": 1, "acc1": 50})
    )
    assert reproduce.save_records(tmp_path / "c", records) == []
    assert collect_runs(records)["plain20"].test_error == pytest.approx(8.0)


UNTIL_STOPPED = (
    "metrics = out / 'metrics.jsonl'\n"
    "metrics.write_text(json.dumps({'kind': 'eval', 'iteration': 4000, 'acc1': 70.0}) + '\\n')\n"
    "signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))\n"
    "time.sleep(60)\n"
)


def _table_row(runs: Path, arch: str) -> str:
    return next(
        line for line in render_table(collect_runs(runs)).splitlines() if line.startswith(f"| {arch} |")
    )


def test_each_segment_keeps_its_device_and_commit_and_an_older_record_counts_as_one_entry(runs):
    """A net begun on a CPU at one commit and finished on a GPU at another names both in the table."""
    folder = runs / "plain32"
    older = json.loads((folder / "run.json").read_text())  # written before `history`: one commit, no segments
    older |= {"gpu": "CPU (2 cores)", "segments": 3, "returncode": 143}
    older["command"] = "python -m cli.main train --arch plain32 --resume auto"
    (folder / "run.json").write_text(json.dumps(older))
    gpu_command = "python -m cli.main train --arch plain32 --resume auto --compile reduce-overhead"
    gpu_segment = {"arch": "plain32", "gpu": "NVIDIA H200", "commit": "fedcba9876543210", "started": "now"}
    gpu_segment["command"] = gpu_command
    assert not reproduce._record(folder, gpu_segment, 120.0, 0)

    record = json.loads((folder / "run.json").read_text())
    assert record["segments"] == 4 and record["wall_s"] == pytest.approx(older["wall_s"] + 120)
    assert [(s["gpu"], s["commit"], s.get("segments", 1)) for s in record["history"]] == [
        ("CPU (2 cores)", "0123456789abcdef", 3),
        ("NVIDIA H200", "fedcba9876543210", 1),
    ]
    # Each segment keeps the command it ran with: here the GPU segment added --train-args the CPU ones lacked.
    assert [s["command"] for s in record["history"]] == [older["command"], gpu_command]
    assert _table_row(runs, "plain32").endswith("| CPU (2 cores), NVIDIA H200 | 012345678, fedcba987 |")

    stopped = {**gpu_segment, "arch": "plain56", "commit": "abc-dirty"}
    assert not reproduce._record(runs / "plain56", stopped, 1.0, reproduce.STOPPED_BY_SIGNAL)
    assert _table_row(runs, "plain56").endswith("| NVIDIA H100, NVIDIA H200 | 012345678, abc-dirty |")


KILLED_RUNNER = """
import sys, time
from tests.test_reproduce import _fake_trainer
from training import reproduce
from training.errors import RunFolderError
reproduce.train_command = _fake_trainer(reproduce.Path(sys.argv[1]), sys.argv[2])
reproduce.run_all(["resnet20"], "unused", reproduce.Path(sys.argv[1]) / "runs", 1, [])
"""


def test_a_segment_killed_outright_is_counted_up_to_its_last_metrics_line(tmp_path, monkeypatch):
    """SIGKILL (or a lost VM) gives the runner no chance to record; the next run closes the segment. Its trainer
    gets SIGTERM from the kernel (before, it trained on, for hours, on its GPU: its own session)."""
    logs_then_hangs = (
        "(out / 'trainer.pid').write_text(str(os.getpid()))\n"
        "(out / 'metrics.jsonl').write_text(json.dumps({'kind': 'eval', 'iteration': 4000, 'acc1': 70.0}))\n"
        "time.sleep(60)\n"
    )
    runner = subprocess.Popen(
        [sys.executable, "-c", KILLED_RUNNER, str(tmp_path), logs_then_hangs], cwd=REPO_ROOT
    )
    folder = tmp_path / "runs" / "resnet20"
    deadline = time.monotonic() + 30
    while not (folder / "trainer.pid").is_file() or not (folder / "metrics.jsonl").is_file():
        assert runner.poll() is None and time.monotonic() < deadline, "the runner never started its trainer"
        time.sleep(0.05)
    runner.kill()
    runner.wait()
    trainer = int((folder / "trainer.pid").read_text())
    wait_until(
        lambda: has_ended(trainer), 10, what="the trainer ended"
    )  # this one has no handler: it just ends
    assert json.loads((folder / "run.json").read_text())["history"][-1]["running"]

    started = json.loads((folder / "run.json").read_text())["history"][0]["started"]
    last_line = dt.datetime.fromisoformat(started).timestamp() + 600
    os.utime(folder / "metrics.jsonl", (last_line, last_line))  # as if it had logged for ten minutes
    finishing = _fake_trainer(
        tmp_path,
        "(out / 'metrics.jsonl').open('a').write('\\n' + json.dumps({'kind': 'eval', 'iteration': 8000, 'acc1': 90.0}))\n",
    )
    monkeypatch.setattr(reproduce, "train_command", finishing)
    monkeypatch.setattr(reproduce.time, "sleep", lambda _: None)
    assert reproduce.run_all(["resnet20"], "unused", tmp_path / "runs", 1, []) == []

    record = json.loads((folder / "run.json").read_text())
    killed, finished = record["history"]
    assert killed["killed"] and killed["returncode"] is None and killed["wall_s"] == pytest.approx(600)
    assert "running" not in killed and finished["returncode"] == 0 and record["segments"] == 2
    assert record["wall_s"] >= 600
    assert "A segment of resnet20 was killed" in render_table(collect_runs(tmp_path / "runs"))


def test_a_killed_segment_copied_to_another_machine_ends_at_its_last_line_not_at_the_checkout(
    tmp_path, monkeypatch
):
    """`report` may copy a net's record while a segment runs; a clone then dates the file, not the training."""
    folder = tmp_path / "runs" / "resnet20"
    folder.mkdir(parents=True)
    started = dt.datetime(2026, 12, 3, 5, 30, tzinfo=dt.UTC)
    open_segment = {
        "commit": "abc",
        "gpu": "CPU",
        "started": started.isoformat(),
        "wall_s": None,
        "running": True,
    }
    (folder / "run.json").write_text(
        json.dumps({"arch": "resnet20", "history": [open_segment], "returncode": None})
    )
    lines = [
        {"kind": "train", "iteration": 100 * i, "error": 80.0, "time": started.timestamp() + 60 * i}
        for i in (1, 2)
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + "\n")
    checked_out = started.timestamp() + 86_400
    os.utime(folder / "metrics.jsonl", (checked_out, checked_out))
    monkeypatch.setattr(reproduce, "train_command", _fake_trainer(tmp_path, "pass\n"))
    monkeypatch.setattr(reproduce.time, "sleep", lambda _: None)
    reproduce.run_all(["resnet20"], "unused", tmp_path / "runs", 1, [])

    killed = json.loads((folder / "run.json").read_text())["history"][0]
    assert killed["killed"] and killed["wall_s"] == pytest.approx(120)


def test_a_time_limit_stops_the_slice_at_a_checkpoint_and_still_reports(tmp_path, monkeypatch, capsys):
    # A job scheduler's or a lent machine's end: a planned stop, so unlike a signal it records and reports.
    monkeypatch.setattr(reproduce, "train_command", _fake_trainer(tmp_path, UNTIL_STOPPED))
    monkeypatch.setattr(reproduce, "LAUNCH_MARGIN_S", 0)
    real_sleep = reproduce.time.sleep
    monkeypatch.setattr(reproduce.time, "sleep", lambda _: real_sleep(0.05))
    doc = tmp_path / "reproduction.md"
    doc.write_text(f"{TABLE_BEGIN}\n{TABLE_END}\n")
    runs = tmp_path / "runs"
    args = reproduce.get_args_parser().parse_args(
        [
            "run",
            "--archs",
            "resnet20",
            "plain20",
            "--concurrent",
            "1",
            "--time-limit",
            "1.5s",
            "--data",
            str(tmp_path),
        ]
        + ["--runs-dir", str(runs), "--doc", str(doc), "--figure", str(tmp_path / "fig6.png")]
    )
    assert reproduce.main(args) == 0
    out = capsys.readouterr().out
    assert "time limit reached; not finished: resnet20, plain20 (run the same command again)" in out
    assert json.loads((runs / "resnet20" / "run.json").read_text())["returncode"] == 143
    assert not (runs / "plain20").exists()  # queued behind resnet20 and never started
    assert (tmp_path / "reproduction-runs" / "resnet20" / "run.json").is_file()
    assert "| resnet20 | 8.75% | 30.00% |" in doc.read_text() and "unfinished" in doc.read_text()


def test_no_net_is_started_too_close_to_the_time_limit(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(reproduce, "train_command", _fake_trainer(tmp_path, UNTIL_STOPPED))
    monkeypatch.setattr(reproduce.time, "sleep", lambda _: None)
    doc = tmp_path / "reproduction.md"
    args = reproduce.get_args_parser().parse_args(
        [
            "run",
            "--archs",
            "resnet20",
            "--time-limit",
            "30",
            "--data",
            str(tmp_path),
            "--runs-dir",
            str(tmp_path / "runs"),
        ]
        + ["--doc", str(doc), "--figure", str(tmp_path / "fig6.png")]
    )
    assert reproduce.main(args) == 0  # a slice that evaluated nothing yet is not an error
    # 30 s would not reach a first checkpoint: no net started (the study's lock is all there is)
    assert [path.name for path in (tmp_path / "runs").iterdir()] == [".lock"]
    out = capsys.readouterr().out
    assert "time limit reached; not finished: resnet20" in out
    assert f"no test evaluation yet, so {doc} is unchanged" in out and not doc.exists()


@pytest.mark.parametrize(
    "text, seconds", [("570", 570), ("570s", 570), ("9.5m", 570), ("2h", 7200), (" 1.5 s", 1.5)]
)
def test_time_limits_read_as_durations(text, seconds):
    assert reproduce.duration_seconds(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "-5", "9 minutes", "1h30m"])
def test_a_bad_time_limit_is_a_usage_error(text, capsys):
    with pytest.raises(SystemExit) as exit_info:
        reproduce.get_args_parser().parse_args(["run", "--time-limit", text])
    assert exit_info.value.code == 2
    assert (
        f"argument --time-limit: {text!r} is not a duration such as 570, 9.5m or 2h"
        in capsys.readouterr().err
    )


def test_gpu_slots_are_counted_inside_the_runners_own_visible_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert [reproduce.visible_device(slot) for slot in "01"] == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4, 5")  # e.g. a scheduler gave this job GPUs 4 and 5
    assert [reproduce.visible_device(slot) for slot in "01"] == ["4", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8f2c,MIG-1a")
    assert reproduce.visible_device("1") == "MIG-1a"


def test_the_committed_table_is_what_the_committed_records_give(tmp_path):
    """docs/reproduction.md's table and claims must be rebuilt, unchanged, from docs/reproduction-runs/."""
    committed = REPO_ROOT / "docs" / "reproduction.md"
    doc = tmp_path / "reproduction.md"
    shutil.copy(committed, doc)
    report(REPO_ROOT / "docs" / "reproduction-runs", doc, tmp_path / "img" / "cifar10-figure6.png")
    assert _table_block(doc) == _table_block(committed)


def _table_block(doc: Path) -> str:
    text = doc.read_text()
    return text[text.index(TABLE_BEGIN) : text.index(TABLE_END)]
