"""Datasets for training and evaluation, behind one batch-iterator interface.

Two sources:
  * CIFAR-10 (`dataset="cifar10"`): `training.cifar` decodes pickle batches or the JPEG tree once and augments
    whole batches on the device (`DeviceBatches`).
  * Image folders (`dataset="imagenet"`, and any `<class>/<image>` tree): `train/<wnid>/*.JPEG`,
    `val/<wnid>/*` read with Pillow in DataLoader workers (`FolderBatches`).

Both yield (images, labels) batches whose order and augmentation are pure functions of (seed, epoch, batch), and
both take `set_epoch(epoch, start_batch)`, so a resumed run sees exactly the batches an uninterrupted run would.
Unreadable image files are skipped and counted, never a crash. In training an unreadable file is replaced by a
readable one drawn from (seed, epoch, sample), so every rank's batches keep their size and its epochs their
length: the (epoch, batch) that rank 0's checkpoint records is then every rank's position, and resume stays exact.
"""

from __future__ import annotations

import logging
import random
import signal
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from server.spec import PreprocessSpec
from training import presets
from training.errors import DataError, MissingSplitError

log = logging.getLogger(__name__)

EVAL_SPLITS = ("val", "test")
# Tries to replace an unreadable training image; all fail only when most files are unreadable.
TRAIN_SUBSTITUTES = 16


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers, so (seed, epoch, sample or batch) streams don't collide."""
    return (
        int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1, np.uint64)[0]) >> 1
    )


def require_folder(root: str | Path) -> Path:
    """`root` as a Path, or a DataError saying what it is instead: missing, or a file (often the archive)."""
    root = Path(root)
    if root.is_file():
        archive = bool({".tar", ".tgz", ".gz", ".xz", ".bz2", ".zip"} & set(root.suffixes))
        advice = (
            "extract it first (`make cifar`, or `python -m training.cifar --help`)"
            if archive
            else "give a folder"
        )
        raise DataError(f"data folder {root} is a file: {advice}")
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    return root


def split_dir(root: str | Path, split: str) -> Path:
    """`root/train` for training; `root/val` or `root/test` for evaluation; `root` itself if it holds classes."""
    root = require_folder(root)
    candidates = [split] if split == "train" else list(EVAL_SPLITS)
    for name in candidates:
        if (root / name).is_dir():
            return root / name
    if any(entry.is_dir() and entry.name not in ("train", *EVAL_SPLITS) for entry in root.iterdir()):
        return root
    raise MissingSplitError(f"no {'/ or '.join(candidates)}/ folder and no class folders under {root}")


def is_cifar_pickle(root: str | Path) -> bool:
    root = Path(root)
    return any(
        (folder / "data_batch_1").is_file() or (folder / "test_batch").is_file()
        for folder in (root, root / "cifar-10-batches-py")
    )


def _load_or_none(path: str) -> Image.Image | None:
    try:
        with open(path, "rb") as file:
            image = Image.open(file)
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def folder_problem(directory: Path, error: OSError) -> str:
    """Why ImageFolder refused `directory`, in one line: torchvision names a class folder without images by its
    name alone, after "Found no valid file for the classes"."""
    empty = sorted(
        folder.name
        for folder in (directory.iterdir() if directory.is_dir() else ())
        if folder.is_dir() and not any(path.suffix.lower() in IMG_EXTENSIONS for path in folder.rglob("*"))
    )
    if not empty:
        return f"no images under {directory}: {str(error).splitlines()[0]}"
    return (
        f"no images in the class folder{'s' if len(empty) > 1 else ''} {', '.join(empty[:5])} of {directory} "
        f"(a class needs at least one {'/'.join(IMG_EXTENSIONS)} file): fill or remove "
        f"{'them' if len(empty) > 1 else 'it'}"
    )


