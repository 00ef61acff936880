"""Per-model inference statistics with the meaning of Triton's statistics extension (`ModelStatistics`).

Each served name keeps one `ModelStatistics`. Counters are plain ints: everything that updates them runs on the
event loop, so no locks are needed. Durations are nanoseconds from `time.perf_counter_ns()`; `last_inference`
is wall-clock milliseconds since the epoch, as Triton reports it.

As in Triton: `success` / `fail` count requests (each 1, whatever its batch) with their whole duration; `queue`
and `compute_*` count successful requests with the time each spent waiting and being computed (a request that
shared a backend call with others is charged that call's full compute time); `inference_count` adds the images
of successful requests; `execution_count` and `batch_stats` count successful executions, per batch size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Duration:
    """Triton's `StatisticDuration`: how often something happened and its total time."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns


@dataclass
class ComputeTimes:
    """Where compute time went: preparing the input tensor, running the model, handing the output out."""

    input_ns: int = 0
    infer_ns: int = 0
    output_ns: int = 0

    def __add__(self, other: ComputeTimes) -> ComputeTimes:
        return ComputeTimes(
            self.input_ns + other.input_ns, self.infer_ns + other.infer_ns, self.output_ns + other.output_ns
        )


@dataclass(frozen=True)
class RequestTimes:
    """What one request's trip through a dispatcher cost: waiting for its batch, then that batch's compute."""

    queue_ns: int
    compute: ComputeTimes


@dataclass
class BatchStatistics:
    """Triton's `InferBatchStatistics` for one batch size (the size is the key it is kept under)."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)

    def add(self, compute: ComputeTimes) -> None:
        self.compute_input.add(compute.input_ns)
        self.compute_infer.add(compute.infer_ns)
        self.compute_output.add(compute.output_ns)


@dataclass
class ModelStatistics:
    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, BatchStatistics] = field(default_factory=dict)

    def request(self, started_ns: int | None = None) -> Request:
        """`with statistics.request() as request: ...; request.succeeded(images, times)`; an exception
        (a refusal, a failure, a cancellation) counts the request in `fail`."""
        return Request(self, time.perf_counter_ns() if started_ns is None else started_ns)

    def record_success(self, images: int, request_ns: int, times: RequestTimes) -> None:
        self.inference_count += images
        self.success.add(request_ns)
        self.queue.add(times.queue_ns)
        self.compute_input.add(times.compute.input_ns)
        self.compute_infer.add(times.compute.infer_ns)
        self.compute_output.add(times.compute.output_ns)

    def record_failure(self, request_ns: int) -> None:
        self.fail.add(request_ns)

    def record_execution(self, batch_size: int, compute: ComputeTimes) -> None:
        # Triton stamps `last_inference` when an execution completes, not when a request arrives.
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.execution_count += 1
        self.batches.setdefault(batch_size, BatchStatistics()).add(compute)


class Request:
    """One request's stay at a model, from `started_ns` until `succeeded()` or an exception."""

    __slots__ = ("statistics", "started_ns", "times")

    def __init__(self, statistics: ModelStatistics, started_ns: int) -> None:
        self.statistics = statistics
        self.started_ns = started_ns
        self.times: RequestTimes | None = None

    def succeeded(self, images: int, times: RequestTimes) -> None:
        self.times = times
        self.statistics.record_success(images, time.perf_counter_ns() - self.started_ns, times)

    def __enter__(self) -> Request:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is not None and self.times is None:
            self.statistics.record_failure(time.perf_counter_ns() - self.started_ns)
