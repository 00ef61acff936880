"""Training speed: our loop vs a stock PyTorch loop, for ResNet-50 (img/s) and the cifar-paper ResNet-20 (ms/step).

    python -m training.benchmark                       # GPU: batch 256, bf16 autocast, channels_last
    python -m training.benchmark --device cpu --nets resnet20 --amp none --steps 30   # CPU, ResNet-20 only

Both ResNet-50 loops see the same synthetic device-resident batches, so data loading is excluded and the
numbers compare the training step itself: ours is `Trainer.train_step` (our model, SGD, LambdaLR schedule,
on-device metric accumulation); the stock one is torchvision's resnet50 with the textbook
zero_grad/forward/backward/step loop. ResNet-20 runs the real cifar-paper step including the on-device
augmentation of `training.cifar.DeviceBatches`; its stock counterpart is the textbook CIFAR loop (a DataLoader
of PIL images through torchvision's RandomCrop(32, 4) + flip + ToTensor + Normalize, copied to the device each
step) on the same network. "64k iterations" multiplies ms/step by the schedule's 64,000 steps (evaluation and
checkpoints not included).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torchvision
import torchvision.transforms as T
from PIL import Image

from cli.help import HelpFormatter
from cli.limits import MAX_WORKERS
from server.spec import PreprocessSpec
from training.data import DataSplit
from training.errors import ConfigError
from training.models import build_model
from training.recipes import COMPILE_MODES, resolve
from training.train import Trainer, compiled
from training.utils import DistInfo, resolve_device

PAPER_CIFAR_ITERATIONS = 64_000


class SyntheticBatches:
    """The same pre-made batch over and over (no data loading in the measurement)."""

    def __init__(
        self, batch_size: int, image_size: int, num_classes: int, device: torch.device, channels_last: bool
    ) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(batch_size, 3, image_size, image_size, generator=generator).to(device)
        if channels_last:
            self.images = self.images.contiguous(memory_format=torch.channels_last)
        self.labels = torch.randint(0, num_classes, (batch_size,), generator=generator).to(device)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        pass

    def __len__(self) -> int:
        return 1_000_000

    def __iter__(self):
        while True:
            yield self.images, self.labels


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(step, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per step, measured after `warmup` steps (compilation, cuDNN autotuning)."""
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - start) / steps


