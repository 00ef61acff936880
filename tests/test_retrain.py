"""`resnet retrain`: fine-tune a checkpoint on new data, to a new class set, with provenance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cli.main import main as cli_main
from tests.test_training import make_image_tree, resnet_cli, small_config
from training.evaluate import evaluate_checkpoint
from training.train import train
from training.utils import load_checkpoint, sha256_file


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    root = tmp_path_factory.mktemp("parent")
    data = make_image_tree(root / "data", {"train": 16, "test": 4})
    torch.set_num_threads(1)
    result = train(small_config(data, root / "run", iterations=6), progress=False)
    return result.last_checkpoint


@pytest.mark.slow
def test_retrain_to_a_new_class_set_end_to_end(parent, tmp_path):
    new_classes = ("bird", "cat", "horse", "ship")
    data = make_image_tree(
        tmp_path / "new", {"train": 10, "val": 4}, size=(40, 36), classes=new_classes, seed=5
    )
    output = tmp_path / "retrained"
    done = resnet_cli(
        "retrain",
        "--checkpoint",
        str(parent),
        "--data",
        str(data),
        "--output-dir",
        str(output),
        "--new-classes",
        "--iterations",
        "12",
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--no-progress",
    )
    assert done.returncode == 0, done.stderr
    best = output / "best.pt"
    checkpoint = load_checkpoint(best)
    assert checkpoint["classes"] == list(new_classes) and checkpoint["num_classes"] == 4
    assert checkpoint["model"]["fc.weight"].shape == (4, 64)
    assert checkpoint["arch"] == "resnet20" and (output / "checkpoint-0000012.pt").is_file()
    assert checkpoint["iteration"] in (5, 10, 12)  # best.pt: the best evaluation (one per 5-iteration epoch)
    # The backbone started from the parent: early layers moved only a little, not re-initialised.
    parent_state = load_checkpoint(parent)
    drift = (checkpoint["model"]["conv1.weight"] - parent_state["model"]["conv1.weight"]).norm()
    assert drift < 0.5 * parent_state["model"]["conv1.weight"].norm()
    provenance = checkpoint["provenance"]
    assert provenance["parent_sha256"] == sha256_file(parent) and provenance["new_classes"] is True
    assert provenance["data"]["classes"] == list(new_classes)
    assert provenance["data"]["counts"] == dict.fromkeys(new_classes, 10)
    assert (
        provenance["metrics"]["eval"]["n"] == 16
        and provenance["metrics"]["eval"]["top1"] == checkpoint["best_top1"]
    )
    assert (
        json.loads((output / "provenance.json").read_text())["parent_sha256"] == provenance["parent_sha256"]
    )
    assert checkpoint["preprocess"] == parent_state["preprocess"]
    result = evaluate_checkpoint(best, data, workers=0)
    assert result["n"] == 16 and result["top1"] > 25  # better than chance on a learnable set


def retrain_cli(parent: Path, data: Path, output_dir: Path, *flags: str) -> int:
    """`resnet retrain` in this process: its exit status (stderr is the test's capsys)."""
    return cli_main(
        ["retrain", "--checkpoint", str(parent), "--data", str(data), "--output-dir", str(output_dir), *flags]
    )


def test_class_mismatch_without_new_classes_is_a_one_line_error(parent, tmp_path, capsys):
    data = make_image_tree(tmp_path / "new", {"train": 2}, classes=("cat", "zebra"))
    status = retrain_cli(parent, data, tmp_path / "out", "--iterations", "2", "--batch-size", "2")
    assert status == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"resnet: error: {data} has classes the checkpoint was not trained on (zebra); "
        "pass --new-classes to train a new classification head"
    ]
    assert not (tmp_path / "out").exists()


def test_retrain_on_a_subset_of_the_classes_keeps_the_head(parent, tmp_path, capsys):
    data = make_image_tree(tmp_path / "new", {"train": 6}, classes=("dog", "frog"), seed=9)
    status = retrain_cli(
        parent, data, tmp_path / "out", "--iterations", "3", "--workers", "0", "--no-progress"
    )
    err = capsys.readouterr().err
    assert status == 0, err
    assert "12 training images < --batch-size 64; using batch 12" in err  # the default batch, clamped
    assert "--lr-milestones" not in err  # the default ones fit even a 3-iteration run
    checkpoint = load_checkpoint(tmp_path / "out" / "best.pt")
    assert checkpoint["config"]["batch_size"] == 12 and checkpoint["config"]["lr_milestones"] == [1, 2]
    assert checkpoint["classes"] == ["cat", "dog", "frog"] and checkpoint["num_classes"] == 3
    assert checkpoint["provenance"]["data"]["counts"] == {"cat": 0, "dog": 6, "frog": 6}


def test_checkpoint_every_zero_is_refused_not_read_as_the_default(parent, tmp_path, capsys):
    data = make_image_tree(tmp_path / "new", {"train": 2}, classes=("cat", "dog"))
    assert retrain_cli(parent, data, tmp_path / "out", "--checkpoint-every", "0", "--workers", "0") == 1
    err = capsys.readouterr().err.splitlines()
    assert (
        err[-1] == "resnet: error: --checkpoint-every must be at least 1, got 0"
        and not (tmp_path / "out").exists()
    )


def test_resume_takes_the_flags_given_and_refuses_what_it_cannot_change(parent, tmp_path, capsys):
    # Every flag was dropped on --resume, so `--iterations 5` did not extend a finished 3-iteration retrain; and a
    # default --iterations 500 must not be taken for one given
    data = make_image_tree(tmp_path / "new", {"train": 6}, classes=("dog", "frog"), seed=9)
    out = tmp_path / "out"
    flags = ("--batch-size", "64", "--workers", "0", "--no-progress")
    assert retrain_cli(parent, data, out, "--iterations", "3", *flags) == 0
    first = load_checkpoint(out / "checkpoint-0000003.pt")
    assert first["config"]["batch_size"] == 12  # clamped to the folder
    capsys.readouterr()
    assert retrain_cli(parent, data, out, "--iterations", "5", "--resume", "auto", *flags) == 0
    assert "resuming from" in capsys.readouterr().err and (out / "checkpoint-0000005.pt").is_file()
    assert retrain_cli(parent, data, out, "--lr", "0.05", "--resume", "auto", *flags) == 1
    refusal = capsys.readouterr().err.splitlines()[-1]
    assert refusal.startswith(
        f"resnet: error: --lr 0.05: not what {out / 'checkpoint-0000005.pt'} was trained with (--lr 0.01)"
    )
