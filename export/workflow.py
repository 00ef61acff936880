"""`export_to_repository`: one call from a network to verified, published Triton models.

Every artifact is built and verified in a scratch folder first; only when all pass are they published, each as
a new atomic version and all of them or none (`repository.Publication` undoes a publish that fails half-way, a
disk that fills), so a failed export leaves the repository exactly as it was. Exports into one repository build at
the same time and publish one after the other (the repository's lock file).

Published models, for `name`:
  <name>               FP32 ONNX (gpu target: ONNX Runtime + TensorRT accelerator, FP16 with --fp16)
  <name>_fp16          FP16 ONNX (with --fp16)
  <name>_int8          INT8 QDQ ONNX (with --int8), accuracy-checked
  <name>_trt           TensorRT plan (with --tensorrt, gpu target only)
  <name>_preprocess    Python backend: image bytes -> input tensor (server.preprocessing)
  <variant>_pipeline   ensemble per variant: image bytes -> logits with labels
"""

from __future__ import annotations

import contextlib
import errno
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from rich.console import Console
from rich.progress import MofNCompleteColumn, Progress
from rich.table import Table

import cli.files
from cli.limits import MAX_BATCH_SIZE, MAX_INSTANCES
from export import onnx as onnx_export
from export import repository as repo
from export.errors import ExportError
from export.quantize import (
    QuantizeOptions,
    Unreadable,
    check_accuracy_budget,
    image_files,
    labelled_images,
    quantize_int8,
)
from export.source import ModelSource
from export.tensorrt import build_plan, tensorrt_available
from server.spec import PIPELINE_SUFFIX, PREPROCESS_SUFFIX

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# The folders an export makes beside each model. A model named like one would overwrite another model's (`--name
# resnet20_pipeline` replaced resnet20's ensemble with a classifier), and clients read `<name>_pipeline` as "the
# model that takes encoded images".
GENERATED_SUFFIXES = (PREPROCESS_SUFFIX, PIPELINE_SUFFIX)
# what a write into a full (or quota-bound, or size-limited) disk fails with
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@dataclass
class ExportOptions:
    name: str
    repository: Path = Path("model_repository")
    target: str = "cpu"
    fp16: bool = False
    int8: bool = False
    calib_data: Path | None = None
    eval_data: Path | None = None
    max_accuracy_drop: float = 1.0
    quantize: QuantizeOptions = field(default_factory=QuantizeOptions)
    tensorrt: bool = False
    labels: list[str] | None = None
    batching: repo.BatchingPolicy = field(default_factory=repo.BatchingPolicy)
    keep_versions: int = 3
    pipeline: bool = True
    cpu_threads: int = 0
    measure_latency: bool = True


@dataclass
class Artifact:
    """One published model: a row of the summary table."""

    model: str
    precision: str
    file: str
    size_bytes: int
    check: str  # what verified it: parity error or accuracy drop
    latency_ms: float | None = None
    version: int | None = None
    classifier: repo.ClassifierSpec | None = field(default=None, repr=False)
    path: Path | None = field(default=None, repr=False)