class SafeImageFolder(Dataset):
    """An ImageFolder whose samples are (unreadable indices, image tensor, label); the image is None for a file
    Pillow cannot decode, unless `substitutes` > 0 lets a readable file drawn at random take its place.

    Indexed by (index, seed): the transform's random draws and the substitutes are seeded per sample, so a sample
    does not depend on which worker loads it or when (a resumed run sees the same batches).
    """

    def __init__(
        self, directory: Path, transform, classes: list[str] | None = None, substitutes: int = 0
    ) -> None:
        try:
            folder = ImageFolder(str(directory), loader=_load_or_none)
        except (FileNotFoundError, OSError) as error:
            raise DataError(folder_problem(directory, error)) from error
        self.root = directory
        self.samples = folder.samples
        self.classes = list(folder.classes)
        if classes is not None and self.classes != list(classes):
            unknown = sorted(set(self.classes) - set(classes))
            if unknown:
                raise DataError(f"{directory} has classes the model does not know: {', '.join(unknown[:5])}")
            index = {name: i for i, name in enumerate(classes)}
            self.samples = [(path, index[self.classes[target]]) for path, target in self.samples]
            self.classes = list(classes)
        self.targets = [target for _, target in self.samples]
        self.transform = transform
        self.substitutes = substitutes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        unreadable = []
        for candidate in self._candidates(index, seed):
            path, target = self.samples[candidate]
            image = _load_or_none(path)
            if image is not None:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    return unreadable, self.transform(image), target
            unreadable.append(candidate)
        return unreadable, None, None

    def _candidates(self, index: int, seed: int) -> Iterator[int]:
        yield index
        draws = random.Random(seed)
        for _ in range(self.substitutes):
            yield draws.randrange(len(self.samples))

    def class_counts(self) -> dict[str, int]:
        counts = Counter(self.targets)
        return {name: counts.get(i, 0) for i, name in enumerate(self.classes)}


