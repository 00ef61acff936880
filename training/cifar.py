"""CIFAR-10 fast path: decode once into a uint8 cache, keep it on the device, augment whole batches there.

The paper's CIFAR recipe (4-pixel zero pad, random 32x32 crop, horizontal flip) is cheap enough that a
DataLoader with workers spends more time in Python than the GPU spends on ResNet-20; doing it as one gather per
batch on resident uint8 data keeps the GPU busy and makes the order a pure function of (seed, epoch, batch).

Sources understood by `load_cifar10(root, split)`:
  * the python pickle batches (`data_batch_1..5`, `test_batch`, `batches.meta`), root being the
    `cifar-10-batches-py` folder or its parent;
  * a JPEG folder tree `<split>/<class>/*.jpg` (the layout of ../shared/data/cifar10-jpeg.tar.xz), root being
    that folder or its parent `cifar10-jpeg/`.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import cli.files
from server.spec import CIFAR10_MEAN, CIFAR10_STD
from training.data import mix_seed
from training.errors import DataError, MissingSplitError

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
IMAGE_SIZE = 32
PICKLE_FOLDER = "cifar-10-batches-py"
JPEG_FOLDER = "cifar10-jpeg"
PICKLE_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
JPEG_SUFFIXES = {".jpg", ".jpeg", ".png"}
CACHE_VERSION = 1


@dataclass(frozen=True)
class DecodedSplit:
    images: np.ndarray  # uint8 [N, 32, 32, 3]
    labels: np.ndarray  # int64 [N]
    classes: list[str]
    skipped: int = 0  # unreadable or wrongly sized image files


# ----------------------------------------------------------------------------------------------- loading


def load_cifar10(
    root: str | os.PathLike, split: str = "train", cache_dir: str | os.PathLike | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Images uint8 [N, 32, 32, 3], labels int64 [N] and the class names of one split.

    The first call decodes the source and writes `<root>/.cache/cifar10-<split>.npz` (atomically); later calls
    load that file unless the source folders changed. An unwritable root just means no cache.
    """
    if split not in SPLITS:
        raise DataError(f"unknown CIFAR-10 split {split!r}; expected one of {', '.join(SPLITS)}")
    kind, source = find_source(Path(root), split)
    cache_path = Path(cache_dir) if cache_dir is not None else Path(root) / ".cache"
    cache_path = cache_path / f"cifar10-{split}.npz"
    fingerprint = _fingerprint(kind, source, split)
    decoded = _read_cache(cache_path, fingerprint)
    if decoded is None:
        decoded = read_pickle_split(source, split) if kind == "pickle" else read_jpeg_split(source / split)
        _write_cache(cache_path, decoded, fingerprint)
    if decoded.skipped:
        log.warning(
            "CIFAR-10 %s: skipped %d unreadable image file(s) under %s", split, decoded.skipped, source
        )
    return torch.from_numpy(decoded.images), torch.from_numpy(decoded.labels), list(decoded.classes)


def find_source(root: Path, split: str) -> tuple[str, Path]:
    """("pickle", folder with the batches) or ("jpeg", folder holding `<split>/<class>/`)."""
    if not root.is_dir():
        raise DataError(
            f"CIFAR-10 folder {root} does not exist (extract it first: `make cifar`, or see `python -m training.cifar --help`)"
        )
    for candidate in (root, root / PICKLE_FOLDER):
        if all((candidate / name).is_file() for name in PICKLE_BATCHES[split]):
            return "pickle", candidate
    for candidate in (root, root / JPEG_FOLDER):
        if (candidate / split).is_dir():
            return "jpeg", candidate
    raise MissingSplitError(
        f"no CIFAR-10 {split} data under {root}: expected {PICKLE_FOLDER}/ pickle batches "
        f"({', '.join(PICKLE_BATCHES[split])}) or a JPEG tree {split}/<class>/*.jpg"
    )


