"""Training throughput: our loop vs a stock PyTorch loop (ResNet-50), and ResNet-20 cifar-paper time/iteration.

    python -m training.benchmark                       # GPU: batch 256, bf16 autocast, channels_last
    python -m training.benchmark --device cpu --batch-size 8 --steps 3 --image-size 64   # smoke run

Both ResNet-50 loops see the same synthetic device-resident batches, so data loading is excluded and the
numbers compare the training step itself: ours is `Trainer.train_step` (our model, SGD, LambdaLR schedule,
on-device metric accumulation); the stock one is torchvision's resnet50 with the textbook
zero_grad/forward/backward/step loop. ResNet-20 runs the real cifar-paper step including the on-device
augmentation of `training.cifar.DeviceBatches`.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torchvision

from training.data import DataSplit
from training.recipes import resolve
from training.train import Trainer
from training.utils import DistInfo


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


def _trainer(recipe: str, arch: str, batches, num_classes: int, args, device: torch.device) -> Trainer:
    config = resolve(
        recipe,
        {
            "arch": arch,
            "batch_size": args.batch_size if recipe == "imagenet-paper" else None,
            "amp": args.amp,
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
    network = torch.compile(model) if args.compile else model
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


def bench_resnet20_cifar(args, device: torch.device) -> float:
    from training.cifar import DeviceBatches

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.cifar_images, 32, 32, 3), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (args.cifar_images,), generator=generator)
    batch_size = min(args.cifar_batch_size, args.cifar_images)
    batches = DeviceBatches(
        images,
        labels,
        batch_size,
        device=device,
        train=True,
        drop_last=True,
        channels_last=args.channels_last,
    )
    trainer = _trainer("cifar-paper", "resnet20", batches, 10, args, device)
    window = trainer.new_window()
    trainer.network.train()
    stream = iter(_forever(batches))

    def step() -> None:
        images, labels = next(stream)
        trainer.train_step(images, labels, window)

    return _time_steps(step, args.steps, args.warmup, device)


def _forever(batches):
    epoch = 0
    while True:
        batches.set_epoch(epoch)
        yield from batches
        epoch += 1


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=256, help="ResNet-50 batch size")
    parser.add_argument("--image-size", type=int, default=224, help="ResNet-50 input size")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--amp", choices=("none", "bf16"), default="bf16")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--compile", action="store_true", help="torch.compile both ResNet-50 loops")
    parser.add_argument("--cifar-batch-size", type=int, default=128, help="ResNet-20 batch size (paper: 128)")
    parser.add_argument("--cifar-images", type=int, default=50_000, help="size of the synthetic CIFAR set")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser


def main(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    ours = bench_resnet50_ours(args, device)
    stock = bench_resnet50_stock(args, device)
    cifar = bench_resnet20_cifar(args, device)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "amp": args.amp,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "steps": args.steps,
        "resnet50_ours_img_s": args.batch_size / ours,
        "resnet50_stock_img_s": args.batch_size / stock,
        "resnet20_cifar_ms_per_iter": 1000 * cifar,
        "cifar_batch_size": args.cifar_batch_size,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"| measurement ({result['device']}, {args.amp}, channels_last={args.channels_last}) | value |")
        print("| --- | --- |")
        print(f"| ResNet-50 ours, batch {args.batch_size} | {result['resnet50_ours_img_s']:.1f} img/s |")
        print(
            f"| ResNet-50 stock PyTorch loop, batch {args.batch_size} | {result['resnet50_stock_img_s']:.1f} img/s |"
        )
        print(
            f"| ResNet-20 cifar-paper (batch {args.cifar_batch_size}, augmentation on device) | "
            f"{result['resnet20_cifar_ms_per_iter']:.2f} ms/iteration |"
        )
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
