"""INT8: ONNX Runtime static quantization (QDQ, per-channel weights) calibrated on real images, with an
accuracy budget checked on held-out labelled images.

Images are read with the gateway's own preprocessing (`server.preprocessing`) and the model's PreprocessSpec, so
calibration sees exactly the tensors the served model will see.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from export.errors import AccuracyBudgetError, ExportError
from export.onnx import session
from server.spec import INPUT_NAME, OUTPUT_NAME, PreprocessSpec

Advance = Callable[[int], None]  # called with the number of images just processed
ProgressFactory = Callable[[str, int], Advance]  # (description, total images) -> advance callback

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}


@dataclass(frozen=True)
class QuantizeOptions:
    method: str = "minmax"
    per_channel: bool = True
    max_calibration_images: int = 256
    # Keeping the stem conv and the classifier in FP32 costs little speed and protects small models (ResNet-20).
    keep_first_last_fp32: bool = False


@dataclass
class Unreadable:
    """Images skipped because they do not decode or break a limit, with why: one corrupt file among thousands
    should not cost an export the minutes of work before it. Both models read the same files, so a dict."""

    found: dict[Path, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.found)

    def summary(self) -> str:
        """ "" when none, else "N unreadable images skipped (e.g. PATH: reason)"."""
        if not self.found:
            return ""
        path, reason = next(iter(self.found.items()))
        return (
            f"{len(self.found)} unreadable image{'s' * (len(self.found) > 1)} skipped (e.g. {path}: {reason})"
        )


@dataclass(frozen=True)
class AccuracyReport:
    images: int  # those read; `unreadable` were skipped
    fp32_top1: float
    int8_top1: float
    max_drop: float  # in top-1 points (percent)
    unreadable: int = 0

    @property
    def drop(self) -> float:
        return (self.fp32_top1 - self.int8_top1) * 100

    @property
    def ok(self) -> bool:
        return self.drop <= self.max_drop


def preprocess_file(path: Path, spec: PreprocessSpec) -> np.ndarray:
    """The model's input tensor for one image file; ExportError naming the file when it cannot be read."""
    from server.errors import GatewayError
    from server.preprocessing import preprocess_image

    try:
        return preprocess_image(path.read_bytes(), spec)
    except GatewayError as error:
        raise ExportError(f"{path}: {error.message}") from error
    except OSError as error:  # unreadable on disk (permissions, a broken link)
        raise ExportError(f"{path}: {error.strerror or error}") from error


def image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise ExportError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ExportError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    return files


def labelled_images(folder: Path, classes: list[str] | None = None) -> list[tuple[Path, int]]:
    """ImageFolder layout (`<class>/<image>`): labels are the model's class indices when the folder names are
    the model's class names, else the sorted folder order (torchvision's ImageFolder rule: ImageNet's wnid folders
    against its readable labels), which needs one folder per class. A mix of the two would measure accuracy
    against wrong labels, so it is refused."""
    class_dirs = sorted(d.name for d in folder.iterdir() if d.is_dir()) if folder.is_dir() else []
    if not class_dirs:
        raise ExportError(f"{folder} is not an ImageFolder (<class>/<image> sub-folders)")
    named = set(class_dirs) & set(classes or ())
    if named:
        unknown = sorted(set(class_dirs) - named)
        if unknown:
            raise ExportError(f"{folder} has classes the model does not know: {', '.join(unknown[:5])}")
        index = {name: classes.index(name) for name in class_dirs}
    elif classes is not None and len(class_dirs) != len(classes):
        raise ExportError(
            f"{folder}: none of its {len(class_dirs)} class folders is one of the model's {len(classes)} class "
            f"names, and read in sorted order they would need one folder per class; name them as the labels "
            f"(e.g. {classes[0]!r})"
        )
    else:
        index = {name: i for i, name in enumerate(class_dirs)}
    return [(path, index[name]) for name in class_dirs for path in image_files(folder / name)]


def batches(
    paths: list[Path],
    spec: PreprocessSpec,
    batch_size: int,
    unreadable: Unreadable,
    advance: Advance | None = None,
) -> Iterator[np.ndarray]:
    """The images as input batches, in order, those that cannot be read skipped into `unreadable`; ExportError
    when none can."""
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        tensors = []
        for path in chunk:
            try:
                tensors.append(preprocess_file(path, spec))
            except ExportError as error:
                unreadable.found[path] = str(error).removeprefix(f"{path}: ")
        if tensors:
            yield np.stack(tensors)
        if advance:
            advance(len(chunk))
    if paths and all(path in unreadable.found for path in paths):
        raise ExportError(f"none of the {len(paths)} images can be read: {unreadable.summary()}")