def validate(options: ExportOptions, source: ModelSource) -> list[str]:
    """Fail before any work on flags that cannot work; returns the labels."""
    if not NAME_PATTERN.match(options.name):
        raise ExportError(f"model name {options.name!r} must be letters, digits, '_', '-' or '.'")
    for suffix in GENERATED_SUFFIXES:
        if options.name.endswith(suffix):
            raise ExportError(
                f"model name {options.name!r} ends in {suffix!r}, which export keeps for the <name>{suffix} "
                "model it makes beside each one; choose another --name"
            )
    if options.target not in ("cpu", "gpu"):
        raise ExportError(f"--target must be cpu or gpu, got {options.target!r}")
    if options.int8 and not options.calib_data:
        raise ExportError("--int8 needs --calib-data DIR (a folder of real images to calibrate on)")
    if options.eval_data and not options.int8:
        raise ExportError("--eval-data is used to check the INT8 accuracy drop; add --int8")
    if options.tensorrt and options.target != "gpu":
        raise ExportError("--tensorrt builds a GPU engine; use it with --target gpu")
    if options.tensorrt and not tensorrt_available():
        raise ExportError(
            "--tensorrt needs the `tensorrt` Python package (GPU exporter image); it is not installed here"
        )
    if options.keep_versions < 1:
        raise ExportError("--keep-versions must be at least 1")
    if not 1 <= options.batching.max_batch_size <= MAX_BATCH_SIZE:
        raise ExportError(f"--max-batch-size must be from 1 to {MAX_BATCH_SIZE}")
    if not 1 <= options.batching.instances <= MAX_INSTANCES:
        raise ExportError(f"--instances must be from 1 to {MAX_INSTANCES}")
    if options.batching.max_queue_delay_us < 0:
        raise ExportError("--max-queue-delay-us must be 0 or more")
    if options.quantize.max_calibration_images < 1:
        raise ExportError("--calib-images must be at least 1")
    if options.max_accuracy_drop < 0:
        raise ExportError("--max-accuracy-drop is in top-1 points and must be 0 or more")
    if options.calib_data:
        image_files(options.calib_data)  # raises a clear error for an empty or missing folder
    labels = options.labels or source.classes or repo.class_index_labels(source.num_classes)
    if len(labels) != source.num_classes:
        raise ExportError(f"{len(labels)} labels given for a model with {source.num_classes} classes")
    if options.eval_data:
        labelled_images(options.eval_data, labels)  # its folders fit the labels, known before minutes of work
    if not repo.publishing_unfinished(options.repository):
        # else what the name serves may be undone first: it is checked under the lock, after that
        check_served_contract(options, source, labels)
    return labels


def check_served_contract(options: ExportOptions, source: ModelSource, labels: list[str]) -> None:
    """Refuse a model that would change the config.pbtxt and labels.txt its name's published versions share."""
    for model_dir in (options.repository / name for name in _classifier_names(options)):
        change = repo.shared_contract_change(model_dir, source.spec, labels)
        if change:
            raise ExportError(
                f"{model_dir} serves {_plural('version', repo.versions(model_dir))} with one config.pbtxt "
                f"and labels.txt; this model changes them ({change}), which the versions kept for rollback do not "
                f"fit: publish it under another --name, or move {model_dir} away first"
            )


def _plural(noun: str, numbers: list[int]) -> str:
    return f"{noun}{'s' if len(numbers) > 1 else ''} {', '.join(map(str, numbers))}"


def _classifier_names(options: ExportOptions) -> list[str]:
    variants = {"_fp16": options.fp16, "_int8": options.int8, "_trt": options.tensorrt}
    return [options.name] + [options.name + suffix for suffix, wanted in variants.items() if wanted]


def export_to_repository(
    source: ModelSource, options: ExportOptions, console: Console | None = None
) -> list[Artifact]:
    """Export, verify and publish `source` as described in the module docstring; returns what was published."""
    console = console or Console(quiet=True)
    labels = validate(options, source)
    base = repo.ClassifierSpec(
        name=options.name,
        arch=source.arch,
        precision="fp32",
        num_classes=source.num_classes,
        preprocess=source.spec,
        target=options.target,
        batching=options.batching,
        cpu_threads=options.cpu_threads,
        tensorrt_precision=("FP16" if options.fp16 else "FP32") if options.target == "gpu" else None,
    )
    with tempfile.TemporaryDirectory(prefix="resnet-export-") as scratch:
        with _scratch_space(Path(scratch)):
            artifacts = _build_artifacts(source, options, labels, base, Path(scratch), console)
        with console.status(f"publishing into {options.repository}..."):
            _publish(artifacts, labels, source, options, console)
    return artifacts


