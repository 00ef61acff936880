"""Inference backends behind one interface: embedded ONNX Runtime (default) or a Triton Inference Server.

A backend discovers the classifier models it serves (`ModelInfo`, read from the model repository or from Triton's
config API) and runs already-preprocessed batches: `await backend.infer(info, batch) -> (logits, version)`.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import itertools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2 as mc

from cli.tls import client_context, handshake_hint
from server.batching import Inference
from server.certificates import WatchedFiles
from server.errors import (
    GRPC_AT_HTTP_PORT,
    BackendUnavailable,
    DeadlineExceeded,
    InvalidInput,
    ModelNotFound,
    Overloaded,
)
from server.settings import Settings
from server.spec import (
    INPUT_NAME,
    LABELS_FILENAME,
    OUTPUT_NAME,
    PIPELINE_SUFFIX,
    PREPROCESS_SUFFIX,
    ROLE_KEY,
    PreprocessSpec,
    Role,
    SpecError,
)

log = logging.getLogger("resnet.server")
CONFIG_FILENAME = "config.pbtxt"
UNLOADED = "unloaded"  # Triton's reason for a model unloaded on request: not a failure
ONNX_FILENAME = "model.onnx"
# Execution providers in order of preference; the first ones ONNX Runtime offers here are used.
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


@dataclass
class ModelInfo:
    name: str
    version: str
    spec: PreprocessSpec
    labels: list[str]
    max_batch_size: int
    input_shape: tuple[int, int, int]
    num_classes: int
    # Which load of it (the embedded backend counts them): a version number comes back after a rollback (its
    # folder deleted) or an undone export, and each load must keep its own session.
    load: int = 0


class ConfigError(Exception):
    """A repository entry the gateway skips (logged, never fatal)."""


def read_labels(model_dir: Path, num_classes: int) -> list[str]:
    path = model_dir / LABELS_FILENAME
    labels = path.read_text().splitlines() if path.is_file() else []
    if len(labels) != num_classes:
        if labels:
            log.warning(
                "%s has %d labels for %d classes; using class indexes", path, len(labels), num_classes
            )
        return [str(index) for index in range(num_classes)]
    return labels


def model_info(
    config: mc.ModelConfig, version: str, labels_dir: Path | None, max_batch_size: int
) -> ModelInfo:
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    try:
        spec = PreprocessSpec.from_parameters(parameters)
    except SpecError as error:
        raise ConfigError(f"{config.name}: {error}") from error
    inputs = {tensor.name: tensor for tensor in config.input}
    outputs = {tensor.name: tensor for tensor in config.output}
    if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
        raise ConfigError(f"{config.name}: expected tensors {INPUT_NAME!r} -> {OUTPUT_NAME!r}")
    dims = tuple(int(d) for d in inputs[INPUT_NAME].dims)
    num_classes = int(outputs[OUTPUT_NAME].dims[-1])
    labels = read_labels(labels_dir, num_classes) if labels_dir else [str(i) for i in range(num_classes)]
    model_max = config.max_batch_size or 1
    return ModelInfo(config.name, version, spec, labels, min(model_max, max_batch_size), dims, num_classes)  # type: ignore[arg-type]


def check_onnx_fits(session, info: ModelInfo) -> None:
    """Refuse a model.onnx whose tensors disagree with its config: a model exported for other classes or another
    input size, left beside a config rewritten for a newer version, would fail every request instead."""
    onnx_shape = tuple(session.get_inputs()[0].shape[1:])
    if onnx_shape != info.input_shape:
        raise ConfigError(f"model.onnx takes {onnx_shape}, config says {info.input_shape}")
    width = session.get_outputs()[0].shape[-1]
    if isinstance(width, int) and width != info.num_classes:
        raise ConfigError(f"model.onnx gives {width} classes, config and labels say {info.num_classes}")


# what reading a model's config.pbtxt may raise: missing or unreadable, or not a ModelConfig
CONFIG_ERRORS = (OSError, text_format.ParseError)


def read_model_config(model_dir: Path) -> mc.ModelConfig:
    return text_format.Parse((model_dir / CONFIG_FILENAME).read_text(), mc.ModelConfig())


def is_classifier(config: mc.ModelConfig) -> bool:
    role = config.parameters[ROLE_KEY].string_value if ROLE_KEY in config.parameters else Role.CLASSIFIER
    return role == Role.CLASSIFIER


@dataclass(frozen=True)
class LoadFailure:
    """A classifier of the repository the gateway cannot serve: the version it tried, and why (one line)."""

    version: str
    reason: str


@dataclass(frozen=True)
class TritonIndex:
    """Triton's repository index, as the gateway reads it."""

    # each model with a READY version, and the highest one: what Triton runs for a request that names no version
    # (during a reload, or under a policy that serves several, more than one is READY)
    ready: dict[str, str]
    # each model whose highest version that Triton tried to load is UNAVAILABLE, and Triton's reason
    failed: dict[str, LoadFailure]


