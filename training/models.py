"""ResNets as in He et al. 2015, "Deep Residual Learning for Image Recognition".

ImageNet nets (Table 1): ResNet-18/34 (basic blocks) and 50/101/152 (bottlenecks), option B shortcuts
(projection only where the shape changes). `stride_variant` places the downsampling stride of a bottleneck:
"v1" in the first 1x1 conv (the paper's released Caffe models), "v1.5" in the 3x3 conv (torchvision; about
+0.5% top-1 at a little more compute). Module names follow torchvision so its state dicts load strictly.

CIFAR nets (Sec. 4.2): 6n+2 layers, 3x3 convs on 32x32/16x16/8x8 maps with {16, 32, 64} filters, option A
shortcuts (parameter-free: stride-2 subsampling plus zero channels), and the plain nets of the same depths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.errors import UnknownArchError

STRIDE_VARIANTS = ("v1", "v1.5")

# name -> (block kind, blocks per stage)
IMAGENET_ARCHS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}
CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)
CIFAR_ARCHS: dict[str, tuple[int, bool]] = {  # name -> (depth, residual)
    **{f"resnet{d}": (d, True) for d in CIFAR_DEPTHS},
    **{f"plain{d}": (d, False) for d in CIFAR_DEPTHS if d != 1202},
}
ARCHS: tuple[str, ...] = tuple(IMAGENET_ARCHS) + tuple(CIFAR_ARCHS)


def is_cifar_arch(arch: str) -> bool:
    return arch in CIFAR_ARCHS


def default_num_classes(arch: str) -> int:
    return 10 if is_cifar_arch(arch) else 1000


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs (Fig. 2 left); the first carries the stride."""

    expansion = 1

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        stride_variant: str = "v1.5",
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (Fig. 5 right); the stride sits in the 1x1 (v1) or the 3x3 (v1.5)."""

    expansion = 4

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        stride_variant: str = "v1.5",
    ) -> None:
        super().__init__()
        stride_1x1, stride_3x3 = (stride, 1) if stride_variant == "v1" else (1, stride)
        self.conv1 = conv1x1(in_planes, planes, stride_1x1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride_3x3)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ImageNetResNet(nn.Module):
    """Table 1: 7x7/2 conv, 3x3/2 max pool, four stages (conv2_x..conv5_x), global average pool, fc."""

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: tuple[int, int, int, int],
        num_classes: int = 1000,
        stride_variant: str = "v1.5",
    ) -> None:
        super().__init__()
        self.stride_variant = stride_variant
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_stage(block, 64, layers[0], stride=1)
        self.layer2 = self._make_stage(block, 128, layers[1], stride=2)
        self.layer3 = self._make_stage(block, 256, layers[2], stride=2)
        self.layer4 = self._make_stage(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        he_init(self)

    def _make_stage(
        self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int
    ) -> nn.Sequential:
        downsample = None
        out_planes = planes * block.expansion
        if stride != 1 or self.in_planes != out_planes:
            # Option B: a projection shortcut only where the shape changes.
            downsample = nn.Sequential(
                conv1x1(self.in_planes, out_planes, stride), nn.BatchNorm2d(out_planes)
            )
        layers = [block(self.in_planes, planes, stride, downsample, self.stride_variant)]
        self.in_planes = out_planes
        layers += [
            block(self.in_planes, planes, stride_variant=self.stride_variant) for _ in range(1, blocks)
        ]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ZeroPadShortcut(nn.Module):
    """Option A: identity with stride-2 subsampling and zero-filled extra channels (no parameters)."""

    def __init__(self, stride: int, extra_channels: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


class CifarBlock(nn.Module):
    """Two 3x3 convs; with `residual` the option-A shortcut is added, without it this is a plain-net block."""

    def __init__(self, in_planes: int, planes: int, stride: int, residual: bool) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.residual = residual
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = ZeroPadShortcut(stride, planes - in_planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + self.shortcut(x)
        return self.relu(out)


class CifarResNet(nn.Module):
    """Sec. 4.2: 3x3 conv (16), 3 stages of n blocks with 16/32/64 filters, global average pool, fc: 6n+2 layers."""

    def __init__(self, depth: int, num_classes: int = 10, residual: bool = True) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise UnknownArchError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_stage(16, 16, n, 1, residual)
        self.layer2 = self._make_stage(16, 32, n, 2, residual)
        self.layer3 = self._make_stage(32, 64, n, 2, residual)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)
        he_init(self)

    @staticmethod
    def _make_stage(in_planes: int, planes: int, blocks: int, stride: int, residual: bool) -> nn.Sequential:
        layers = [CifarBlock(in_planes, planes, stride, residual)]
        layers += [CifarBlock(planes, planes, 1, residual) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def he_init(model: nn.Module) -> None:
    """He et al. 2015 ("Delving deep into rectifiers") init for convs, as the paper does (Sec. 3.4)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def build_model(arch: str, num_classes: int | None = None, stride_variant: str = "v1.5") -> nn.Module:
    """A freshly He-initialized network by name (see `ARCHS`); `num_classes` defaults to 1000 / 10 (CIFAR)."""
    if stride_variant not in STRIDE_VARIANTS:
        raise UnknownArchError(
            f"unknown stride variant {stride_variant!r}; choose one of {', '.join(STRIDE_VARIANTS)}"
        )
    num_classes = num_classes or default_num_classes(arch)
    if arch in IMAGENET_ARCHS:
        kind, layers = IMAGENET_ARCHS[arch]
        block = BasicBlock if kind == "basic" else Bottleneck
        return ImageNetResNet(block, layers, num_classes, stride_variant)
    if arch in CIFAR_ARCHS:
        depth, residual = CIFAR_ARCHS[arch]
        return CifarResNet(depth, num_classes, residual)
    raise UnknownArchError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
