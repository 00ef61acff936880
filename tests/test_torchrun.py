"""Distributed data parallel on the CPU: `torchrun` with 2 processes (gloo) trains, evaluates and checkpoints."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.support import REPO_ROOT, torchrun_train_command
from tests.test_training import make_image_tree
from training.evaluate import evaluate_checkpoint
from training.utils import hold_run_folder, list_checkpoints, load_checkpoint


@pytest.mark.slow
def test_two_process_torchrun_trains_and_checkpoints(tmp_path):
    data = make_image_tree(tmp_path / "data", {"train": 16, "test": 4})
    output = tmp_path / "run"
    command = [
        *torchrun_train_command(),
        "--recipe",
        "cifar-paper",
        "--arch",
        "resnet20",
        "--data",
        str(data),
        "--output-dir",
        str(output),
        "--batch-size",
        "16",
        "--iterations",
        "6",
        "--log-every",
        "2",
        "--checkpoint-every",
        "3",
        "--eval-every",
        "6",
        "--device",
        "cpu",
        "--no-tensorboard",
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [iteration for iteration, _ in list_checkpoints(output)] == [3, 6]
    checkpoint = load_checkpoint(output / "checkpoint-0000006.pt")
    assert checkpoint["config"]["world_size"] == 2 and checkpoint["iteration"] == 6
    assert not any(key.startswith("module.") for key in checkpoint["model"])  # saved unwrapped from DDP
    assert json.loads((output / "config.json").read_text())["world_size"] == 2
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    train_lines = [line for line in lines if line["kind"] == "train"]
    assert [line["iteration"] for line in train_lines] == [2, 4, 6]  # written once (rank 0), not per process
    evals = [line for line in lines if line["kind"] == "eval"]
    assert len(evals) == 1 and evals[0]["n"] == 12  # the test split, sharded over the ranks and summed
    assert evaluate_checkpoint(output / "best.pt", data, workers=0)["n"] == 12


@pytest.mark.slow
def test_a_folder_another_run_holds_stops_every_rank_with_one_line(tmp_path):
    data, output = make_image_tree(tmp_path / "data", {"train": 8}), tmp_path / "run"
    output.mkdir()
    held = hold_run_folder(output)  # as a run in progress holds it (this process: its pid in the message)
    try:
        flags = ["--arch", "resnet20", "--data", str(data), "--output-dir", str(output), "--iterations", "2"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        command = [*torchrun_train_command(), *flags, "--device", "cpu", "--no-progress"]
        done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    finally:
        held.close()
    assert done.returncode != 0
    # rank 0 names the holder; rank 1 used to die in a collective rank 0 had left ("Connection closed by peer")
    assert f"resnet: error: {output} is in use by another run (pid {os.getpid()} on " in done.stderr
    assert f"resnet: error: {output} is in use by another run (rank 0 found it locked)" in done.stderr
    assert "Connection closed by peer" not in done.stderr and not (output / "config.json").exists()
