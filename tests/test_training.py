"""The training core on tiny synthetic data: transforms, recipes, the loop, checkpoints, exact resume, CLI errors."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as v1

from cli.main import main as cli_main
from server.spec import PreprocessSpec
from tests.gateway_models import write_misfit_model
from tests.support import REPO_ROOT, VENV_BIN, files_of_at_most, wait_until
from training import recipes
from training.data import load_split
from training.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    RunFolderError,
    TrainingDiverged,
    UnknownRecipeError,
)
from training.evaluate import evaluate_checkpoint, evaluate_onnx
from training.models import ARCHS, build_model
from training.presets import eval_transform, ten_crop_transform
from training.recipes import TrainConfig
from training.train import train, weights_are_finite
from training.utils import (
    MetricsWriter,
    StepSchedule,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    set_rng_state,
)

CLASSES = ("cat", "dog", "frog")


def make_image_tree(
    root: Path, per_class: dict[str, int], size: tuple[int, int] = (32, 32), classes=CLASSES, seed: int = 0
) -> Path:
    """`<split>/<class>/<n>.jpg` with a learnable signal: each class has its own mean colour."""
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            colour = np.array([60 + 70 * (index % 3), 200 - 60 * (index % 4), 40 + 50 * (index % 5)])
            for n in range(count):
                pixels = colour + rng.integers(-40, 40, (size[1], size[0], 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                    folder / f"{n}.jpg", quality=90
                )
    return root


# Tiny models on a shared 2-core machine: one thread avoids OpenMP spinning against other processes (3x faster).
ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def resnet_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    command = (
        [str(VENV_BIN / "resnet")] if (VENV_BIN / "resnet").exists() else [sys.executable, "-m", "cli.main"]
    )
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, env=ONE_THREAD_ENV
    )


@pytest.fixture(scope="module")
def cifar_like(tmp_path_factory) -> Path:
    return make_image_tree(tmp_path_factory.mktemp("cifar"), {"train": 32, "test": 8})


def small_config(data: Path, output_dir: Path, **overrides) -> TrainConfig:
    values = dict(
        arch="resnet20",
        data=str(data),
        output_dir=str(output_dir),
        batch_size=16,
        iterations=8,
        log_every=2,
        checkpoint_every=4,
        eval_every=100,
        keep_last=100,
        tensorboard=False,
        device="cpu",
    )
    return recipes.resolve("cifar-paper", {**values, **overrides})


# ------------------------------------------------------------------------------------------------ transforms


def test_eval_transform_matches_the_reference_pillow_pipeline():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 451, 3), dtype=np.uint8))
    spec = PreprocessSpec.imagenet()
    reference = v1.Compose(
        [v1.Resize(256), v1.CenterCrop(224), v1.ToTensor(), v1.Normalize(spec.mean, spec.std)]
    )
    ours = eval_transform(spec)(image)
    assert ours.shape == (3, 224, 224)
    torch.testing.assert_close(ours, reference(image), rtol=0, atol=1e-5)


def test_eval_transform_applies_channel_order_and_layout():
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    rgb = eval_transform(PreprocessSpec(resize_shorter=36, crop=32))(image)
    bgr_nhwc = eval_transform(PreprocessSpec(resize_shorter=36, crop=32, channel_order="BGR", layout="NHWC"))(
        image
    )
    torch.testing.assert_close(bgr_nhwc, rgb.flip(0).permute(1, 2, 0))


def test_ten_crop_holds_the_center_crop_and_mirrors():
    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (70, 90, 3), dtype=np.uint8))
    spec = PreprocessSpec(resize_shorter=64, crop=48)
    crops = ten_crop_transform(spec)(image)
    assert crops.shape == (10, 3, 48, 48)
    torch.testing.assert_close(crops[4], eval_transform(spec)(image))
    torch.testing.assert_close(crops[9], crops[4].flip(-1))


# ------------------------------------------------------------------------------------------------ recipes


def test_recipes_follow_the_paper_and_flags_override():
    cifar = recipes.resolve("cifar-paper", {})
    assert (cifar.batch_size, cifar.lr, cifar.iterations, cifar.lr_milestones) == (
        128,
        0.1,
        64_000,
        [32_000, 48_000],
    )
    assert (cifar.momentum, cifar.weight_decay, cifar.warmup_lr) == (0.9, 1e-4, None)
    imagenet = recipes.resolve("imagenet-paper", {"batch_size": 1024})
    assert imagenet.train_resize == (256, 480) and imagenet.train_crop == 224
    assert imagenet.effective_lr == pytest.approx(0.4)  # linear scaling from batch 256
    deep = recipes.resolve("cifar-paper", {"arch": "resnet110", "iterations": 10, "lr_milestones": [5]})
    assert deep.warmup_lr == 0.01 and deep.iterations == 10 and deep.lr_milestones == [5]
    with pytest.raises(UnknownRecipeError, match="cifar-paper"):
        recipes.resolve("cifar-fast", {})
    with pytest.raises(ConfigError):
        recipes.resolve("cifar-paper", {"batch_size": 10}).validate(world_size=4)
    pinned = recipes.resolve("cifar-paper", {"device": "cuda:1"})
    pinned.validate(world_size=1)  # one process may pick its GPU
    with pytest.raises(
        ConfigError, match=r"--device cuda:1 would put all 2 processes on one device; .*--device cuda"
    ):
        pinned.validate(world_size=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rng_state_is_this_devices_and_old_per_gpu_lists_still_load():
    state = rng_state()
    assert isinstance(state["cuda"], torch.Tensor)
    expected = torch.rand(3, device="cuda")
    set_rng_state(state)
    assert torch.equal(torch.rand(3, device="cuda"), expected)
    # Checkpoints written before held one state per GPU visible then, possibly more than are visible now.
    set_rng_state({**state, "cuda": [state["cuda"]] * (torch.cuda.device_count() + 4)})
    assert torch.equal(torch.rand(3, device="cuda"), expected)


def test_step_schedule_warms_up_then_divides_at_milestones():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = StepSchedule([3, 5], 0.1, warmup_factor=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    def lr_after_steps(steps: int) -> float:
        for _ in range(steps):
            optimizer.step(), scheduler.step()
        return optimizer.param_groups[0]["lr"]

    assert lr_after_steps(0) == pytest.approx(0.01)  # warm-up: 0.1 x 0.1
    assert lr_after_steps(1) == pytest.approx(0.01)  # still warming up at iteration 1
    schedule.warming_up = False
    assert lr_after_steps(1) == pytest.approx(0.1)  # iteration 2: the base rate
    assert lr_after_steps(1) == pytest.approx(0.01)  # 0.1 ÷ 10 at iteration 3
    assert lr_after_steps(2) == pytest.approx(0.001)  # ÷ 10 again at iteration 5
    state = scheduler.state_dict()
    restored = torch.optim.lr_scheduler.LambdaLR(optimizer, StepSchedule([3, 5], 0.1, warmup_factor=0.1))
    restored.load_state_dict(state)
    assert restored.lr_lambdas[0].warming_up is False  # the warm-up state survives a checkpoint


# ------------------------------------------------------------------------------------------------ the loop


@pytest.mark.slow
def test_training_on_an_image_folder_lowers_the_loss_and_skips_corrupt_files(tmp_path, capsys):
    data = make_image_tree(tmp_path / "data", {"train": 12, "val": 4}, size=(48, 40))
    (data / "train" / "cat" / "broken.jpg").write_bytes(b"not a jpeg at all")
    spec = PreprocessSpec(resize_shorter=36, crop=32).to_dict()
    config = recipes.resolve(
        "imagenet-paper",
        dict(
            arch="resnet18",
            data=str(data),
            output_dir=str(tmp_path / "run"),
            batch_size=12,
            lr=0.02,
            scale_lr=False,
            iterations=48,  # 24 left the val set at chance (50.0%) on torch 2.14 / torchvision 0.29
            log_every=12,
            checkpoint_every=100,
            eval_every=100,
            workers=0,
            tensorboard=False,
            device="cpu",
            seed=1,
        ),
    )
    config.train_resize, config.train_crop, config.preprocess = (36, 44), 32, spec
    result = train(config, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [line["loss"] for line in lines if line["kind"] == "train"]
    assert len(losses) == 4 and sum(losses[2:]) < sum(losses[:2]) * 0.7  # halves: 6-step windows are noisy
    assert result.metrics["eval"]["n"] == 12 and result.metrics["eval"]["top1"] > 50
    assert "skipped 1 unreadable image" in capsys.readouterr().err
    checkpoint = load_checkpoint(result.last_checkpoint)
    assert checkpoint["data"]["skipped_images"] == 1 and checkpoint["classes"] == list(CLASSES)


def folder_batches(data: Path, split: str, rank: int = 0, world_size: int = 1, **overrides):
    options = dict(
        dataset="imagenet", spec=PreprocessSpec(resize_shorter=32, crop=32), batch_size=2, train=True
    )
    return load_split(data, split, **{**options, **overrides}, seed=3, rank=rank, world_size=world_size)


def test_unreadable_training_images_are_replaced_so_every_rank_keeps_full_batches(tmp_path):
    # Dropped images made one rank's batches smaller and its epochs shorter: its data order drifted from the
    # (epoch, batch) that rank 0's checkpoint records, so a resumed DDP run no longer saw the same batches.
    data = make_image_tree(tmp_path / "data", {"train": 4, "val": 2})
    broken = sorted((data / "train" / "cat").glob("*.jpg"))[:3] + [data / "val" / "dog" / "0.jpg"]
    for path in broken:
        path.write_bytes(b"not a jpeg at all")
    for rank in (0, 1):
        split = folder_batches(data, "train", rank, world_size=2)
        first, again = list(split.batches), list(split.batches)
        assert len(first) == len(split.batches) == 3 and [len(labels) for _, labels in first] == [2, 2, 2]
        for (images, labels), (images_again, labels_again) in zip(first, again, strict=True):
            assert torch.equal(images, images_again) and torch.equal(labels, labels_again)  # resume-safe
        split.batches.set_epoch(0, start_batch=2)
        assert torch.equal(next(iter(split.batches))[0], first[2][0])
        assert {split.batches.dataset.samples[i][0] for i in split.batches.skipped} <= set(map(str, broken))
    val = folder_batches(data, "val", train=False, batch_size=4)
    assert (
        sum(len(labels) for _, labels in val.batches) == 5
    )  # evaluation skips: a substitute would be counted
    assert [Path(val.batches.dataset.samples[i][0]) for i in val.batches.skipped] == [broken[-1]]


def test_a_training_folder_with_no_readable_image_is_a_clear_error_not_an_endless_loop(tmp_path):
    # It used to yield no batch at all, and the loop started the same empty epoch forever (deaf to SIGTERM).
    data = make_image_tree(tmp_path / "data", {"train": 2})
    for path in (data / "train").rglob("*.jpg"):
        path.write_bytes(b"truncated")
    config = small_config(data, tmp_path / "run", batch_size=2, loader="folder", workers=0)
    with pytest.raises(
        DataError, match="no readable image in a training batch of 2, even among 16 substitutes"
    ):
        train(config, progress=False)


def test_checkpoints_hold_everything_and_are_pruned(cifar_like, tmp_path):
    config = small_config(cifar_like, tmp_path / "run", iterations=12, keep_last=2, eval_every=6)
    result = train(config, progress=False)
    assert [it for it, _ in list_checkpoints(tmp_path / "run")] == [8, 12]
    assert (tmp_path / "run" / "best.pt").is_file()
    assert not list((tmp_path / "run").glob(".*tmp"))  # atomic writes leave no temp files
    checkpoint = load_checkpoint(result.last_checkpoint)
    for key in (
        "model",
        "optimizer",
        "lr_scheduler",
        "epoch",
        "iteration",
        "rng",
        "config",
        "arch",
        "num_classes",
        "classes",
        "preprocess",
        "data_order",
        "metrics",
    ):
        assert key in checkpoint, key
    assert (
        checkpoint["iteration"] == 12 and checkpoint["arch"] == "resnet20" and checkpoint["num_classes"] == 3
    )
    assert PreprocessSpec.from_dict(checkpoint["preprocess"]) == PreprocessSpec.cifar10()
    saved_config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved_config["iterations"] == 12 and saved_config["batch_size"] == 16
    assert saved_config["effective_lr"] == pytest.approx(0.1 * 16 / 128)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"train", "eval"} == {line["kind"] for line in metrics}
    logged = [line["time"] for line in metrics]  # what dates the end of a run killed outright (reproduce)
    assert logged == sorted(logged) and abs(time.time() - logged[-1]) < 600


def test_warm_up_runs_at_the_low_rate_until_the_error_threshold(cifar_like, tmp_path, capsys):
    config = small_config(cifar_like, tmp_path / "run", iterations=6, warmup_lr=0.01, warmup_until_error=1.0)
    train(config, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rates = [line["lr"] for line in lines if line["kind"] == "train"]
    scale = 16 / 128
    assert rates == pytest.approx([0.01 * scale, 0.1 * scale, 0.1 * scale])
    assert "warm-up done at iteration 2" in capsys.readouterr().err


@pytest.mark.parametrize("lr", [1e30, 1e10])
def test_a_diverging_run_stops_before_writing_nan_weights(cifar_like, tmp_path, lr):
    # Two steps at a sane rate (the warm-up ends at the first log), a checkpoint, then a rate that blows up: the loss
    # (1e30) or the weights (1e10) turn NaN, and the run stops instead of saving them as its last and best.
    config = small_config(
        cifar_like, tmp_path, lr=lr, warmup_lr=0.01, warmup_until_error=1.0, checkpoint_every=2, log_every=2
    )
    with pytest.raises(TrainingDiverged) as diverged:
        train(config, progress=False)
    assert re.match(
        r"training diverged by iteration (4|6): (the training loss is (nan|inf)|the weights hold NaN or infinite "
        rf"values) \(lr .+\); the last checkpoint, {re.escape(str(tmp_path))}/checkpoint-000000[24].pt, is from before "
        r"it\. Lower --lr \(or add --warmup-lr\) and train again$",
        str(diverged.value),
    ), diverged.value
    checkpoints = list_checkpoints(tmp_path)
    assert checkpoints and all(weights_are_finite_in(path) for _, path in checkpoints)
    assert not (tmp_path / "best.pt").exists()


def weights_are_finite_in(path: Path) -> bool:
    model = build_model("resnet20", 3)
    model.load_state_dict(load_checkpoint(path)["model"])
    return weights_are_finite(model)


def test_nan_in_a_batchnorm_statistic_counts_as_diverged():
    model = build_model("resnet20", 3)
    assert weights_are_finite(model)
    model.bn1.running_var[0] = float("inf")
    assert not weights_are_finite(model)


def test_milestones_past_a_shortened_run_are_warned_about(cifar_like, tmp_path, capsys):
    train(
        small_config(cifar_like, tmp_path / "recipe", iterations=2), progress=False
    )  # the recipe's 32k, 48k
    warning = (
        "warning: --iterations 2 ends before the --lr-milestones at 32000,48000: the rate never drops there"
    )
    assert warning in capsys.readouterr().err
    train(small_config(cifar_like, tmp_path / "shortened", iterations=2, lr_milestones=[1]), progress=False)
    assert "--lr-milestones" not in capsys.readouterr().err


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def test_resume_on_another_device_uses_this_devices_optimizer_kernel(cifar_like, tmp_path):
    run = tmp_path / "run"
    first = train(small_config(cifar_like, run, iterations=4), progress=False)
    checkpoint = torch.load(first.last_checkpoint, weights_only=False)
    checkpoint["optimizer"]["param_groups"][0]["fused"] = True  # as written on a GPU
    torch.save(checkpoint, first.last_checkpoint)
    resumed = train(
        small_config(cifar_like, run), resume="auto", progress=False, resume_overrides={"iterations": 6}
    )
    assert resumed.iteration == 6
    assert load_checkpoint(resumed.last_checkpoint)["optimizer"]["param_groups"][0]["fused"] is None


def test_resume_auto_passes_over_a_damaged_newest_checkpoint(cifar_like, tmp_path, capsys):
    run = tmp_path / "run"
    first = train(small_config(cifar_like, run, iterations=8), progress=False)
    first.last_checkpoint.write_bytes(first.last_checkpoint.read_bytes()[:1000])  # a bad copy, a disk error
    resumed = train(
        small_config(cifar_like, run), resume="auto", progress=False, resume_overrides={"iterations": 10}
    )
    err = capsys.readouterr().err
    assert "warning: skipping checkpoint-0000008.pt: cannot read checkpoint" in err
    assert "(iteration 4)" in err
    assert resumed.iteration == 10
    assert load_checkpoint(run / "checkpoint-0000008.pt")["iteration"] == 8  # rewritten on the way


def test_resume_auto_with_no_readable_checkpoint_is_one_error(cifar_like, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint-0000004.pt").write_text("not a checkpoint")
    with pytest.raises(
        CheckpointError, match=r"no checkpoint in .*run can be read \(checkpoint-0000004.pt\)"
    ):
        train(small_config(cifar_like, run), resume="auto", progress=False)


def test_resume_refuses_flags_it_cannot_apply_instead_of_dropping_them(cifar_like, tmp_path):
    # --arch, --lr and the like were dropped: `--arch resnet32 --resume auto` trained the folder's ResNet-20 on
    run = tmp_path / "run"
    train(small_config(cifar_like, run, iterations=4), progress=False)
    asked = {"arch": "resnet32", "lr": 0.1, "lr_milestones": [2, 3], "channels_last": True, "iterations": 6}
    with pytest.raises(CheckpointError) as refused:
        train(small_config(cifar_like, run), resume="auto", progress=False, resume_overrides=asked)
    assert str(refused.value).startswith(
        f"--arch resnet32, --lr-milestones 2,3, --channels-last: not what {run / 'checkpoint-0000004.pt'} was "
        "trained with (--arch resnet20, --lr-milestones 32000,48000, no --channels-last), and a resumed run keeps "
        "its settings except --iterations, --checkpoint-every,"
    ), refused.value
    assert str(refused.value).endswith("continue without them, or start a new run in another --output-dir")
    same = {"arch": "resnet20", "lr": 0.1, "iterations": 6}  # as trained: nothing to refuse
    resumed = train(small_config(cifar_like, run), resume="auto", progress=False, resume_overrides=same)
    assert resumed.iteration == 6


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(cifar_like, tmp_path):
    straight = train(small_config(cifar_like, tmp_path / "straight"), progress=False)
    killed_dir = tmp_path / "killed"
    command = [
        sys.executable,
        "-m",
        "cli.main",
        "train",
        "--recipe",
        "cifar-paper",
        "--arch",
        "resnet20",
        "--data",
        str(cifar_like),
        "--output-dir",
        str(killed_dir),
        "--batch-size",
        "16",
        "--iterations",
        "100000",
        "--log-every",
        "2",
        "--checkpoint-every",
        "4",
        "--eval-every",
        "100000",
        "--keep-last",
        "1000",
        "--no-tensorboard",
        "--no-progress",
        "--device",
        "cpu",
    ]
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ONE_THREAD_ENV
    )
    try:
        wait_until(
            lambda: (killed_dir / "checkpoint-0000004.pt").exists() or process.poll() is not None,
            120,
            interval=0.02,
            what="first checkpoint",
        )
        # a second run into the folder meanwhile (a job restarted while the first still runs) is refused
        with pytest.raises(
            RunFolderError, match=rf"{killed_dir} is in use by another run \(pid {process.pid} on "
        ):
            run_on = {"iterations": 5}  # where it was not refused, a step past the checkpoint, not 100000
            train(
                small_config(cifar_like, killed_dir), resume="auto", progress=False, resume_overrides=run_on
            )
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL  # and its lock went with it: the resume below runs
    resumed = train(
        small_config(cifar_like, killed_dir),
        resume=str(killed_dir / "checkpoint-0000004.pt"),
        progress=False,
        resume_overrides={"iterations": 8},
    )
    assert resumed.iteration == straight.iteration == 8
    expected, actual = _weights(straight.last_checkpoint), _weights(resumed.last_checkpoint)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    assert (
        load_checkpoint(resumed.last_checkpoint)["optimizer"]["state"].keys()
        == load_checkpoint(straight.last_checkpoint)["optimizer"]["state"].keys()
    )


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_resume_auto_continues(cifar_like, tmp_path, capsys):
    output = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "cli.main",
        "train",
        "--data",
        str(cifar_like),
        "--output-dir",
        str(output),
        "--batch-size",
        "16",
        "--iterations",
        "100000",
        "--checkpoint-every",
        "100000",
        "--log-every",
        "5",
        "--eval-every",
        "100000",
        "--no-tensorboard",
        "--no-progress",
        "--device",
        "cpu",
        "--loader",
        "folder",
        "--workers",
        "2",
    ]
    # Its own process group, signalled as a whole (like Ctrl-C in a terminal): DataLoader workers get the
    # SIGTERM too and must not die before the trainer has written its checkpoint.
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ONE_THREAD_ENV,
        start_new_session=True,
    )
    wait_until(
        lambda: (
            (output / "metrics.jsonl").exists()
            and (output / "metrics.jsonl").stat().st_size > 0
            or process.poll() is not None
        ),
        120,
        interval=0.05,
        what="training started",
    )
    os.killpg(process.pid, signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err
    assert "resume auto" in err
    ((iteration, path),) = list_checkpoints(output)
    assert iteration >= 5 and load_checkpoint(path)["iteration"] == iteration
    resumed = train(
        small_config(cifar_like, output),
        resume="auto",
        progress=False,
        resume_overrides={"iterations": iteration + 3},
    )
    assert resumed.iteration == iteration + 3
    assert f"resuming from {path} (iteration {iteration})" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_evaluate_checkpoint_and_onnx_agree(cifar_like, tmp_path):
    result = train(small_config(cifar_like, tmp_path / "run", iterations=4), progress=False)
    center = evaluate_checkpoint(result.last_checkpoint, cifar_like, workers=0)
    assert (
        center["n"] == 24
        and 0 <= center["top1"] <= 100
        and center["error"] == pytest.approx(100 - center["top1"])
    )
    ten = evaluate_checkpoint(result.last_checkpoint, cifar_like, ten_crop=True, workers=0)
    assert ten["n"] == 24 and ten["ten_crop"]
    checkpoint = load_checkpoint(result.last_checkpoint)
    model = build_model("resnet20", 3)
    model.load_state_dict(checkpoint["model"])
    onnx_path = tmp_path / "model.onnx"
    torch.onnx.export(
        model.eval(),
        torch.randn(1, 3, 32, 32),
        str(onnx_path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}},
        dynamo=False,
    )
    onnx = evaluate_onnx(
        onnx_path, cifar_like, PreprocessSpec.cifar10(), checkpoint["classes"], workers=0, dataset="cifar10"
    )
    assert onnx["n"] == 24 and onnx["top1"] == pytest.approx(center["top1"])


def test_evaluate_cli_prints_accuracy(cifar_like, tmp_path):
    result = train(small_config(cifar_like, tmp_path / "run", iterations=2), progress=False)
    done = resnet_cli(
        "evaluate",
        "--checkpoint",
        str(result.last_checkpoint),
        "--data",
        str(cifar_like),
        "--workers",
        "0",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["n"] == 24


def test_evaluate_a_published_onnx_with_its_repositorys_preprocessing_and_labels(tmp_path, capsys):
    """No checkpoint needed for a model in a repository: its config and labels.txt say how it is served."""
    published = REPO_ROOT / "model_repository" / "resnet20_cifar10"
    onnx = max(published.glob("*/model.onnx"))
    data = make_image_tree(tmp_path / "data", {"test": 4}, classes=["cat", "ship"])  # two of the ten classes
    labels = (published / "labels.txt").read_text().splitlines()
    expected = evaluate_onnx(onnx, data, PreprocessSpec.cifar10(), labels, workers=0)
    assert cli_main(["evaluate", "--onnx", str(onnx), "--data", str(data), "--workers", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 8 and (result["top1"], result["top5"]) == (expected["top1"], expected["top5"])
    loose = tmp_path / "model.onnx"
    loose.write_bytes(onnx.read_bytes())
    assert cli_main(["evaluate", "--onnx", str(loose), "--data", str(data), "--workers", "0"]) == 1
    err = capsys.readouterr().err
    assert (
        f"resnet: error: {loose} takes 32x32 images, the preprocessing makes 224x224: give the --checkpoint"
        in err
    )
    misfit = tmp_path / "repository" / "misfit"
    write_misfit_model(misfit.parent, classes=2)  # its labels.txt names 2 classes, its model.onnx scores 3
    argv = ["evaluate", "--onnx", str(misfit / "1" / "model.onnx"), "--data", str(data), "--workers", "0"]
    assert cli_main(argv) == 1
    assert (
        f"{misfit / '1' / 'model.onnx'} gives 3 class scores, its class names are 2: "
        in capsys.readouterr().err
    )


def test_onnx_evaluation_runs_where_device_says_or_says_why_not():
    import onnxruntime as ort

    from training.evaluate import onnx_providers

    assert onnx_providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(ConfigError, match="--device with --onnx must be auto, cpu or cuda, got 'tpu'"):
        onnx_providers("tpu")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert onnx_providers("cuda")[0] == onnx_providers("auto")[0] == "CUDAExecutionProvider"
    else:  # was: --device cuda quietly ran on the CPU
        assert onnx_providers("auto") == ["CPUExecutionProvider"]
        with pytest.raises(
            ConfigError, match=r"--device cuda with --onnx: this ONNX Runtime \(.+\) has no CUDA"
        ):
            onnx_providers("cuda")


# ------------------------------------------------------------------------------------------------ errors


def test_data_errors_are_typed(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        train(small_config(tmp_path / "missing", tmp_path / "run"), progress=False)
    archive = tmp_path / "cifar10-jpeg.tar.xz"
    archive.write_bytes(b"")
    for loader in ("device", "folder"):  # the archive given as --data: say so, not "does not exist"
        with pytest.raises(
            DataError, match=r"cifar10-jpeg.tar.xz is a file: extract it first \(`make cifar`"
        ):
            train(small_config(archive, tmp_path / "run", loader=loader), progress=False)
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    config = small_config(tmp_path / "empty", tmp_path / "run")
    config.loader = "folder"
    with pytest.raises(DataError, match="no images"):
        train(config, progress=False)
    # one empty class beside full ones: torchvision's "Found no valid file for the classes zebra" read as if the
    # whole folder had no images
    data = make_image_tree(tmp_path / "one-empty", {"train": 4})
    (data / "train" / "zebra").mkdir()
    (data / "train" / "zebra" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError) as refused:
        train(small_config(data, tmp_path / "run", loader="folder"), progress=False)
    assert str(refused.value) == (
        f"no images in the class folder zebra of {data / 'train'} (a class needs at least one "
        ".jpg/.jpeg/.png/.ppm/.bmp/.pgm/.tif/.tiff/.webp file): fill or remove it"
    )


@pytest.mark.parametrize("loader", ["folder", "device"])
def test_no_validation_set_is_a_warning_but_a_broken_one_stops_the_run(tmp_path, capsys, loader):
    data = make_image_tree(tmp_path / "data", {"train": 8})
    train(small_config(data, tmp_path / "without", iterations=2, loader=loader), progress=False)
    assert "warning: no validation data (no " in capsys.readouterr().err
    make_image_tree(data, {"test": 2}, classes=[*CLASSES[:2], "zebra"])  # a class training never saw
    with pytest.raises(
        DataError, match="has classes the model does not know: zebra|the model was trained on"
    ):
        train(small_config(data, tmp_path / "broken", iterations=2, loader=loader), progress=False)


def test_a_checkpoint_that_cannot_be_written_is_a_clear_error_and_loses_nothing(tmp_path):
    data, run = make_image_tree(tmp_path / "data", {"train": 4, "test": 2}), tmp_path / "run"
    flags = (
        "--arch resnet20 --batch-size 8 --checkpoint-every 2 --no-progress --device cpu --log-every 1".split()
    )
    command = [sys.executable, "-m", "cli", "train", "--data", str(data), "--output-dir", str(run), *flags]
    # 2 iterations write their checkpoints (2.2 MB each); then none fits, as on a disk that fills up mid-run
    subprocess.run([*command, "--iterations", "2"], cwd=REPO_ROOT, check=True, capture_output=True)
    written = sorted(run.glob("*.pt"))
    result = subprocess.run(
        [*command, "--iterations", "4", "--resume", "auto"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        preexec_fn=files_of_at_most(1_000_000),
    )
    # torch.save answers the failed write with a RuntimeError of its zip writer (a traceback, before)
    assert result.returncode == 1, result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"resnet: error: cannot write {run / 'checkpoint-000000'}")
    intact = "the checkpoints written before it are intact, so fix the cause and continue with --resume auto"
    assert last_line.endswith(f".pt: File too large; {intact}")
    assert "Traceback" not in result.stderr
    # no temp file, no half checkpoint
    assert sorted(run.glob("*.pt")) == written and not list(run.glob(".*tmp"))
    assert torch.load(written[-1], weights_only=False)["iteration"] == 2


def test_a_run_folder_that_takes_no_file_at_all_is_one_line_naming_the_first(tmp_path):
    data, run = make_image_tree(tmp_path / "data", {"train": 4}), tmp_path / "run"
    command = [sys.executable, "-m", "cli", "train", "--data", str(data), "--output-dir", str(run)]
    result = subprocess.run(
        [*command, "--iterations", "2"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        preexec_fn=files_of_at_most(0),
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"resnet: error: cannot write {run / 'config.json'}: File too large; ")
    assert sorted(path.name for path in run.iterdir()) == [".lock"]  # config.json's temp file removed


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
def test_metrics_that_cannot_be_written_name_the_file(tmp_path):
    (tmp_path / "metrics.jsonl").symlink_to("/dev/full")  # each write fails with ENOSPC, as on a full disk
    writer = MetricsWriter(tmp_path, tensorboard=False)
    message = r"cannot write .*metrics.jsonl: No space left on device; the checkpoints"
    with pytest.raises(RunFolderError, match=message):
        writer.write("train", 1, loss=0.5)
    # the line it kept is flushed again at the end of the run
    with pytest.raises(RunFolderError, match=message):
        writer.close()


def test_a_file_system_error_is_one_line_too(tmp_path, capsys):
    status = cli_main(["train", "--data", str(tmp_path), "--output-dir", "/proc/resnet-run"])
    assert status == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "resnet: error: [Errno 2] No such file or directory: '/proc/resnet-run'"
    ]


def test_cli_error_is_one_line_and_non_zero_in_a_real_process(tmp_path):
    done = resnet_cli(
        "train", "--output-dir", str(tmp_path / "run"), "--data", str(tmp_path), "--arch", "resnet99"
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "resnet: error: unknown architecture 'resnet99'; choose one of " + ", ".join(ARCHS)
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--recipe", "fast"], "unknown recipe 'fast'"),
        (["train", "--data", "/nonexistent/data"], "data folder /nonexistent/data does not exist"),
        (["train", "--batch-size", "0"], "--batch-size 0 must be a positive multiple"),
        (["train", "--lr-milestones", "5,3"], "--lr-milestones must be increasing"),
        (["train", "--lr", "-0.1"], "--lr must be a positive number, got -0.1"),
        (["train", "--lr", "inf"], "--lr must be a positive number, got inf"),
        (["train", "--warmup-lr", "0"], "--warmup-lr must be a positive number, got 0.0"),
        (["train", "--momentum", "1.5"], "--momentum must be in [0, 1)"),
        (["train", "--lr-milestones", "0,5"], "--lr-milestones must be increasing iterations >= 1"),
        (["train", "--lr-gamma", "0"], "--lr-gamma must be a positive number, got 0.0"),
        (["train", "--weight-decay", "nan"], "--weight-decay a number >= 0, got 0.9 and nan"),
        (["train", "--warmup-until-error", "2"], "--warmup-until-error is a fraction in (0, 1], got 2.0"),
        (["train", "--label-smoothing", "1.5"], "--label-smoothing must be in [0, 1), got 1.5"),
        (["train", "--checkpoint-every", "0"], "--checkpoint-every must be at least 1, got 0"),
        (["train", "--log-every", "0"], "--log-every must be at least 1, got 0"),
        (["train", "--eval-every", "-1"], "--eval-every must be at least 0, got -1"),
        (["train", "--workers", "-1"], "--workers must be at least 0, got -1"),
        (["train", "--workers", "100000"], "--workers must be at most 256, got 100000"),  # a fork bomb
        (["train", "--seed", "-1"], "--seed must be in [0, 2**32), got -1"),
        (["train", "--seed", str(2**64)], f"--seed must be in [0, 2**32), got {2**64}"),
        (["train", "--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
        (
            ["evaluate", "--checkpoint", __file__, "--device", "tpu"],
            "--device must be auto, cpu, cuda or cuda:N",
        ),
        (
            ["evaluate", "--checkpoint", __file__, "--batch-size", "0"],
            "--batch-size must be at least 1, got 0",
        ),
        (
            ["evaluate", "--checkpoint", __file__, "--workers", "-1"],
            "--workers must be from 0 to 256, got -1",
        ),
        (
            ["evaluate", "--checkpoint", __file__, "--workers", "1000"],
            "--workers must be from 0 to 256, got 1000",
        ),
        (["evaluate", "--onnx", __file__, "--data", "."], "cannot load ONNX model"),
        (["evaluate", "--checkpoint", __file__, "--data", "."], "not a PyTorch checkpoint, or a damaged one"),
        (
            ["export", "--checkpoint", __file__, "--repository", tempfile.gettempdir()],
            f"cannot read checkpoint {__file__}: not a PyTorch checkpoint",
        ),
        (
            ["export", "--arch", "resnet20", "--weights", "random", "--repository", __file__],
            f"cannot use {__file__} as the model repository: it is a file",
        ),
        (
            ["evaluate", "--checkpoint", "/nonexistent/model.pt"],
            "checkpoint /nonexistent/model.pt does not exist",
        ),
    ],
)
def test_cli_errors_are_one_line_and_non_zero(tmp_path, capsys, args, message):
    # The same boundary as the console script (cli.main.main), without another torch import per case.
    status = cli_main([*args, "--output-dir", str(tmp_path / "run")] if args[0] == "train" else args)
    assert status == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"resnet: error: {lines[0][len('resnet: error: ') :]}"] and message in lines[0]


def test_a_run_folder_given_for_a_checkpoint_file_names_what_was_meant(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint-0000004.pt").write_bytes(b"")
    newest = f"checkpoint {run} is a folder; give a checkpoint file such as {run}/checkpoint-0000004.pt"
    for args, message in (
        (["evaluate", "--checkpoint", str(run)], newest),
        (["export", "--checkpoint", str(run), "--repository", str(tmp_path / "repo")], newest),
        (
            ["train", "--resume", str(run), "--output-dir", str(run)],
            f"--resume {run} is a folder; to continue that run use --resume auto --output-dir {run}",
        ),
    ):
        assert cli_main(args) == 1
        assert capsys.readouterr().err.strip() == f"resnet: error: {message}", args[0]
    (run / "best.pt").write_bytes(b"")
    assert cli_main(["evaluate", "--checkpoint", str(run)]) == 1
    assert capsys.readouterr().err.strip().endswith(f"such as {run}/best.pt")


def test_an_output_dir_that_is_a_file_is_one_line_error(capsys):
    assert cli_main(["train", "--output-dir", __file__]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"resnet: error: --output-dir {__file__} is a file; give a folder for the run"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_cuda_without_a_gpu_is_one_line_error(tmp_path, capsys):
    assert cli_main(["train", "--device", "cuda", "--output-dir", str(tmp_path / "run")]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        "resnet: error: --device cuda: PyTorch sees no CUDA GPU here; use --device cpu (or auto)"
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--compile", "fast"], "resnet train: error: argument --compile: invalid choice: 'fast'"),
        (["train", "--iterations", "many"], "resnet train: error: argument --iterations: invalid int value"),
        (["nonsense"], "resnet: error: argument command: invalid choice: 'nonsense'"),
        (
            ["triton", "serve", "--http-port", "99999"],
            "resnet triton serve: error: argument --http-port: '99999' is not a port number (1-65535)",
        ),
        (["client", "classify", "--top-k", "x", "a.jpg"], "resnet client classify: error: argument --top-k"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(message) and lines[0].endswith("--help`)")


def test_resnet_alone_shows_the_commands_and_exits_2(capsys):
    assert cli_main([]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("usage: resnet") and "commands:" in err and "  train " in err and "required" not in err
    )


# ------------------------------------------------------------------------------------------------ benchmark


@pytest.mark.slow
def test_benchmark_runs_on_cpu_with_tiny_sizes(tmp_path):
    trace = tmp_path / "not-yet" / "trace.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "training.benchmark",
            "--device",
            "cpu",
            "--batch-size",
            "4",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--image-size",
            "32",
            "--cifar-batch-size",
            "8",
            "--cifar-images",
            "64",
            "--amp",
            "none",
            "--stock-workers",
            "0",
            "--profile",
            str(trace),
            "--profile-steps",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO_ROOT,
        env=ONE_THREAD_ENV,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["resnet50_ours_img_s"] > 0 and result["resnet50_stock_img_s"] > 0
    assert result["resnet20_ours_ms_per_iter"] > 0 and result["resnet20_stock_ms_per_iter"] > 0
    assert result["compile"] == "none" and result["device"].startswith("cpu")
    assert json.loads(trace.read_text())["traceEvents"]  # its folder made first: torch's export would not


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
        (["--steps", "0"], "--steps must be at least 1, got 0"),
        (["--stock-workers", "-1"], "--stock-workers must be at least 0, got -1"),
        (["--stock-workers", "1000"], "--stock-workers must be at most 256, got 1000"),
        (["--cifar-images", "100"], "--cifar-images (100) must hold one --cifar-batch-size batch"),
    ],
)
def test_benchmark_bad_flags_are_refused_before_any_loop(flags, message):
    from training.benchmark import check_args, get_args_parser
    from training.utils import DistInfo, resolve_device

    args = get_args_parser().parse_args(["--nets", "resnet20", *flags])
    with pytest.raises(ConfigError) as refused:  # what main() does before it measures
        check_args(args)
        resolve_device(args.device, DistInfo())
    assert str(refused.value) == message


def test_a_bad_benchmark_flag_is_one_line_and_exit_status_1():
    # one real process for the CLI path; the checks themselves, in process above (each process imports torch: 4 s)
    done = subprocess.run(
        [sys.executable, "-m", "training.benchmark", "--nets", "resnet20", "--steps", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
        env=ONE_THREAD_ENV,
    )
    assert done.returncode == 1
    assert done.stderr == "resnet: error: --steps must be at least 1, got 0\n" and not done.stdout


def test_benchmark_table_has_ratios_and_the_schedule_time():
    from training.benchmark import table

    result = {
        "device": "cpu (2 cores)",
        "torch": "2.x",
        "compile": "none",
        "amp": "bf16",
        "channels_last": True,
        "batch_size": 256,
        "image_size": 224,
        "resnet50_ours_img_s": 120.0,
        "resnet50_stock_img_s": 100.0,
        "cifar_batch_size": 128,
        "stock_workers": 8,
        "resnet20_ours_ms_per_iter": 2.5,
        "resnet20_stock_ms_per_iter": 10.0,
    }
    rows = table(result).splitlines()
    assert "| 120.0 | 100.0 | 1.20x |" in rows[2]
    assert "| 2.50 | 10.00 | 4.00x |" in rows[3]
    assert rows[4].endswith("| 2.7 | 10.7 | |")  # 64,000 x 2.5 ms = 2.67 min


def test_benchmark_amp_applies_to_the_resnet50_loops_only():
    """The ResNet-20 row compares FP32 steps (its stock loop has no autocast), whatever --amp says."""
    from training.benchmark import SyntheticBatches, _trainer, get_args_parser

    args = get_args_parser().parse_args(["--amp", "bf16", "--device", "cpu"])
    cpu = torch.device("cpu")
    batches = SyntheticBatches(2, 32, 10, cpu, False)
    assert _trainer("imagenet-paper", "resnet18", batches, 10, args, cpu).config.amp == "bf16"
    assert _trainer("cifar-paper", "resnet20", batches, 10, args, cpu).config.amp == "none"


def test_benchmark_resets_the_compiler_before_each_loop(monkeypatch):
    """Each loop is timed as if alone in the process (see benchmark._alone)."""
    from training import benchmark

    calls = []
    loops = ("resnet50_ours", "resnet50_stock", "resnet20_ours", "resnet20_stock")
    monkeypatch.setattr(torch.compiler, "reset", lambda: calls.append("reset"))
    for name in loops:
        monkeypatch.setattr(
            benchmark, f"bench_{name}", lambda args, device, name=name: calls.append(name) or 0.5
        )
    args = benchmark.get_args_parser().parse_args(["--device", "cpu", "--batch-size", "2"])
    result = benchmark.measure(args, torch.device("cpu"))
    assert calls == [call for name in loops for call in ("reset", name)]
    assert result["resnet50_ours_img_s"] == 4.0 and result["resnet20_stock_ms_per_iter"] == 500.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_benchmark_stock_loop_sees_no_cuda_graph_step_marks_from_ours(monkeypatch):
    """After ours ran with CUDA graphs (marking its steps), the stock loop starts with the heuristic, as if alone."""
    from torch._inductor.cudagraph_trees import MarkStepBox

    from training import benchmark

    seen = []
    record = lambda args, device: seen.append(MarkStepBox.mark_step_counter) or 1.0  # noqa: E731
    monkeypatch.setattr(benchmark, "bench_resnet20_stock", record)
    argv = "--nets resnet20 --compile reduce-overhead --steps 2 --warmup 3 --cifar-images 512".split()
    benchmark.measure(benchmark.get_args_parser().parse_args(argv), torch.device("cuda"))
    assert seen == [0]  # non-zero: generations would advance only on marks the stock loop never makes


def test_benchmark_profiles_our_resnet20_step(tmp_path, capsys):
    from training.benchmark import get_args_parser, main

    trace = tmp_path / "trace.json"
    argv = "--device cpu --nets resnet20 --steps 1 --warmup 0 --cifar-batch-size 4 --cifar-images 16".split()
    argv += ["--stock-workers", "0", "--json", "--profile", str(trace), "--profile-steps", "2"]
    main(get_args_parser().parse_args(argv))
    events = json.loads(trace.read_text())["traceEvents"]
    assert sum(event.get("name") == "Optimizer.step#SGD.step" for event in events) == 2
    captured = capsys.readouterr()
    assert f"profile of 2 steps (Chrome trace: {trace})" in captured.err
    assert "aten::convolution" in captured.err
    assert json.loads(captured.out)["resnet20_ours_ms_per_iter"] > 0


def test_benchmark_rejects_unknown_nets(capsys):
    from training.benchmark import get_args_parser

    with pytest.raises(SystemExit) as exit_info:
        get_args_parser().parse_args(["--nets", "resnet18"])
    assert exit_info.value.code == 2 and "choose from resnet50, resnet20" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ compile


def test_compile_modes_are_validated_and_old_configs_load():
    assert TrainConfig.from_dict({"compile": True}).compile == "default"
    assert TrainConfig.from_dict({"compile": False}).compile == "none"
    with pytest.raises(ConfigError, match="--compile must be one of none, default, reduce-overhead"):
        TrainConfig(compile="fast").validate()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_compiled_training_matches_eager_in_its_first_steps(cifar_like, tmp_path):
    # reduce-overhead is the mode meant for GPUs (CUDA graphs); on the CPU it must still train, same numbers.
    runs = {}
    for mode in ("none", "reduce-overhead"):
        config = small_config(
            cifar_like, tmp_path / mode, iterations=2, log_every=1, checkpoint_every=2, compile=mode
        )
        train(config, progress=False)
        lines = (tmp_path / mode / "metrics.jsonl").read_text().splitlines()
        runs[mode] = [json.loads(line)["loss"] for line in lines if json.loads(line)["kind"] == "train"]
        assert json.loads((tmp_path / mode / "config.json").read_text())["compile"] == mode
    assert runs["reduce-overhead"] == pytest.approx(runs["none"], rel=1e-3)
