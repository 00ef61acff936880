"""Named training recipes (the paper's) and how flags override them into one resolved `TrainConfig`.

Schedules count iterations, as the paper does (CIFAR: ÷10 at 32k and 48k, stop at 64k). The learning rate
scales linearly with the global batch size (Goyal et al. 2017): `lr` is the rate at `reference_batch_size`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from cli.limits import MAX_WORKERS
from server.spec import PreprocessSpec
from training.errors import ConfigError, UnknownRecipeError

# Deep nets that the paper warms up at lr 0.01 until training error < 80% (Sec. 4.2, ResNet-110 and 1202).
WARMUP_ARCHS = ("resnet110", "resnet1202", "plain110")
# torch.compile modes; "reduce-overhead" replays CUDA graphs, which is what makes a net as small as ResNet-20
# fast on a GPU: its step is a few hundred tiny kernels, so launch overhead, not arithmetic, sets the pace.
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")


@dataclass
class TrainConfig:
    recipe: str = "cifar-paper"
    arch: str = "resnet20"
    dataset: str = (
        "cifar10"  # augmentation style: "cifar10" (pad + crop + flip) or "imagenet" (scale + colour)
    )
    loader: str = "auto"  # "device" (training.cifar: decode once, augment on the device), "folder", "auto"
    data: str = ""
    output_dir: str = ""
    num_classes: int | None = None  # None: from the data
    stride_variant: str = "v1.5"
    # optimisation
    batch_size: int = 128  # global, over all processes
    reference_batch_size: int = 128  # the batch size `lr` is meant for
    lr: float = 0.1
    scale_lr: bool = True
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    label_smoothing: float = 0.0
    iterations: int = 64_000
    lr_milestones: list[int] = field(default_factory=lambda: [32_000, 48_000])
    lr_gamma: float = 0.1
    warmup_lr: float | None = None  # None: no warm-up; else this lr until training error < warmup_until_error
    warmup_until_error: float = 0.8
    # data and augmentation
    train_resize: tuple[int, int] = (256, 480)  # imagenet: shorter side drawn from [min, max]
    train_crop: int = 224
    cifar_padding: int = 4
    lighting: float = 0.1  # AlexNet PCA colour augmentation strength (imagenet)
    preprocess: dict = field(default_factory=lambda: PreprocessSpec.cifar10().to_dict())
    workers: int = 4
    # bookkeeping
    eval_every: int = 0  # iterations; 0 = once per epoch
    checkpoint_every: int = 1000
    keep_last: int = 3
    log_every: int = 50
    seed: int = 0
    # speed
    device: str = "auto"
    amp: str = "none"  # "bf16" for bfloat16 autocast
    channels_last: bool = False
    compile: str = "none"  # torch.compile mode: none, default, reduce-overhead (CUDA graphs), max-autotune
    tensorboard: bool = True

    @property
    def effective_lr(self) -> float:
        if not self.scale_lr:
            return self.lr
        return self.lr * self.batch_size / self.reference_batch_size

    @property
    def warmup_lr_effective(self) -> float | None:
        if self.warmup_lr is None:
            return None
        return self.warmup_lr * (self.effective_lr / self.lr)

    @property
    def preprocess_spec(self) -> PreprocessSpec:
        return PreprocessSpec.from_dict(self.preprocess)

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["effective_lr"] = self.effective_lr
        return values

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in values.items() if k in names}
        if "train_resize" in known:
            known["train_resize"] = tuple(known["train_resize"])
        if isinstance(known.get("compile"), bool):  # checkpoints written before compile modes existed
            known["compile"] = "default" if known["compile"] else "none"
        return cls(**known)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def validate(self, world_size: int = 1) -> None:
        if self.batch_size <= 0 or self.batch_size % world_size:
            raise ConfigError(
                f"--batch-size {self.batch_size} must be a positive multiple of the {world_size} processes"
            )
        if world_size > 1 and ":" in self.device:
            raise ConfigError(
                f"--device {self.device} would put all {world_size} processes on one device; under torchrun use "
                "--device cuda (each process takes the GPU of its LOCAL_RANK)"
            )
        if self.iterations <= 0:
            raise ConfigError(f"--iterations must be positive, got {self.iterations}")
        if not 0 < self.lr < math.inf:
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")
        if self.warmup_lr is not None and not 0 < self.warmup_lr < math.inf:
            raise ConfigError(f"--warmup-lr must be a positive number, got {self.warmup_lr}")
        if not 0 <= self.momentum < 1 or not 0 <= self.weight_decay < math.inf:
            raise ConfigError(
                f"--momentum must be in [0, 1) and --weight-decay a number >= 0, got {self.momentum} and "
                f"{self.weight_decay}"
            )
        # mix_seed keeps 32 bits of each part, so a larger seed would replay a smaller one's data order.
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"--seed must be in [0, 2**32), got {self.seed}")
        self._check_schedule()
        self._check_counts()
        if self.amp not in ("none", "bf16"):
            raise ConfigError(f"--amp must be none or bf16, got {self.amp!r}")
        if self.compile not in COMPILE_MODES:
            raise ConfigError(f"--compile must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}")
        if self.dataset not in ("cifar10", "imagenet"):
            raise ConfigError(f"unknown dataset kind {self.dataset!r}")
        if self.loader not in ("auto", "device", "folder"):
            raise ConfigError(f"unknown loader {self.loader!r}; choose auto, device or folder")
        if Path(self.output_dir or ".").is_file():
            raise ConfigError(f"--output-dir {self.output_dir} is a file; give a folder for the run")

    def _check_schedule(self) -> None:
        milestones = list(self.lr_milestones)
        if milestones != sorted(milestones) or min(milestones, default=1) < 1:
            raise ConfigError(f"--lr-milestones must be increasing iterations >= 1, got {milestones}")
        if not 0 < self.lr_gamma < math.inf:
            raise ConfigError(f"--lr-gamma must be a positive number, got {self.lr_gamma}")
        if not 0 < self.warmup_until_error <= 1:
            raise ConfigError(f"--warmup-until-error is a fraction in (0, 1], got {self.warmup_until_error}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")

    def _check_counts(self) -> None:
        for flag, value, least in (
            ("--checkpoint-every", self.checkpoint_every, 1),
            ("--log-every", self.log_every, 1),
            ("--keep-last", self.keep_last, 0),
            ("--eval-every", self.eval_every, 0),
            ("--workers", self.workers, 0),
        ):
            if value < least:
                raise ConfigError(f"{flag} must be at least {least}, got {value}")
        if self.workers > MAX_WORKERS:
            raise ConfigError(f"--workers must be at most {MAX_WORKERS}, got {self.workers}")


RECIPES: dict[str, dict] = {
    # Sec. 3.4: batch 256, lr 0.1 ÷10 on plateaus (30/60/90 epochs of 5005 iterations), 60e4 iterations,
    # shorter side in [256, 480], 224 crop, flip, AlexNet colour augmentation, wd 1e-4, momentum 0.9.
    "imagenet-paper": dict(
        dataset="imagenet",
        arch="resnet50",
        batch_size=256,
        reference_batch_size=256,
        lr=0.1,
        iterations=600_000,
        lr_milestones=[150_000, 300_000, 450_000],
        train_resize=(256, 480),
        train_crop=224,
        lighting=0.1,
        preprocess=PreprocessSpec.imagenet().to_dict(),
        eval_every=5_000,
        checkpoint_every=1_000,
        workers=min(8, os.cpu_count() or 1),
    ),
    # Sec. 4.2: batch 128, lr 0.1 ÷10 at 32k and 48k, stop at 64k, wd 1e-4, pad 4 + crop 32 + flip.
    "cifar-paper": dict(
        dataset="cifar10",
        arch="resnet20",
        batch_size=128,
        reference_batch_size=128,
        lr=0.1,
        iterations=64_000,
        lr_milestones=[32_000, 48_000],
        cifar_padding=4,
        preprocess=PreprocessSpec.cifar10().to_dict(),
        eval_every=0,
        checkpoint_every=1_000,
        workers=0,
    ),
}


def resolve(recipe: str, overrides: dict) -> TrainConfig:
    """The recipe's values, then every override that is not None; warm-up switched on for the deep CIFAR nets."""
    if recipe not in RECIPES:
        raise UnknownRecipeError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    values = {**RECIPES[recipe], "recipe": recipe}
    values.update({k: v for k, v in overrides.items() if v is not None})
    config = TrainConfig.from_dict(values)
    if overrides.get("warmup_lr") is None and recipe == "cifar-paper" and config.arch in WARMUP_ARCHS:
        config.warmup_lr = 0.01
    return config