def _build_artifacts(
    source: ModelSource,
    options: ExportOptions,
    labels: list[str],
    base: repo.ClassifierSpec,
    scratch: Path,
    console: Console,
) -> list[Artifact]:
    """Every variant asked for, built in `scratch` and verified."""
    crop = source.spec.crop
    artifacts = []
    with console.status("exporting ONNX (FP32)..."):
        fp32 = onnx_export.export_onnx(source.model, scratch / "fp32.onnx", crop)
        report = onnx_export.require_parity(
            onnx_export.verify_onnx(source.model, fp32, crop), "the FP32 ONNX model"
        )
    artifacts.append(
        Artifact(
            options.name,
            "fp32",
            "model.onnx",
            fp32.stat().st_size,
            f"rel. err {report.relative_error:.1e}",
            classifier=base,
            path=fp32,
        )
    )
    console.log(
        f"FP32 ONNX verified on batches {report.batch_sizes}: relative error {report.relative_error:.1e}"
    )
    if options.fp16:
        with console.status("converting to FP16..."):
            fp16 = onnx_export.convert_fp16(fp32, scratch / "fp16.onnx")
            report = onnx_export.require_parity(
                onnx_export.verify_onnx(source.model, fp16, crop, precision="fp16"), "the FP16 ONNX model"
            )
        spec = replace(base, name=f"{options.name}_fp16", precision="fp16", tensorrt_precision=None)
        artifacts.append(
            Artifact(
                spec.name,
                "fp16",
                "model.onnx",
                fp16.stat().st_size,
                f"rel. err {report.relative_error:.1e}",
                classifier=spec,
                path=fp16,
            )
        )
        console.log(f"FP16 ONNX verified: relative error {report.relative_error:.1e}")
    if options.int8:
        artifacts.append(_int8(source, options, labels, fp32, scratch, base, console))
    if options.tensorrt:
        artifacts.append(_tensorrt(options, fp32, scratch, base, console, artifacts))
    if options.measure_latency:
        with console.status("measuring latency..."):
            for artifact in artifacts:
                if artifact.file == "model.onnx":
                    artifact.latency_ms = onnx_export.measure_latency_ms(artifact.path, crop)
    return artifacts


@contextlib.contextmanager
def _scratch_space(scratch: Path) -> Iterator[None]:
    """A full scratch disk as one line that names it: the repository is often on another disk, and a bare
    "No space left on device" sent users to look there."""
    try:
        yield
    except Exception as error:
        cause = cli.files.os_error_behind(error)
        # ONNX Runtime's quantizer keeps its own temporary files beside the scratch folder, under TMPDIR too
        where = None if cause is None or cause.filename is None else Path(cause.filename)
        if (
            cause is None
            or cause.errno not in DISK_FULL
            or (where and not where.is_relative_to(scratch.parent))
        ):
            raise
        raise ExportError(
            f"cannot write the export's scratch files in {scratch.parent} (TMPDIR): {cause.strerror}; free space "
            "there or point TMPDIR at a larger disk (nothing was published)"
        ) from error


def _int8(source, options, labels, fp32, scratch, base, console) -> Artifact:
    skipped = Unreadable()
    with _progress(console) as progress:
        int8 = quantize_int8(
            fp32,
            scratch / "int8.onnx",
            options.calib_data,
            source.spec,
            options.quantize,
            progress=progress,
            unreadable=skipped,
        )
    if skipped:
        console.log(f"[yellow]calibration: {skipped.summary()}[/yellow]")
    if options.eval_data:
        with _progress(console) as progress:
            accuracy = check_accuracy_budget(
                fp32,
                int8,
                options.eval_data,
                source.spec,
                classes=labels,
                max_drop=options.max_accuracy_drop,
                progress=progress,
            )
        skipped_note = f", {accuracy.unreadable} unreadable skipped" if accuracy.unreadable else ""
        check = (
            f"top-1 {accuracy.int8_top1:.2%} ({-accuracy.drop:+.2f} pt, n={accuracy.images}{skipped_note})"
        )
        console.log(
            f"INT8 accuracy: FP32 {accuracy.fp32_top1:.2%} -> INT8 {accuracy.int8_top1:.2%} on {accuracy.images} images"
            f"{skipped_note}"
        )
    else:
        # No labels: agreement with FP32 on the calibration images is the best evidence available.
        samples = [(path, 0) for path in image_files(options.calib_data)[:64]]
        agreement = _agreement(fp32, int8, samples, source.spec)
        check = f"agrees with FP32 on {agreement:.0%} (no --eval-data)"
        console.log(
            f"INT8: no --eval-data, accuracy budget not checked; top-1 agreement with FP32 {agreement:.0%}"
        )
    spec = replace(
        base,
        name=f"{options.name}_int8",
        precision="int8",
        tensorrt_precision="INT8" if options.target == "gpu" else None,
    )
    return Artifact(spec.name, "int8", "model.onnx", int8.stat().st_size, check, classifier=spec, path=int8)