class Backend(abc.ABC):
    name = "backend"
    # why it is not ready, in one line, for /readyz and the log (the registry clears it when ready)
    problem = ""

    def __init__(self) -> None:
        # the classifiers the last start() found but could not serve, by name
        self.failures: dict[str, LoadFailure] = {}

    @abc.abstractmethod
    async def start(self) -> list[ModelInfo]:
        """Connect / load; returns the models found (possibly none yet for a remote backend that is down), and
        sets `failures`."""
        ...

    @abc.abstractmethod
    async def infer(self, info: ModelInfo, batch: np.ndarray, deadline: float) -> Inference:
        """The batch's logits, and the version that computed them."""

    async def ready(self) -> bool:
        return True

    async def models_changed(self) -> bool:
        """Whether start() would now find other models or versions than it last did."""
        return False

    async def retire(self, info: ModelInfo) -> None:
        """`info`'s model is no longer served as it was (replaced, or gone) and nothing is queued for it."""
        return None

    async def close(self) -> None:
        return None  # a hook: remote backends close their connections


# --- embedded ONNX Runtime ---------------------------------------------------------------------------------


def providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [name for name in PREFERRED_PROVIDERS if name in available] or ["CPUExecutionProvider"]


class EmbeddedBackend(Backend):
    """ONNX Runtime sessions in this process, one per classifier with a model.onnx in its newest version.

    start() again (the registry calls it when `models_changed()`) loads only what changed: a new version, or files
    of the served one rewritten; a model whose new version does not load goes on serving the one it had, as Triton
    does. Sessions are keyed by (name, version, load), so requests queued for the old version finish on it, even
    where the new one has the same number (a rollback, then a re-export).
    """

    name = "embedded"

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings
        self.sessions: dict[tuple[str, str, int], object] = {}
        self._loads = itertools.count(1)
        # One thread per model: ORT parallelises inside a run; concurrent runs would only fight for the cores.
        self.executors: dict[str, concurrent.futures.ThreadPoolExecutor] = {}
        # each model served: the stamps of the files it was loaded from (model_file_stamps), and its info
        self.served: dict[str, tuple[tuple, ModelInfo]] = {}
        self._repository_seen: tuple = ()

    def _scan(self) -> list[tuple[mc.ModelConfig, str, Path]]:
        repository = self.settings.repository
        if not repository.is_dir():
            raise ConfigError(f"model repository not found: {repository.resolve()}")
        found = []
        for model_dir in sorted(p for p in repository.iterdir() if (p / CONFIG_FILENAME).is_file()):
            try:
                config = read_model_config(model_dir)
            except CONFIG_ERRORS as error:
                log.warning("skipping %s: %s", model_dir, error)
                continue
            if not is_classifier(config):
                continue
            versions = sorted(
                (
                    int(p.name)
                    for p in model_dir.iterdir()
                    if p.name.isdigit() and (p / ONNX_FILENAME).is_file()
                ),
                reverse=True,
            )
            if not versions:
                log.warning("skipping %s: no version folder with %s", model_dir.name, ONNX_FILENAME)
                continue
            config.name = config.name or model_dir.name
            found.append((config, str(versions[0]), model_dir))
        return found

    def _load(self, config: mc.ModelConfig, version: str, model_dir: Path) -> ModelInfo:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.settings.intra_op_threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # ORT's workers spin between runs by default; here they would steal the cores that decode images and run
        # the event loop (measured: 2.4 -> 1.5 ms of gateway CPU per ResNet-20 image with spinning off).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        path = str(model_dir / version / ONNX_FILENAME)
        try:
            session = ort.InferenceSession(path, options, providers=providers())
        except Exception as error:  # noqa: BLE001 - e.g. a CUDA/TensorRT provider whose libraries are missing
            if providers() == ["CPUExecutionProvider"]:
                raise
            log.warning("%s: GPU execution providers failed (%s); using the CPU", config.name, error)
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        info = model_info(config, version, model_dir, self.settings.max_batch_size)
        check_onnx_fits(session, info)
        info.load = next(self._loads)
        self.sessions[_session_key(info)] = session
        if info.name not in self.executors:
            self.executors[info.name] = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix=f"ort-{info.name}"
            )
        log.info(
            "loaded %s version %s (%s) with %s", info.name, version, info.input_shape, session.get_providers()
        )
        return info

    def _repository_state(self) -> tuple:
        """The stamps of every file a model is loaded from, across the repository: what changes when a version is
        published (renamed in), removed, or a file rewritten."""
        repository = self.settings.repository
        if not repository.is_dir():
            return ()
        return tuple(
            stamps
            for model_dir in sorted(repository.iterdir())
            if model_dir.is_dir()
            for stamps in model_file_stamps(
                model_dir, *sorted(p.name for p in model_dir.iterdir() if p.name.isdigit())
            )
        )

    async def models_changed(self) -> bool:
        return await asyncio.to_thread(self._repository_state) != self._repository_seen

    async def start(self) -> list[ModelInfo]:
        # taken before the scan: a change made during it is seen at the next look
        seen = await asyncio.to_thread(self._repository_state)
        infos, failures, served = [], {}, {}
        for config, version, model_dir in await asyncio.to_thread(self._scan):
            stamps = model_file_stamps(model_dir, version)
            before = self.served.get(config.name)
            try:
                if before and before[0] == stamps:  # unchanged: no new session
                    entry = before
                else:
                    entry = (stamps, await asyncio.to_thread(self._load, config, version, model_dir))
            except (ConfigError, Exception) as error:  # noqa: BLE001 - one broken model must not stop the others
                if before is None:
                    log.error("cannot serve %s: %s", config.name, error)
                    failures[config.name] = LoadFailure(version, one_line(error))
                    continue
                log.error(
                    "cannot serve %s version %s, version %s goes on serving: %s",
                    config.name, version, before[1].version, error,
                )  # fmt: skip
                entry = before
            infos.append(entry[1])
            served[config.name] = entry
        self.failures, self.served, self._repository_seen = failures, served, seen
        return infos

    async def retire(self, info: ModelInfo) -> None:
        # Freed once any request still holding the old model is past its deadline: a request being decoded at the
        # switch reaches the backend after it (a replaced batcher runs such a request alone).
        delay = self.settings.request_timeout_s + 1
        asyncio.get_running_loop().call_later(delay, self._free, info)

    def _free(self, info: ModelInfo) -> None:
        still = self.served.get(info.name)
        if still is None or still[1] is not info:
            self.sessions.pop(_session_key(info), None)
        if still is None and info.name in self.executors:
            self.executors.pop(info.name).shutdown(wait=False)

    def _run(self, session, batch: np.ndarray) -> np.ndarray:
        return session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]

    async def infer(self, info: ModelInfo, batch: np.ndarray, deadline: float) -> Inference:
        session = self.sessions[_session_key(info)]  # taken now: the version may be replaced meanwhile
        loop = asyncio.get_running_loop()
        logits = await loop.run_in_executor(self.executors[info.name], self._run, session, batch)
        return Inference(logits, info.version)

    async def close(self) -> None:
        for executor in self.executors.values():
            executor.shutdown(wait=True)
        self.sessions.clear()