class ImageCalibrationReader(CalibrationDataReader):
    def __init__(
        self,
        paths: list[Path],
        spec: PreprocessSpec,
        unreadable: Unreadable,
        batch_size: int = 8,
        advance: Advance | None = None,
    ):
        self._batches = batches(paths, spec, batch_size, unreadable, advance)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def quantize_int8(
    fp32_path: Path,
    int8_path: Path,
    calib_dir: Path,
    spec: PreprocessSpec,
    options: QuantizeOptions | None = None,
    progress: ProgressFactory | None = None,
    unreadable: Unreadable | None = None,
) -> Path:
    """Static INT8 QDQ model from `fp32_path`, calibrated on (up to N, evenly spread) images under `calib_dir`;
    those that cannot be read are skipped into `unreadable`."""
    options = options or QuantizeOptions()
    paths = image_files(calib_dir)
    if len(paths) > options.max_calibration_images:
        step = len(paths) / options.max_calibration_images
        paths = [paths[int(i * step)] for i in range(options.max_calibration_images)]
    advance = progress("calibrating INT8", len(paths)) if progress else None
    reader = ImageCalibrationReader(paths, spec, unreadable or Unreadable(), advance=advance)
    return quantize_with_reader(fp32_path, int8_path, reader, options)


def quantize_with_reader(
    fp32_path: Path,
    int8_path: Path,
    reader: CalibrationDataReader,
    options: QuantizeOptions | None = None,
) -> Path:
    """The quantization itself; `reader` yields `{INPUT_NAME: batch}` (benchmarks pass synthetic batches)."""
    options = options or QuantizeOptions()
    if options.method not in CALIBRATION_METHODS:
        raise ExportError(
            f"unknown calibration method {options.method!r} (choose from {', '.join(CALIBRATION_METHODS)})"
        )
    with tempfile.TemporaryDirectory(prefix="quant-") as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        _pre_process(fp32_path, prepared)
        quantize_static(
            str(prepared),
            str(int8_path),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=options.per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CALIBRATION_METHODS[options.method],
            nodes_to_exclude=_first_last_nodes(prepared) if options.keep_first_last_fp32 else [],
            extra_options={"CalibTensorRangeSymmetric": False},
        )
    onnx.checker.check_model(str(int8_path), full_check=True)
    return int8_path


class ArrayCalibrationReader(CalibrationDataReader):
    def __init__(self, arrays: list[np.ndarray]):
        self._arrays = iter(arrays)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._arrays, None)
        return None if batch is None else {INPUT_NAME: batch}


def top1(
    onnx_path: Path,
    samples: list[tuple[Path, int]],
    spec: PreprocessSpec,
    batch_size: int = 32,
    advance: Advance | None = None,
    unreadable: Unreadable | None = None,
) -> float:
    """Top-1 accuracy over the samples that can be read (the others skipped into `unreadable`)."""
    unreadable = Unreadable() if unreadable is None else unreadable
    runtime = session(onnx_path)
    paths = [path for path, _ in samples]
    predictions = [
        runtime.run([OUTPUT_NAME], {INPUT_NAME: batch})[0].argmax(1)
        for batch in batches(paths, spec, batch_size, unreadable, advance)
    ]
    labels = np.array([label for path, label in samples if path not in unreadable.found])
    return float((np.concatenate(predictions) == labels).mean())


def check_accuracy_budget(
    fp32_path: Path,
    int8_path: Path,
    eval_dir: Path,
    spec: PreprocessSpec,
    *,
    classes: list[str] | None = None,
    max_drop: float = 1.0,
    progress: ProgressFactory | None = None,
) -> AccuracyReport:
    """Top-1 of both models on held-out labelled images (those that cannot be read skipped and counted); raises
    AccuracyBudgetError above `max_drop` points."""
    samples = labelled_images(eval_dir, classes)
    unreadable = Unreadable()
    accuracies = [
        top1(
            path,
            samples,
            spec,
            advance=progress(f"top-1 of {label}", len(samples)) if progress else None,
            unreadable=unreadable,
        )
        for path, label in ((fp32_path, "FP32"), (int8_path, "INT8"))
    ]
    report = AccuracyReport(len(samples) - len(unreadable), *accuracies, max_drop, len(unreadable))
    if not report.ok:
        raise AccuracyBudgetError(
            f"INT8 top-1 {report.int8_top1:.2%} vs FP32 {report.fp32_top1:.2%} on {report.images} images: "
            f"drop {report.drop:.2f} points > budget {max_drop:g}; nothing published"
        )
    return report


def _pre_process(fp32_path: Path, prepared: Path) -> None:
    """ONNX Runtime's shape inference and graph clean-up before quantization, into `prepared`."""
    try:
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
    except DecodeError as error:
        # Its shape inference writes the model through ONNX's C++, which does not check the write: on a full disk
        # the file is cut short without an error, and only reading it back fails (a protobuf traceback).
        size_mb = fp32_path.stat().st_size / 1e6
        raise ExportError(
            f"ONNX Runtime's quantization pre-processing wrote a model it cannot read back in {prepared.parent.parent}"
            f": is TMPDIR full? (its writes are not checked, so a full disk cuts the model short without an error; "
            f"it needs room for a few copies of the {size_mb:.1f} MB model.) Free space there or point TMPDIR at a "
            "larger disk (nothing was published)"
        ) from error


def _first_last_nodes(path: Path) -> list[str]:
    nodes = onnx.load(str(path)).graph.node
    convs = [n.name for n in nodes if n.op_type == "Conv"]
    heads = [n.name for n in nodes if n.op_type in ("Gemm", "MatMul")]
    return convs[:1] + heads[-1:]
