"""`resnet retrain`: offline batch retraining — fine-tune an existing checkpoint on a new data folder.

The new run starts from the parent's weights, keeps its preprocessing, and runs a short schedule (default 500
iterations, lr 0.01 ÷10 at 50% and 75%). With `--new-classes` the classifier head is replaced to fit the new
data's classes; without it the data's classes must be the parent's (or a subset). Every checkpoint carries
`provenance`: the parent's path and sha256, the data summary (classes + image counts) and the metrics, so the
result is ready for `resnet export`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from cli.help import HelpFormatter
from training.data import count_images, discover_classes, is_cifar_pickle
from training.errors import ClassMismatchError
from training.recipes import TrainConfig
from training.train import SIGTERM_EXIT, int_list, train
from training.utils import atomic_write_text, load_checkpoint, sha256_file

# The flags' defaults, applied here rather than by argparse: on --resume only the flags given count (a default
# --iterations 500 would otherwise cut a resumed 1000-iteration retrain short).
DEFAULTS = {
    "iterations": 500,
    "lr": 0.01,
    "batch_size": 64,
    "eval_every": 0,
    "keep_last": 2,
    "workers": 2,
    "seed": 0,
    "device": "auto",
}
# What the command line may say about the run, by TrainConfig field; the rest comes from the parent.
RUN_FLAGS = (*DEFAULTS, "lr_milestones", "checkpoint_every")


def _fine_tune_config(parent: dict, args: argparse.Namespace, classes: list[str], loader: str) -> TrainConfig:
    config = TrainConfig.from_dict(parent.get("config", {}))
    iterations = args.iterations
    config.arch = parent["arch"]
    config.data, config.output_dir, config.loader = str(args.data), str(args.output_dir), loader
    config.num_classes = len(classes)
    config.batch_size = config.reference_batch_size = args.batch_size
    config.lr, config.scale_lr = args.lr, False
    config.iterations = iterations
    # 50% and 75% of the run; a run too short for one has none (the warning about late milestones is for the user's).
    config.lr_milestones = args.lr_milestones or [m for m in (iterations // 2, iterations * 3 // 4) if m >= 1]
    config.warmup_lr = None
    config.eval_every = args.eval_every
    default_every = max(1, iterations // 5)
    config.checkpoint_every = default_every if args.checkpoint_every is None else args.checkpoint_every
    config.log_every = min(config.log_every, max(1, iterations // 10))
    config.keep_last = args.keep_last
    config.workers = args.workers
    config.seed = args.seed
    config.device = args.device
    config.compile, config.channels_last = "none", False
    config.recipe = f"retrain:{config.recipe}"
    return config


def _head_initializer(parent_state: dict, new_head: bool):
    """Load the parent's weights; with a new head, everything but the final fc layer."""

    def init(model: torch.nn.Module) -> None:
        state = {k: v for k, v in parent_state.items() if not (new_head and k.startswith("fc."))}
        missing, unexpected = model.load_state_dict(state, strict=not new_head)
        if new_head and (unexpected or any(not key.startswith("fc.") for key in missing)):
            raise ClassMismatchError(
                f"parent weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )

    return init


def retrain(args: argparse.Namespace):
    given = {name: getattr(args, name) for name in RUN_FLAGS if getattr(args, name) is not None}
    args = argparse.Namespace(**{**vars(args), **DEFAULTS, **given})
    parent_path = Path(args.checkpoint)
    parent = load_checkpoint(parent_path)
    parent_classes = list(parent.get("classes") or [])
    parent_dataset = parent.get("config", {}).get("dataset", "imagenet")
    # The device loader needs CIFAR's 32x32 images; a new folder may hold any size, so it is read as a folder.
    loader = "device" if parent_dataset == "cifar10" and is_cifar_pickle(args.data) else "folder"
    data_classes = discover_classes(args.data, loader)
    if args.new_classes:
        classes = data_classes
    elif set(data_classes) <= set(parent_classes):
        classes = parent_classes
    else:
        extra = sorted(set(data_classes) - set(parent_classes))
        raise ClassMismatchError(
            f"{args.data} has classes the checkpoint was not trained on ({', '.join(extra[:5])}"
            f"{', ...' if len(extra) > 5 else ''}); pass --new-classes to train a new classification head"
        )
    config = _fine_tune_config(parent, args, classes, loader)
    if loader == "folder":
        images = count_images(args.data)
        if 0 < images < config.batch_size:
            # A small new folder is the common case for retraining: use it whole rather than fail.
            print(
                f"note: {images} training images < --batch-size {config.batch_size}; using batch {images}",
                file=sys.stderr,
            )
            config.batch_size = config.reference_batch_size = images
            if "batch_size" in given:  # the same command again, to resume: the same batch
                given["batch_size"] = images
    provenance = {
        "parent": str(parent_path.resolve()),
        "parent_sha256": sha256_file(parent_path),
        "parent_arch": parent["arch"],
        "parent_classes": parent_classes,
        "parent_iteration": parent.get("iteration"),
        "new_classes": bool(args.new_classes),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    init = _head_initializer(parent["model"], new_head=args.new_classes)
    return train(
        config,
        resume=args.resume,
        progress=args.progress,
        provenance=provenance,
        init_model=init,
        classes=classes,
        resume_overrides={"output_dir": config.output_dir, "data": config.data, **given},
    ), config


def get_args_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        description="Fine-tune an existing checkpoint on a new data folder (offline batch retraining). "
        "The result (best.pt in --output-dir) records its parent, data and metrics, ready for export.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--checkpoint",
        required=env("RESNET_CHECKPOINT") is None,
        default=env("RESNET_CHECKPOINT"),
        help="parent checkpoint (.pt) (env RESNET_CHECKPOINT)",
    )
    parser.add_argument(
        "--data",
        "--data-path",
        dest="data",
        default=env("RESNET_DATA_PATH", "data"),
        help="new data: train/ (+ val/ or test/) class folders (env RESNET_DATA_PATH)",
    )
    parser.add_argument(
        "--output-dir",
        default=env("RESNET_OUTPUT_DIR", "runs/retrain"),
        help="where the new checkpoints go (env RESNET_OUTPUT_DIR)",
    )
    parser.add_argument(
        "--new-classes",
        action="store_true",
        help="the data has a different class set: replace the classification head",
    )
    parser.add_argument("--iterations", type=int, help="fine-tune steps (default: 500)")
    parser.add_argument("--lr", type=float, help="initial learning rate (default: 0.01)")
    parser.add_argument(
        "--lr-milestones",
        type=int_list,
        help="iterations where lr ÷10 (default: 50%% and 75%% of --iterations)",
    )
    parser.add_argument("--batch-size", type=int, help="global batch size (default: 64)")
    parser.add_argument(
        "--eval-every", type=int, help="iterations between evaluations (default: 0 = each epoch)"
    )
    parser.add_argument(
        "--checkpoint-every", type=int, help="iterations between checkpoints (default: 1/5 of the run)"
    )
    parser.add_argument(
        "--keep-last", type=int, help="checkpoints kept besides best.pt (0: all) (default: 2)"
    )
    parser.add_argument("--workers", type=int, help="data loading processes (default: 2)")
    parser.add_argument(
        "--seed", type=int, help="seed for the new head, data order and augmentation (default: 0)"
    )
    parser.add_argument(
        "--device", default=env("RESNET_DEVICE"), help="auto, cpu or cuda (env RESNET_DEVICE; default: auto)"
    )
    parser.add_argument(
        "--resume",
        help="continue an interrupted retrain: a checkpoint or 'auto'; of the flags above only --iterations, "
        "--checkpoint-every, --eval-every, --keep-last, --workers and --device may change",
    )
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar"
    )
    return parser


def main(args: argparse.Namespace) -> int:
    result, config = retrain(args)
    if result.stopped:
        print(f"stopped at iteration {result.iteration}; continue with --resume auto", file=sys.stderr)
        return SIGTERM_EXIT
    best = result.best_checkpoint or result.last_checkpoint
    summary = {"checkpoint": str(best), "iteration": result.iteration, **result.metrics}
    atomic_write_text(
        Path(config.output_dir) / "provenance.json",
        json.dumps(load_checkpoint(best).get("provenance", {}), indent=2, default=str) + "\n",
    )
    print(f"retrained checkpoint: {best}")
    print(json.dumps(summary))
    return 0