def _session_key(info: ModelInfo) -> tuple[str, str, int]:
    return info.name, info.version, info.load


def model_file_stamps(model_dir: Path, *versions: str) -> tuple:
    """(path, modification time, size) of a model's config and labels, and of each version's model.onnx."""
    files = [model_dir / CONFIG_FILENAME, model_dir / LABELS_FILENAME]
    files += [model_dir / version / ONNX_FILENAME for version in versions]
    stamps = []
    for path in files:
        try:
            stat = path.stat()
        except OSError:  # absent (labels are optional), or removed meanwhile: seen as a change
            continue
        stamps.append((str(path), stat.st_mtime_ns, stat.st_size))
    return tuple(stamps)


# --- Triton ------------------------------------------------------------------------------------------------


def triton_problem(error: Exception, settings: Settings) -> str:
    """A failed call to Triton as one line; where the port speaks the other protocol, or TLS explains it, the
    setting that fixes it."""
    text, protocol = str(error).strip(), settings.triton_protocol
    client_cert = settings.triton_key_pair is not None if settings.triton_tls else None
    flags = {"ca_flag": "--triton-ca-cert", "cert_flag": "--triton-client-cert"}
    if hint := handshake_hint(text, client_cert, plain=f"--triton-url {protocol}://HOST:PORT", **flags):
        return one_line(error) + hint
    if protocol == "grpc" and any(sign in text for sign in GRPC_AT_HTTP_PORT):
        return (
            f"{one_line(error)} (if that is Triton's HTTP port, set --triton-protocol http; if it speaks TLS, "
            "give --triton-url as grpcs://HOST:PORT)"
        )
    # aiohttp, reading HTTP/2 frames as a status line (its text holds those bytes)
    if protocol == "http" and "Bad status line" in text:
        return "its answer is not HTTP/1.1 (if that is Triton's gRPC port, set --triton-protocol grpc)"
    return one_line(error)


