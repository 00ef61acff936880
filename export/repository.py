"""The Triton model repository writer: config.pbtxt from Triton's protobuf schema, atomic versions, pruning.

Configs are `tritonclient.grpc.model_config_pb2.ModelConfig` messages written with `google.protobuf.text_format`
and parsed back before they are written, so a config Triton would reject never reaches the disk.
Publishing writes a version into a hidden folder beside the model and renames it into place: Triton (or a
gateway) polling the repository sees either no version or a complete one, and a published version is never
overwritten. `Publication` publishes the models of one export together or not at all, holding the repository's
lock file so that two exports publish one after the other.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

import cli.files
from export.errors import RepositoryError
from server.spec import (
    ARCH_KEY,
    IMAGE_INPUT_NAME,
    INPUT_NAME,
    LABELS_FILENAME,
    OUTPUT_NAME,
    PRECISION_KEY,
    ROLE_KEY,
    PreprocessSpec,
    Role,
    SpecError,
)

CONFIG_FILENAME = "config.pbtxt"
PARTIAL_PREFIX = ".partial-"
SHARED_DIR_MODE = 0o755
TRITON_MODELS_DIR = Path(__file__).with_name("triton_models")
CLASSIFIER_MODEL_PY = TRITON_MODELS_DIR / "onnx_classifier.py"
PREPROCESS_MODEL_PY = TRITON_MODELS_DIR / "preprocess.py"
THREADS_KEY = "onnxruntime.intra_op_num_threads"
SPINNING_KEY = "onnxruntime.allow_spinning"
STALE_PARTIAL_S = 3600
# Triton and the gateway load folders only: a file at the top of the repository is ignored by both
LOCK_FILENAME = ".resnet-export.lock"
JOURNAL_FILENAME = ".resnet-export.journal"
LOCK_WAIT_S = 600.0  # publishing takes seconds; a holder this long is stuck, and is named
LOCK_POLL_S = 0.1


@dataclass(frozen=True)
class BatchingPolicy:
    max_batch_size: int = 32
    max_queue_delay_us: int = 2000
    max_queue_size: int = 256  # requests beyond this are rejected at once instead of queueing without bound
    queue_timeout_us: int = 5_000_000  # a request waiting longer is rejected (Triton answers UNAVAILABLE)
    instances: int = 1


@dataclass(frozen=True)
class ClassifierSpec:
    """What a classifier model's config needs to say."""

    name: str
    arch: str
    precision: str  # fp32 | fp16 | int8
    num_classes: int
    preprocess: PreprocessSpec
    target: str = (
        "cpu"  # cpu: Python backend + ONNX Runtime; gpu: onnxruntime_onnx / tensorrt_plan on KIND_GPU
    )
    runtime: str = "onnx"  # onnx | tensorrt
    batching: BatchingPolicy = field(default_factory=BatchingPolicy)
    tensorrt_precision: str | None = (
        None  # gpu onnx: TensorRT execution accelerator precision_mode (FP16/INT8)
    )
    cpu_threads: int = 0  # ONNX Runtime intra-op threads in the Python backend (0: ORT's default)


def _parameters(config: mc.ModelConfig, values: Mapping[str, str]) -> None:
    for key, value in values.items():
        config.parameters[key].string_value = str(value)


def _dynamic_batching(config: mc.ModelConfig, batching: BatchingPolicy) -> None:
    config.max_batch_size = batching.max_batch_size
    config.dynamic_batching.max_queue_delay_microseconds = batching.max_queue_delay_us
    policy = config.dynamic_batching.default_queue_policy
    policy.max_queue_size = batching.max_queue_size
    policy.default_timeout_microseconds = batching.queue_timeout_us
    policy.timeout_action = mc.ModelQueuePolicy.REJECT


