"""`resnet export`: a checkpoint (or an arch + weights) -> verified ONNX / FP16 / INT8 / TensorRT models in a
Triton model repository, with a preprocess model and a pipeline ensemble. Flags default from RESNET_* variables."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from rich.console import Console

from cli.errors import raise_terminated
from export.errors import ExportError


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"RESNET_{name}", default)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Export a ResNet to verified ONNX (plus FP16 / INT8 / TensorRT) and publish it as a new "
        "version in a Triton model repository. Nothing is published unless every artifact verifies.",
        epilog="examples:\n"
        "  resnet export --checkpoint runs/resnet20/best.pt --name resnet20_cifar10\n"
        "  resnet export --arch resnet50 --weights torchvision:IMAGENET1K_V2 --name resnet50 --int8 \\\n"
        "      --calib-data data/calib --eval-data data/val\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_argument_group("what to export (--checkpoint, or --arch with --weights)")
    source.add_argument(
        "--checkpoint", type=Path, help="our training checkpoint, or a torchvision state dict (with --arch)"
    )
    source.add_argument("--arch", help="architecture, e.g. resnet20 (CIFAR) or resnet50 (ImageNet)")
    source.add_argument(
        "--weights",
        default="random",
        help="with --arch: 'random' or 'torchvision[:ENUM]' (downloaded once, hash-checked; "
        "default enum DEFAULT) (default: random)",
    )
    source.add_argument(
        "--num-classes", type=int, help="classes for --weights random (default: 10 CIFAR / 1000)"
    )
    out = parser.add_argument_group("where to")
    out.add_argument("--name", help="model name in the repository (default: the arch)")
    out.add_argument(
        "--repository",
        type=Path,
        default=Path(_env("MODEL_REPOSITORY", "model_repository")),
        help="model repository folder (env RESNET_MODEL_REPOSITORY; default: model_repository)",
    )
    out.add_argument(
        "--target",
        choices=("cpu", "gpu"),
        default=_env("EXPORT_TARGET", "cpu"),
        help="cpu: Python-backend model running ONNX Runtime; gpu: onnxruntime_onnx with the TensorRT "
        "accelerator (env RESNET_EXPORT_TARGET; default: cpu)",
    )
    out.add_argument(
        "--labels",
        type=Path,
        help="labels file, one per line (default: checkpoint classes, else "
        "ImageNet classes for torchvision weights, else class_N)",
    )
    out.add_argument(
        "--max-batch-size",
        type=int,
        default=int(_env("MAX_BATCH_SIZE", "32")),
        help="Triton max_batch_size and the TensorRT profile's max (default: 32)",
    )
    out.add_argument(
        "--max-queue-delay-us", type=int, default=2000, help="dynamic batching delay (default: 2000)"
    )
    out.add_argument("--instances", type=int, default=1, help="model instances (default: 1)")
    out.add_argument(
        "--keep-versions",
        type=int,
        default=int(_env("KEEP_VERSIONS", "3")),
        help="versions kept on disk per model; older ones are pruned (default: 3)",
    )
    out.add_argument(
        "--no-pipeline",
        dest="pipeline",
        action="store_false",
        help="skip the <name>_preprocess model and <name>_pipeline ensemble",
    )
    variants = parser.add_argument_group("variants")
    variants.add_argument(
        "--fp16",
        action="store_true",
        help="also publish <name>_fp16 (FP16 ONNX); on gpu, run the TensorRT accelerator in FP16",
    )
    variants.add_argument("--int8", action="store_true", help="also publish <name>_int8 (static QDQ INT8)")
    variants.add_argument("--calib-data", type=Path, help="image folder to calibrate INT8 on (real images)")
    variants.add_argument(
        "--calib-images", type=int, default=256, help="calibration images used (default: 256)"
    )
    variants.add_argument(
        "--calib-method",
        choices=("minmax", "entropy", "percentile"),
        default="minmax",
        help="activation range method (default: minmax)",
    )
    variants.add_argument(
        "--keep-first-last-fp32",
        action="store_true",
        help="leave the stem conv and classifier unquantized (helps small CIFAR nets)",
    )
    variants.add_argument(
        "--eval-data",
        type=Path,
        help="labelled images (ImageFolder: <class>/<image>) to measure the INT8 accuracy drop on",
    )
    variants.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=1.0,
        help="refuse INT8 when top-1 drops more than this many points (default: 1.0)",
    )
    variants.add_argument(
        "--tensorrt",
        action="store_true",
        help="also build <name>_trt, a TensorRT plan (needs tensorrt and --target gpu)",
    )
    repair = parser.add_argument_group("repair")
    repair.add_argument(
        "--undo-unfinished",
        action="store_true",
        help="export nothing: undo what an export killed while publishing into --repository left there (its "
        "new versions, the config.pbtxt and labels.txt it replaced), as the next export would; waits for an "
        "export that is still publishing",
    )
    return parser


def _source(args: argparse.Namespace):
    from export.source import from_arch, from_checkpoint

    if args.checkpoint:
        if args.weights != "random" or args.num_classes is not None:
            raise ExportError("--weights and --num-classes go with --arch alone: a --checkpoint has its own")
        return from_checkpoint(args.checkpoint, args.arch)
    if not args.arch:
        raise ExportError("give --checkpoint PATH, or --arch NAME with --weights random|torchvision[:ENUM]")
    return from_arch(args.arch, args.weights, args.num_classes)


def _labels(path: Path | None) -> list[str] | None:
    if path is None:
        return None
    try:
        labels = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError as error:
        raise ExportError(f"cannot read labels file {path}: {error.strerror}") from error
    if not labels:
        raise ExportError(f"labels file {path} is empty")
    return labels


def _check_writable(repository: Path) -> None:
    """Before minutes of export and verification, not after them; nothing is created here (a failed export
    leaves no folder behind)."""
    existing = next(folder for folder in (repository, *repository.parents) if folder.exists())
    if not existing.is_dir():
        why = "it is a file" if existing == repository else f"{existing} is a file"
    elif not os.access(existing, os.W_OK | os.X_OK):
        why = f"{existing} is not writable"
    else:
        return
    raise ExportError(f"cannot use {repository} as the model repository: {why}")


def _undo_unfinished(repository: Path, console: Console) -> int:
    from export.repository import undo_killed_export

    if not repository.is_dir():
        raise ExportError(f"no model repository at {repository}")
    _check_writable(repository)
    if not undo_killed_export(repository, console.print):
        console.print(f"nothing to undo: no export was killed while publishing into {repository}")
    return 0


def main(args: argparse.Namespace) -> int:
    from export.quantize import QuantizeOptions
    from export.repository import BatchingPolicy
    from export.workflow import ExportOptions, export_to_repository, summary_table

    if args.undo_unfinished:
        if args.checkpoint or args.arch:
            raise ExportError("--undo-unfinished exports nothing: give it --repository alone")
        return _undo_unfinished(args.repository, Console(stderr=True))
    _check_writable(args.repository)
    # stopped where it stood, an export left its scratch folder (100 MB for a ResNet-50) in TMPDIR each time
    signal.signal(signal.SIGTERM, raise_terminated)
    console = Console(stderr=True)
    with console.status("loading the model..."):
        source = _source(args)
    options = ExportOptions(
        name=args.name or source.arch,
        repository=args.repository,
        target=args.target,
        fp16=args.fp16,
        int8=args.int8,
        calib_data=args.calib_data,
        eval_data=args.eval_data,
        max_accuracy_drop=args.max_accuracy_drop,
        tensorrt=args.tensorrt,
        labels=_labels(args.labels),
        quantize=QuantizeOptions(
            method=args.calib_method,
            max_calibration_images=args.calib_images,
            keep_first_last_fp32=args.keep_first_last_fp32,
        ),
        batching=BatchingPolicy(
            max_batch_size=args.max_batch_size,
            max_queue_delay_us=args.max_queue_delay_us,
            instances=args.instances,
        ),
        keep_versions=args.keep_versions,
        pipeline=args.pipeline,
    )
    artifacts = export_to_repository(source, options, console)
    Console(width=None if sys.stdout.isatty() else 120).print(summary_table(artifacts, options.repository))
    return 0