class EpochSampler(Sampler):
    """(index, seed) pairs: a per-epoch permutation (train) or the plain order, sharded across ranks."""

    def __init__(
        self, size: int, batch_size: int, train: bool, seed: int, rank: int, world_size: int
    ) -> None:
        self.size, self.batch_size, self.train = size, batch_size, train
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        self.start_batch = 0

    def indices(self) -> list[int]:
        if not self.train:
            return list(range(self.rank, self.size, self.world_size))
        generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        order = torch.randperm(self.size, generator=generator).tolist()
        per_rank = -(-self.size // self.world_size)
        order += order[: per_rank * self.world_size - self.size]  # pad like DistributedSampler
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = self.indices()
        if self.train:
            indices = indices[: len(indices) // self.batch_size * self.batch_size]  # drop_last
        for index in indices[self.start_batch * self.batch_size :]:
            yield index, mix_seed(self.seed, self.epoch, index, 1)

    def __len__(self) -> int:
        return len(self.indices())


def _ignore_stop_signals(worker_id: int) -> None:
    """A SIGTERM sent to the whole process group must reach only the trainer, which checkpoints and then
    stops its workers; a worker dying first would crash the loop. Workers still exit when the trainer dies."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _collate(samples):
    good = [(image, target) for _, image, target in samples if image is not None]
    bad = [index for unreadable, _, _ in samples for index in unreadable]
    if not good:
        return None, None, bad
    images = torch.stack([image for image, _ in good])
    return images, torch.tensor([target for _, target in good], dtype=torch.int64), bad


class FolderBatches:
    """(images, labels) batches from a SafeImageFolder; same interface as `training.cifar.DeviceBatches`."""

    def __init__(
        self,
        dataset: SafeImageFolder,
        batch_size: int,
        train: bool,
        seed: int = 0,
        workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        channels_last: bool = False,
    ) -> None:
        self.dataset = dataset
        self.batch_size, self.train = batch_size, train
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.sampler = EpochSampler(len(dataset), batch_size, train, seed, rank, world_size)
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
            worker_init_fn=_ignore_stop_signals,
        )
        self.skipped: set[int] = set()

    def __len__(self) -> int:
        count = len(self.sampler)
        return count // self.batch_size if self.train else -(-count // self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.epoch, self.sampler.start_batch = int(epoch), int(start_batch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, bad in self.loader:
            if bad:
                new = set(bad) - self.skipped
                self.skipped.update(bad)
                for index in new:
                    log.warning("skipping unreadable image %s", self.dataset.samples[index][0])
            if images is None:
                if self.train:
                    raise DataError(
                        f"no readable image in a training batch of {self.batch_size}, even among "
                        f"{self.dataset.substitutes} substitutes each; {len(self.skipped)} unreadable files "
                        f"under {self.dataset.root} so far"
                    )
                continue
            images = images.to(self.device, non_blocking=True)
            if self.channels_last and images.dim() == 4:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, labels.to(self.device, non_blocking=True)
        self.sampler.start_batch = 0


@dataclass
class DataSplit:
    batches: object  # FolderBatches or training.cifar.DeviceBatches
    classes: list[str]
    class_counts: dict[str, int]
    source: str

    @property
    def size(self) -> int:
        return sum(self.class_counts.values())

    def summary(self) -> dict:
        return {
            "source": self.source,
            "images": self.size,
            "classes": self.classes,
            "counts": self.class_counts,
        }


def load_split(
    root: str | Path,
    split: str,
    *,
    dataset: str,
    spec: PreprocessSpec,
    batch_size: int,
    train: bool,
    seed: int = 0,
    workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    device="cpu",
    channels_last: bool = False,
    classes: list[str] | None = None,
    ten_crop: bool = False,
    train_resize: tuple[int, int] = (256, 480),
    train_crop: int = 224,
    lighting: float = 0.1,
    cifar_padding: int = 4,
    loader: str = "auto",
) -> DataSplit:
    """Batches of one split of `root`: CIFAR-10 through `training.cifar`, anything else as an image folder."""
    if loader == "auto":
        loader = "device" if dataset == "cifar10" else "folder"
    if ten_crop and is_cifar_pickle(root):
        raise DataError(
            "--ten-crop needs image files; CIFAR-10 pickle batches hold 32x32 arrays (use the JPEG tree)"
        )
    if loader == "device" and not ten_crop:
        return _cifar_split(
            root,
            split,
            spec,
            batch_size,
            train,
            seed,
            rank,
            world_size,
            device,
            channels_last,
            classes,
            cifar_padding,
        )
    directory = split_dir(root, split)
    if ten_crop:
        transform = presets.ten_crop_transform(spec)
    elif not train:
        transform = presets.eval_transform(spec)
    elif dataset == "cifar10":
        transform = presets.cifar_train_transform(spec, cifar_padding)
    else:
        transform = presets.imagenet_train_transform(spec, train_resize, train_crop, lighting)
    folder = SafeImageFolder(directory, transform, classes, TRAIN_SUBSTITUTES if train else 0)
    if len(folder) == 0:
        raise DataError(f"no images under {directory}")
    batches = FolderBatches(folder, batch_size, train, seed, workers, rank, world_size, device, channels_last)
    if train and len(batches) == 0:
        raise DataError(
            f"{directory} has {len(folder)} images, fewer than one batch of {batch_size} per process; "
            "lower --batch-size"
        )
    return DataSplit(batches, folder.classes, folder.class_counts(), str(directory))


def discover_classes(root: str | Path, loader: str) -> list[str]:
    """Class names of the training split, without reading images (CIFAR pickles: from batches.meta)."""
    if loader == "device":
        from training.cifar import load_cifar10

        return load_cifar10(root, "train")[2]
    directory = split_dir(root, "train")
    classes = sorted(entry.name for entry in directory.iterdir() if entry.is_dir())
    if not classes:
        raise DataError(f"no class folders under {directory}")
    return classes


def count_images(root: str | Path) -> int:
    """Image files under the training split's class folders (a directory walk, no decoding)."""
    directory = split_dir(root, "train")
    classes = sorted(entry.name for entry in directory.iterdir() if entry.is_dir())
    index = {name: i for i, name in enumerate(classes)}
    return len(make_dataset(str(directory), index, extensions=IMG_EXTENSIONS, allow_empty=True))


def _cifar_split(
    root, split, spec, batch_size, train, seed, rank, world_size, device, channels_last, classes, padding
) -> DataSplit:
    from training.cifar import DeviceBatches, load_cifar10

    cifar_split = "train" if split == "train" else "test"
    require_folder(root)
    images, labels, names = load_cifar10(root, cifar_split)
    if classes is not None and list(names) != list(classes):
        raise DataError(f"{root} has classes {names[:5]}..., the model was trained on {list(classes)[:5]}...")
    batches = DeviceBatches(
        images,
        labels,
        batch_size,
        device=device,
        train=train,
        mean=spec.mean,
        std=spec.std,
        generator=seed,
        drop_last=train,
        padding=padding,
        rank=rank,
        world_size=world_size,
        channels_last=channels_last,
    )
    if train and len(batches) == 0:
        raise DataError(
            f"{root} has {len(images)} images, fewer than one batch of {batch_size}; lower --batch-size"
        )
    counts = torch.bincount(labels, minlength=len(names)).tolist()
    return DataSplit(
        batches, list(names), dict(zip(names, counts, strict=True)), f"{root} (cifar10 {cifar_split})"
    )
