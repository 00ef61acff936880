"""The models the gateway serves: `ModelRegistry` (on `app.state.registry`) and `ServedModel`.

`ServedModel.classify` is what the HTTP and gRPC APIs call: preprocess on a thread pool, queue into the model's
batcher, softmax + top-k. `ServedModel.infer` takes already-preprocessed tensors through the same batcher.
Deadlines are absolute `time.monotonic()` values; None means the settings' request timeout from now.

Each model keeps two sets of Triton-style statistics, as Triton would for our exported repository:
`tensor_statistics` for the classifier (every request that reaches the batcher, every backend call) and
`image_statistics` for encoded-image requests (HTTP classify, gRPC `<name>_pipeline`), which like Triton's
ensemble send the classifier one request each once decoded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import numpy as np

from server.backends import Backend, LoadFailure, ModelInfo, create_backend, one_line
from server.batching import DirectDispatcher, Dispatcher, DynamicBatcher, Inference
from server.errors import BackendUnavailable, InvalidInput, ModelNotFound, UnclassifiableImage
from server.metrics import Metrics
from server.preprocessing import preprocess_batch
from server.scores import NAN_SCORES, softmax, unscored_rows
from server.settings import Settings
from server.spec import PreprocessSpec
from server.statistics import ComputeTimes, ModelStatistics, Request, RequestTimes

log = logging.getLogger("resnet.server")
HEALTH_INTERVAL_S = 1.0
PROBLEM_LOG_S = 30.0
# A request naming a model or version not served has the gateway look at the backend's models again; looks begin at
# most this often however many such requests arrive (else a client asking for names that do not exist costs a look
# each), and every request waiting shares the next one.
LOOK_AGAIN_S = 0.1
Found = TypeVar("Found")


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    score: float


class Classification(NamedTuple):
    """The top-k predictions of each image, and the version of the model that made them."""

    predictions: list[list[Prediction]]
    version: str


def top_predictions(probabilities: np.ndarray, k: int, labels: list[str]) -> list[list[Prediction]]:
    """The k best classes per row, best first."""
    k = min(k, probabilities.shape[1])
    best = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return [
        [Prediction(int(i), labels[i], float(row[i])) for i in indexes]
        for row, indexes in zip(probabilities, best, strict=True)
    ]


class ServedModel:
    def __init__(
        self,
        info: ModelInfo,
        backend: Backend,
        dispatcher_factory,
        settings: Settings,
        preprocess_pool: concurrent.futures.Executor,
        metrics: Metrics,
    ) -> None:
        self.info = info
        self.runtime = backend
        self.settings = settings
        self.metrics = metrics
        self.preprocess_pool = preprocess_pool
        self.tensor_statistics = ModelStatistics()
        self.image_statistics = ModelStatistics()
        self.dispatcher: Dispatcher = dispatcher_factory(self)

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def version(self) -> str:
        return self.info.version

    @property
    def spec(self) -> PreprocessSpec:
        return self.info.spec

    @property
    def labels(self) -> list[str]:
        return self.info.labels

    @property
    def max_batch_size(self) -> int:
        return self.info.max_batch_size

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.info.input_shape

    @property
    def backend(self) -> str:
        """ "embedded" or "triton"."""
        return self.runtime.name

    def deadline(self, deadline: float | None) -> float:
        return time.monotonic() + self.settings.request_timeout_s if deadline is None else deadline

    async def run_batch(self, batch: np.ndarray) -> Inference:
        started = time.monotonic()
        # Deadlines are enforced per request by the dispatcher; the backend gets the longest one allowed.
        inference = await self.runtime.infer(
            self.info, np.ascontiguousarray(batch), started + self.settings.request_timeout_s
        )
        self.metrics.inference_seconds.labels(self.name).observe(time.monotonic() - started)
        return inference

    async def preprocess(self, images: list[bytes]) -> np.ndarray:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.preprocess_pool, preprocess_batch, images, self.spec, self.settings.max_image_pixels
        )

    async def infer(
        self, batch: np.ndarray, deadline: float | None = None, started_ns: int | None = None
    ) -> Inference:
        """float32 [N, *input_shape] preprocessed tensors -> logits [N, num_classes], and the version that computed
        them.

        `started_ns` (`time.perf_counter_ns()`): when the API began handling the request, for its statistics."""
        with self.tensor_statistics.request(started_ns) as request:
            if (
                batch.dtype != np.float32
                or batch.ndim != 4
                or tuple(batch.shape[1:]) != self.input_shape
                or not len(batch)
            ):
                raise InvalidInput(
                    f"{self.name} takes float32 [N, {', '.join(map(str, self.input_shape))}] with N >= 1, "
                    f"got {batch.dtype} {list(batch.shape)}"
                )
            with self.dispatcher.admit(len(batch)):
                inference, _ = await self._infer(batch, self.deadline(deadline), request)
            return inference

    async def _infer(
        self, batch: np.ndarray, deadline: float, request: Request
    ) -> tuple[Inference, RequestTimes]:
        inference, times = await self.dispatcher.infer(batch, deadline)
        request.succeeded(len(batch), times)
        self.metrics.images.labels(self.name).inc(len(batch))
        return inference, times

    async def infer_images(
        self, images: list[bytes], deadline: float | None = None, started_ns: int | None = None
    ) -> Inference:
        """Encoded images -> logits [N, num_classes] and their version, admitted like `classify` (the gRPC
        `_pipeline` models)."""
        with self.image_statistics.request(started_ns) as request:
            if not images:
                raise InvalidInput("no images to classify")
            deadline = self.deadline(deadline)
            with self.dispatcher.admit(len(images)):  # before decoding: a refused request costs nothing
                decode_started_ns = time.perf_counter_ns()
                batch = await self.preprocess(images)
                decoding = ComputeTimes(input_ns=time.perf_counter_ns() - decode_started_ns)
                # Decoded, the request goes on to the classifier as its own request (a Triton ensemble's step).
                with self.tensor_statistics.request() as classifier_request:
                    inference, times = await self._infer(batch, deadline, classifier_request)
            # Decoding is this request's input preparation (Triton's `compute_input`: "prepare input tensor data").
            compute = decoding + times.compute
            request.succeeded(len(images), RequestTimes(times.queue_ns, compute))
            # As Triton does for an ensemble: each successful request is one execution of its own batch size.
            self.image_statistics.record_execution(len(images), compute)
            return inference

    async def classify(
        self, images: list[bytes], top_k: int = 5, deadline: float | None = None
    ) -> Classification:
        if top_k < 1:
            raise InvalidInput(f"top_k must be at least 1, got {top_k}")
        logits, version = await self.infer_images(images, deadline)
        probabilities = softmax(logits)
        if unscored := unscored_rows(probabilities):
            which = f"image {unscored[0] + 1} of {len(images)}: " if len(images) > 1 else ""
            raise UnclassifiableImage(f"{which}{NAN_SCORES} (model {self.name!r} version {version})")
        return Classification(top_predictions(probabilities, top_k, self.labels), version)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "versions": [self.version],
            "input_shape": list(self.input_shape),
            "num_classes": len(self.labels),
            "max_batch_size": self.max_batch_size,
            "backend": self.backend,
            "preprocess": self.spec.to_dict(),
        }


class ModelRegistry:
    """The models of one backend. For Triton, a health loop keeps `ready()` current and re-reads the models
    whenever Triton comes (back) up, so the gateway recovers from a Triton restart by itself."""

    def __init__(
        self, settings: Settings, metrics: Metrics | None = None, backend: Backend | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.backend = backend or create_backend(settings)
        threads = settings.preprocess_threads or (os.cpu_count() or 1)
        self.preprocess_pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="preprocess")
        self.models: dict[str, ServedModel] = {}
        self._backend_ready = False
        self._logged_problems: dict[str, float] = {}  # each reason to be down, when it was last logged
        self._health_task: asyncio.Task | None = None
        self._follow_problem = ""  # why the last look at the models failed, once logged
        # the look at the models under way, which every caller shares
        self._look: asyncio.Future | None = None
        self._look_began = -LOOK_AGAIN_S

    def names(self) -> list[str]:
        return sorted(self.models)

    def get(self, name: str) -> ServedModel:
        if not self._backend_ready:
            raise BackendUnavailable(f"{self.describe_backend()} is not ready; retry shortly")
        model = self.models.get(name)
        if model is None:
            raise ModelNotFound(
                f"model {name!r} {self.unserved(name)}; available: {', '.join(self.names()) or 'none'}"
            )
        return model

    async def current(self, find: Callable[[], Found]) -> Found:
        """`find()` (which raises ModelNotFound for what is not served), after a look at the backend's models where
        it failed: a model or version published since the last poll (`repository_poll_s`, 5 s by default; Triton's
        health loop, 1 s) is served to the request that names it, not answered 404 until the next poll."""
        try:
            return find()
        except ModelNotFound:
            if not await self._looked_again():
                raise
        return find()

    async def _looked_again(self) -> bool:
        """Whether the models were looked at for this request, by a look that began once it asked (one under way
        may have read the repository before the change it asks for): not where the backend is down (its health
        loop reads the models when it comes up) or the repository is read only at start-up
        (`--repository-poll-s 0`)."""
        follows = self.backend.name != "embedded" or self.settings.repository_poll_s > 0
        if not (follows and self.ready()):
            return False
        with contextlib.suppress(TimeoutError):  # a slow load: answered as before, the look goes on
            await asyncio.wait_for(self._look_begun_after(time.monotonic()), self.settings.request_timeout_s)
        return True

    async def _look_begun_after(self, asked: float) -> None:
        while self._look_began < asked:
            if self._looking():
                await asyncio.shield(self._look)  # type: ignore[arg-type]
            elif (wait := self._look_began + LOOK_AGAIN_S - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            else:
                self._follow_model_changes()
        await asyncio.shield(self._look)  # type: ignore[arg-type]

    @property
    def failures(self) -> dict[str, LoadFailure]:
        """The classifiers of the repository the backend could not serve, by name."""
        return self.backend.failures

    def unserved(self, name: str) -> str:
        """Why `name` is not served, for an error message: it failed to load (and why), or there is no such model."""
        failure = self.failures.get(name)
        return f"failed to load: {failure.reason}" if failure else "not found"

    def not_ready_reason(self) -> str:
        if self._backend_ready:
            return self._no_models()
        problem = self.backend.problem
        return f"{self.describe_backend()} is not ready{': ' + problem if problem else ''}"

    def _no_models(self) -> str:
        where = (
            self.settings.repository.resolve() if self.backend.name == "embedded" else self.describe_backend()
        )
        failed = "".join(
            f"; {name} failed to load: {failure.reason}" for name, failure in self.failures.items()
        )
        return f"no classifier models to serve from {where}{failed}"

    def describe_backend(self) -> str:
        if self.backend.name == "triton":
            tls = " over TLS" if self.settings.triton_tls else ""
            return f"Triton at {self.settings.triton_url} ({self.settings.triton_protocol}{tls})"
        return "the embedded ONNX Runtime backend"

    def ready(self) -> bool:
        return self._backend_ready and bool(self.models)

    def _dispatcher(self, model: ServedModel) -> Dispatcher:
        if not self.settings.batching:
            return DirectDispatcher(
                model.name,
                model.run_batch,
                queue_size=self.settings.queue_size,
                metrics=self.metrics,
                statistics=model.tensor_statistics,
            )
        # Against Triton two batches may be in flight (network overlap); in-process, one at a time uses all cores.
        workers = 2 if self.backend.name == "triton" else 1
        return DynamicBatcher(
            model.name,
            model.run_batch,
            max_batch_size=model.max_batch_size,
            max_delay_s=self.settings.max_delay_ms / 1000,
            queue_size=self.settings.queue_size,
            metrics=self.metrics,
            statistics=model.tensor_statistics,
            workers=workers,
        )

    async def _load_models(self) -> None:
        """The backend's models, now: one unchanged keeps its ServedModel (queue, statistics), one new or changed
        gets a new one; a replaced or removed one answers what it has queued, then the backend may free it."""
        infos = await self.backend.start()
        old = self.models
        models = {}
        for info in infos:
            model = old.get(info.name)
            if model is None or model.info != info:
                model = ServedModel(
                    info, self.backend, self._dispatcher, self.settings, self.preprocess_pool, self.metrics
                )
                model.dispatcher.start()
            models[info.name] = model
        self.models = models
        for model in old.values():
            if models.get(model.name) is not model:
                await model.dispatcher.close()
                await self.backend.retire(model.info)
            if model.name not in models:  # its gauges would go on showing the last values
                for gauge in (self.metrics.queue_depth, self.metrics.admitted):
                    with contextlib.suppress(KeyError):
                        gauge.remove(model.name)
        self.metrics.model_unavailable.clear()
        for name in self.failures:
            self.metrics.model_unavailable.labels(name).set(1)
        if self.models:
            served = ", ".join(f"{name} (version {self.models[name].version})" for name in self.names())
            log.info("serving %s on the %s backend", served, self.backend.name)
        else:
            log.warning(self._no_models())

    async def start(self) -> None:
        if self.backend.name == "embedded":
            await self._load_models()
            self._backend_ready = True
            if self.settings.repository_poll_s:
                self._health_task = asyncio.create_task(self._repository_loop(), name="repository-poll")
            return
        await self._check_health()
        self._health_task = asyncio.create_task(self._health_loop(), name="backend-health")

    async def _check_health(self) -> None:
        ready = await self.backend.ready()
        if ready and (not self._backend_ready or not self.models):
            try:
                await self._load_models()
            except Exception as error:  # noqa: BLE001 - keep polling; readiness stays false
                self.backend.problem = f"cannot read its models: {one_line(error)}"
                ready = False
        elif ready:
            await self._follow_model_changes()
        if ready:
            self.backend.problem = ""
        self._log_health(ready, self.backend.problem)
        self._backend_ready = ready

    def _follow_model_changes(self) -> asyncio.Future:
        """The look at the backend's models under way, or a new one: polls and requests share it, so models are
        never loaded twice at once."""
        if self._look is None or self._look.done():
            self._look_began = time.monotonic()
            self._look = asyncio.ensure_future(self._read_model_changes())
        return self._look

    def _looking(self) -> bool:
        return self._look is not None and not self._look.done()

    async def _read_model_changes(self) -> None:
        """Serve what the backend serves now: a model loaded, unloaded or given a new version while it stays up
        (a rollout on Triton, docs/deployment.md section 8; a version `resnet export` published into the embedded
        backend's repository). If they cannot be read, the models read before go on serving and the next look
        tries again."""
        try:
            if await self.backend.models_changed():
                await self._load_models()
            self._follow_problem = ""
        except Exception as error:  # noqa: BLE001 - a look that failed changes nothing
            if one_line(error) != self._follow_problem:  # once, not at every look
                self._follow_problem = one_line(error)
                log.warning(
                    "cannot read the models of %s again: %s", self.describe_backend(), one_line(error)
                )

    def _log_health(self, ready: bool, problem: str) -> None:
        """Each change of readiness; while down, each reason once per PROBLEM_LOG_S (a wrong port's reasons can
        alternate from one poll to the next: both are logged, not one per poll)."""
        now = time.monotonic()
        self._logged_problems = {p: at for p, at in self._logged_problems.items() if now - at < PROBLEM_LOG_S}
        if ready and not self._backend_ready:
            log.info("%s is ready", self.describe_backend())
            self._logged_problems.clear()
        elif not ready and (self._backend_ready or problem not in self._logged_problems):
            log.warning("%s is NOT ready: %s", self.describe_backend(), problem or "no reason given")
            self._logged_problems[problem] = now

    async def _repository_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.repository_poll_s)
            await self._follow_model_changes()

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            await self._check_health()

    async def close(self) -> None:
        """Answer what is queued, then release the backend (called after uvicorn drained the requests)."""
        for task in (self._health_task, self._look):
            if task:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for model in self.models.values():
            await model.dispatcher.close()
        await self.backend.close()
        self.preprocess_pool.shutdown(wait=True)
