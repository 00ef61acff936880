"""`resnet evaluate`: top-1/top-5 of a checkpoint (PyTorch) or an ONNX model (ONNX Runtime), center or 10-crop.

Other parts call `evaluate_checkpoint(...)` and `evaluate_onnx(...)` (e.g. to measure the INT8 accuracy drop);
both return {"top1", "top5", "error", "top5_error", "n", ...} with accuracies in percent.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cli.errors import ResnetError
from cli.help import HelpFormatter
from cli.limits import MAX_WORKERS
from server.spec import PreprocessSpec
from training.data import is_cifar_pickle, load_split
from training.errors import CheckpointError, ConfigError
from training.models import build_model
from training.utils import (
    DistInfo,
    accuracy_counts,
    all_reduce_sum,
    load_checkpoint,
    resolve_device,
    state_dict_mismatch,
)


def _result(top1_hits: float, top5_hits: float, count: float, loss_sum: float | None = None) -> dict:
    count = int(count)
    top1 = 100.0 * top1_hits / max(count, 1)
    top5 = 100.0 * top5_hits / max(count, 1)
    result = {"top1": top1, "top5": top5, "error": 100.0 - top1, "top5_error": 100.0 - top5, "n": count}
    if loss_sum is not None:
        result["loss"] = loss_sum / max(count, 1)
    return result


# no_grad, not inference_mode: the model may be the compiled (CUDA-graph) module that training continues with,
# and inference-mode tensors mixed into its graphs are a known source of failures.
@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module, batches, device: torch.device, amp: str = "none", progress: bool = False
) -> dict:
    """Top-1/top-5 over `batches` (summed over ranks when distributed); 5-D batches are averaged over crops."""
    model.eval()
    top1 = top5 = count = loss_sum = 0.0
    for images, labels in tqdm(batches, desc="eval", unit="batch", disable=not progress, leave=False):
        crops = images.shape[1] if images.dim() == 5 else 1
        flat = images.flatten(0, 1) if crops > 1 else images
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
            logits = model(flat.to(device)).float()
        if crops > 1:
            logits = logits.view(len(labels), crops, -1).softmax(-1).mean(1)  # the paper averages the scores
        labels = labels.to(device)
        hit1, hit5 = accuracy_counts(logits, labels)
        top1, top5, count = top1 + hit1, top5 + hit5, count + len(labels)
        if crops == 1:
            loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
    top1, top5, count, loss_sum = all_reduce_sum([top1, top5, count, loss_sum], device)
    return _result(top1, top5, count, loss_sum)


def model_from_checkpoint(checkpoint: dict) -> torch.nn.Module:
    config = checkpoint.get("config", {})
    variant = checkpoint.get("stride_variant", config.get("stride_variant", "v1.5"))
    model = build_model(checkpoint["arch"], checkpoint["num_classes"], variant)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise CheckpointError(
            f"checkpoint weights do not fit {checkpoint['arch']}: {state_dict_mismatch(error)}"
        ) from error
    return model


def choose_loader(data: str | Path, dataset: str | None, loader: str = "auto") -> tuple[str, str]:
    """(dataset, loader) for evaluating on `data`: CIFAR's decode-once loader where it can read the data."""
    from training.cifar import find_source

    if is_cifar_pickle(data):
        return "cifar10", "device"
    dataset = dataset or "imagenet"
    if dataset == "cifar10" and loader != "folder":
        try:
            find_source(Path(data), "test")
            return dataset, "device"
        except ResnetError:  # not a CIFAR layout: read it as an image folder
            pass
    return dataset, "folder"


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | Path,
    ten_crop: bool = False,
    batch_size: int = 64,
    device: str = "auto",
    workers: int = 2,
    progress: bool = False,
) -> dict:
    """Evaluate a training checkpoint on `data` (a val/ or test/ folder, or its parent, or CIFAR batches)."""
    device_obj = resolve_device(device, DistInfo())
    state = load_checkpoint(checkpoint)
    model = model_from_checkpoint(state).to(device_obj)
    spec = PreprocessSpec.from_dict(state["preprocess"])
    config = state.get("config", {})
    kind, loader = choose_loader(data, config.get("dataset"), config.get("loader", "auto"))
    split = load_split(
        data,
        "val",
        dataset=kind,
        spec=spec,
        batch_size=batch_size,
        train=False,
        workers=workers,
        device=device_obj,
        classes=state.get("classes"),
        ten_crop=ten_crop,
        loader=loader,
    )
    result = evaluate_model(model, split.batches, device_obj, progress=progress)
    return {**result, "ten_crop": ten_crop, "checkpoint": str(checkpoint), "data": split.source}