@contextlib.contextmanager
def _progress(console: Console):
    """A factory of rich progress bars (description, total) -> advance(n), shown on `console`."""
    with Progress(
        *Progress.get_default_columns(),
        MofNCompleteColumn(),
        console=console,
        transient=False,
        disable=console.quiet,
    ) as bars:

        def factory(description: str, total: int):
            task = bars.add_task(description, total=total)
            return lambda n: bars.advance(task, n)

        yield factory


def _agreement(fp32: Path, int8: Path, samples, spec) -> float:
    import numpy as np

    from export.quantize import batches

    a, b = onnx_export.session(fp32), onnx_export.session(int8)
    same = total = 0
    for batch in batches(
        [p for p, _ in samples], spec, 16, Unreadable()
    ):  # agreement of those that can be read
        left = a.run([onnx_export.OUTPUT_NAME], {onnx_export.INPUT_NAME: batch})[0].argmax(1)
        right = b.run([onnx_export.OUTPUT_NAME], {onnx_export.INPUT_NAME: batch})[0].argmax(1)
        same, total = same + int(np.sum(left == right)), total + len(batch)
    return same / max(total, 1)


def _tensorrt(options, fp32, scratch, base, console, artifacts) -> Artifact:
    source_onnx = next((a.path for a in artifacts if a.precision == "int8"), fp32)
    with console.status("building the TensorRT engine..."):
        plan = build_plan(
            source_onnx,
            scratch / "model.plan",
            base.preprocess.crop,
            options.batching.max_batch_size,
            fp16=options.fp16,
            int8=options.int8,
            timing_cache=options.repository / ".tensorrt_timing_cache",
        )
    precision = "int8" if options.int8 else "fp16" if options.fp16 else "fp32"
    spec = replace(
        base, name=f"{options.name}_trt", precision=precision, runtime="tensorrt", tensorrt_precision=None
    )
    return Artifact(
        spec.name, precision, "model.plan", plan.stat().st_size, "TensorRT build", classifier=spec, path=plan
    )


def _publish(
    artifacts: list[Artifact],
    labels: list[str],
    source: ModelSource,
    options: ExportOptions,
    console: Console,
) -> None:
    root = options.repository
    with repo.Publication(root, log=console.log) as publication:
        # again, under the lock: an export that published meanwhile may have changed what the name serves
        check_served_contract(options, source, labels)
        for artifact in artifacts:
            files: dict[str, Path | bytes] = {artifact.file: artifact.path}
            if options.target == "cpu":
                files["model.py"] = repo.CLASSIFIER_MODEL_PY
            config = repo.classifier_config(artifact.classifier)
            artifact.version = publication.add(root / artifact.model, files, config, labels)
        if options.pipeline:
            _publish_pipelines(publication, artifacts, labels, source, options)
        publication.prune(options.keep_versions)


def _publish_pipelines(
    publication: repo.Publication,
    artifacts: list[Artifact],
    labels: list[str],
    source: ModelSource,
    options: ExportOptions,
) -> None:
    preprocess_name = options.name + PREPROCESS_SUFFIX
    config = repo.preprocess_config(preprocess_name, source.arch, source.spec, options.batching)
    publication.add(options.repository / preprocess_name, {"model.py": repo.PREPROCESS_MODEL_PY}, config)
    for artifact in artifacts:
        name = artifact.model + PIPELINE_SUFFIX
        config = repo.pipeline_config(name, artifact.classifier, preprocess_name)
        # An ensemble's version folder holds nothing but must exist; git keeps no empty folder, so it gets an empty
        # .gitkeep (Triton ignores it), and a repository committed to git still loads.
        publication.add(options.repository / name, {".gitkeep": b""}, config, labels)


def summary_table(artifacts: list[Artifact], repository: Path) -> Table:
    table = Table(title=f"Published to {repository}")
    for column in ("model", "version", "precision", "file", "size", "check", "latency (batch 1)"):
        table.add_column(column)
    for a in artifacts:
        latency = f"{a.latency_ms:.1f} ms" if a.latency_ms is not None else "-"
        table.add_row(
            a.model, str(a.version), a.precision, a.file, f"{a.size_bytes / 1e6:.1f} MB", a.check, latency
        )
    return table
