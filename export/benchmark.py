"""Throughput of one network on this CPU: PyTorch eager vs ONNX Runtime FP32 vs ONNX Runtime INT8.

`python -m export.benchmark --arch resnet50` prints a markdown table; `benchmark_runtimes()` returns the rows
(`resnet bench` calls it). Random weights and synthetic inputs: speed does not depend on the values, and INT8
calibration on random batches gives the same kernels as calibration on photos.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cli.limits import MAX_THREADS
from export.onnx import export_onnx, session
from export.quantize import ArrayCalibrationReader, quantize_with_reader
from export.source import default_spec, from_arch
from server.spec import INPUT_NAME, OUTPUT_NAME
from training.errors import ConfigError
from training.models import build_model


@dataclass(frozen=True)
class RuntimeResult:
    runtime: str
    batch: int
    images_per_s: float
    p50_ms: float


def _time(run, inputs, min_seconds: float, min_repeats: int = 3) -> list[float]:
    run(inputs)  # warm-up: allocations, kernel selection
    timings: list[float] = []
    deadline = time.perf_counter() + min_seconds
    while len(timings) < min_repeats or time.perf_counter() < deadline:
        start = time.perf_counter()
        run(inputs)
        timings.append(time.perf_counter() - start)
    return timings


def benchmark_runtimes(
    arch: str = "resnet50",
    batch_sizes: tuple[int, ...] = (1, 8, 32),
    threads: int | None = None,
    min_seconds: float = 3.0,
    workdir: Path | None = None,
) -> list[RuntimeResult]:
    """Each runtime at each batch size for at least `min_seconds`; images/s from the mean, p50 latency per batch."""
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    source = from_arch(arch, "random")
    crop = default_spec(arch).crop
    with tempfile.TemporaryDirectory(dir=workdir) as scratch:
        fp32 = export_onnx(source.model, Path(scratch) / "fp32.onnx", crop)
        rng = np.random.default_rng(0)
        calibration = [rng.standard_normal((8, 3, crop, crop), dtype=np.float32) for _ in range(4)]
        int8 = quantize_with_reader(fp32, Path(scratch) / "int8.onnx", ArrayCalibrationReader(calibration))
        runners = {"PyTorch eager FP32": _torch_runner(source.model)}
        for name, path in (("ONNX Runtime FP32", fp32), ("ONNX Runtime INT8 (QDQ)", int8)):
            runtime = session(path, threads)
            runners[name] = lambda x, runtime=runtime: runtime.run([OUTPUT_NAME], {INPUT_NAME: x})
        results = []
        for name, run in runners.items():
            for batch in batch_sizes:
                inputs = rng.standard_normal((batch, 3, crop, crop), dtype=np.float32)
                timings = _time(run, inputs, min_seconds)
                results.append(
                    RuntimeResult(
                        name, batch, batch / float(np.mean(timings)), float(np.median(timings)) * 1000
                    )
                )
        return results


def _torch_runner(model: torch.nn.Module):
    model = model.eval()

    def run(inputs: np.ndarray):
        with torch.inference_mode():
            return model(torch.from_numpy(inputs))

    return run


def markdown_table(results: list[RuntimeResult]) -> str:
    batches = sorted({r.batch for r in results})
    runtimes = list(dict.fromkeys(r.runtime for r in results))
    cell = {(r.runtime, r.batch): r for r in results}
    baseline = runtimes[0]
    ratio_batch = 8 if 8 in batches else batches[-1]
    header = (
        "| runtime | "
        + " | ".join(f"img/s @ batch {b}" for b in batches)
        + f" | p50 ms @ batch 1 | vs {baseline} @ batch {ratio_batch} |"
    )
    lines = [header, "|" + " --- |" * (len(batches) + 3)]
    for runtime in runtimes:
        speeds = " | ".join(f"{cell[runtime, b].images_per_s:.1f}" for b in batches)
        p50 = f"{cell[runtime, 1].p50_ms:.1f}" if (runtime, 1) in cell else "-"
        ratio = cell[runtime, ratio_batch].images_per_s / cell[baseline, ratio_batch].images_per_s
        lines.append(f"| {runtime} | {speeds} | {p50} | {ratio:.2f}x |")
    return "\n".join(lines)


def batch_size_list(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(size) for size in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes, got {text!r}") from None
    if min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be at least 1, got {text!r}")
    return sizes


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m export.benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50", help="architecture (random weights)")
    parser.add_argument(
        "--batch-sizes", type=batch_size_list, default=(1, 8, 32), help="comma-separated batch sizes (1,8,32)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="intra-op threads (default: torch's default)"
    )
    parser.add_argument("--min-seconds", type=float, default=3.0, help="time each cell at least this long")
    return parser


def main(args: argparse.Namespace) -> None:
    if args.threads is not None and not 1 <= args.threads <= MAX_THREADS:
        raise ConfigError(f"--threads must be from 1 to {MAX_THREADS}, got {args.threads}")
    if not 0 < args.min_seconds <= 3600:
        raise ConfigError(f"--min-seconds must be more than 0 and at most 3600, got {args.min_seconds}")
    build_model(args.arch, 2)  # an unknown name fails here, before any export
    results = benchmark_runtimes(args.arch, args.batch_sizes, args.threads, args.min_seconds)
    print(markdown_table(results))


if __name__ == "__main__":
    from cli.main import run_script

    run_script(get_args_parser, main)
