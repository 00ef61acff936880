"""`resnet train`: the paper's recipes, one process or DDP under torchrun, with exact resume.

    resnet train --recipe cifar-paper --arch resnet20 --data data/cifar10-jpeg --output-dir runs/r20
    torchrun --nproc-per-node 8 -m cli.main train --recipe imagenet-paper --arch resnet50 --data /imagenet ...

Iteration-based: the loop counts optimizer steps, derives (epoch, batch in epoch) from the iteration, and asks
the data for exactly that batch, so `--resume` continues where the run stopped. Checkpoints are atomic and hold
everything needed (model, optimizer, lr schedule, RNG, data position, config, classes, preprocessing).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from training import recipes
from training.data import DataSplit, load_split
from training.errors import CheckpointError, MissingSplitError, RunFolderError, TrainingDiverged
from training.evaluate import evaluate_model
from training.models import ARCHS, STRIDE_VARIANTS, build_model
from training.recipes import COMPILE_MODES, RECIPES, TrainConfig
from training.utils import (
    DistInfo,
    MetricsWriter,
    StepSchedule,
    all_reduce_sum,
    atomic_torch_save,
    atomic_write_text,
    checkpoint_path,
    hold_run_folder,
    init_distributed,
    load_checkpoint,
    load_latest_checkpoint,
    mark_best,
    prune_checkpoints,
    resolve_device,
    rng_state,
    seed_everything,
    set_rng_state,
)

log = logging.getLogger("resnet.train")

CHECKPOINT_FORMAT = 1
# Flags that may change when resuming; everything else comes from the checkpoint's config.
RESUME_OVERRIDES = (
    "iterations",
    "checkpoint_every",
    "eval_every",
    "log_every",
    "keep_last",
    "workers",
    "device",
    "tensorboard",
    "data",
    "output_dir",
    "compile",
)
SIGTERM_EXIT = 143


@dataclass
class RunResult:
    iteration: int
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    metrics: dict
    stopped: bool = False


class StopFlag:
    """Set by SIGTERM/SIGINT: the loop writes a checkpoint at the next step boundary and exits."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.previous: dict = {}

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()

    def _handle(self, signum, frame) -> None:
        self.signal = signum


def compiled(module: torch.nn.Module, mode: str) -> torch.nn.Module:
    """`module` under torch.compile in one of recipes.COMPILE_MODES ("none": as it is)."""
    if mode == "none":
        return module
    return torch.compile(module, mode=None if mode == "default" else mode)


