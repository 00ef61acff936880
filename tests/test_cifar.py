"""CIFAR-10 fast path: both source layouts, the decode cache, and on-device augmentation."""

from __future__ import annotations

import pickle
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from tests.support import files_of_at_most
from training.cifar import (
    DeviceBatches,
    find_source,
    load_cifar10,
    prepare_cifar10,
    read_jpeg_split,
)
from training.data import mix_seed
from training.errors import DataError

CLASSES = ["airplane", "automobile", "bird"]
PER_BATCH = 6  # images per fake pickle batch


def smooth_images(count: int, seed: int) -> np.ndarray:
    """Low-frequency uint8 images, so a JPEG round trip stays close to the original."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:32, 0:32] / 31.0
    base = rng.uniform(40, 215, size=(count, 1, 1, 3))
    slope = rng.uniform(-35, 35, size=(count, 1, 1, 3))
    return np.clip(base + slope * (x[None, :, :, None] + y[None, :, :, None]), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def fake_cifar(tmp_path_factory) -> dict:
    """The same fake dataset as pickle batches (under cifar-10-batches-py/) and as a JPEG tree."""
    root = tmp_path_factory.mktemp("cifar")
    data = {"train": smooth_images(5 * PER_BATCH, 0), "test": smooth_images(PER_BATCH, 1)}
    labels = {split: np.arange(len(images)) % len(CLASSES) for split, images in data.items()}
    pickles = root / "pickle" / "cifar-10-batches-py"
    pickles.mkdir(parents=True)
    names = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    for split, batch_names in names.items():
        for i, name in enumerate(batch_names):
            chunk = slice(i * PER_BATCH, (i + 1) * PER_BATCH)
            flat = data[split][chunk].transpose(0, 3, 1, 2).reshape(-1, 3072)
            batch = {b"data": flat, b"labels": labels[split][chunk].tolist()}
            (pickles / name).write_bytes(pickle.dumps(batch))
    (pickles / "batches.meta").write_bytes(pickle.dumps({b"label_names": [c.encode() for c in CLASSES]}))
    jpegs = root / "jpeg" / "cifar10-jpeg"
    for split, images in data.items():
        counters = dict.fromkeys(CLASSES, 0)
        for image, label in zip(images, labels[split], strict=True):
            name = CLASSES[label]
            (jpegs / split / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(jpegs / split / name / f"{counters[name]:04d}.jpg", quality=95)
            counters[name] += 1
    return {"root": root, "data": data, "labels": labels, "pickles": pickles, "jpegs": jpegs}


def test_pickle_batches_load_exactly_from_folder_or_parent(fake_cifar, tmp_path):
    for root in (fake_cifar["pickles"], fake_cifar["pickles"].parent):
        images, labels, classes = load_cifar10(root, "train", cache_dir=tmp_path / root.name)
        assert images.dtype == torch.uint8 and images.shape == (5 * PER_BATCH, 32, 32, 3)
        assert labels.dtype == torch.int64
        assert classes == CLASSES
        np.testing.assert_array_equal(images.numpy(), fake_cifar["data"]["train"])
        np.testing.assert_array_equal(labels.numpy(), fake_cifar["labels"]["train"])


def test_jpeg_tree_agrees_with_pickle_batches(fake_cifar, tmp_path):
    for split in ("train", "test"):
        from_pickle = load_cifar10(fake_cifar["pickles"], split, cache_dir=tmp_path / "p")
        from_jpeg = load_cifar10(fake_cifar["jpegs"].parent, split, cache_dir=tmp_path / "j")
        assert from_jpeg[2] == from_pickle[2] == CLASSES
        # The JPEG tree is grouped by class; compare as multisets of (label, image) via a stable sort.
        order_p = torch.argsort(from_pickle[1], stable=True)
        order_j = torch.argsort(from_jpeg[1], stable=True)
        assert torch.equal(from_pickle[1][order_p], from_jpeg[1][order_j])
        difference = (from_pickle[0][order_p].float() - from_jpeg[0][order_j].float()).abs().mean()
        assert difference < 3, f"JPEG and pickle pixels differ by {difference:.2f} on average"


def test_cache_is_written_once_and_reused(fake_cifar, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = load_cifar10(fake_cifar["jpegs"], "test", cache_dir=cache)
    assert (cache / "cifar10-test.npz").is_file()

    def must_not_decode(*args, **kwargs):
        raise AssertionError("decoded again although the cache is valid")

    monkeypatch.setattr("training.cifar.read_jpeg_split", must_not_decode)
    second = load_cifar10(fake_cifar["jpegs"], "test", cache_dir=cache)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1]) and first[2] == second[2]


def test_cache_is_refreshed_when_files_change(fake_cifar, tmp_path):
    tree = tmp_path / "tree"
    (tree / "test" / "cat").mkdir(parents=True)
    images = smooth_images(3, 7)
    for i in range(2):
        Image.fromarray(images[i]).save(tree / "test" / "cat" / f"{i}.jpg")
    cache_file = tree / ".cache" / "cifar10-test.npz"  # the default cache folder
    assert len(load_cifar10(tree, "test")[0]) == 2 and cache_file.is_file()
    first_cache = cache_file.read_bytes()
    Image.fromarray(images[2]).save(tree / "test" / "cat" / "2.jpg")
    assert len(load_cifar10(tree, "test")[0]) == 3
    assert cache_file.read_bytes() != first_cache  # rewritten for the new file, not only bypassed


def test_corrupt_and_wrongly_sized_files_are_skipped_and_counted(tmp_path):
    folder = tmp_path / "test" / "dog"
    folder.mkdir(parents=True)
    Image.fromarray(smooth_images(1, 3)[0]).save(folder / "good.jpg")
    (folder / "truncated.jpg").write_bytes((folder / "good.jpg").read_bytes()[:40])
    (folder / "noise.jpg").write_bytes(b"not a jpeg at all")
    Image.new("RGB", (16, 16)).save(folder / "small.jpg")
    decoded = read_jpeg_split(tmp_path / "test")
    assert decoded.skipped == 3
    assert decoded.images.shape == (1, 32, 32, 3) and decoded.classes == ["dog"]
    images, labels, classes = load_cifar10(tmp_path, "test")
    assert len(images) == 1 and labels.tolist() == [0]


def test_missing_empty_or_unknown_data_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_cifar10(tmp_path / "nowhere", "train")
    with pytest.raises(DataError, match="no CIFAR-10 train data"):
        load_cifar10(tmp_path, "train")
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        load_cifar10(tmp_path, "train")
    with pytest.raises(DataError, match="unknown CIFAR-10 split"):
        load_cifar10(tmp_path, "validation")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "test_batch").write_bytes(b"garbage")
    assert find_source(tmp_path / "bad", "test")[0] == "pickle"
    with pytest.raises(DataError, match="cannot read CIFAR-10 batch"):
        load_cifar10(tmp_path / "bad", "test")


def test_cli_reports_missing_data_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "training.cifar", "--data-path", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert (
        result.stderr.strip().startswith("resnet: error: CIFAR-10 folder")
        and "\n" not in result.stderr.strip()
    )


def test_prepare_extracts_once_and_atomically(fake_cifar, tmp_path):
    tarball = tmp_path / "cifar10-jpeg.tar.xz"
    with tarfile.open(tarball, "w:xz") as archive:
        archive.add(fake_cifar["jpegs"], arcname="cifar10-jpeg")
    target = prepare_cifar10(tarball, tmp_path / "data")
    assert target == tmp_path / "data" / "cifar10-jpeg"
    assert sorted(p.name for p in (target / "train").iterdir()) == CLASSES
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["cifar10-jpeg"]  # no staging folder left
    assert prepare_cifar10(tarball, tmp_path / "data") == target
    with pytest.raises(DataError, match="does not exist"):
        prepare_cifar10(tmp_path / "missing.tar.xz", tmp_path / "data")
    not_an_archive = tmp_path / "notes.tar.gz"
    not_an_archive.write_text("hello")
    with pytest.raises(
        DataError, match=r"^\S+notes.tar.gz is not a tar archive \(.tar, .tar.gz, .tar.bz2 or .tar.xz\)$"
    ):
        prepare_cifar10(not_an_archive, tmp_path / "data")
    with pytest.raises(DataError, match="is a file, not a folder to extract into"):
        prepare_cifar10(tarball, not_an_archive)


@pytest.mark.parametrize("mode", ["w:xz", "w:gz", "w"])
def test_an_archive_cut_short_is_one_error_that_says_so(fake_cifar, tmp_path, mode):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    with tarfile.open(whole, mode) as archive:
        archive.add(fake_cifar["pickles"], arcname="cifar-10-batches-py")
    cut.write_bytes(
        whole.read_bytes()[: whole.stat().st_size // 2]
    )  # a download or copy that stopped half-way
    # a traceback (EOFError) for a compressed one, before; "is not a tar archive" for a plain one
    with pytest.raises(
        DataError, match=r"^cannot extract \S+cut: it is cut short \(.+\); fetch or copy it again$"
    ):
        prepare_cifar10(cut, tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_an_extraction_that_fills_the_disk_leaves_nothing_behind(fake_cifar, tmp_path):
    tarball, data = tmp_path / "cifar.tar", tmp_path / "data"
    with tarfile.open(tarball, "w") as archive:
        archive.add(fake_cifar["pickles"], arcname="cifar-10-batches-py")
    result = subprocess.run(
        [sys.executable, "-m", "training.cifar", "--tarball", str(tarball), "--data-path", str(data)],
        capture_output=True,
        text=True,
        preexec_fn=files_of_at_most(10_000),  # each batch is 18 kB: the first one cannot be written
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == f"resnet: error: cannot extract {tarball}: [Errno 27] File too large"
    assert list(data.iterdir()) == []  # its staging folder, with what it held, removed


# ----------------------------------------------------------------------------------------- DeviceBatches


def random_data(count: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (count, 32, 32, 3), dtype=torch.uint8, generator=generator)
    return images, torch.arange(count) % 10


def normalize(images: torch.Tensor, batches: DeviceBatches) -> torch.Tensor:
    return (images.float() - batches.mean) / batches.std


def test_eval_batches_are_ordered_normalized_nchw():
    images, labels = random_data(50)
    batches = DeviceBatches(
        images, labels, batch_size=16, train=False, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)
    )
    out = list(batches)
    assert len(batches) == len(out) == 4 and out[-1][0].shape == (2, 3, 32, 32)
    x = torch.cat([b for b, _ in out])
    assert x.dtype == torch.float32
    expected = (
        images.permute(0, 3, 1, 2).float() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    ) / torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    torch.testing.assert_close(x, expected)
    assert torch.equal(torch.cat([y for _, y in out]), labels)
    assert len(DeviceBatches(images, labels, 16, drop_last=True)) == 3


def mirror(image: torch.Tensor, flip: bool) -> torch.Tensor:
    return image.flip(-1) if flip else image


def test_train_augmentation_is_a_padded_crop_or_its_mirror():
    images, labels = random_data(40)
    batches = DeviceBatches(images, labels, batch_size=40, train=True, generator=3)
    x, y = next(iter(batches))
    assert x.shape == (40, 3, 32, 32) and x.dtype == torch.float32
    order = batches.indices()
    assert torch.equal(y, labels[order])
    padded = normalize(torch.nn.functional.pad(images.permute(0, 3, 1, 2), (4, 4, 4, 4)), batches)
    flips, shifts = 0, 0
    for i in range(40):
        source = padded[order[i]]
        matches = [
            (top, left, flip)
            for top in range(9)
            for left in range(9)
            for flip in (False, True)
            if torch.allclose(x[i], mirror(source[:, top : top + 32, left : left + 32], flip))
        ]
        assert len(matches) == 1, f"image {i} is not exactly one crop/flip of its padded source: {matches}"
        top, left, flip = matches[0]
        flips += flip
        shifts += (top, left) != (4, 4)
    assert 5 <= flips <= 35 and shifts >= 30  # both augmentations actually happen


def test_order_and_augmentation_depend_only_on_seed_epoch_batch():
    images, labels = random_data(50)

    def epoch(seed, number, start_batch=0):
        batches = DeviceBatches(
            images, labels, batch_size=16, train=True, generator=torch.Generator().manual_seed(seed)
        )
        batches.set_epoch(number, start_batch)
        return list(batches)

    first, again = epoch(1, 0), epoch(1, 0)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0][1], epoch(1, 1)[0][1])  # a new permutation each epoch
    assert not torch.equal(first[0][0], epoch(2, 0)[0][0])  # and per seed
    resumed = epoch(1, 0, start_batch=2)
    assert len(resumed) == 2
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first[2:], resumed, strict=True)
    )


def test_crop_and_flip_come_from_one_generator_per_batch_in_a_fixed_order():
    """A checkpoint stores (seed, epoch, batch) only, so these draws must never change between versions: a run
    resumed by newer code must see the batches the older code would have shown it (short last batch too)."""
    images, labels = random_data(50)
    batches = DeviceBatches(images, labels, batch_size=16, train=True, generator=7)
    batches.set_epoch(2, start_batch=1)
    out = list(batches)
    order = batches.indices()
    padded = normalize(torch.nn.functional.pad(images.permute(0, 3, 1, 2), (4, 4, 4, 4)), batches)
    assert [len(y) for _, y in out] == [16, 16, 2]
    for position, (x, _) in enumerate(out):
        batch = position + 1
        generator = torch.Generator().manual_seed(mix_seed(batches.seed, 2, batch, 1))
        top = torch.randint(0, 9, (len(x),), generator=generator)
        left = torch.randint(0, 9, (len(x),), generator=generator)
        flip = torch.rand(len(x), generator=generator) < 0.5
        for i in range(len(x)):
            source = padded[order[batch * 16 + i]]
            crop = source[:, top[i] : top[i] + 32, left[i] : left[i] + 32]
            torch.testing.assert_close(x[i], mirror(crop, bool(flip[i])))


def test_state_dict_resumes_mid_epoch():
    images, labels = random_data(50)
    batches = DeviceBatches(images, labels, batch_size=10, train=True, generator=5)
    batches.set_epoch(3, start_batch=1)
    restored = DeviceBatches(images, labels, batch_size=10, train=True, generator=99)
    restored.load_state_dict(batches.state_dict())
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, restored, strict=True))


def test_shards_are_disjoint_and_cover_the_data():
    images, labels = random_data(50)
    for train in (True, False):
        shards = [
            DeviceBatches(images, labels, 8, train=train, generator=0, rank=r, world_size=3) for r in range(3)
        ]
        indices = [shard.indices() for shard in shards]
        seen = torch.cat(indices)
        assert set(seen.tolist()) == set(range(50))
        if train:  # padded so every rank runs the same number of steps
            assert [len(i) for i in indices] == [17, 17, 17] and len({len(s) for s in shards}) == 1
        else:
            assert len(seen) == 50
    with pytest.raises(ValueError):
        DeviceBatches(images, labels, 8, rank=3, world_size=3)


def test_channels_last_and_bad_input():
    images, labels = random_data(8)
    x, _ = next(iter(DeviceBatches(images, labels, 8, train=True, channels_last=True)))
    assert x.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError):
        DeviceBatches(images.float(), labels, 8)
    with pytest.raises(ValueError):
        DeviceBatches(images, labels[:3], 8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_match_cpu_batches():
    images, labels = random_data(64)
    cpu = list(DeviceBatches(images, labels, 32, train=True, generator=4))
    gpu = list(DeviceBatches(images, labels, 32, "cuda", train=True, generator=4))
    for (a, ya), (b, yb) in zip(cpu, gpu, strict=True):
        torch.testing.assert_close(a, b.cpu())
        assert torch.equal(ya, yb.cpu())
