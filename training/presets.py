"""Image transforms: the recipes' training augmentation and the evaluation transform defined by a PreprocessSpec.

`eval_transform(spec)` is the reference the gateway's numpy/Pillow preprocessing and the Triton preprocessing
model are tested against: Pillow resize of the shorter side, center crop, scale to [0, 1], normalize, then the
spec's channel order and layout.
"""

from __future__ import annotations

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from server.spec import PreprocessSpec

INTERPOLATIONS = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
}

# AlexNet's PCA colour augmentation (Krizhevsky et al. 2012), eigen-decomposition of ImageNet RGB covariance.
IMAGENET_PCA_EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
IMAGENET_PCA_EIGVEC = torch.tensor(
    [
        [-0.5675, 0.7192, 0.4009],
        [-0.5808, -0.0045, -0.8140],
        [-0.5836, -0.6948, 0.4203],
    ]
)


class Lighting(torch.nn.Module):
    """Add a random multiple of the RGB principal components to every pixel of a [0, 1] float image."""

    def __init__(self, alphastd: float = 0.1) -> None:
        super().__init__()
        self.alphastd = alphastd

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.alphastd == 0:
            return image
        alpha = torch.randn(3) * self.alphastd
        rgb = IMAGENET_PCA_EIGVEC @ (alpha * IMAGENET_PCA_EIGVAL)
        return image + rgb.view(3, 1, 1).to(image.dtype)


class SpecLayout(torch.nn.Module):
    """Apply the spec's channel order and layout to a normalized RGB CHW tensor."""

    def __init__(self, spec: PreprocessSpec) -> None:
        super().__init__()
        self.bgr = spec.channel_order == "BGR"
        self.nhwc = spec.layout == "NHWC"

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.bgr:
            image = image.flip(-3)
        if self.nhwc:
            image = image.movedim(-3, -1)
        return image


class StackedCrops(torch.nn.Module):
    """Run a multi-crop transform, then `per_crop` on each crop, stacked into one [crops, ...] tensor."""

    def __init__(self, crops: torch.nn.Module, per_crop: torch.nn.Module) -> None:
        super().__init__()
        self.crops = crops
        self.per_crop = per_crop

    def forward(self, image):
        return torch.stack([self.per_crop(crop) for crop in self.crops(image)])


def _to_float() -> list:
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True)]


def imagenet_train_transform(
    spec: PreprocessSpec, resize: tuple[int, int] = (256, 480), crop: int = 224, lighting: float = 0.1
) -> T.Compose:
    """Sec. 3.4: shorter side drawn from [256, 480], random 224 crop, flip, colour augmentation, normalize."""
    return T.Compose(
        [
            T.RandomResize(
                resize[0], resize[1] + 1, interpolation=INTERPOLATIONS[spec.interpolation], antialias=True
            ),
            T.RandomCrop(crop),
            T.RandomHorizontalFlip(),
            *_to_float(),
            Lighting(lighting),
            T.Normalize(spec.mean, spec.std),
            SpecLayout(spec),
        ]
    )


def cifar_train_transform(spec: PreprocessSpec, padding: int = 4) -> T.Compose:
    """Sec. 4.2: 4-pixel zero pad, random 32x32 crop, horizontal flip (for CIFAR-like image folders)."""
    return T.Compose(
        [
            T.Resize(spec.resize_shorter, interpolation=INTERPOLATIONS[spec.interpolation], antialias=True),
            T.CenterCrop(spec.crop),
            T.RandomCrop(spec.crop, padding=padding),
            T.RandomHorizontalFlip(),
            *_to_float(),
            T.Normalize(spec.mean, spec.std),
            SpecLayout(spec),
        ]
    )


def eval_transform(spec: PreprocessSpec) -> T.Compose:
    """Resize the shorter side (Pillow, antialiased), center crop, scale to [0, 1], normalize: [3, crop, crop]."""
    return T.Compose(
        [
            T.Resize(spec.resize_shorter, interpolation=INTERPOLATIONS[spec.interpolation], antialias=True),
            T.CenterCrop(spec.crop),
            *_to_float(),
            T.Normalize(spec.mean, spec.std),
            SpecLayout(spec),
        ]
    )


def ten_crop_transform(spec: PreprocessSpec) -> T.Compose:
    """The paper's 10-crop testing: 4 corners + center and their mirrors -> [10, 3, crop, crop]."""
    return T.Compose(
        [
            T.Resize(spec.resize_shorter, interpolation=INTERPOLATIONS[spec.interpolation], antialias=True),
            StackedCrops(
                T.TenCrop(spec.crop),
                T.Compose([*_to_float(), T.Normalize(spec.mean, spec.std), SpecLayout(spec)]),
            ),
        ]
    )
