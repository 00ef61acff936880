"""Dynamic batching: samples from many requests queue per model, run as one batch, and are answered one by one.

A worker takes the oldest sample, waits at most `max_delay` for the batch to fill up to `max_batch_size`, runs
the batch once and resolves each sample's future with its own row. The queue is bounded (in samples): a request
that does not fit is refused at once with 503 + Retry-After instead of growing memory; a sample whose request
passed its deadline is dropped before it costs inference. Every backend call is timed (stacking the batch,
the backend, handing rows out) for the model's Triton-style statistics (server/statistics.py).
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from server.errors import DeadlineExceeded, GatewayError, InvalidInput, Overloaded
from server.metrics import Metrics
from server.statistics import ComputeTimes, ModelStatistics, RequestTimes


class Inference(NamedTuple):
    """What a backend call gives: logits [N, num_classes], and the version of the model that computed them (a
    remote backend may have moved on to a newer one than the request was routed to)."""

    logits: np.ndarray
    version: str


RunBatch = Callable[[np.ndarray], Awaitable[Inference]]


@dataclass(eq=False)
class _Execution:
    """One backend call, shared by every sample in its batch: when it started and where its time went."""

    started_ns: int
    compute: ComputeTimes
    version: str  # of the model that computed it


@dataclass
class _Pending:
    sample: np.ndarray
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    execution: _Execution | None = None  # set with the result


class Dispatcher(abc.ABC):
    """What ServedModel calls: `with dispatcher.admit(n): inference, times = await dispatcher.infer(batch, deadline)`.

    Admission bounds the images a model holds at once (being decoded, queued or inferred) to `queue_size`: one
    more request is refused before it costs a decode, so memory stays bounded however many clients connect.
    """

    model: str
    run_batch: RunBatch
    queue_size: int
    metrics: Metrics
    statistics: ModelStatistics  # the model's: every successful backend call is an execution
    _admitted: int = 0

    @contextlib.contextmanager
    def admit(self, images: int):
        if images > self.queue_size:
            raise InvalidInput(
                f"{images} images in one request is more than model {self.model!r} queues "
                f"({self.queue_size}); send fewer per request"
            )
        if self._admitted + images > self.queue_size:
            raise Overloaded(
                f"model {self.model!r} holds {self._admitted} images (limit {self.queue_size}); retry later"
            )
        self._admitted += images
        try:
            yield
        finally:
            self._admitted -= images

    def admitted(self) -> int:
        return self._admitted

    @abc.abstractmethod
    async def infer(self, batch: np.ndarray, deadline: float) -> tuple[Inference, RequestTimes]:
        """Logits for the batch and the version that computed them, and what the request spent waiting and being
        computed."""

    async def _infer_alone(self, batch: np.ndarray, deadline: float) -> tuple[Inference, RequestTimes]:
        """The batch sent to the backend as it is, with no wait in the gateway."""
        remaining = _remaining(deadline)
        self.metrics.batch_size.labels(self.model).observe(len(batch))
        started_ns = time.perf_counter_ns()
        try:
            inference = await asyncio.wait_for(self.run_batch(batch), remaining)
        except TimeoutError:
            raise DeadlineExceeded(f"no result within the request deadline ({remaining:.1f}s)") from None
        compute = ComputeTimes(infer_ns=time.perf_counter_ns() - started_ns)
        self.statistics.record_execution(len(batch), compute)
        return inference, RequestTimes(0, compute)

    def start(self) -> None:
        return None  # a hook: only dispatchers with a background task start one

    async def close(self) -> None:
        return None  # a hook: only dispatchers with a background task stop one

    def depth(self) -> int:
        return 0


def _remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise DeadlineExceeded("request deadline passed before inference")
    return remaining


class DynamicBatcher(Dispatcher):
    def __init__(
        self,
        model: str,
        run_batch: RunBatch,
        *,
        max_batch_size: int,
        max_delay_s: float,
        queue_size: int,
        metrics: Metrics,
        statistics: ModelStatistics,
        workers: int = 1,
    ) -> None:
        self.model = model
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.queue_size = queue_size
        self.metrics = metrics
        self.statistics = statistics
        self.workers = workers
        self._queue: collections.deque[_Pending] = collections.deque()
        self._arrived = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._closing = False

    def depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._work(), name=f"batcher-{self.model}-{i}") for i in range(self.workers)
        ]

    async def infer(self, batch: np.ndarray, deadline: float) -> tuple[Inference, RequestTimes]:
        if self._closing:
            # Its model was replaced (a new version) or removed while this request was being decoded: the workers
            # are stopping or gone, and a sample queued now waited out its deadline (504). The backend keeps the
            # version the request was routed to until every such request is past its deadline (`retire`).
            return await self._infer_alone(batch, deadline)
        remaining = _remaining(deadline)
        loop = asyncio.get_running_loop()
        enqueued_ns = time.perf_counter_ns()
        pending = [_Pending(sample, loop.create_future()) for sample in batch]
        self._queue.extend(pending)
        self.metrics.queue_depth.labels(self.model).set(len(self._queue))
        self._arrived.set()
        futures = [p.future for p in pending]
        rows_of_all = asyncio.gather(*futures)
        # Cancelled (deadline, client gone), a gather *finishes with* CancelledError rather than being cancelled,
        # and asyncio logs "exception was never retrieved" for each such request unless something reads it.
        rows_of_all.add_done_callback(lambda gathered: gathered.cancelled() or gathered.exception())
        try:
            rows = await asyncio.wait_for(rows_of_all, remaining)
        except TimeoutError:
            raise DeadlineExceeded(
                f"no result within the request deadline ({remaining:.1f}s left at submit)"
            ) from None
        finally:
            for future in futures:  # dropped by the worker if still queued
                future.cancel()
        executions = list(dict.fromkeys(p.execution for p in pending if p.execution is not None))
        return Inference(np.stack(rows), _version(executions)), _times(executions, enqueued_ns)

    async def _next_batch(self) -> list[_Pending]:
        while not self._queue:
            if self._closing:
                return []
            self._arrived.clear()
            await self._arrived.wait()
        oldest = self._queue[0].enqueued
        while len(self._queue) < self.max_batch_size and not self._closing:
            wait = oldest + self.max_delay_s - time.monotonic()
            if wait <= 0:
                break
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), wait)
        taken = []
        while self._queue and len(taken) < self.max_batch_size:
            pending = self._queue.popleft()
            if not pending.future.done():  # a timed-out or cancelled request's samples cost nothing
                taken.append(pending)
        self.metrics.queue_depth.labels(self.model).set(len(self._queue))
        return taken

    async def _work(self) -> None:
        while True:
            taken = await self._next_batch()
            if not taken:
                if self._closing and not self._queue:
                    return
                continue
            started = time.monotonic()
            started_ns = time.perf_counter_ns()
            for pending in taken:
                self.metrics.queue_seconds.labels(self.model).observe(started - pending.enqueued)
            self.metrics.batch_size.labels(self.model).observe(len(taken))
            try:
                batch = np.stack([p.sample for p in taken])
                stacked_ns = time.perf_counter_ns()
                logits, version = await self.run_batch(batch)
            except GatewayError as error:
                self._fail(taken, error)
                continue
            except Exception as error:  # noqa: BLE001 - one bad batch must not stop the worker
                self._fail(taken, error)
                continue
            inferred_ns = time.perf_counter_ns()
            execution = _Execution(
                started_ns, ComputeTimes(stacked_ns - started_ns, inferred_ns - stacked_ns), version
            )
            for pending, row in zip(taken, logits, strict=True):
                if not pending.future.done():
                    pending.execution = execution
                    pending.future.set_result(row)
            # The waiting requests resume only after this step, so they read the finished output time.
            execution.compute.output_ns = time.perf_counter_ns() - inferred_ns
            self.statistics.record_execution(len(taken), execution.compute)

    @staticmethod
    def _fail(taken: list[_Pending], error: Exception) -> None:
        for pending in taken:
            if not pending.future.done():
                pending.future.set_exception(error)

    async def close(self) -> None:
        """Stop taking requests, answer what is queued, then stop the workers."""
        self._closing = True
        self._arrived.set()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _times(executions: list[_Execution], enqueued_ns: int) -> RequestTimes:
    """A request waited until its first batch started and is charged the compute of every batch it was in
    (one, unless its images did not all fit into the same batch)."""
    compute = sum((execution.compute for execution in executions), ComputeTimes())
    return RequestTimes(min(execution.started_ns for execution in executions) - enqueued_ns, compute)


def _version(executions: list[_Execution]) -> str:
    """The version that computed a request's rows. A response names one, so a request whose images were split
    into batches on either side of a rollout names the newer."""
    by_number = lambda version: (len(version), version)  # noqa: E731 - version folders are numbers, "10" > "9"
    return max((execution.version for execution in executions), key=by_number)


class DirectDispatcher(Dispatcher):
    """No gateway batching: each request goes to the backend as is (Triton's dynamic batcher merges them).

    Still bounded by admission (`queue_size` images per model). Nothing waits in the gateway, so queue time is 0;
    Triton's own queueing is part of the backend call (compute_infer).
    """

    def __init__(
        self,
        model: str,
        run_batch: RunBatch,
        *,
        queue_size: int,
        metrics: Metrics,
        statistics: ModelStatistics,
    ) -> None:
        self.model = model
        self.run_batch = run_batch
        self.queue_size = queue_size
        self.metrics = metrics
        self.statistics = statistics

    async def infer(self, batch: np.ndarray, deadline: float) -> tuple[Inference, RequestTimes]:
        return await self._infer_alone(batch, deadline)
