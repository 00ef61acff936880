"""The gateway's numpy/Pillow preprocessing against the training evaluation transform, and its input handling."""

from __future__ import annotations

import errno
import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from server.errors import InvalidImage, Overloaded, PayloadTooLarge, UnsupportedMediaType
from server.preprocessing import PILLOW_PIXEL_LIMIT, open_image, preprocess_batch, preprocess_image
from server.spec import PreprocessSpec
from tests.gateway_models import png_claiming

IMAGENET = PreprocessSpec.imagenet()


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth gradients plus texture: JPEG-realistic content without shared data."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = [np.sin(x / (37 + 11 * c)) * np.cos(y / (23 + 7 * c)) for c in range(3)]
    pixels = (np.stack(channels, -1) * 90 + 128 + rng.normal(0, 12, (height, width, 3))).clip(0, 255)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def pixel_error(ours: np.ndarray, reference: np.ndarray, spec: PreprocessSpec) -> float:
    """Mean absolute difference in units of the original 0-255 pixels."""
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    return float(np.abs((ours - reference) * std).mean() * 255)


@pytest.fixture(scope="module")
def eval_transform():
    presets = pytest.importorskip("training.presets", reason="training extra (torch) not installed")
    return presets.eval_transform


@pytest.mark.parametrize(
    "spec",
    [PreprocessSpec.imagenet(), PreprocessSpec(resize_shorter=232, crop=224, interpolation="bicubic")],
    ids=["resize256-bilinear", "resize232-bicubic"],
)
def test_matches_training_eval_transform_on_real_photos(imagenet_samples, eval_transform, spec):
    reference_transform = eval_transform(spec)
    errors = []
    for path in imagenet_samples:
        ours = preprocess_image(path.read_bytes(), spec)
        with Image.open(path) as image:
            reference = reference_transform(image.convert("RGB")).numpy()
        assert ours.shape == reference.shape == (3, spec.crop, spec.crop)
        assert ours.dtype == np.float32
        errors.append(pixel_error(ours, reference, spec))
    assert max(errors) < 1.0, f"worst photo differs by {max(errors):.3f}/255 on average"


def test_jpeg_draft_of_a_large_photo_stays_within_tolerance(eval_transform):
    data = encode(photo_like(3000, 2000), "JPEG", quality=92)
    ours = preprocess_image(data, IMAGENET)
    with Image.open(io.BytesIO(data)) as image:
        reference = eval_transform(IMAGENET)(image.convert("RGB")).numpy()
    assert pixel_error(ours, reference, IMAGENET) < 1.0


def test_cifar_spec_gives_normalized_32x32():
    spec = PreprocessSpec.cifar10()
    tensor = preprocess_image(encode(Image.new("RGB", (32, 32), (255, 0, 0)), "PNG"), spec)
    assert tensor.shape == (3, 32, 32)
    expected = (np.array([1.0, 0.0, 0.0]) - np.array(spec.mean)) / np.array(spec.std)
    np.testing.assert_allclose(tensor[:, 0, 0], expected, rtol=1e-5)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1"])
def test_every_pillow_mode_becomes_rgb(mode):
    base = photo_like(80, 60)
    image = (
        base.convert(mode)
        if mode != "I;16"
        else Image.fromarray(np.asarray(base.convert("L"), np.uint16) * 257)
    )
    fmt = "JPEG" if mode == "CMYK" else "PNG" if mode != "1" else "BMP"
    tensor = preprocess_image(encode(image, fmt), PreprocessSpec(resize_shorter=48, crop=40))
    assert tensor.shape == (3, 40, 40) and np.isfinite(tensor).all()
    if mode in ("L", "I;16"):  # grey stays grey, and 16-bit scales down to the same 8-bit values
        np.testing.assert_allclose(tensor[0] * 0.229 + 0.485, tensor[1] * 0.224 + 0.456, atol=1e-5)
        eight_bit = preprocess_image(
            encode(base.convert("L"), "PNG"), PreprocessSpec(resize_shorter=48, crop=40)
        )
        np.testing.assert_allclose(tensor, eight_bit, atol=1e-5)


def test_transparency_is_composited_over_white():
    transparent = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    tensor = preprocess_image(
        encode(transparent, "PNG"), PreprocessSpec(resize_shorter=32, crop=32, mean=(0, 0, 0), std=(1, 1, 1))
    )
    np.testing.assert_allclose(tensor, 1.0)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF"])
