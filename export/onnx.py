"""PyTorch -> ONNX (checked, simplified, dynamic batch) -> verified against PyTorch; the FP16 variant.

Hard-won facts (torch 2.14.1):
- The dynamo exporter (`torch.onnx.export(dynamo=True)`, the default since 2.9) needs `onnxscript`, which the
  export extra does not install, and takes several times longer for a ResNet; the TorchScript exporter
  (`dynamo=False`) is deprecated but exact for these convolutional nets, so it is used here.
- Tracing with batch 1 lets the exporter constant-fold shapes that then pin the batch; trace with batch 2 and
  verify at other sizes (1, 3) so a pinned shape is caught.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from export.errors import VerificationError
from server.spec import INPUT_NAME, OUTPUT_NAME

OPSET = 17
TRACE_BATCH = 2
VERIFY_BATCHES = (1, 3)
# Max |onnx - torch| allowed, relative to max |torch| over the batch. FP32 reorderings stay ~1e-6; FP16 ~1e-3.
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}


@dataclass(frozen=True)
class ParityReport:
    precision: str
    batch_sizes: tuple[int, ...]
    max_abs_error: float
    relative_error: float  # max_abs_error / max |reference|
    tolerance: float
    top1_agreement: float

    @property
    def ok(self) -> bool:
        return self.relative_error <= self.tolerance


def export_onnx(
    model: torch.nn.Module, path: Path, crop: int, *, opset: int = OPSET, simplify: bool = True
) -> Path:
    """Trace `model` (eval mode, CPU, FP32) into `path` with a dynamic batch axis; full onnx.checker check."""
    if opset < 17:
        raise ValueError("opset >= 17 is required")
    model = model.eval().cpu()
    example = torch.randn(TRACE_BATCH, 3, crop, crop)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter(
            "ignore", DeprecationWarning
        )  # the legacy-exporter notice, see module docstring
        warnings.filterwarnings("ignore", message="Constant folding")  # option-A shortcut slices, harmless
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    proto = onnx.load(str(path))
    if simplify:
        import onnxslim

        proto = onnxslim.slim(proto)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    return path


def convert_fp16(fp32_path: Path, fp16_path: Path) -> Path:
    """FP16 weights and math, FP32 input/output so clients and the gateway send the same tensors."""
    import onnxslim
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    # The converter appends its input/output Casts at the end of the node list; onnxslim re-sorts the graph
    # topologically (onnx.checker rejects it otherwise).
    proto = onnxslim.slim(proto)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(fp16_path))
    return fp16_path


def session(path: Path, threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def verify_onnx(
    model: torch.nn.Module,
    onnx_path: Path,
    crop: int,
    *,
    precision: str = "fp32",
    batch_sizes: tuple[int, ...] = VERIFY_BATCHES,
    tolerance: float | None = None,
    seed: int = 0,
) -> ParityReport:
    """Run PyTorch and ONNX Runtime on the same random batches (sizes other than the traced one); compare."""
    tolerance = TOLERANCE[precision] if tolerance is None else tolerance
    generator = torch.Generator().manual_seed(seed)
    runtime = session(onnx_path)
    max_abs, max_ref, agree, total = 0.0, 0.0, 0, 0
    model = model.eval().cpu()
    for batch in batch_sizes:
        inputs = torch.randn(batch, 3, crop, crop, generator=generator)
        with torch.no_grad():
            expected = model(inputs).numpy()
        actual = runtime.run([OUTPUT_NAME], {INPUT_NAME: inputs.numpy()})[0]
        if actual.shape != expected.shape:
            raise VerificationError(
                f"{onnx_path.name}: batch {batch} gave shape {actual.shape}, expected {expected.shape}"
            )
        max_abs = max(max_abs, float(np.abs(actual - expected).max()))
        max_ref = max(max_ref, float(np.abs(expected).max()))
        agree += int((actual.argmax(1) == expected.argmax(1)).sum())
        total += batch
    relative = max_abs / max(max_ref, 1e-12)
    if not np.isfinite(relative):
        relative = float("inf")
    return ParityReport(precision, tuple(batch_sizes), max_abs, relative, tolerance, agree / total)


def require_parity(report: ParityReport, what: str) -> ParityReport:
    if not report.ok:
        raise VerificationError(
            f"{what} does not match PyTorch: relative error {report.relative_error:.2e} > {report.tolerance:.0e} "
            f"(max abs {report.max_abs_error:.3g}, top-1 agreement {report.top1_agreement:.0%}); nothing published"
        )
    return report


def measure_latency_ms(path: Path, crop: int, batch: int = 1, repeats: int = 5) -> float:
    """Median wall time of one ONNX Runtime run, after a warm-up run (a rough number for the summary table)."""
    runtime = session(path)
    inputs = np.random.default_rng(0).standard_normal((batch, 3, crop, crop), dtype=np.float32)
    runtime.run([OUTPUT_NAME], {INPUT_NAME: inputs})
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        runtime.run([OUTPUT_NAME], {INPUT_NAME: inputs})
        timings.append(time.perf_counter() - start)
    return float(np.median(timings) * 1000)