def _version_number(version: str) -> int:
    return int(version) if version.isdigit() else -1


def one_line(error: Exception) -> str:
    return first_line(str(error)) or type(error).__name__


def first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def grpc_tls(settings: Settings) -> dict:
    """tritonclient.grpc.aio's TLS arguments (it reads the CA file itself; without one, gRPC's bundled roots)."""
    if not settings.triton_tls:
        return {}
    ca_cert = str(settings.triton_ca_cert) if settings.triton_ca_cert else None
    cert, key = (str(path) for path in settings.triton_key_pair) if settings.triton_key_pair else (None, None)
    return {"ssl": True, "root_certificates": ca_cert, "certificate_chain": cert, "private_key": key}


def http_tls(settings: Settings) -> dict:
    """tritonclient.http.aio's (aiohttp's) TLS arguments: an SSLContext."""
    if not settings.triton_tls:
        return {}
    return {"ssl": True, "ssl_context": client_context(settings.triton_ca_cert, settings.triton_key_pair)}


class TritonBackend(Backend):
    """One shared asyncio client (gRPC or HTTP) to Triton; model configs come from Triton's config API.

    gRPC reconnects on its own after Triton restarts; the short reconnect backoff below keeps that within a
    second or two instead of gRPC's default of up to two minutes. Over TLS, renewed CA, certificate or key files
    (`--triton-ca-cert`, `--triton-client-cert`, `--triton-client-key`) are picked up every `ssl_reload_s`, at a
    health check: a new client takes the next calls, the old one closes once its calls are past their deadline.
    """

    name = "triton"

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings
        self._served = TritonIndex({}, {})  # the index the last start() served
        self.protocol = settings.triton_protocol
        if self.protocol == "grpc":
            import tritonclient.grpc.aio as client_module
        else:
            import tritonclient.http.aio as client_module
        self.module = client_module
        self.client = self._new_client()
        from tritonclient.utils import InferenceServerException

        self.exception = InferenceServerException
        tls_files = [settings.triton_ca_cert, *(settings.triton_key_pair or ())]
        self.tls_files = WatchedFiles([path for path in tls_files if path])
        self._next_look = time.monotonic() + settings.ssl_reload_s
        self._retiring: dict[asyncio.Task, object] = {}  # closing later -> the client it closes

    def _new_client(self):
        if self.protocol == "grpc":
            channel_args = [
                ("grpc.max_send_message_length", 256 * 1024 * 1024),
                ("grpc.max_receive_message_length", 256 * 1024 * 1024),
                ("grpc.initial_reconnect_backoff_ms", 250),
                ("grpc.min_reconnect_backoff_ms", 250),
                ("grpc.max_reconnect_backoff_ms", 1000),
                ("grpc.keepalive_time_ms", 10_000),
                ("grpc.keepalive_timeout_ms", 5_000),
            ]
            return self.module.InferenceServerClient(
                self.settings.triton_url, channel_args=channel_args, **grpc_tls(self.settings)
            )
        return self.module.InferenceServerClient(
            self.settings.triton_url, conn_timeout=5.0, **http_tls(self.settings)
        )

    def _look_at_tls_files(self) -> None:
        if (
            not (self.settings.triton_tls and self.settings.ssl_reload_s)
            or time.monotonic() < self._next_look
        ):
            return
        self._next_look = time.monotonic() + self.settings.ssl_reload_s
        self.reload_if_changed()

    def reload_if_changed(self) -> bool:
        """A new client when the TLS files changed and load; True when the next calls use it."""
        if not self.tls_files.changed():
            return False
        try:
            client_context(self.settings.triton_ca_cert, self.settings.triton_key_pair)
        except ValueError as error:
            log.warning("Triton's TLS files changed but do not load, the ones in use are kept: %s", error)
            return False
        retired, self.client = self.client, self._new_client()
        retiring = asyncio.create_task(self._close_later(retired))
        self._retiring[retiring] = retired
        retiring.add_done_callback(lambda done: self._retiring.pop(done, None))
        files = ", ".join(map(str, self.tls_files.paths))
        log.info("Triton's TLS files reloaded (%s): new calls use them", files)
        return True

    async def _close_later(self, client) -> None:
        """Close a replaced client once the calls it carries are past their deadline."""
        await asyncio.sleep(self.settings.request_timeout_s + 1)
        await client.close()

    async def _config(self, name: str) -> mc.ModelConfig:
        if self.protocol == "grpc":
            response = await self.client.get_model_config(name)
            return response.config
        as_dict = await self.client.get_model_config(name)
        return json_format.ParseDict(as_dict, mc.ModelConfig(), ignore_unknown_fields=True)

    async def _index(self) -> TritonIndex:
        if self.protocol == "grpc":
            index = await self.client.get_model_repository_index(as_json=True)
            entries = index.get("models", [])
        else:
            entries = await self.client.get_model_repository_index()
        # in rising version order, so that each model's highest version is the one kept
        entries = sorted(entries, key=lambda entry: _version_number(str(entry.get("version", ""))))
        ready = {e["name"]: str(e.get("version", "")) for e in entries if e.get("state") == "READY"}
        failed = {
            e["name"]: LoadFailure(str(e.get("version", "")), first_line(e["reason"]))
            for e in entries
            if e.get("state") == "UNAVAILABLE" and e.get("reason", UNLOADED) != UNLOADED
        }
        return TritonIndex(ready, failed)

    async def models_changed(self) -> bool:
        return await self._index() != self._served

    def _failures(self, index: TritonIndex) -> dict[str, LoadFailure]:
        """The classifiers Triton could not load and serves no version of; a failed newer version of one it serves
        is logged (Triton keeps the old one serving)."""
        failures = {}
        for name, failure in index.failed.items():
            served = index.ready.get(name)
            if served is None and self._may_be_classifier(name):
                log.error("Triton cannot load %s version %s: %s", name, failure.version, failure.reason)
                failures[name] = failure
            elif served is not None and _version_number(failure.version) > _version_number(served):
                log.error(
                    "Triton cannot load %s version %s, version %s goes on serving: %s",
                    name, failure.version, served, failure.reason,
                )  # fmt: skip
        return failures

    def _may_be_classifier(self, name: str) -> bool:
        # Triton gives no config of a model that did not load: the shared repository's says, else the name
        try:
            return is_classifier(read_model_config(self.settings.repository / name))
        except CONFIG_ERRORS:
            return not name.endswith((PIPELINE_SUFFIX, PREPROCESS_SUFFIX))

    async def start(self) -> list[ModelInfo]:
        infos = []
        index = await self._index()
        failures = self._failures(index)
        for name, version in index.ready.items():
            config = await self._config(name)
            if not is_classifier(config):
                continue
            labels_dir = self.settings.repository / name
            local_labels = (labels_dir / LABELS_FILENAME).is_file()
            try:
                info = model_info(
                    config, version, labels_dir if local_labels else None, self.settings.max_batch_size
                )
            except ConfigError as error:
                log.error("cannot serve %s: %s", name, error)
                failures[name] = LoadFailure(version, one_line(error))
                continue
            if not local_labels:
                info.labels = await self._labels_from_triton(info) or info.labels
            infos.append(info)
        # only now: a start() that failed midway leaves models_changed() true, so the next look tries again
        self.failures, self._served = failures, index
        return infos

    async def _labels_from_triton(self, info: ModelInfo) -> list[str] | None:
        """Labels through Triton's classification extension ("score:index:label"), when the gateway does not
        share the repository's files."""
        tensor = self.module.InferInput(INPUT_NAME, [1, *info.input_shape], "FP32")
        tensor.set_data_from_numpy(np.zeros((1, *info.input_shape), np.float32))
        try:
            result = await self.client.infer(
                info.name,
                [tensor],
                outputs=[self.module.InferRequestedOutput(OUTPUT_NAME, class_count=info.num_classes)],
            )
        except self.exception as error:
            log.warning("cannot read labels of %s from Triton: %s", info.name, error)
            return None
        labels = [str(info_index) for info_index in range(info.num_classes)]
        for entry in result.as_numpy(OUTPUT_NAME).reshape(-1):
            _, index, *label = (entry.decode() if isinstance(entry, bytes) else str(entry)).split(":", 2)
            if label:
                labels[int(index)] = label[0]
        return labels

    async def ready(self) -> bool:
        """Whether Triton is up. Its liveness, not its readiness: with --strict-readiness (the default) Triton is
        not ready while any model loads, a rollout included, though it serves every READY model meanwhile (the
        gateway answered all its requests 503 during each load). Which models serve is its repository index's
        READY entries."""
        self._look_at_tls_files()
        try:
            if self.protocol == "grpc":
                live = bool(await self.client.is_server_live(client_timeout=2))
            else:
                live = bool(await self.client.is_server_live())
        except Exception as error:  # noqa: BLE001 - any failure to answer means not ready
            self.problem = triton_problem(error, self.settings)
            return False
        if not live:
            self.problem = "its /v2/health/live answers not live"
        return live

    async def infer(self, info: ModelInfo, batch: np.ndarray, deadline: float) -> Inference:
        tensor = self.module.InferInput(INPUT_NAME, list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch)
        outputs = [self.module.InferRequestedOutput(OUTPUT_NAME)]
        remaining = max(deadline - time.monotonic(), 0.001)
        try:
            if self.protocol == "grpc":
                result = await self.client.infer(
                    info.name, [tensor], outputs=outputs, client_timeout=remaining
                )
            else:
                result = await asyncio.wait_for(
                    self.client.infer(info.name, [tensor], outputs=outputs), remaining
                )
        except TimeoutError:
            raise DeadlineExceeded("Triton did not answer within the request deadline") from None
        except self.exception as error:
            raise translate_triton_error(error, info.name) from None
        except OSError as error:  # HTTP connection refused / reset
            raise BackendUnavailable(
                f"Triton at {self.settings.triton_url} is unreachable: {error}"
            ) from None
        logits = result.as_numpy(OUTPUT_NAME)
        if logits is None or len(logits) != len(batch):
            raise BackendUnavailable(f"Triton returned no {OUTPUT_NAME!r} for {info.name}")
        return Inference(logits, self._version_of(result) or info.version)

    def _version_of(self, result) -> str:
        """The version Triton ran: a request names none, and Triton serves a new one as soon as it is loaded, up to
        a health interval before the gateway reads its index (answers named the replaced one meanwhile)."""
        response = result.get_response()
        return response.model_version if self.protocol == "grpc" else str(response.get("model_version", ""))

    async def close(self) -> None:
        for retiring, retired in list(self._retiring.items()):
            retiring.cancel()
            await retired.close()
        await self.client.close()


def translate_triton_error(error: Exception, model: str) -> Exception:
    status = str(getattr(error, "status", lambda: "")() or "")
    text = str(getattr(error, "message", lambda: str(error))() or error)
    if "Request for unknown model" in text:
        # unloaded ("has no available versions", "is not found") up to a second before the gateway's next look at
        # Triton's index: the model is gone, not Triton (answered 503 "Triton is unavailable" before, 98 times in
        # one unload under four clients over HTTP)
        return ModelNotFound(f"Triton no longer serves model {model!r}: {text}")
    if "DEADLINE_EXCEEDED" in status or "Deadline Exceeded" in text:
        return DeadlineExceeded("Triton did not answer within the request deadline")
    if "queue size" in text or "RESOURCE_EXHAUSTED" in status:
        return Overloaded(f"Triton is overloaded: {text}")
    if "INVALID_ARG" in status or "unexpected shape" in text:
        return InvalidInput(f"Triton rejected the input: {text}")
    return BackendUnavailable(f"Triton is unavailable: {text}")


def create_backend(settings: Settings) -> Backend:
    return TritonBackend(settings) if settings.backend == "triton" else EmbeddedBackend(settings)