def classifier_config(spec: ClassifierSpec) -> mc.ModelConfig:
    crop = spec.preprocess.crop
    config = mc.ModelConfig(name=spec.name)
    _dynamic_batching(config, spec.batching)
    config.input.add(name=INPUT_NAME, data_type=mc.TYPE_FP32, dims=[3, crop, crop])
    config.output.add(
        name=OUTPUT_NAME, data_type=mc.TYPE_FP32, dims=[spec.num_classes], label_filename=LABELS_FILENAME
    )
    config.version_policy.latest.num_versions = 1
    gpu = spec.target == "gpu"
    config.instance_group.add(
        count=spec.batching.instances,
        kind=mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU,
    )
    if spec.target == "cpu":
        config.backend = "python"
        _parameters(config, {THREADS_KEY: str(spec.cpu_threads), SPINNING_KEY: "0"})
    elif spec.target != "gpu":
        raise RepositoryError(f"unknown target {spec.target!r} (cpu or gpu)")
    elif spec.runtime == "tensorrt":
        config.platform = "tensorrt_plan"
        config.default_model_filename = "model.plan"
    else:
        config.platform = "onnxruntime_onnx"
        config.default_model_filename = "model.onnx"
        if spec.tensorrt_precision:
            accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add(
                name="tensorrt"
            )
            accelerator.parameters["precision_mode"] = spec.tensorrt_precision
            accelerator.parameters["max_workspace_size_bytes"] = str(1 << 30)
            accelerator.parameters["trt_engine_cache_enable"] = "1"
    warmup = config.model_warmup.add(name="zeros_batch_1", batch_size=1)
    warmup.inputs[INPUT_NAME].data_type = mc.TYPE_FP32
    warmup.inputs[INPUT_NAME].dims.extend([3, crop, crop])
    warmup.inputs[INPUT_NAME].zero_data = True
    _parameters(config, {ROLE_KEY: Role.CLASSIFIER, ARCH_KEY: spec.arch, PRECISION_KEY: spec.precision})
    _parameters(config, spec.preprocess.to_parameters())
    return config


def preprocess_config(
    name: str, arch: str, preprocess: PreprocessSpec, batching: BatchingPolicy
) -> mc.ModelConfig:
    config = mc.ModelConfig(name=name, backend="python")
    _dynamic_batching(config, batching)
    config.input.add(name=IMAGE_INPUT_NAME, data_type=mc.TYPE_STRING, dims=[1])
    config.output.add(name=INPUT_NAME, data_type=mc.TYPE_FP32, dims=[3, preprocess.crop, preprocess.crop])
    config.instance_group.add(count=batching.instances, kind=mc.ModelInstanceGroup.KIND_CPU)
    config.version_policy.latest.num_versions = 1
    _parameters(config, {ROLE_KEY: Role.PREPROCESS, ARCH_KEY: arch})
    _parameters(config, preprocess.to_parameters())
    return config


def pipeline_config(name: str, classifier: ClassifierSpec, preprocess_model: str) -> mc.ModelConfig:
    """Ensemble: encoded image bytes -> preprocess model -> classifier -> logits (with labels)."""
    config = mc.ModelConfig(name=name, platform="ensemble", max_batch_size=classifier.batching.max_batch_size)
    config.input.add(name=IMAGE_INPUT_NAME, data_type=mc.TYPE_STRING, dims=[1])
    config.output.add(
        name=OUTPUT_NAME,
        data_type=mc.TYPE_FP32,
        dims=[classifier.num_classes],
        label_filename=LABELS_FILENAME,
    )
    steps = config.ensemble_scheduling.step
    first = steps.add(model_name=preprocess_model, model_version=-1)
    first.input_map[IMAGE_INPUT_NAME] = IMAGE_INPUT_NAME
    first.output_map[INPUT_NAME] = "preprocessed"
    second = steps.add(model_name=classifier.name, model_version=-1)
    second.input_map[INPUT_NAME] = "preprocessed"
    second.output_map[OUTPUT_NAME] = OUTPUT_NAME
    _parameters(
        config, {ROLE_KEY: Role.PIPELINE, ARCH_KEY: classifier.arch, PRECISION_KEY: classifier.precision}
    )
    _parameters(config, classifier.preprocess.to_parameters())
    return config