def _autocast(device: torch.device, amp: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16")


class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        info: DistInfo,
        device: torch.device,
        train_split: DataSplit,
        val_split: DataSplit | None,
        progress: bool = True,
        provenance: dict | None = None,
        init_model: Callable[[torch.nn.Module], None] | None = None,
    ) -> None:
        self.config, self.info, self.device = config, info, device
        self.train_split, self.val_split = train_split, val_split
        self.classes = train_split.classes
        self.num_classes = config.num_classes or len(self.classes)
        self.provenance = provenance
        self.output_dir = Path(config.output_dir)
        # A bar on a terminal; plain log lines when stderr goes to a file (cluster logs, CI).
        self.progress = progress and info.is_main and sys.stderr.isatty()
        self.model = build_model(config.arch, self.num_classes, config.stride_variant)
        if init_model is not None:
            init_model(self.model)
        memory_format = torch.channels_last if config.channels_last else torch.preserve_format
        self.model.to(device, memory_format=memory_format)
        self.optimizer = torch.optim.SGD(
            self.model.parameters(),
            lr=config.effective_lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            nesterov=config.nesterov,
            # One kernel for the whole update; the default foreach path launches several (CUDA only here).
            fused=True if device.type == "cuda" else None,
        )
        warmup = config.warmup_lr_effective
        self.schedule = StepSchedule(
            config.lr_milestones, config.lr_gamma, None if warmup is None else warmup / config.effective_lr
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.iteration = 0
        self.best_top1: float | None = None
        self.best_path: Path | None = None
        self.last_path: Path | None = None
        self.last_eval: dict = {}
        self.last_train: dict = {}
        self.reported_skipped = 0
        self.stop = StopFlag()
        self.network: torch.nn.Module = self.model
        if info.distributed:
            self.network = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.network = compiled(self.network, config.compile)

    # ------------------------------------------------------------------------------------------ state

    def state_dict(self, epoch: int, batch_in_epoch: int) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "arch": self.config.arch,
            "stride_variant": self.config.stride_variant,
            "num_classes": self.num_classes,
            "classes": self.classes,
            "preprocess": self.config.preprocess_spec.to_dict(),
            "config": {**self.config.to_dict(), "world_size": self.info.world_size},
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.scheduler.state_dict(),
            "epoch": epoch,
            "iteration": self.iteration,
            "data_order": {"seed": self.config.seed, "epoch": epoch, "start_batch": batch_in_epoch},
            "rng": rng_state(),
            "metrics": {"train": self.last_train, "eval": self.last_eval},
            "best_top1": self.best_top1,
            "data": {**self.train_split.summary(), "skipped_images": self.skipped_images},
            **(
                {
                    "provenance": {
                        **self.provenance,
                        "data": self.train_split.summary(),
                        "metrics": {"train": self.last_train, "eval": self.last_eval},
                    }
                }
                if self.provenance
                else {}
            ),
        }

    def load_state_dict(self, checkpoint: dict, path: Path | None = None) -> None:
        self.last_path = path
        self.model.load_state_dict(checkpoint["model"])
        fused = [group["fused"] for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        for group, flag in zip(self.optimizer.param_groups, fused, strict=True):
            group["fused"] = flag  # this device decides, not the one that wrote the checkpoint
        self.scheduler.load_state_dict(checkpoint["lr_scheduler"])
        set_rng_state(checkpoint["rng"])
        self.iteration = int(checkpoint["iteration"])
        self.best_top1 = checkpoint.get("best_top1")
        self.last_eval = checkpoint.get("metrics", {}).get("eval", {})
        if checkpoint.get("provenance") and not self.provenance:
            self.provenance = checkpoint["provenance"]
        best = self.output_dir / "best.pt"
        self.best_path = best if best.exists() else None

    def save(self, epoch: int, batch_in_epoch: int, is_best: bool = False) -> Path:
        """Rank 0 writes checkpoint-<iteration>.pt atomically, updates best.pt, prunes old ones."""
        if not weights_are_finite(self.model):
            raise self.diverged("the weights hold NaN or infinite values")
        path = checkpoint_path(self.output_dir, self.iteration)
        if self.info.is_main:
            atomic_torch_save(self.state_dict(epoch, batch_in_epoch), path)
            if is_best or self.val_split is None:
                mark_best(path, self.output_dir)
                self.best_path = self.output_dir / "best.pt"
            prune_checkpoints(self.output_dir, self.config.keep_last)
        if self.info.distributed:
            dist.barrier()
        self.last_path = path
        return path

    # ------------------------------------------------------------------------------------------ loop

    def evaluate(self) -> dict:
        result = evaluate_model(self.network, self.val_split.batches, self.device, self.config.amp)
        self.network.train()
        return result

    def run(self) -> RunResult:
        config = self.config
        batches = self.train_split.batches
        batches.set_epoch(0)
        per_epoch = len(batches)
        eval_every = config.eval_every or per_epoch
        epoch, batch_in_epoch = divmod(self.iteration, per_epoch)
        batches.set_epoch(epoch, batch_in_epoch)
        metrics = MetricsWriter(self.output_dir, config.tensorboard) if self.info.is_main else None
        self.stop.install()
        bar = tqdm(
            total=config.iterations,
            initial=self.iteration,
            desc=f"train {config.arch}",
            unit="it",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        window = self.new_window()
        self.network.train()
        stopped = False
        try:
            while self.iteration < config.iterations and not stopped:
                for images, labels in batches:
                    self.train_step(images, labels, window)
                    batch_in_epoch += 1
                    if batch_in_epoch == per_epoch:
                        epoch, batch_in_epoch = epoch + 1, 0
                    bar.update(1)
                    last = self.iteration >= config.iterations
                    if self.iteration % config.log_every == 0 or last:
                        self._log(window, metrics, bar)
                        window = self.new_window()
                    if self._should_stop():
                        self.save(epoch, batch_in_epoch)
                        stopped = True
                        break
                    paused = time.perf_counter()
                    if self.iteration % eval_every == 0 or last:
                        self._eval_and_save(epoch, batch_in_epoch, metrics, bar)
                    elif self.iteration % config.checkpoint_every == 0:
                        self.save(epoch, batch_in_epoch)
                    window["start"] += time.perf_counter() - paused  # img/s counts training steps only
                    if last:
                        break
                else:
                    # The epoch ran out, and batch_in_epoch wrapped to 0 with it (training batches are never
                    # dropped: see training.data): start the next one.
                    batches.set_epoch(epoch)
        finally:
            self.stop.restore()
            bar.close()
            if metrics is not None:
                metrics.close()
        return RunResult(
            self.iteration,
            self.last_path,
            self.best_path,
            {"train": self.last_train, "eval": self.last_eval},
            stopped,
        )

    def new_window(self) -> dict:
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        return {
            "loss": zero.clone(),
            "correct": zero.clone(),
            "count": zero.clone(),
            "start": time.perf_counter(),
        }

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, window: dict) -> None:
        if self.config.compile == "reduce-overhead":
            # CUDA graphs reuse their output memory; say where a step starts rather than rely on the heuristic.
            torch.compiler.cudagraph_mark_step_begin()
        with _autocast(self.device, self.config.amp):
            logits = self.network(images)
            loss = self.criterion(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.iteration += 1
        # Accumulate on the device; synchronise only at log steps.
        window["loss"] += loss.detach().double() * len(labels)
        window["correct"] += (logits.detach().argmax(1) == labels).sum()
        window["count"] += len(labels)

    def _log(self, window: dict, metrics: MetricsWriter | None, bar: tqdm) -> None:
        loss, correct, count = all_reduce_sum(
            [window["loss"].item(), window["correct"].item(), window["count"].item()], self.device
        )
        if not math.isfinite(loss):  # summed over the window and the ranks: one NaN step anywhere shows here
            raise self.diverged(f"the training loss is {loss}")
        elapsed = time.perf_counter() - window["start"]
        error = 1.0 - correct / max(count, 1)
        lr = self.optimizer.param_groups[0]["lr"]
        self.last_train = {
            "loss": loss / max(count, 1),
            "error": 100.0 * error,
            "lr": lr,
            "img_per_s": count / max(elapsed, 1e-9),
        }
        if self.schedule.warming_up and error < self.config.warmup_until_error:
            # Sec. 4.2: warm up until training error < 80%, then back to the recipe's rate.
            self.schedule.warming_up = False
            for group, base_lr in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
                group["lr"] = base_lr * self.schedule(self.iteration)
            self._print(
                f"warm-up done at iteration {self.iteration} (training error {100 * error:.1f}%)", bar
            )
        skipped = self.skipped_images
        if skipped > self.reported_skipped:
            self.reported_skipped = skipped
            self._print(f"warning: skipped {skipped} unreadable image file(s) so far", bar)
        self.last_train["skipped_images"] = skipped
        if metrics is not None:
            metrics.write("train", self.iteration, **self.last_train)
        bar.set_postfix(
            loss=f"{self.last_train['loss']:.3f}", lr=f"{lr:.4g}", img_s=f"{self.last_train['img_per_s']:.0f}"
        )
        if not self.progress and self.info.is_main:
            self._print(
                f"iteration {self.iteration}/{self.config.iterations} loss {self.last_train['loss']:.4f} "
                f"lr {lr:.4g} {self.last_train['img_per_s']:.0f} img/s",
                bar,
            )

    def diverged(self, what: str) -> TrainingDiverged:
        lr = self.optimizer.param_groups[0]["lr"]
        last = (
            f"the last checkpoint, {self.last_path}, is from before it"
            if self.last_path
            else "no checkpoint was written"
        )
        return TrainingDiverged(
            f"training diverged by iteration {self.iteration}: {what} (lr {lr:.4g}); {last}. Lower --lr (or add "
            "--warmup-lr) and train again"
        )

    @property
    def skipped_images(self) -> int:
        """Unreadable image files this rank has met (train + val)."""
        return len(getattr(self.train_split.batches, "skipped", ())) + (
            len(getattr(self.val_split.batches, "skipped", ())) if self.val_split is not None else 0
        )

    def _eval_and_save(
        self, epoch: int, batch_in_epoch: int, metrics: MetricsWriter | None, bar: tqdm
    ) -> None:
        is_best = False
        if self.val_split is not None:
            self.last_eval = self.evaluate()
            is_best = self.best_top1 is None or self.last_eval["top1"] > self.best_top1
            if is_best:
                self.best_top1 = self.last_eval["top1"]
            if metrics is not None:
                metrics.write("eval", self.iteration, epoch=epoch, **self.last_eval)
            self._print(
                f"iteration {self.iteration}: val top-1 {self.last_eval['top1']:.2f}% "
                f"top-5 {self.last_eval['top5']:.2f}% ({self.last_eval['n']} images)",
                bar,
            )
        self.save(epoch, batch_in_epoch, is_best)

    def _should_stop(self) -> bool:
        if not self.info.distributed:
            return self.stop.signal is not None
        # Every rank must stop at the same iteration, so agree on it (only at log/checkpoint steps: a sync).
        if self.iteration % self.config.log_every and self.iteration % self.config.checkpoint_every:
            return False
        return all_reduce_sum([1.0 if self.stop.signal is not None else 0.0], self.device)[0] > 0

    def _print(self, message: str, bar: tqdm) -> None:
        if self.info.is_main:
            bar.write(message, file=sys.stderr)


def weights_are_finite(model: torch.nn.Module) -> bool:
    """Every floating-point parameter and buffer (BatchNorm statistics too) finite; one device sync."""
    tensors = [tensor for tensor in model.state_dict().values() if tensor.is_floating_point()]
    return bool(torch.stack([torch.isfinite(tensor).all() for tensor in tensors]).all())


# ---------------------------------------------------------------------------------------------- entry points


def load_data(
    config: TrainConfig, info: DistInfo, device: torch.device, classes: list[str] | None = None
) -> tuple[DataSplit, DataSplit | None]:
    common = dict(
        dataset=config.dataset,
        spec=config.preprocess_spec,
        seed=config.seed,
        workers=config.workers,
        rank=info.rank,
        world_size=info.world_size,
        device=device,
        channels_last=config.channels_last,
        loader=config.loader,
    )
    train_split = load_split(
        config.data,
        "train",
        batch_size=config.batch_size // info.world_size,
        train=True,
        classes=classes,
        train_resize=tuple(config.train_resize),
        train_crop=config.train_crop,
        lighting=config.lighting,
        cifar_padding=config.cifar_padding,
        **common,
    )
    try:
        val_split = load_split(
            config.data,
            "val",
            batch_size=max(config.batch_size // info.world_size, 1),
            train=False,
            classes=train_split.classes,
            **common,
        )
    except MissingSplitError as error:  # a validation set that is there but broken stops the run instead
        if info.is_main:
            print(
                f"warning: no validation data ({error}); best.pt follows the last checkpoint", file=sys.stderr
            )
        val_split = None
    return train_split, val_split


def warn_about_schedule(config: TrainConfig, info: DistInfo) -> None:
    """A shortened run that keeps the recipe's milestones would never lower its rate: legal, rarely meant."""
    late = [m for m in config.lr_milestones if m >= config.iterations]
    if late and info.is_main:
        print(
            f"warning: --iterations {config.iterations} ends before the --lr-milestones at "
            f"{','.join(map(str, late))}: the rate never drops there (shorten them with the run)",
            file=sys.stderr,
        )


def train(
    config: TrainConfig,
    resume: str | None = None,
    progress: bool = True,
    provenance: dict | None = None,
    init_model: Callable[[torch.nn.Module], None] | None = None,
    resume_overrides: dict | None = None,
    classes: list[str] | None = None,
) -> RunResult:
    """Train per `config` (or continue `resume`: a checkpoint path or "auto" = latest in the output dir)."""
    checkpoint = None
    if resume:
        if resume == "auto":
            found = load_latest_checkpoint(Path(config.output_dir))
        elif Path(resume).is_dir():  # a run's folder: its latest checkpoint is what --resume auto takes
            raise CheckpointError(
                f"--resume {resume} is a folder; to continue that run use --resume auto --output-dir {resume}"
            )
        else:
            found = (Path(resume), load_checkpoint(resume))
        if found is None:
            print(f"no checkpoint in {config.output_dir} yet; starting from scratch", file=sys.stderr)
        else:
            path, checkpoint = found
            refuse_changed_settings(path, checkpoint["config"], resume_overrides or {})
            print(f"resuming from {path} (iteration {checkpoint['iteration']})", file=sys.stderr)
            overrides = {
                k: v for k, v in (resume_overrides or {}).items() if k in RESUME_OVERRIDES and v is not None
            }
            config = TrainConfig.from_dict({**checkpoint["config"], **overrides})
            classes = checkpoint.get("classes")
            init_model = None
    probe = "cuda" if config.device == "auto" and torch.cuda.is_available() else config.device
    info = init_distributed(probe)
    lock = None
    try:
        config.validate(info.world_size)
        warn_about_schedule(config, info)
        device = resolve_device(config.device, info)
        if device.type == "cuda":
            # A run sees a handful of fixed shapes (train batch, last batch, eval batch): let cuDNN time its
            # algorithms once per shape rather than take the heuristic's pick for every step.
            torch.backends.cudnn.benchmark = True
        seed_everything(config.seed)
        output_dir = Path(config.output_dir)
        lock = take_run_folder(output_dir, info, device)
        if info.is_main:
            atomic_write_text(
                output_dir / "config.json",
                json.dumps({**config.to_dict(), "world_size": info.world_size}, indent=2) + "\n",
            )
        train_split, val_split = load_data(config, info, device, classes)
        trainer = Trainer(config, info, device, train_split, val_split, progress, provenance, init_model)
        if checkpoint is not None:
            if checkpoint.get("config", {}).get("world_size", 1) != info.world_size and info.is_main:
                print(
                    "warning: resuming with a different number of processes; the data order changes",
                    file=sys.stderr,
                )
            trainer.load_state_dict(checkpoint, path)
        result = trainer.run()
        if info.is_main:
            summary = {
                "iteration": result.iteration,
                "last_checkpoint": str(result.last_checkpoint),
                "best_checkpoint": str(result.best_checkpoint),
                **result.metrics,
            }
            atomic_write_text(output_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        return result
    finally:
        if lock is not None:
            lock.close()
        if info.distributed and dist.is_initialized():
            dist.destroy_process_group()


def take_run_folder(output_dir: Path, info: DistInfo, device: torch.device) -> BinaryIO | None:
    """Rank 0 makes and locks the run's folder; under torchrun every rank learns whether it could, so all stop
    with the same line instead of the others with a collective their peer left."""
    lock, refusal = None, None
    if info.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock = hold_run_folder(output_dir)
        except RunFolderError as error:
            refusal = error
    refused_anywhere = info.distributed and all_reduce_sum([float(refusal is not None)], device)[0] > 0
    if refused_anywhere and refusal is None:
        refusal = RunFolderError(f"{output_dir} is in use by another run (rank 0 found it locked)")
    if refusal is not None:
        raise refusal
    return lock


def refuse_changed_settings(path: Path, saved: dict, overrides: dict) -> None:
    """A flag a resumed run cannot change that differs from the checkpoint's config is an error: such flags were
    dropped without a word, so `--arch resnet32 --resume auto` went on training the folder's ResNet-20."""
    fixed = {k: v for k, v in overrides.items() if k not in RESUME_OVERRIDES and v is not None}
    resumed, asked = TrainConfig.from_dict(saved), TrainConfig.from_dict({**saved, **fixed})
    changed = [k for k in fixed if getattr(asked, k) != getattr(resumed, k)]
    if changed:
        given = ", ".join(_as_flag(k, getattr(asked, k)) for k in changed)
        kept = ", ".join(_as_flag(k, getattr(resumed, k)) for k in changed)
        can_change = ", ".join("--" + k.replace("_", "-") for k in RESUME_OVERRIDES if k != "tensorboard")
        raise CheckpointError(
            f"{given}: not what {path} was trained with ({kept}), and a resumed run keeps its settings except "
            f"{can_change}; continue without {'it' if len(changed) == 1 else 'them'}, or start a new run in another "
            "--output-dir"
        )


def _as_flag(name: str, value) -> str:
    flag = {"scale_lr": "--no-lr-scaling"}.get(name, "--" + name.replace("_", "-"))
    if isinstance(value, bool):
        return flag if value != (name == "scale_lr") else f"no {flag}"
    return f"{flag} {','.join(map(str, value)) if isinstance(value, list | tuple) else value}"


def int_list(text: str) -> list[int]:
    try:
        return [int(float(part)) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated iterations, got {text!r}") from error


def get_args_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        description="Train a ResNet with one of the paper's recipes. Flags override any recipe field; "
        "the resolved config is saved as config.json in --output-dir and in every checkpoint. "
        "For several GPUs or nodes run under torchrun (DDP).",
        epilog="recipes: "
        + "; ".join(
            f"{name} (batch {r['batch_size']}, lr {r['lr']}, {r['iterations']} it, "
            f"milestones {r['lr_milestones']})"
            for name, r in RECIPES.items()
        ),
    )
    parser.add_argument(
        "--recipe",
        default=env("RESNET_RECIPE", "cifar-paper"),
        help="named recipe: cifar-paper (Sec. 4.2) or imagenet-paper (Sec. 3.4) "
        "(env RESNET_RECIPE; default: %(default)s)",
    )
    parser.add_argument(
        "--arch",
        default=env("RESNET_ARCH"),
        metavar="ARCH",
        help=f"network, one of {', '.join(ARCHS)} (env RESNET_ARCH; default: the recipe's)",
    )
    parser.add_argument(
        "--data",
        "--data-path",
        dest="data",
        default=env("RESNET_DATA_PATH", "data"),
        help="dataset folder: train/ (+ val/ or test/) class folders, or CIFAR-10 pickle batches "
        "(env RESNET_DATA_PATH; default: %(default)s)",
    )
    parser.add_argument(
        "--output-dir",
        default=env("RESNET_OUTPUT_DIR"),
        help="where checkpoints, config.json, metrics.jsonl and TensorBoard logs go "
        "(env RESNET_OUTPUT_DIR; default: runs/<recipe>-<arch>)",
    )
    parser.add_argument(
        "--resume",
        default=env("RESNET_RESUME"),
        help="checkpoint to continue from, or 'auto' for the latest in --output-dir",
    )
    group = parser.add_argument_group("optimisation (default: the recipe's)")
    group.add_argument("--batch-size", type=int, help="global batch size over all processes")
    group.add_argument("--lr", type=float, help="learning rate at the recipe's batch size (scaled linearly)")
    group.add_argument(
        "--no-lr-scaling",
        dest="scale_lr",
        action="store_false",
        default=None,
        help="use --lr as given instead of scaling it with the batch size",
    )
    group.add_argument("--momentum", type=float)
    group.add_argument("--weight-decay", type=float)
    group.add_argument("--label-smoothing", type=float)
    group.add_argument("--iterations", type=int, help="total optimizer steps")
    group.add_argument(
        "--lr-milestones", type=int_list, help="iterations at which lr is divided, e.g. 32000,48000"
    )
    group.add_argument("--lr-gamma", type=float, help="factor applied at each milestone")
    group.add_argument(
        "--warmup-lr",
        type=float,
        help="train at this lr until training error < --warmup-until-error (paper: 0.01 for "
        "ResNet-110/1202, on by default for them)",
    )
    group.add_argument("--warmup-until-error", type=float, help="fraction, default 0.8")
    group.add_argument("--stride-variant", choices=STRIDE_VARIANTS, help="bottleneck stride placement")
    group.add_argument("--seed", type=int, help="seed for init, data order and augmentation (0 to 2**32-1)")
    group = parser.add_argument_group("run")
    group.add_argument("--workers", type=int, help="data loading processes (image folders)")
    group.add_argument(
        "--loader",
        choices=("auto", "device", "folder"),
        help="device: CIFAR-10 decoded once and augmented on the device; folder: Pillow in DataLoader workers; "
        "auto: device for cifar-paper (default)",
    )
    group.add_argument("--eval-every", type=int, help="iterations between evaluations (0 = each epoch)")
    group.add_argument("--checkpoint-every", type=int, help="iterations between checkpoints")
    group.add_argument("--keep-last", type=int, help="checkpoints kept besides best.pt (0: all)")
    group.add_argument("--log-every", type=int, help="iterations between metrics lines")
    group.add_argument("--device", default=env("RESNET_DEVICE"), help="auto, cpu, cuda (default auto)")
    group.add_argument("--amp", choices=("none", "bf16"), help="bf16 autocast")
    group.add_argument("--channels-last", action="store_true", default=None, help="NHWC memory format")
    group.add_argument(
        "--compile",
        nargs="?",
        const="default",
        choices=COMPILE_MODES,
        help="torch.compile the model; bare --compile = default mode, reduce-overhead adds CUDA graphs",
    )
    group.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", default=None)
    group.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


OVERRIDE_FIELDS = (
    "arch",
    "data",
    "output_dir",
    "batch_size",
    "lr",
    "scale_lr",
    "momentum",
    "weight_decay",
    "label_smoothing",
    "iterations",
    "lr_milestones",
    "lr_gamma",
    "warmup_lr",
    "warmup_until_error",
    "stride_variant",
    "seed",
    "workers",
    "loader",
    "eval_every",
    "checkpoint_every",
    "keep_last",
    "log_every",
    "device",
    "amp",
    "channels_last",
    "compile",
    "tensorboard",
)


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, dict]:
    overrides = {name: getattr(args, name, None) for name in OVERRIDE_FIELDS}
    config = recipes.resolve(args.recipe, overrides)
    build_model(config.arch, 2)  # unknown names fail here, before any data is read
    if not config.output_dir:
        config.output_dir = str(Path("runs") / f"{config.recipe}-{config.arch}")
        overrides["output_dir"] = config.output_dir
    return config, overrides


def main(args: argparse.Namespace) -> int:
    config, overrides = config_from_args(args)
    result = train(config, resume=args.resume, progress=args.progress, resume_overrides=overrides)
    if result.stopped:
        print(
            f"stopped at iteration {result.iteration}; checkpoint {result.last_checkpoint}; "
            "continue with --resume auto",
            file=sys.stderr,
        )
        return SIGTERM_EXIT
    if result.last_checkpoint is None:
        raise CheckpointError("no iterations were run (is --iterations already reached?)")
    print(f"done: iteration {result.iteration}, last {result.last_checkpoint}, best {result.best_checkpoint}")
    return 0
