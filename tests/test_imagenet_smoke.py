"""Smoke run of the ImageNet recipe end to end on the CPU: ResNet-50, `imagenet-paper`, torchrun with 2 processes,
scale augmentation, the step schedule, checkpoints, then the paper's 10-crop evaluation of the result.

Synthetic photos (3 classes) keep it independent of ../shared; a handful of iterations shows the plumbing, not
accuracy.
"""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
from PIL import Image

from tests.support import REPO_ROOT, torchrun_train_command
from training.evaluate import evaluate_checkpoint
from training.utils import list_checkpoints, load_checkpoint

CLASSES = ("n01440764", "n01629819", "n02965783")


def make_photos(root, per_class: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    for split, count in per_class.items():
        for index, wnid in enumerate(CLASSES):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(count):
                size = (
                    int(rng.integers(260, 400)),
                    int(rng.integers(260, 400)),
                )  # varied shapes, as ImageNet
                base = np.zeros((size[1], size[0], 3), np.uint8) + np.array(
                    [90 * index, 120, 200 - 80 * index], np.uint8
                )
                noise = rng.integers(0, 40, base.shape, dtype=np.uint8)
                Image.fromarray(base + noise).save(folder / f"{wnid}_{i}.JPEG", quality=90)


@pytest.mark.slow
def test_imagenet_recipe_resnet50_under_torchrun_then_ten_crop(tmp_path):
    data, output = tmp_path / "imagenet", tmp_path / "run"
    make_photos(data, {"train": 4, "val": 1})
    command = [
        *torchrun_train_command(),
        "--recipe",
        "imagenet-paper",
        "--arch",
        "resnet50",
        "--data",
        str(data),
        "--output-dir",
        str(output),
        "--batch-size",
        "8",
        "--iterations",
        "4",
        "--lr-milestones",
        "2,3",
        "--checkpoint-every",
        "2",
        "--eval-every",
        "4",
        "--log-every",
        "1",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--no-tensorboard",
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]

    assert [iteration for iteration, _ in list_checkpoints(output)] == [2, 4]
    checkpoint = load_checkpoint(output / "best.pt")
    config = checkpoint["config"]
    assert checkpoint["arch"] == "resnet50" and checkpoint["classes"] == list(CLASSES)
    assert checkpoint["model"]["fc.weight"].shape == (3, 2048)  # torchvision layout, classes from the folder
    assert config["recipe"] == "imagenet-paper" and config["world_size"] == 2
    assert (
        tuple(config["train_resize"]) == (256, 480) and config["train_crop"] == 224 and config["lighting"] > 0
    )
    assert checkpoint["preprocess"]["crop"] == 224 and checkpoint["preprocess"]["resize_shorter"] == 256

    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    rates = [r["lr"] for r in records if r["kind"] == "train"]
    base = 0.1 * 8 / 256  # lr 0.1 is for batch 256; scaled linearly to the global batch of 8
    assert rates == pytest.approx([base, base / 10, base / 100, base / 100])
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(evals) == 1 and evals[0]["n"] == 3  # one val image per class, sharded over 2 ranks and summed

    ten_crop = evaluate_checkpoint(output / "best.pt", data, ten_crop=True, workers=0)
    assert ten_crop["ten_crop"] and ten_crop["n"] == 3 and 0 <= ten_crop["top1"] <= 100
