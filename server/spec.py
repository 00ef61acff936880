"""What the model repository says about a model, in one place: the keys, the preprocessing spec, the roles.

The exporter writes these values into `config.pbtxt` `parameters`; the gateway, the Triton preprocessing model
and the training evaluation transform read them back. Nothing about a model is configured twice.
No torch here: the gateway image imports this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

# Tensor names shared by every exported classifier and the Triton pipeline.
INPUT_NAME = "input"  # FP32 [batch, 3, crop, crop], normalized, NCHW
OUTPUT_NAME = "logits"  # FP32 [batch, num_classes]
IMAGE_INPUT_NAME = "image"  # TYPE_STRING [batch, 1]: encoded image bytes (pipeline and preprocess models)
LABELS_FILENAME = "labels.txt"  # one label per line, in class-index order
# The models export makes beside each classifier <name>: <name>_preprocess, and an ensemble <variant>_pipeline that
# takes encoded images (what clients of Triton's protocol call)
PREPROCESS_SUFFIX = "_preprocess"
PIPELINE_SUFFIX = "_pipeline"

# `parameters` keys in config.pbtxt.
ROLE_KEY = "resnet.role"
ARCH_KEY = "resnet.arch"
PRECISION_KEY = "resnet.precision"
PREPROCESS_PREFIX = "preprocess."


class Role:
    CLASSIFIER = "classifier"  # the network: INPUT_NAME -> OUTPUT_NAME
    PREPROCESS = "preprocess"  # Python backend: IMAGE_INPUT_NAME -> INPUT_NAME
    PIPELINE = "pipeline"  # ensemble: IMAGE_INPUT_NAME -> OUTPUT_NAME (classification extension)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class SpecError(ValueError):
    """A preprocessing spec that cannot be used (missing key, bad number, unsupported option)."""


@dataclass(frozen=True)
class PreprocessSpec:
    """Eval-time preprocessing: resize the shorter side, center-crop, scale to [0, 1], normalize, lay out."""

    resize_shorter: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    channel_order: str = "RGB"
    layout: str = "NCHW"
    extra: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.crop <= 0 or self.resize_shorter < self.crop:
            raise SpecError(
                f"need 0 < crop <= resize_shorter, got crop={self.crop} resize={self.resize_shorter}"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise SpecError(f"mean and std need 3 values each, std > 0; got mean={self.mean} std={self.std}")
        if self.interpolation not in ("bilinear", "bicubic", "nearest"):
            raise SpecError(f"unsupported interpolation {self.interpolation!r}")
        if self.channel_order not in ("RGB", "BGR"):
            raise SpecError(f"unsupported channel order {self.channel_order!r}")
        if self.layout not in ("NCHW", "NHWC"):
            raise SpecError(f"unsupported layout {self.layout!r}")

    @classmethod
    def imagenet(cls) -> PreprocessSpec:
        return cls()

    @classmethod
    def cifar10(cls) -> PreprocessSpec:
        return cls(resize_shorter=32, crop=32, mean=CIFAR10_MEAN, std=CIFAR10_STD)

    def to_parameters(self) -> dict[str, str]:
        """The `parameters` entries for config.pbtxt (string values, as Triton stores them)."""
        values = asdict(self)
        values.pop("extra")
        return {PREPROCESS_PREFIX + key: _format(value) for key, value in values.items()}

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str]) -> PreprocessSpec:
        """Inverse of `to_parameters`; unknown `preprocess.*` keys are kept in `extra`, missing ones default."""
        fields = {
            k[len(PREPROCESS_PREFIX) :]: v for k, v in parameters.items() if k.startswith(PREPROCESS_PREFIX)
        }
        try:
            known = {
                "resize_shorter": int(fields.pop("resize_shorter", cls.resize_shorter)),
                "crop": int(fields.pop("crop", cls.crop)),
                "mean": _floats(fields.pop("mean", None), IMAGENET_MEAN),
                "std": _floats(fields.pop("std", None), IMAGENET_STD),
                "interpolation": fields.pop("interpolation", cls.interpolation),
                "channel_order": fields.pop("channel_order", cls.channel_order),
                "layout": fields.pop("layout", cls.layout),
            }
        except ValueError as error:
            raise SpecError(f"bad preprocessing parameter: {error}") from error
        return cls(**known, extra=fields)

    def to_dict(self) -> dict:
        values = asdict(self)
        values.pop("extra")
        return values

    @classmethod
    def from_dict(cls, values: Mapping) -> PreprocessSpec:
        known = {
            k: values[k]
            for k in ("resize_shorter", "crop", "interpolation", "channel_order", "layout")
            if k in values
        }
        for key in ("mean", "std"):
            if key in values:
                known[key] = tuple(float(v) for v in values[key])
        return cls(**known)


def _format(value: object) -> str:
    if isinstance(value, tuple | list):
        return ",".join(repr(float(v)) for v in value)
    return str(value)


def _floats(text: str | None, default: tuple[float, float, float]) -> tuple[float, float, float]:
    if text is None:
        return default
    values = tuple(float(part) for part in text.split(","))
    if len(values) != 3:
        raise ValueError(f"expected 3 comma-separated numbers, got {text!r}")
    return values  # type: ignore[return-value]
