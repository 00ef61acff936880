"""Where the network to export comes from: our checkpoint, a torchvision state dict, or an arch + weights.

Every source resolves to a `ModelSource`: an eval-mode `torch.nn.Module` plus what the repository must record
about it (arch, class names, preprocessing spec).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision

from export.errors import ExportError, WeightsUnavailableError
from server.spec import PreprocessSpec
from training import models
from training.utils import read_torch_file, state_dict_mismatch

DOWNLOAD_TIMEOUT_S = float(os.environ.get("RESNET_DOWNLOAD_TIMEOUT", "20"))
_TORCHVISION_INTERPOLATION = {"BILINEAR": "bilinear", "BICUBIC": "bicubic", "NEAREST": "nearest"}


@dataclass
class ModelSource:
    model: torch.nn.Module
    arch: str
    classes: list[str] | None
    spec: PreprocessSpec

    @property
    def num_classes(self) -> int:
        return _num_classes(self.model.state_dict())


def build_model(arch: str, num_classes: int | None = None, stride_variant: str = "v1.5") -> torch.nn.Module:
    """Our paper-exact ResNets (training.models); their state-dict keys are torchvision's."""
    return models.build_model(arch, num_classes=num_classes, stride_variant=stride_variant)


def default_spec(arch: str) -> PreprocessSpec:
    return PreprocessSpec.cifar10() if models.is_cifar_arch(arch) else PreprocessSpec.imagenet()


def from_checkpoint(path: Path, arch: str | None = None) -> ModelSource:
    """Our training checkpoint (a dict with `model`, `arch`, ...) or a bare torchvision state dict (needs arch)."""
    payload = read_torch_file(path)
    if not isinstance(payload, dict):
        raise ExportError(f"{path} is not a checkpoint or state dict (got {type(payload).__name__})")
    # The stride variant changes where a bottleneck downsamples but not the weights' shapes: a wrong one loads
    # cleanly and computes something else, so it is taken from the checkpoint (torchvision state dicts: v1.5).
    stride_variant = "v1.5"
    if "model" in payload and isinstance(payload["model"], dict):
        named = payload.get("arch")
        if arch and named and arch != named:
            raise ExportError(f"{path} is a {named} checkpoint, not {arch}: leave --arch out")
        state, arch = payload["model"], arch or named
        classes = payload.get("classes")
        spec = PreprocessSpec.from_dict(payload["preprocess"]) if payload.get("preprocess") else None
        config = payload.get("config") if isinstance(payload.get("config"), dict) else {}
        stride_variant = payload.get("stride_variant", config.get("stride_variant", "v1.5"))
    else:
        state, classes, spec = payload, None, None
    if not arch:
        raise ExportError(f"{path} does not say its architecture; pass --arch")
    model = build_model(arch, num_classes=_num_classes(state), stride_variant=stride_variant)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ExportError(f"{path} does not fit {arch}: {state_dict_mismatch(error)}") from error
    return ModelSource(model.eval(), arch, list(classes) if classes else None, spec or default_spec(arch))


def from_arch(arch: str, weights: str = "random", num_classes: int | None = None) -> ModelSource:
    """`random` (seeded initialization) or `torchvision[:ENUM]` (official ImageNet weights, default enum DEFAULT)."""
    if num_classes is not None and num_classes < 1:
        raise ExportError(f"--num-classes must be at least 1, got {num_classes}")
    if weights == "random":
        torch.manual_seed(0)
        return ModelSource(build_model(arch, num_classes).eval(), arch, None, default_spec(arch))
    if not weights.startswith("torchvision"):
        raise ExportError(f"--weights must be 'random' or 'torchvision[:ENUM]', got {weights!r}")
    enum_name = weights.partition(":")[2] or "DEFAULT"
    try:
        weight_enum = torchvision.models.get_model_weights(arch)[enum_name]
    except (ValueError, KeyError) as error:
        raise ExportError(f"torchvision has no weights {enum_name!r} for {arch!r}") from error
    state = load_state_dict_from_url(weight_enum.url)
    model = build_model(arch, num_classes=_num_classes(state))
    model.load_state_dict(state)
    return ModelSource(
        model.eval(), arch, list(weight_enum.meta["categories"]), spec_from_torchvision(weight_enum)
    )


def spec_from_torchvision(weight_enum) -> PreprocessSpec:
    transform = weight_enum.transforms()
    return PreprocessSpec(
        resize_shorter=int(transform.resize_size[0]),
        crop=int(transform.crop_size[0]),
        mean=tuple(transform.mean),
        std=tuple(transform.std),
        interpolation=_TORCHVISION_INTERPOLATION.get(transform.interpolation.name, "bilinear"),
    )


def load_state_dict_from_url(url: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> dict:
    """Download once into torch hub's cache, check the hash torchvision embeds in the file name, load."""
    cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
    target = cache_dir / Path(url).name
    if not target.is_file():
        _download(url, target, timeout)
    return torch.load(target, map_location="cpu", weights_only=True)


def _download(url: str, target: Path, timeout: float) -> None:
    expected = re.search(r"-([a-f0-9]{6,})\.", target.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False, suffix=".part") as part:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                shutil.copyfileobj(response, part)
        except (TimeoutError, urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            Path(part.name).unlink(missing_ok=True)
            raise WeightsUnavailableError(
                f"cannot download {url} ({reason}); check the network or pass --checkpoint"
            ) from error
    digest = hashlib.sha256(Path(part.name).read_bytes()).hexdigest()
    if expected and not digest.startswith(expected.group(1)):
        Path(part.name).unlink(missing_ok=True)
        raise WeightsUnavailableError(f"{url}: hash {digest[:12]} does not match {expected.group(1)}")
    with contextlib.suppress(FileNotFoundError):
        os.replace(part.name, target)


def _num_classes(state: dict) -> int:
    for key in ("fc.weight", "linear.weight", "classifier.weight"):
        if key in state:
            return int(state[key].shape[0])
    last_matrix = [value for value in state.values() if getattr(value, "ndim", 0) == 2]
    if not last_matrix:
        raise ExportError("cannot tell the number of classes from the state dict")
    return int(last_matrix[-1].shape[0])
