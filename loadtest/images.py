"""The photos load tests and benchmarks send: real JPEGs from a folder, or generated ones of realistic sizes.

Generated images are smooth gradients with a little noise, so that they compress like photos (a few tens of KB
at 500x375) rather than like white noise (hundreds of KB); the sizes are the common ImageNet ones.
No torch here: the Locust image imports this module.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

# The shared real photos beside the project (../shared/data); used when present, never required.
SHARED_PHOTOS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenet-samples"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
IMAGES_SENT = 64  # the first images of a folder, by name, that a load test sends
GENERATED_SIZES = (
    (500, 375),
    (500, 333),
    (375, 500),
    (640, 480),
    (500, 400),
    (333, 500),
    (800, 600),
    (400, 300),
)


def default_folder() -> Path | None:
    """RESNET_LOADTEST_IMAGES if set, else the shared ImageNet samples when they exist."""
    configured = os.environ.get("RESNET_LOADTEST_IMAGES")
    if configured:
        return Path(configured)
    return SHARED_PHOTOS if SHARED_PHOTOS.is_dir() else None


def read_folder(folder: Path, limit: int | None = None) -> list[tuple[str, bytes]]:
    """(file name, encoded bytes) of the images in `folder`, sorted by name."""
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    return [(p.name, p.read_bytes()) for p in paths]


def undecodable(images: list[tuple[str, bytes]]) -> list[str]:
    """Names of the images Pillow cannot decode: each request with one would fail, and fail the run."""
    bad = []
    for name, data in images:
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
        except (OSError, ValueError, Image.DecompressionBombError):
            bad.append(name)
    return bad


def check_folder(folder: Path, error_type: type[Exception]) -> None:
    """Raise `error_type` unless `folder` holds images the server can decode: an --images typo must not become a
    silent switch to generated photos, nor a run of 4xx answers."""
    if not folder.is_dir():
        raise error_type(f"--images {folder} is {'a file' if folder.exists() else 'missing'}, not a folder")
    images = read_folder(folder, limit=IMAGES_SENT)
    if not images:
        raise error_type(f"--images folder {folder} holds no {'/'.join(sorted(IMAGE_SUFFIXES))} files")
    bad = undecodable(images)
    if bad:
        raise error_type(
            f"--images folder {folder}: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} cannot be decoded "
            "(every request that sends one would fail)"
        )


def generate(count: int = 8, seed: int = 0, quality: int = 85) -> list[tuple[str, bytes]]:
    """`count` JPEGs of realistic sizes and content statistics (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        width, height = GENERATED_SIZES[i % len(GENERATED_SIZES)]
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        phase = rng.uniform(0, 2 * np.pi, size=3)
        freq = rng.uniform(0.005, 0.03, size=(3, 2))
        channels = [
            127
            + 100 * np.sin(freq[c, 0] * x + freq[c, 1] * y + phase[c])
            + rng.normal(0, 12, (height, width))
            for c in range(3)
        ]
        pixels = np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buffer, format="JPEG", quality=quality)
        images.append((f"generated_{i:02d}_{width}x{height}.jpg", buffer.getvalue()))
    return images


def load_images(folder: Path | None = None, limit: int | None = None) -> list[tuple[str, bytes]]:
    """Photos from `folder` (or the default folder); generated ones when there is none or it holds no images."""
    folder = folder or default_folder()
    if folder is not None:
        if not folder.is_dir():
            raise FileNotFoundError(f"image folder {folder} does not exist")
        images = read_folder(folder, limit)
        if images:
            return images
    return generate(limit or 8)