def test_supported_formats_decode(fmt):
    image = Image.new("RGB", (50, 40), (250, 10, 10))
    spec = PreprocessSpec(resize_shorter=32, crop=32, mean=(0, 0, 0), std=(1, 1, 1))
    tensor = preprocess_image(encode(image, fmt), spec)
    assert tensor[0].mean() > 0.85 and tensor[1].mean() < 0.15


def test_animated_gif_uses_the_first_frame():
    frames = [Image.new("RGB", (40, 40), color) for color in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    tensor = preprocess_image(data, PreprocessSpec(resize_shorter=32, crop=32, mean=(0, 0, 0), std=(1, 1, 1)))
    assert tensor[0].mean() > 0.9 and tensor[2].mean() < 0.1


def test_exif_orientation_is_applied():
    upright = Image.new("RGB", (40, 80), (0, 0, 255))
    upright.paste((255, 0, 0), (0, 0, 40, 40))  # red on top, blue below
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # as a camera writes it, with orientation 6 to undo
    exif = Image.Exif()
    exif[0x0112] = 6
    spec = PreprocessSpec(resize_shorter=40, crop=40, mean=(0, 0, 0), std=(1, 1, 1))
    expected = preprocess_image(encode(upright, "PNG"), spec)
    ours = preprocess_image(encode(stored, "PNG", exif=exif), spec)
    np.testing.assert_allclose(ours, expected, atol=1e-6)


def test_bgr_and_nhwc_follow_the_spec():
    data = encode(Image.new("RGB", (32, 32), (255, 0, 0)), "PNG")
    spec = PreprocessSpec(
        resize_shorter=32, crop=32, mean=(0, 0, 0), std=(1, 1, 1), channel_order="BGR", layout="NHWC"
    )
    tensor = preprocess_image(data, spec)
    assert tensor.shape == (32, 32, 3)
    np.testing.assert_allclose(tensor[0, 0], [0, 0, 1])


def test_batch_is_one_contiguous_array():
    images = [encode(photo_like(70 + 10 * i, 50, seed=i), "JPEG") for i in range(3)]
    batch = preprocess_batch(images, IMAGENET)
    assert batch.shape == (3, 3, 224, 224) and batch.flags.c_contiguous and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[2], preprocess_image(images[2], IMAGENET))


@pytest.mark.parametrize(
    "data, error",
    [
        (b"", InvalidImage),
        (b"definitely not an image", InvalidImage),
        (encode(Image.new("RGB", (64, 64)), "TIFF"), UnsupportedMediaType),
    ],
)
def test_bad_bytes_raise_typed_errors(data, error):
    with pytest.raises(error):
        preprocess_image(data, IMAGENET)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_image_is_invalid(fmt):
    data = encode(photo_like(300, 200), fmt)
    with pytest.raises(InvalidImage, match="truncated|cannot"):
        preprocess_image(data[: len(data) // 2], IMAGENET)


@pytest.mark.parametrize("step", ["open", "load"])
def test_an_error_of_the_machine_is_not_blamed_on_the_image(step, monkeypatch):
    # Out of file descriptors, a good image was answered 400 invalid_image ("cannot read image header: [Errno 24] Too
    # many open files"), and `resnet client` reported the file as bad. The system's errors carry an errno; Pillow's
    # about a bad image do not.
    def out_of_files(*args, **kwargs):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(*((Image, "open") if step == "open" else (ImageFile.ImageFile, "load")), out_of_files)
    with pytest.raises(
        Overloaded, match=r"^the gateway cannot decode images now \(Too many open files\); retry later$"
    ):
        preprocess_image(encode(photo_like(300, 200), "PNG"), IMAGENET)


def test_pixel_limit_is_checked_before_decoding():
    data = encode(photo_like(400, 300), "JPEG")
    with pytest.raises(PayloadTooLarge, match="400x300"):
        preprocess_image(data, IMAGENET, max_pixels=100_000)


@pytest.mark.parametrize(
    ("size", "message"),
    [((7000, 7000), "7000x7000"), ((10000, 10000), "10000x10000"), ((30000, 30000), "over Pillow's")],
    ids=["over-limit", "pillow-warns", "pillow-refuses"],
)
def test_decompression_bomb_is_refused_from_the_header(size, message):
    with pytest.raises(PayloadTooLarge, match=message) as refused:
        preprocess_image(png_claiming(*size), IMAGENET)
    assert "the limit of 40000000" in str(refused.value)  # the configured limit, not Pillow's


def test_a_limit_past_pillows_warning_threshold_is_the_one_applied():
    assert open_image(png_claiming(10000, 10000), max_pixels=PILLOW_PIXEL_LIMIT).size == (10000, 10000)
