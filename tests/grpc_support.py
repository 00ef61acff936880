"""Shared by the gRPC and client tests: a model repository Triton and the gateway both serve (classifier, preprocess
model and `_pipeline` ensemble, written with the exporter's code), and a gateway process with its gRPC port."""

from __future__ import annotations

import ssl
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from export.repository import (
    PREPROCESS_MODEL_PY,
    BatchingPolicy,
    ClassifierSpec,
    pipeline_config,
    preprocess_config,
    publish_version,
    write_model,
)
from tests.gateway_models import LABELS, TINY_SPEC, write_colors_model
from tests.support import free_ports, running_process

API_KEY = "grpc-test-key"


# a family in the `pipeline_triton` fixture's repository that its Triton does not load
UNLOADED_MODEL = "blank"


def write_pipeline_repository(root: Path, name: str = "colors") -> Path:
    """`name` (classifier), `name_preprocess` and `name_pipeline`, as `resnet export` lays them out."""
    write_colors_model(root, name)
    batching = BatchingPolicy(max_batch_size=32)
    preprocess = root / f"{name}_preprocess"
    publish_version(preprocess, {"model.py": PREPROCESS_MODEL_PY})
    write_model(preprocess, preprocess_config(preprocess.name, "colors", TINY_SPEC, batching))
    classifier = ClassifierSpec(
        name=name,
        arch="colors",
        precision="fp32",
        num_classes=len(LABELS),
        preprocess=TINY_SPEC,
        batching=batching,
    )
    pipeline = root / f"{name}_pipeline"
    publish_version(pipeline, {})  # an ensemble's version folder is empty but must exist
    write_model(pipeline, pipeline_config(pipeline.name, classifier, preprocess.name), LABELS)
    return root


@dataclass(frozen=True)
class Gateway:
    http_url: str
    grpc_address: str  # host:port, as tritonclient.grpc takes it
    tls: bool = False

    @property
    def grpc_url(self) -> str:
        return f"{'grpcs' if self.tls else 'grpc'}://{self.grpc_address}"


@contextmanager
def gateway_process(
    log_dir: Path, *flags: str, ready_path: str = "/readyz", tls: ssl.SSLContext | None = None
):
    """`resnet serve` on loopback with free HTTP and gRPC ports; yields once `ready_path` answers 2xx (over
    HTTPS trusting `tls`, for a gateway given its certificate in `flags`)."""
    port, grpc_port = free_ports(2)
    command = [
        sys.executable,
        "-m",
        "cli.main",
        "serve",
        "--port",
        str(port),
        "--grpc-port",
        str(grpc_port),
        "--intra-op-threads",
        "1",
        "--preprocess-threads",
        "1",
        *flags,
    ]
    log_path = log_dir / f"gateway-{port}.log"
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    with running_process(command, ready_url=f"{url}{ready_path}", timeout=90, log_path=log_path, tls=tls):
        yield Gateway(url, f"127.0.0.1:{grpc_port}", tls is not None)