# --- files -------------------------------------------------------------------------------------------------


def config_text(config: mc.ModelConfig) -> str:
    text = text_format.MessageToString(config)
    if read_config_text(text) != config:  # what Triton will parse must be what we built
        raise RepositoryError(f"config for {config.name} does not round-trip through text_format")
    return text


def read_config_text(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


def read_config(model_dir: Path) -> mc.ModelConfig:
    path = model_dir / CONFIG_FILENAME
    try:
        return read_config_text(path.read_text())
    except (OSError, text_format.ParseError) as error:
        raise RepositoryError(f"cannot read {path}: {error}") from error


def atomic_write_text(path: Path, text: str) -> None:
    # named .partial-*: pruning removes what a writer killed mid-write left
    cli.files.atomic_write_text(path, text, prefix=PARTIAL_PREFIX)


def write_model(model_dir: Path, config: mc.ModelConfig, labels: list[str] | None = None) -> None:
    """config.pbtxt (and labels.txt) of one model, each replaced atomically."""
    if config.name != model_dir.name:
        raise RepositoryError(f"config name {config.name!r} must equal its folder name {model_dir.name!r}")
    if labels is not None:
        atomic_write_text(model_dir / LABELS_FILENAME, "".join(f"{label}\n" for label in labels))
    atomic_write_text(model_dir / CONFIG_FILENAME, config_text(config))


def class_index_labels(num_classes: int) -> list[str]:
    """The labels export writes when nothing names the classes: class_0, class_1, ..."""
    return [f"class_{index}" for index in range(num_classes)]


def served_preprocessing(model_dir: Path) -> tuple[PreprocessSpec, list[str] | None]:
    """The preprocessing a published model is served with (its config's parameters) and its class names, None
    where labels.txt is missing or holds only class_N indexes."""
    parameters = {key: value.string_value for key, value in read_config(model_dir).parameters.items()}
    try:
        spec = PreprocessSpec.from_parameters(parameters)
    except SpecError as error:
        raise RepositoryError(f"{model_dir / CONFIG_FILENAME}: {error}") from None
    path = model_dir / LABELS_FILENAME
    labels = path.read_text().splitlines() if path.is_file() else []
    return spec, labels if labels and labels != class_index_labels(len(labels)) else None


def shared_contract_change(model_dir: Path, spec: PreprocessSpec, labels: list[str]) -> str | None:
    """What publishing a classifier with `spec` and `labels` into `model_dir` would change that its versions on
    disk share (config.pbtxt's input, output and preprocessing, and labels.txt), None when nothing.

    Every version of a model is served with the one config and labels file: a new version with other classes or
    other preprocessing would make the versions kept for rollback answer with the wrong names, or not load.
    """
    if not versions(model_dir) or not (model_dir / CONFIG_FILENAME).is_file():
        return None
    try:
        served_spec, served_labels = served_preprocessing(model_dir)
        outputs = {tensor.name: tensor for tensor in read_config(model_dir).output}
    except RepositoryError:  # a config no server can read: re-exporting is how it gets repaired
        return None
    served_classes = int(outputs[OUTPUT_NAME].dims[-1]) if OUTPUT_NAME in outputs else None
    if served_classes is not None and served_classes != len(labels):
        return f"{served_classes} classes -> {len(labels)}"
    if served_labels is not None and served_labels != labels:
        renamed = [f"{old} -> {new}" for old, new in zip(served_labels, labels, strict=True) if old != new]
        more = f" and {len(renamed) - 3} more" if len(renamed) > 3 else ""
        return "class names " + ", ".join(renamed[:3]) + more
    changed = [
        f"{key} {old} -> {new}"
        for (key, old), new in zip(served_spec.to_dict().items(), spec.to_dict().values(), strict=True)
        if old != new
    ]
    return "preprocessing " + ", ".join(changed) if changed else None


def versions(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    return sorted(
        int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0
    )


def publish_version(model_dir: Path, files: Mapping[str, Path | bytes | str]) -> int:
    """Copy `files` ({name in version folder: source path or contents}) into a new version folder, atomically.

    The folder is filled under a hidden name beside the versions and renamed to the next free number; an
    existing version is never touched. Returns the version number.
    """
    new_model = not model_dir.exists()
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=model_dir, prefix=PARTIAL_PREFIX))
    try:
        for name, source in files.items():
            target = staging / name
            if isinstance(source, Path):
                shutil.copyfile(source, target)
            else:
                target.write_bytes(source.encode() if isinstance(source, str) else source)
            with open(target, "rb") as handle:
                os.fsync(handle.fileno())
        staging.chmod(SHARED_DIR_MODE)  # mkdtemp's 0700 would hide the version from other users
        return _rename_into_place(staging, model_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        # a first publish that failed: an empty model folder left behind stops Triton ("Could not determine
        # backend for model"); rmdir leaves a folder that holds anything
        if new_model:
            with contextlib.suppress(OSError):
                model_dir.rmdir()


def _rename_into_place(staging: Path, model_dir: Path) -> int:
    for _ in range(100):
        version = max(versions(model_dir), default=0) + 1
        target = model_dir / str(version)
        if target.exists():
            continue
        try:
            # rename(2) is atomic, and fails rather than replace a non-empty folder a concurrent publish made.
            os.rename(staging, target)
        except OSError as error:
            if error.errno in (errno.ENOTEMPTY, errno.EEXIST):
                continue
            raise
        return version
    raise RepositoryError(f"could not claim a new version number in {model_dir}")


def prune_versions(model_dir: Path, keep: int) -> list[int]:
    """Delete all but the newest `keep` versions (and leftovers of crashed publishes); returns the removed."""
    if keep < 1:
        raise RepositoryError("--keep-versions must be at least 1")
    removed = versions(model_dir)[:-keep]
    for version in removed:
        shutil.rmtree(model_dir / str(version))
    for leftover in model_dir.glob(PARTIAL_PREFIX + "*"):
        if time.time() - leftover.stat().st_mtime > STALE_PARTIAL_S:
            with contextlib.suppress(OSError):
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    return removed


@dataclass
class Journal:
    """What undoing a publish in progress takes, in the repository before each step of it. An export killed midway
    (SIGKILL, the OOM killer, a lost machine) cannot undo itself; the next one, holding the lock the killed one
    held, finds its journal and undoes it (`Publication`)."""

    holder: str
    # the model folders it made; each model's versions before its new one; <model>/<file> -> the text it replaced
    # (None where there was no file)
    new_models: list[str] = field(default_factory=list)
    versions_before: dict[str, list[int]] = field(default_factory=dict)
    replaced: dict[str, str | None] = field(default_factory=dict)

    def save(self, repository: Path) -> None:
        cli.files.atomic_write_text(repository / JOURNAL_FILENAME, json.dumps(asdict(self), indent=1))

    @staticmethod
    def remove(repository: Path) -> None:
        """The publish it records is over: published, or undone (or to be mended by hand, as an error says)."""
        (repository / JOURNAL_FILENAME).unlink(missing_ok=True)

    @classmethod
    def load(cls, repository: Path) -> Journal | None:
        path = repository / JOURNAL_FILENAME
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as error:
            raise RepositoryError(
                f"cannot read {path} ({_reason(error)}), the record of an export that was killed while publishing: "
                "check that the repository holds what you want served, then remove it"
            ) from error

    def undo(self, repository: Path) -> list[str]:
        """Newest versions first (they free the space a restore may need); returns what could not be undone."""
        failures: list[str] = []
        for model, before in reversed(self.versions_before.items()):
            for version in reversed(versions(repository / model)):
                if version not in before:
                    _remove_tree(repository / model / str(version), failures)
        for name, text in self.replaced.items():
            path = repository / name
            if path.parent.name in self.new_models:
                continue
            try:
                if (path.read_text() if path.is_file() else None) == text:
                    continue  # never written (the step failed first): no write to fail on a full disk
                if text is not None:
                    atomic_write_text(path, text)
                else:
                    path.unlink()
            except OSError as error:
                failures.append(f"{path}: {_reason(error)}")
        for model in self.new_models:
            _remove_tree(repository / model, failures)
        return failures


def publishing_unfinished(repository: Path) -> bool:
    """An export is publishing into `repository`, or was killed while it did (its `Journal` is there)."""
    return (repository / JOURNAL_FILENAME).is_file()


def unfinished_publish_warning(repository: Path) -> str | None:
    """For a server about to load `repository`: what an unfinished publish there means, None where there is none."""
    if not publishing_unfinished(repository):
        return None
    try:
        journal = Journal.load(repository)
    except RepositoryError as error:
        return str(error)
    if journal is None:  # it finished meanwhile
        return None
    return (
        f"an export ({journal.holder}) is publishing into {repository}, or was killed while it did: "
        f"{', '.join(journal.versions_before)} may be half published; `resnet export --repository {repository} "
        "--undo-unfinished` undoes what a killed one left, as the next export into it does"
    )


class Publication:
    """The models one export adds to a repository, published together or not at all.

    Each model is published as before (a new version renamed into place, then its config.pbtxt and labels.txt);
    if any step fails (a disk that fills after the first model), every step before it is undone: its new versions
    removed, the files it replaced restored, the model folders it made deleted. A half-published export is a
    repository no one chose, and a model folder holding a version but no config.pbtxt stops Triton from starting
    ("unable to find backend library"). Pruning waits for `prune`, after all are in, so an undo never needs a
    version that pruning took: from `prune` on, the export is published and nothing of it is undone. The next
    export takes an undone version's number again: a server that polled in the moment it existed sees new files
    under it, which it reloads as it does any change.

    From `with` to its end it holds the repository's lock (`hold_repository`): two exports publishing one model at
    once wrote its one config.pbtxt and labels.txt in turns, so that one's version could be served with the other's
    class names, and one's undo could restore files the other had just written. Each step is recorded in the
    repository's `Journal` before it is taken, and an export killed midway is undone by the next one, when it has
    the lock. `log` hears of both (a wait, an undo).
    """

    def __init__(self, repository: Path, log: Callable[[str], object] = lambda message: None) -> None:
        self.repository = repository
        self.log = log
        self.models: list[Path] = []
        self._lock: BinaryIO | None = None
        self._journal = Journal(holder="")
        self._published = False
        self.undid_killed_export = False

    def add(
        self,
        model_dir: Path,
        files: Mapping[str, Path | bytes | str],
        config: mc.ModelConfig,
        labels: list[str] | None = None,
    ) -> int:
        """`files` as a new version of `model_dir`, served with `config` and `labels`; returns the version."""
        self.models.append(model_dir)
        journal, model = self._journal, model_dir.name
        if not model_dir.exists():
            journal.new_models.append(model)
        journal.versions_before[model] = versions(model_dir)
        written = [CONFIG_FILENAME] + ([LABELS_FILENAME] if labels is not None else [])
        for path in (model_dir / name for name in written):
            journal.replaced.setdefault(f"{model}/{path.name}", path.read_text() if path.is_file() else None)
        journal.save(self.repository)
        version = publish_version(model_dir, files)
        write_model(model_dir, config, labels)
        return version

    def prune(self, keep: int) -> None:
        """After the last `add`, under the lock still: another export's undo may need a version pruned meanwhile."""
        self._published = True
        # a kill from here on leaves the export published
        Journal.remove(self.repository)
        for model_dir in self.models:
            try:
                prune_versions(model_dir, keep)
            except OSError as error:
                raise RepositoryError(
                    f"this export is published, but the versions of {model_dir.name} beyond the newest {keep} cannot "
                    f"be removed: {_reason(error)}; the newest is served, remove the others by hand"
                ) from error

    def __enter__(self) -> Publication:
        self._lock = hold_repository(self.repository, self.log)
        try:
            self._undo_a_killed_export()
        except BaseException:
            self._release()
            raise
        self._journal = Journal(holder=cli.files.this_process())
        return self

    def __exit__(self, kind, error, traceback) -> None:
        try:
            self._finish(error)
        finally:
            self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.close()

    def _undo_a_killed_export(self) -> None:
        journal = Journal.load(self.repository)
        if journal is None:
            return
        failures = journal.undo(self.repository)
        if failures:
            raise RepositoryError(
                f"an export ({journal.holder}) was killed while publishing into {self.repository}, and undoing it "
                f"failed ({'; '.join(failures)}): fix that, or remove {self.repository / JOURNAL_FILENAME} once the "
                "repository holds what you want served, and export again"
            )
        Journal.remove(self.repository)
        self.undid_killed_export = True
        self.log(
            f"undid an export ({journal.holder}) killed while publishing into {self.repository} "
            f"({', '.join(journal.versions_before)}): the repository is as it was before it"
        )

    def _finish(self, error: BaseException | None) -> None:
        if error is None or self._published:
            Journal.remove(self.repository)
            return
        step = self.models[-1].name if self.models else "a model"
        undo_failures = self._journal.undo(self.repository)
        Journal.remove(self.repository)  # no later export is to undo it again
        if undo_failures:
            raise RepositoryError(
                f"cannot publish {step} into {self.repository}: {_reason(error)}; undoing the export failed too "
                f"({'; '.join(undo_failures)}): remove what is named there before Triton next starts"
            ) from error
        if isinstance(error, OSError):
            raise RepositoryError(
                f"cannot publish {step} into {self.repository}: {_reason(error)}; nothing of this export is "
                "published (the repository is as it was), so fix the cause and export again"
            ) from error


def undo_killed_export(repository: Path, log: Callable[[str], object]) -> bool:
    """Undo what an export killed while publishing into `repository` left, without publishing anything (after
    waiting for one that is still publishing); whether there was one."""
    with Publication(repository, log) as publication:
        return publication.undid_killed_export


def hold_repository(
    repository: Path, log: Callable[[str], object], wait_s: float = LOCK_WAIT_S
) -> BinaryIO | None:
    """The repository's lock file, locked: waits while another export holds it (saying so to `log`), `wait_s` at
    most. None where the file system has no locks (publishing goes on, unguarded, as before there was a lock)."""
    try:
        repository.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RepositoryError(f"cannot make the repository {repository}: {_reason(error)}") from error
    path = repository / LOCK_FILENAME
    deadline = time.monotonic() + wait_s
    waiting = False
    while True:
        try:
            lock = cli.files.try_lock(path)
        except cli.files.LockHeld as held:
            if time.monotonic() >= deadline:
                raise RepositoryError(
                    f"{path} is still held by another export ({held.holder}) after {wait_s:g} s of waiting, and "
                    "publishing takes seconds: it is likely stuck; stop it (its lock goes with it) and export again "
                    "(nothing of this export is published)"
                ) from None
            if not waiting:
                log(f"waiting for another export to finish publishing into {repository} ({held.holder})")
                waiting = True
            time.sleep(LOCK_POLL_S)
        except OSError as error:
            raise RepositoryError(f"cannot open {path}: {_reason(error)}") from error
        else:
            if lock is None:
                print(f"warning: cannot lock {path} (its file system has no locks)", file=sys.stderr)
            return lock


def _remove_tree(path: Path, failures: list[str]) -> None:
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as error:
        failures.append(f"{path}: {_reason(error)}")


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError):
        return error.strerror or str(error)
    return str(error) or type(error).__name__