def _profile(step, steps: int, device: torch.device, trace: str) -> None:
    """`steps` more steps under torch.profiler: a Chrome trace at `trace`, the busiest operators on stderr.

    On a GPU the table's "Self CUDA time total" against steps x ms/step says how much of a step the kernels fill,
    and so whether launches (CUDA graphs, whole-step capture) or kernels (bf16, fusion) are the lever.
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    # torch's trace export does not fail when the folder is missing: it writes nothing and says nothing.
    Path(trace).parent.mkdir(parents=True, exist_ok=True)
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(steps):
            step()
        _sync(device)
    profiler.export_chrome_trace(trace)
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"profile of {steps} steps (Chrome trace: {trace}):", file=sys.stderr)
    print(profiler.key_averages().table(sort_by=sort_by, row_limit=25), file=sys.stderr)


def _trainer(recipe: str, arch: str, batches, num_classes: int, args, device: torch.device) -> Trainer:
    config = resolve(
        recipe,
        {
            "arch": arch,
            "batch_size": args.batch_size if recipe == "imagenet-paper" else None,
            # --amp is the ResNet-50 loops' setting; the ResNet-20 comparison is FP32 on both sides (its stock loop
            # has no autocast), as its table row says.
            "amp": args.amp if recipe == "imagenet-paper" else "none",
            "channels_last": args.channels_last,
            "compile": args.compile,
            "device": str(device),
            "tensorboard": False,
        },
    )
    config.output_dir = ""  # nothing is written: only train_step runs
    split = DataSplit(batches, [str(i) for i in range(num_classes)], {}, "synthetic")
    return Trainer(config, DistInfo(), device, split, None, progress=False)


def bench_resnet50_ours(args, device: torch.device) -> float:
    batches = SyntheticBatches(args.batch_size, args.image_size, 1000, device, args.channels_last)
    trainer = _trainer("imagenet-paper", "resnet50", batches, 1000, args, device)
    window = trainer.new_window()
    trainer.network.train()
    return _time_steps(
        lambda: trainer.train_step(batches.images, batches.labels, window), args.steps, args.warmup, device
    )


def bench_resnet50_stock(args, device: torch.device) -> float:
    batches = SyntheticBatches(args.batch_size, args.image_size, 1000, device, args.channels_last)
    model = torchvision.models.resnet50().to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    network = compiled(model, args.compile)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    criterion = torch.nn.CrossEntropyLoss()

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16"):
            loss = criterion(network(batches.images), batches.labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    network.train()
    return _time_steps(step, args.steps, args.warmup, device)


def _synthetic_cifar(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, 32, 32, 3), dtype=torch.uint8, generator=generator)
    return images, torch.randint(0, 10, (count,), generator=generator)


class PILImages(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR10 hands the stock loop: one PIL image per item, transformed there."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform) -> None:
        self.images, self.labels, self.transform = images.numpy(), labels.tolist(), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


def bench_resnet20_stock(args, device: torch.device) -> float:
    images, labels = _synthetic_cifar(args.cifar_images)
    spec = PreprocessSpec.cifar10()
    transform = T.Compose(
        [
            T.RandomCrop(32, padding=4),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(spec.mean, spec.std),
        ]
    )
    loader = torch.utils.data.DataLoader(
        PILImages(images, labels, transform),
        batch_size=min(args.cifar_batch_size, args.cifar_images),
        shuffle=True,
        drop_last=True,
        num_workers=args.stock_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=args.stock_workers > 0,
    )
    model = build_model("resnet20", 10).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    network = compiled(model, args.compile)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    criterion = torch.nn.CrossEntropyLoss()
    stream = _forever(loader)

    def step() -> None:
        batch, target = next(stream)
        batch, target = batch.to(device, non_blocking=True), target.to(device, non_blocking=True)
        loss = criterion(network(batch), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    network.train()
    return _time_steps(step, args.steps, args.warmup, device)


def bench_resnet20_ours(args, device: torch.device) -> float:
    from training.cifar import DeviceBatches

    images, labels = _synthetic_cifar(args.cifar_images)
    batches = DeviceBatches(
        images,
        labels,
        min(args.cifar_batch_size, args.cifar_images),
        device=device,
        train=True,
        drop_last=True,
        channels_last=args.channels_last,
    )
    trainer = _trainer("cifar-paper", "resnet20", batches, 10, args, device)
    window = trainer.new_window()
    trainer.network.train()
    stream = _forever(batches)

    def step() -> None:
        images, labels = next(stream)
        trainer.train_step(images, labels, window)

    seconds = _time_steps(step, args.steps, args.warmup, device)
    if args.profile:
        _profile(step, args.profile_steps, device, args.profile)
    return seconds


def _forever(batches):
    epoch = 0
    while True:
        if hasattr(batches, "set_epoch"):
            batches.set_epoch(epoch)
        yield from batches
        epoch += 1


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.benchmark",
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:N or auto"
    )
    parser.add_argument(
        "--nets",
        type=_nets,
        default="resnet50,resnet20",
        help="comma-separated: resnet50 (img/s, synthetic batches), resnet20 (cifar-paper ms/step, data included)",
    )
    parser.add_argument("--batch-size", type=int, default=256, help="ResNet-50 batch size")
    parser.add_argument("--image-size", type=int, default=224, help="ResNet-50 input size")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument(
        "--amp", choices=("none", "bf16"), default="bf16", help="autocast of the ResNet-50 loops"
    )
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default="none",
        choices=COMPILE_MODES,
        help="torch.compile every loop, ours and stock alike; reduce-overhead adds CUDA graphs",
    )
    parser.add_argument("--cifar-batch-size", type=int, default=128, help="ResNet-20 batch size (paper: 128)")
    parser.add_argument("--cifar-images", type=int, default=50_000, help="size of the synthetic CIFAR set")
    parser.add_argument(
        "--stock-workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="DataLoader processes of the stock ResNet-20 loop",
    )
    parser.add_argument(
        "--profile",
        metavar="TRACE.json",
        help="after timing, profile our ResNet-20 step (resnet20 in --nets): a Chrome trace here, operators on stderr",
    )
    parser.add_argument("--profile-steps", type=int, default=50, help="steps under the profiler")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser


def _nets(text: str) -> list[str]:
    nets = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(nets) - {"resnet50", "resnet20"})
    if unknown or not nets:
        raise argparse.ArgumentTypeError(f"choose from resnet50, resnet20; got {text!r}")
    return nets


def _alone(bench, args: argparse.Namespace, device: torch.device) -> float:
    """`bench` measured as if it were the only loop in the process.

    torch.compile's state is process-wide: once any loop has called `cudagraph_mark_step_begin` (ours does, under
    reduce-overhead), CUDA graph trees start a new generation only on that call (torch/_inductor/cudagraph_trees.py,
    `get_curr_generation`), so a loop measured after it that never makes the call never leaves the graphs' warm-up.
    That is the likely cause of the stock ResNet-20 loop's 131.67 ms a step on an H200 (3.51 ours), measured
    before this reset existed; `torch.compiler.reset()` also resets that counter.
    """
    torch.compiler.reset()
    return bench(args, device)


def measure(args: argparse.Namespace, device: torch.device) -> dict:
    result = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "amp": args.amp,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "steps": args.steps,
    }
    if "resnet50" in args.nets:
        result.update(batch_size=args.batch_size, image_size=args.image_size)
        result["resnet50_ours_img_s"] = args.batch_size / _alone(bench_resnet50_ours, args, device)
        result["resnet50_stock_img_s"] = args.batch_size / _alone(bench_resnet50_stock, args, device)
    if "resnet20" in args.nets:
        result.update(cifar_batch_size=args.cifar_batch_size, stock_workers=args.stock_workers)
        result["resnet20_ours_ms_per_iter"] = 1000 * _alone(bench_resnet20_ours, args, device)
        result["resnet20_stock_ms_per_iter"] = 1000 * _alone(bench_resnet20_stock, args, device)
    return result


def table(result: dict) -> str:
    rows = [
        f"| measurement ({result['device']}, torch {result['torch']}, compile={result['compile']}) | ours | stock | "
        "speed-up, ours over stock |",
        "| --- | ---: | ---: | ---: |",
    ]
    if "resnet50_ours_img_s" in result:
        ours, stock = result["resnet50_ours_img_s"], result["resnet50_stock_img_s"]
        rows.append(
            f"| ResNet-50 training, batch {result['batch_size']}, {result['image_size']} px, amp {result['amp']}, "
            f"channels_last={result['channels_last']} (img/s) | {ours:.1f} | {stock:.1f} | {ours / stock:.2f}x |"
        )
    if "resnet20_ours_ms_per_iter" in result:
        ours, stock = result["resnet20_ours_ms_per_iter"], result["resnet20_stock_ms_per_iter"]
        rows.append(
            f"| ResNet-20 cifar-paper step, batch {result['cifar_batch_size']}, FP32, data included (ms/step; "
            f"stock: {result['stock_workers']} DataLoader workers) | {ours:.2f} | {stock:.2f} | "
            f"{stock / ours:.2f}x |"
        )
        minutes = [ms * PAPER_CIFAR_ITERATIONS / 60_000 for ms in (ours, stock)]
        rows.append(
            f"| the 64k-iteration schedule at that rate (minutes) | {minutes[0]:.1f} | {minutes[1]:.1f} | |"
        )
    return "\n".join(rows)


def check_args(args: argparse.Namespace) -> None:
    """Values that would otherwise fail as a traceback, some only after the first loop's minutes of work."""
    at_least = {"batch_size": 1, "image_size": 1, "steps": 1, "warmup": 0, "cifar_batch_size": 1}
    at_least |= {"cifar_images": 1, "stock_workers": 0, "profile_steps": 1}
    for name, low in at_least.items():
        if getattr(args, name) < low:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}")
    if args.stock_workers > MAX_WORKERS:
        raise ConfigError(f"--stock-workers must be at most {MAX_WORKERS}, got {args.stock_workers}")
    if args.cifar_images < args.cifar_batch_size:
        raise ConfigError(f"--cifar-images ({args.cifar_images}) must hold one --cifar-batch-size batch")


def main(args: argparse.Namespace) -> dict:
    check_args(args)
    device = resolve_device(args.device, DistInfo())
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    result = measure(args, device)
    print(json.dumps(result) if args.json else table(result))
    return result


if __name__ == "__main__":
    from cli.main import run_script

    run_script(get_args_parser, main)