def read_pickle_split(folder: Path, split: str) -> DecodedSplit:
    images, labels = [], []
    for name in PICKLE_BATCHES[split]:
        batch = _unpickle(folder / name)
        try:
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            images.append(data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1))
            labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
        except (KeyError, ValueError) as error:
            raise DataError(f"{folder / name} is not a CIFAR-10 batch: {error}") from error
    meta_path = folder / "batches.meta"
    if meta_path.is_file():
        classes = [name.decode() for name in _unpickle(meta_path)[b"label_names"]]
    else:
        classes = [str(i) for i in range(int(max(label.max() for label in labels)) + 1)]
    return DecodedSplit(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels), classes)


def read_jpeg_split(split_dir: Path, workers: int = 2) -> DecodedSplit:
    """Decode `<split_dir>/<class>/*.jpg` (classes in sorted folder order); unreadable files are skipped."""
    from PIL import Image
    from tqdm import tqdm

    classes = (
        sorted(entry.name for entry in split_dir.iterdir() if entry.is_dir()) if split_dir.is_dir() else []
    )
    files = [
        (path, index)
        for index, name in enumerate(classes)
        for path in sorted((split_dir / name).iterdir())
        if path.suffix.lower() in JPEG_SUFFIXES
    ]
    if not files:
        raise DataError(f"no images under {split_dir} (expected <class>/*.jpg)")

    def decode(path: Path) -> np.ndarray | None:
        try:
            with Image.open(path) as image:
                if image.size != (IMAGE_SIZE, IMAGE_SIZE):
                    return None
                return np.asarray(image.convert("RGB"))
        except (OSError, ValueError, SyntaxError):  # PIL's errors for truncated or foreign files
            return None

    images = np.empty((len(files), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    keep = np.zeros(len(files), dtype=bool)
    with ThreadPoolExecutor(workers) as pool:
        decoded = pool.map(decode, (path for path, _ in files), chunksize=256)
        for i, image in enumerate(
            tqdm(decoded, total=len(files), desc=f"decode {split_dir.name}", unit="img", disable=None)
        ):
            if image is not None:
                images[i], keep[i] = image, True
    labels = np.array([label for _, label in files], dtype=np.int64)
    if not keep.any():
        raise DataError(f"none of the {len(files)} images under {split_dir} could be decoded as 32x32")
    return DecodedSplit(images[keep], labels[keep], classes, skipped=int((~keep).sum()))


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as file:
            return pickle.load(file, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError) as error:
        raise DataError(f"cannot read CIFAR-10 batch {path}: {error}") from error


def _fingerprint(kind: str, source: Path, split: str) -> str:
    """Cheap change detector: file/folder sizes and mtimes (a folder's mtime changes when files come or go)."""
    if kind == "pickle":
        paths = [source / name for name in PICKLE_BATCHES[split]]
    else:
        paths = [source / split, *sorted(p for p in (source / split).iterdir() if p.is_dir())]
    stats = [(p.name, p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns) for p in paths]
    return f"v{CACHE_VERSION}:{kind}:{stats}"


def _read_cache(path: Path, fingerprint: str) -> DecodedSplit | None:
    try:
        with np.load(path, allow_pickle=False) as cached:
            if str(cached["fingerprint"]) != fingerprint:
                return None
            return DecodedSplit(
                cached["images"],
                cached["labels"],
                [str(c) for c in cached["classes"]],
                int(cached["skipped"]),
            )
    except (OSError, KeyError, ValueError):
        return None


def _write_cache(path: Path, decoded: DecodedSplit, fingerprint: str) -> None:
    arrays = dict(
        images=decoded.images,
        labels=decoded.labels,
        classes=np.array(decoded.classes),
        skipped=decoded.skipped,
        fingerprint=fingerprint,
    )
    try:
        cli.files.atomic_write(path, lambda file: np.savez(file, **arrays))
    except OSError as error:
        log.warning("not caching decoded CIFAR-10 at %s: %s", path, error)


def prepare_cifar10(tarball: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extract a CIFAR-10 archive (JPEG tree or pickle batches) under `dest` once; returns the data folder."""
    tarball, dest = Path(tarball), Path(dest)
    if not tarball.is_file():
        raise DataError(f"archive {tarball} does not exist")
    if dest.exists() and not dest.is_dir():
        raise DataError(f"--data-path {dest} is a file, not a folder to extract into")
    archive = _open_archive(tarball)
    try:
        with archive:
            return _extract_once(archive, tarball, dest)
    except (EOFError, tarfile.ReadError) as error:  # the archive ends early: a download or copy cut short
        raise DataError(
            f"cannot extract {tarball}: it is cut short ({error}); fetch or copy it again"
        ) from error
    except (tarfile.TarError, OSError) as error:
        raise DataError(f"cannot extract {tarball}: {error}") from error


def _open_archive(tarball: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(tarball)
    except tarfile.ReadError:  # its message lists every compression it tried, one per line
        raise DataError(f"{tarball} is not a tar archive (.tar, .tar.gz, .tar.bz2 or .tar.xz)") from None
    except OSError as error:
        raise DataError(f"cannot read {tarball}: {error}") from error


def _extract_once(archive: tarfile.TarFile, tarball: Path, dest: Path) -> Path:
    top = {Path(name).parts[0] for name in archive.getnames() if name and not name.startswith("/")}
    if len(top) != 1:
        raise DataError(f"{tarball} should hold one top-level folder, found {sorted(top)[:5]}")
    target = dest / top.pop()
    if target.is_dir():
        return target
    dest.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest, prefix=".extract-"))
    try:
        archive.extractall(staging, filter="data")
        os.replace(staging / target.name, target)  # the folder appears whole or not at all
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # after a full disk, what it holds would only keep it full
    return target


# ----------------------------------------------------------------------------------------------- batches


class DeviceBatches:
    """Iterate (images float [B,3,32,32] normalized, labels int64 [B]) from uint8 data resident on `device`.

    Training batches get the paper's augmentation (zero-pad 4, random 32x32 crop, horizontal flip) as one gather
    per batch. The sample order and every random draw are functions of (seed, epoch, batch index) only, so
    `set_epoch(e)` + `start_batch=k` resumes a run mid-epoch exactly. With `world_size > 1` each rank gets a
    disjoint shard of the same permutation (padded to equal length when training, as DistributedSampler does).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        device: torch.device | str = "cpu",
        train: bool = False,
        mean: tuple[float, float, float] = CIFAR10_MEAN,
        std: tuple[float, float, float] = CIFAR10_STD,
        generator: torch.Generator | int | None = None,
        drop_last: bool = False,
        padding: int = 4,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels) or len(images) == 0:
            raise ValueError(f"need as many labels as images (> 0), got {len(images)} and {len(labels)}")
        if batch_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size={batch_size} or rank={rank}/world_size={world_size}")
        self.device = torch.device(device)
        # NCHW uint8 on the device once: 50k CIFAR images are 150 MB.
        self.images = images.permute(0, 3, 1, 2).contiguous().to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.batch_size, self.train, self.drop_last = batch_size, train, drop_last
        self.padding, self.rank, self.world_size, self.channels_last = (
            padding,
            rank,
            world_size,
            channels_last,
        )
        if isinstance(generator, torch.Generator):
            generator = generator.initial_seed()
        self.seed = int(generator if generator is not None else torch.initial_seed())
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1) * 255
        self.epoch = 0
        self.start_batch = 0

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch."""
        total = len(self.images)
        if self.world_size == 1:
            return total
        if self.train:
            return -(-total // self.world_size)
        return len(range(self.rank, total, self.world_size))

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's permutation; `start_batch` skips batches already done (mid-epoch resume)."""
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "start_batch": self.start_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed = int(state["seed"])
        self.set_epoch(state["epoch"], state.get("start_batch", 0))

    def indices(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch (CPU)."""
        total = len(self.images)
        if not self.train:
            return torch.arange(self.rank, total, self.world_size)
        order = torch.randperm(
            total, generator=torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        )
        if self.world_size > 1:
            padded = self.num_samples * self.world_size
            order = torch.cat([order, order[: padded - total]])[self.rank :: self.world_size]
        return order

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.indices()
        batches = range(self.start_batch, len(self))
        draws = self.augmentation_draws(batches, len(order)) if self.train else None
        order = order.to(self.device)
        for position, batch in enumerate(batches):
            index = order[batch * self.batch_size : (batch + 1) * self.batch_size]
            images = self.images[index]
            if draws is not None:
                images = self.augment(images, draws[position])
            images = (images.float() - self.mean) / self.std
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, self.labels[index]
        self.start_batch = 0

    def augmentation_draws(self, batches: range, total: int) -> tuple[torch.Tensor, ...]:
        """Each batch's (crop top, crop left, flip) per image, on the device.

        Drawn on the CPU from a generator per (seed, epoch, batch), so a batch is the same on any device and
        after any resume; copied to the device once per epoch, because a copy per batch from pageable memory
        blocks until the stream is idle, which would stop the host from queueing a step while the GPU works."""
        per_batch = []
        for batch in batches:
            count = min(self.batch_size, total - batch * self.batch_size)
            generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, batch, 1))
            top = torch.randint(0, 2 * self.padding + 1, (count,), generator=generator)
            left = torch.randint(0, 2 * self.padding + 1, (count,), generator=generator)
            flip = (torch.rand(count, generator=generator) < 0.5).long()
            per_batch.append(torch.stack([top, left, flip]))
        if not per_batch:
            return ()
        host = torch.cat(per_batch, dim=1)
        if self.device.type == "cuda":
            host = host.pin_memory()
        on_device = host.to(self.device, non_blocking=True)
        return on_device.split([draws.shape[1] for draws in per_batch], dim=1)

    def augment(self, images: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """Zero-pad, random crop back to size and random horizontal flip, as a single index gather."""
        count, _, height, width = images.shape
        pad = self.padding
        top, left, flip = draws[0], draws[1], draws[2].bool()
        padded = F.pad(images, (pad, pad, pad, pad)) if pad else images
        rows = top[:, None] + torch.arange(height, device=self.device)
        columns = torch.arange(width, device=self.device).expand(count, width)
        columns = left[:, None] + torch.where(flip[:, None], columns.flip(1), columns)
        batch = torch.arange(count, device=self.device)[:, None, None, None]
        channel = torch.arange(3, device=self.device)[None, :, None, None]
        return padded[batch, channel, rows[:, None, :, None], columns[:, None, None, :]]


# ----------------------------------------------------------------------------------------------- CLI


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.cifar",
        description="Prepare CIFAR-10: extract an archive and decode it once into the uint8 cache training uses.",
    )
    parser.add_argument(
        "--tarball",
        type=Path,
        default=os.environ.get("RESNET_CIFAR10_TARBALL"),
        help="archive to extract first, e.g. ../shared/data/cifar10-jpeg.tar.xz (env RESNET_CIFAR10_TARBALL)",
    )
    parser.add_argument(
        "--data-path",
        type=Path,
        default=Path(os.environ.get("RESNET_DATA_PATH", "data")),
        help="where the archive is extracted / where the dataset lives (env RESNET_DATA_PATH; default: data)",
    )
    parser.add_argument(
        "--benchmark",
        action="store_true",
        help="also time 100 training and evaluation batches of 128 from DeviceBatches",
    )
    parser.add_argument(
        "--device",
        default=os.environ.get("RESNET_DEVICE", "cpu"),
        help="device for --benchmark (env RESNET_DEVICE; default: cpu)",
    )
    return parser


def main(args: argparse.Namespace) -> int:
    root = prepare_cifar10(args.tarball, args.data_path) if args.tarball else args.data_path
    for split in SPLITS:
        images, labels, classes = load_cifar10(root, split)
        print(f"{split}: {len(images)} images, {len(classes)} classes ({', '.join(classes)}) from {root}")
        if args.benchmark and split == "train":
            for train in (True, False):
                rate = benchmark_batches(
                    DeviceBatches(images, labels, 128, args.device, train=train, generator=0)
                )
                print(f"  DeviceBatches train={train} on {args.device}: {rate:,.0f} img/s")
    return 0


def benchmark_batches(batches: DeviceBatches, count: int = 100) -> float:
    """Images per second over `count` batches, after one warm-up batch."""
    import time

    iterator = iter(batches)
    next(iterator)
    if batches.device.type == "cuda":
        torch.cuda.synchronize()
    start, images = time.perf_counter(), 0
    for _, (x, _) in zip(range(count), iterator, strict=False):
        images += len(x)
    if batches.device.type == "cuda":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


if __name__ == "__main__":
    from cli.main import run_script

    run_script(get_args_parser, main)
