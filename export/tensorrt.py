"""ONNX -> TensorRT `model.plan` with the TensorRT Python API (runs where `tensorrt` is importable: the exporter
image on a GPU machine). TensorRT cannot be installed on the development machines, so the pure parts (profile
shapes, builder flags) are separate functions tested without it.

A plan is specific to the GPU model and TensorRT version that built it: build it on the serving hardware.
INT8 uses explicit quantization: the QDQ ONNX from `export.quantize` carries the scales, no TensorRT calibrator.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import cli.files
from export.errors import ExportError
from server.spec import INPUT_NAME

DEFAULT_WORKSPACE_BYTES = 4 << 30


def tensorrt_available() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


@dataclass(frozen=True)
class ProfileShapes:
    """One optimization profile for the input: TensorRT tunes kernels for `opt` and accepts min..max."""

    min: tuple[int, int, int, int]
    opt: tuple[int, int, int, int]
    max: tuple[int, int, int, int]


def optimization_profile(crop: int, max_batch_size: int, opt_batch_size: int | None = None) -> ProfileShapes:
    """min batch 1, max = Triton's max_batch_size, opt = the largest power of two <= max/2 (a dynamic batcher
    under load forms batches around half its maximum), unless given."""
    if max_batch_size < 1:
        raise ExportError("max batch size must be at least 1")
    if opt_batch_size is None:
        opt_batch_size = 1
        while opt_batch_size * 2 <= max(1, max_batch_size // 2):
            opt_batch_size *= 2
    if not 1 <= opt_batch_size <= max_batch_size:
        raise ExportError(f"opt batch {opt_batch_size} must be within 1..{max_batch_size}")
    shape = (3, crop, crop)
    return ProfileShapes((1, *shape), (opt_batch_size, *shape), (max_batch_size, *shape))


def builder_flag_names(fp16: bool, int8: bool) -> list[str]:
    """`tensorrt.BuilderFlag` members to set. INT8 keeps FP16 on too so layers left unquantized run in half."""
    flags = []
    if fp16 or int8:
        flags.append("FP16")
    if int8:
        flags.append("INT8")
    return flags


def build_plan(
    onnx_path: Path,
    plan_path: Path,
    crop: int,
    max_batch_size: int,
    *,
    fp16: bool = False,
    int8: bool = False,
    timing_cache: Path | None = None,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
) -> Path:
    """Serialize an engine for `onnx_path` (the QDQ model when int8) into `plan_path`; reuse/refresh the timing cache."""
    if not tensorrt_available():
        raise ExportError(
            "--tensorrt needs the `tensorrt` Python package (GPU exporter image); it is not installed here"
        )
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    for name in builder_flag_names(fp16, int8):
        config.set_flag(getattr(trt.BuilderFlag, name))
    shapes = optimization_profile(crop, max_batch_size)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, shapes.min, shapes.opt, shapes.max)
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(
        timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    )
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path.name}")
    plan_path.write_bytes(bytes(serialized))
    if timing_cache:
        cache_bytes = bytes(config.get_timing_cache().serialize())
        cli.files.atomic_write(timing_cache, lambda file: file.write(cache_bytes))
    return plan_path
