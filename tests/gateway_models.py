"""Tiny real model repositories for the gateway tests, written with the exporter's own repository code.

The "colors" classifier averages each channel and scores classes red, green, blue: a red image is class 0, a
green one class 1, a blue one class 2, so a test can tell whose answer a client got back.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from export.repository import (
    CLASSIFIER_MODEL_PY,
    BatchingPolicy,
    ClassifierSpec,
    classifier_config,
    publish_version,
    read_config,
    write_model,
)
from server.spec import INPUT_NAME, OUTPUT_NAME, PreprocessSpec

COLORS = {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230)}
LABELS = list(COLORS)
TINY_SPEC = PreprocessSpec(resize_shorter=40, crop=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def colors_onnx(crop: int = 32, scale: float = 4, nan_when_overflowing: bool = False) -> bytes:
    """Logits `scale` x the image's mean red, green and blue (normalized): each version's scores tell it apart.
    A scale near FP32's limit overflows on saturated colours (+inf for the colour, -inf for the others);
    `nan_when_overflowing` turns those logits into NaN (x + 0 * x), as an overflow inside a network can."""
    weights = numpy_helper.from_array(np.eye(3, dtype=np.float32) * scale, "weights")
    bias = numpy_helper.from_array(np.zeros(3, dtype=np.float32), "bias")
    initializers = [weights, bias]
    logits = "scaled" if nan_when_overflowing else OUTPUT_NAME
    nodes = [
        helper.make_node("GlobalAveragePool", [INPUT_NAME], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "weights", "bias"], [logits], transB=1),
    ]
    if nan_when_overflowing:
        initializers.append(numpy_helper.from_array(np.zeros(1, dtype=np.float32), "zero"))
        nodes.append(helper.make_node("Mul", [logits, "zero"], ["zeros"]))
        nodes.append(helper.make_node("Add", [logits, "zeros"], [OUTPUT_NAME]))
    graph = helper.make_graph(
        nodes,
        "colors",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", 3, crop, crop])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", 3])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def write_colors_model(
    repository: Path,
    name: str = "colors",
    max_batch_size: int = 32,
    scale: float = 4,
    nan_when_overflowing: bool = False,
) -> Path:
    """A classifier in `repository/name` that both the embedded backend and Triton (Python backend) serve."""
    spec = ClassifierSpec(
        name=name,
        arch="colors",
        precision="fp32",
        num_classes=3,
        preprocess=TINY_SPEC,
        batching=BatchingPolicy(max_batch_size=max_batch_size),
        cpu_threads=1,
    )
    model_dir = repository / name
    write_model(model_dir, classifier_config(spec), LABELS)
    publish_version(
        model_dir,
        {
            "model.onnx": colors_onnx(TINY_SPEC.crop, scale, nan_when_overflowing),
            "model.py": CLASSIFIER_MODEL_PY,
        },
    )
    return model_dir


def write_broken_model(repository: Path, name: str = "broken") -> None:
    """A classifier whose model.onnx was cut short (a copy that did not finish): ONNX Runtime cannot load it."""
    onnx_file = write_colors_model(repository, name) / "1" / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:200])


def write_misfit_model(repository: Path, name: str = "misfit", classes: int = 2, crop: int = 32) -> None:
    """A classifier whose config.pbtxt and labels.txt say `classes` classes of `crop` pixels while its model.onnx
    takes 32 and gives 3: what an export of another model under its name left for the versions kept on disk,
    before export refused it."""
    model_dir = write_colors_model(repository, name)
    config = read_config(model_dir)
    config.output[0].dims[:] = [classes]
    config.input[0].dims[:] = [3, crop, crop]
    write_model(model_dir, config, [f"shade {index}" for index in range(classes)])


def color_image(color: str, size: tuple[int, int] = (64, 48), fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    image = Image.new("RGB", size, COLORS[color])
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def grey_image() -> bytes:
    """Mid-grey (PNG): each logit of a colours model near 0 times its scale, finite even near FP32's limit."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (128, 128, 128)).save(buffer, "PNG")
    return buffer.getvalue()


def noise_jpeg(seed: int, size: tuple[int, int]) -> bytes:
    """A photo-like image with no ties between class scores (so every ranking is unambiguous)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression bomb, as far as the header goes)."""
    data = bytearray(color_image("red", size=(8, 8), fmt="PNG"))
    data[16:24] = struct.pack(
        ">II", width, height
    )  # IHDR payload: after the signature, chunk length and type
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)
