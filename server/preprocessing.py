"""Image bytes -> the model's input tensor, with numpy and Pillow only (no torch in the gateway).

The result equals `training.presets.eval_transform(spec)` (torchvision on a Pillow image): resize the shorter side
with Pillow's antialiased filter, center-crop with torchvision's rounding, scale to [0, 1], normalize, lay out.
Limits are checked from the image header before any pixel is decoded, so a decompression bomb costs nothing.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from server.errors import InvalidImage, Overloaded, PayloadTooLarge, UnsupportedMediaType
from server.spec import PreprocessSpec

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated upload is an error, not a grey half-image
# Every format plugin imported now: Image.open imports them at its first image, which opens files, and a gateway
# started into a burst of clients that had taken every file descriptor failed its first decodes on them.
Image.init()
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
DEFAULT_MAX_PIXELS = 40_000_000
# Pillow refuses outright an image over twice its MAX_IMAGE_PIXELS (only a warning below that), so a configured
# limit can't go past this one.
PILLOW_PIXEL_LIMIT = 2 * Image.MAX_IMAGE_PIXELS
RESAMPLING = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}
# JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale. Only taken while the drafted image keeps at least this many
# times the pixels the resize needs, so the antialiased resize that follows hides the difference (< 1/255 mean).
DRAFT_MARGIN = 2


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Identify the image from its header and check the limits; no pixels are decoded yet."""
    if not data:
        raise InvalidImage("empty image: the request carried no bytes")
    try:
        with warnings.catch_warnings():
            # Pillow's own warning limit (89M pixels) would overrule a larger max_pixels; checked below instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as error:
        raise InvalidImage("not a decodable image (expected JPEG, PNG, WebP, BMP or GIF)") from error
    except Image.DecompressionBombError as error:
        raise PayloadTooLarge(
            f"image is over the limit of {max_pixels} pixels, and over Pillow's of {PILLOW_PIXEL_LIMIT}"
        ) from error
    except (OSError, ValueError, SyntaxError) as error:
        raise _not_the_image(error) or InvalidImage(f"cannot read image header: {error}") from error
    if image.format not in SUPPORTED_FORMATS:
        raise UnsupportedMediaType(
            f"unsupported image format {image.format}; send JPEG, PNG, WebP, BMP or GIF"
        )
    width, height = image.size
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}"
        )
    if width == 0 or height == 0:
        raise InvalidImage(f"image has no pixels ({width}x{height})")
    return image


def _not_the_image(error: Exception) -> Overloaded | None:
    """An error of this machine rather than of the image: an OSError the system raised (it has an errno; Pillow's
    own about a bad image have none). Out of file descriptors, the gateway answered 400 invalid_image ("cannot read
    image header: [Errno 24] Too many open files: '.../PIL/BmpImagePlugin.py'") to good images."""
    if isinstance(error, OSError) and error.errno is not None:
        return Overloaded(f"the gateway cannot decode images now ({error.strerror}); retry later")
    return None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited over white (the colour under alpha is arbitrary)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        pixels = np.asarray(image, dtype=np.float32)
        scale = 255.0 / 65535.0 if pixels.max(initial=0) > 255 or image.mode != "I" else 1.0
        image = Image.fromarray(np.clip(pixels * scale + 0.5, 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """torchvision's Resize(int): the shorter side becomes `shorter`, the longer one scales and truncates."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def decode(data: bytes, spec: PreprocessSpec, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Bytes -> resized and center-cropped RGB image of crop x crop pixels."""
    image = open_image(data, max_pixels)
    if image.format == "JPEG":
        width, height = image.size
        target = resized_size(width, height, spec.resize_shorter * DRAFT_MARGIN)
        image.draft("RGB", target)  # keeps a scale whose size is >= target; a no-op for small photos
    try:
        image.seek(0)  # first frame of an animated GIF / WebP
        image.load()
        image = ImageOps.exif_transpose(image)
        image = to_rgb(image)
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        raise _not_the_image(error) or InvalidImage(
            f"cannot decode image ({error}); is it truncated?"
        ) from error
    size = resized_size(*image.size, spec.resize_shorter)
    if size != image.size:
        image = image.resize(size, RESAMPLING[spec.interpolation])
    width, height = image.size
    top = int(round((height - spec.crop) / 2.0))
    left = int(round((width - spec.crop) / 2.0))
    return image.crop((left, top, left + spec.crop, top + spec.crop))


def normalize(pixels: np.ndarray, spec: PreprocessSpec, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 HWC RGB -> float32 normalized, in the spec's channel order and layout ([3,H,W] or [H,W,3])."""
    if spec.channel_order == "BGR":
        pixels = pixels[..., ::-1]
        mean, std = spec.mean[::-1], spec.std[::-1]
    else:
        mean, std = spec.mean, spec.std
    scale = 1.0 / (255.0 * np.asarray(std, dtype=np.float32))
    offset = np.asarray(mean, dtype=np.float32) / np.asarray(std, dtype=np.float32)
    if spec.layout == "NCHW":
        pixels = pixels.transpose(2, 0, 1)
        scale, offset = scale[:, None, None], offset[:, None, None]
    if out is None:
        out = np.empty(pixels.shape, dtype=np.float32)
    np.multiply(pixels, scale, out=out, dtype=np.float32)
    np.subtract(out, offset, out=out)
    return out


def preprocess_image(data: bytes, spec: PreprocessSpec, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes -> float32 [3, crop, crop] (NCHW spec) or [crop, crop, 3] (NHWC spec).

    Raises InvalidImage (empty, undecodable, truncated), UnsupportedMediaType (other formats) or PayloadTooLarge
    (over `max_pixels`, checked before decoding).
    """
    image = decode(data, spec, max_pixels)
    return normalize(np.asarray(image, dtype=np.uint8), spec)


def preprocess_batch(
    images: list[bytes], spec: PreprocessSpec, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Several images into one contiguous float32 batch [N, ...] without an extra copy per image.

    A bad image's error says which one it is ("image 2 of 5: ...") when the request holds several."""
    with _naming_the_image(0, len(images)):
        first = preprocess_image(images[0], spec, max_pixels)
    batch = np.empty((len(images), *first.shape), dtype=np.float32)
    batch[0] = first
    for index, data in enumerate(images[1:], start=1):
        with _naming_the_image(index, len(images)):
            normalize(np.asarray(decode(data, spec, max_pixels), dtype=np.uint8), spec, out=batch[index])
    return batch


@contextlib.contextmanager
def _naming_the_image(index: int, count: int):
    try:
        yield
    except (InvalidImage, UnsupportedMediaType, PayloadTooLarge) as error:
        if count == 1:
            raise
        raise type(error)(f"image {index + 1} of {count}: {error.message}") from error
