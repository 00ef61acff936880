"""Prometheus metrics of one gateway app, in its own registry (several apps in one process stay separate)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "resnet_requests",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "resnet_request_latency_seconds",
            "HTTP request latency by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("resnet_requests_in_flight", "HTTP requests being handled", registry=r)
        self.tls_expiry = Gauge(
            "resnet_tls_certificate_expiry_timestamp_seconds",
            "when the certificate the gateway serves expires, in Unix time (alert well before it)",
            registry=r,
        )
        self.crl_next_update = Gauge(
            "resnet_tls_crl_next_update_timestamp_seconds",
            "when the first of the client-certificate revocation lists (--ssl-crl) is due for renewal, in Unix time: "
            "past it, OpenSSL refuses every client of that authority",
            registry=r,
        )
        self.tls_reloads = Counter(
            "resnet_tls_reloads",
            "changes of the TLS files seen: reloaded, or refused (they do not load; the files in use are kept)",
            ["outcome"],
            registry=r,
        )
        self.queue_seconds = Histogram(
            "resnet_queue_seconds",
            "time an image waits in the batch queue",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "resnet_inference_seconds",
            "backend time per batch",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "resnet_batch_size", "images per backend call", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge(
            "resnet_queue_depth",
            "images queued (or in flight without batching) per model",
            ["model"],
            registry=r,
        )
        self.admitted = Gauge(
            "resnet_admitted_images",
            "images a model holds: decoding, queued or inferring (bounded by queue_size)",
            ["model"],
            registry=r,
        )
        self.images = Counter("resnet_images", "images classified per model", ["model"], registry=r)
        self.model_unavailable = Gauge(
            "resnet_model_unavailable",
            "1 for each classifier of the repository the gateway could not load (the log and /readyz say why)",
            ["model"],
            registry=r,
        )
        # gRPC calls, named as go-grpc-prometheus names them (method = the RPC's short name, code = its status)
        self.grpc_requests = Counter(
            "resnet_grpc_requests", "gRPC calls by method and status code", ["method", "code"], registry=r
        )
        self.grpc_latency = Histogram(
            "resnet_grpc_request_latency_seconds",
            "gRPC call latency by method (a stream: its whole life)",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.grpc_in_flight = Gauge("resnet_grpc_requests_in_flight", "gRPC calls being handled", registry=r)