def evaluate_onnx(
    onnx_path: str | Path,
    data: str | Path,
    spec: PreprocessSpec | None = None,
    classes: list[str] | None = None,
    ten_crop: bool = False,
    batch_size: int = 32,
    workers: int = 2,
    providers: list[str] | None = None,
    progress: bool = False,
    dataset: str | None = None,
) -> dict:
    """Evaluate an ONNX classifier (input `input` NCHW float, output logits) with ONNX Runtime."""
    import onnxruntime as ort

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise CheckpointError(f"ONNX model {onnx_path} does not exist")
    spec = spec or PreprocessSpec.imagenet()
    try:
        session = ort.InferenceSession(str(onnx_path), providers=providers or ["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - ORT's own classes (InvalidProtobuf, Fail, ...) are bare Exceptions
        raise CheckpointError(f"cannot load ONNX model {onnx_path}: {error}") from error
    model_input = session.get_inputs()[0]
    size = model_input.shape[-2:]
    if (
        spec.layout == "NCHW"
        and all(isinstance(d, int) for d in size)
        and tuple(size) != (spec.crop, spec.crop)
    ):
        raise CheckpointError(
            f"{onnx_path} takes {size[0]}x{size[1]} images, the preprocessing makes {spec.crop}x{spec.crop}: "
            "give the --checkpoint it was exported from, or the model.onnx in its model repository"
        )
    width = session.get_outputs()[0].shape[-1]
    if classes and isinstance(width, int) and width != len(classes):
        # scored against the wrong class indexes, every number would be wrong without a word
        raise CheckpointError(
            f"{onnx_path} gives {width} class scores, its class names are {len(classes)}: give the --checkpoint "
            "it was exported from, or a model.onnx of the repository version its labels.txt describes"
        )
    input_name = model_input.name
    kind, loader = choose_loader(data, dataset)
    split = load_split(
        data,
        "val",
        dataset=kind,
        spec=spec,
        batch_size=batch_size,
        train=False,
        workers=workers,
        classes=classes,
        ten_crop=ten_crop,
        loader=loader,
    )
    top1 = top5 = count = 0
    for images, labels in tqdm(
        split.batches, desc="eval onnx", unit="batch", disable=not progress, leave=False
    ):
        crops = images.shape[1] if images.dim() == 5 else 1
        flat = images.flatten(0, 1) if crops > 1 else images
        logits = torch.from_numpy(np.asarray(session.run(None, {input_name: flat.numpy()})[0]))
        if crops > 1:
            logits = logits.view(len(labels), crops, -1).softmax(-1).mean(1)
        hit1, hit5 = accuracy_counts(logits, labels)
        top1, top5, count = top1 + hit1, top5 + hit5, count + len(labels)
    return {**_result(top1, top5, count), "ten_crop": ten_crop, "onnx": str(onnx_path), "data": split.source}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Top-1/top-5 accuracy of a checkpoint, or of an ONNX model with the checkpoint's "
        "preprocessing and classes, on a labelled folder (center crop or the paper's 10-crop).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--checkpoint",
        default=os.environ.get("RESNET_CHECKPOINT"),
        help="training checkpoint (.pt); with --onnx it supplies preprocessing and class names "
        "(env RESNET_CHECKPOINT)",
    )
    parser.add_argument(
        "--data",
        "--data-path",
        dest="data",
        default=os.environ.get("RESNET_DATA_PATH", "data"),
        help="folder with val/ or test/ class folders (or the class folders themselves), or "
        "CIFAR-10 pickle batches (env RESNET_DATA_PATH)",
    )
    parser.add_argument(
        "--onnx", help="evaluate this ONNX model with ONNX Runtime instead of the PyTorch weights"
    )
    parser.add_argument(
        "--ten-crop", action="store_true", help="the paper's 10-crop testing (corners+center, flips)"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch")
    parser.add_argument("--workers", type=int, default=2, help="data loading processes")
    parser.add_argument(
        "--device",
        default=os.environ.get("RESNET_DEVICE", "auto"),
        help="auto, cpu or cuda; with --onnx it picks the ONNX Runtime provider (env RESNET_DEVICE)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return parser


def onnx_preprocessing(
    onnx_path: str, checkpoint: str | None
) -> tuple[PreprocessSpec, list[str] | None, str | None]:
    """Preprocessing, class names and dataset kind for an ONNX model: the checkpoint's; else, for a published
    `<model>/<version>/model.onnx`, what its model repository serves it with; else ImageNet's."""
    if checkpoint:
        state = load_checkpoint(checkpoint)
        spec = PreprocessSpec.from_dict(state["preprocess"])
        return spec, state.get("classes"), state.get("config", {}).get("dataset")
    model_dir = Path(onnx_path).resolve().parent.parent
    if (model_dir / "config.pbtxt").is_file():
        # export reads config.pbtxt with tritonclient's schema
        try:
            from export.repository import served_preprocessing
        except ImportError:  # the train image has neither export/ nor tritonclient: it evaluates checkpoints
            raise CheckpointError(
                f"{onnx_path} is in a model repository, which this installation cannot read (no `export` "
                "package); give --checkpoint for its preprocessing and classes"
            ) from None
        spec, labels = served_preprocessing(model_dir)
        return spec, labels, None
    return PreprocessSpec.imagenet(), None, None


def onnx_providers(device: str) -> list[str]:
    """ONNX Runtime providers for --device: CUDA where asked (and, for auto, where this build has it)."""
    import onnxruntime as ort

    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if device == "cpu" or (device == "auto" and not has_cuda):
        return ["CPUExecutionProvider"]
    if device in ("auto", "cuda"):
        if has_cuda:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        raise ConfigError(
            f"--device cuda with --onnx: this ONNX Runtime ({ort.__version__}) has no CUDA provider"
        )
    raise ConfigError(f"--device with --onnx must be auto, cpu or cuda, got {device!r}")


def main(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    if not 0 <= args.workers <= MAX_WORKERS:
        raise ConfigError(f"--workers must be from 0 to {MAX_WORKERS}, got {args.workers}")
    if args.onnx:
        spec, classes, kind = onnx_preprocessing(args.onnx, args.checkpoint)
        providers = onnx_providers(args.device)
        result = evaluate_onnx(
            args.onnx,
            args.data,
            spec,
            classes,
            args.ten_crop,
            args.batch_size,
            args.workers,
            providers=providers,
            progress=True,
            dataset=kind,
        )
    else:
        if not args.checkpoint:
            raise CheckpointError("give --checkpoint PATH (and/or --onnx MODEL.onnx)")
        result = evaluate_checkpoint(
            args.checkpoint,
            args.data,
            args.ten_crop,
            args.batch_size,
            args.device,
            args.workers,
            progress=True,
        )
    if args.json:
        print(json.dumps(result))
    else:
        crop = "10-crop" if args.ten_crop else "center crop"
        print(
            f"{result['n']} images ({crop}): top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
            f"(top-1 error {result['error']:.2f}%, top-5 error {result['top5_error']:.2f}%)"
        )
    return 0
