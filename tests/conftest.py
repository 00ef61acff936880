from __future__ import annotations

from pathlib import Path

import pytest

from tests.grpc_support import write_pipeline_repository
from tests.support import SHARED_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the project; tests that need real data skip cleanly without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def imagenet_samples(shared_data: Path) -> list[Path]:
    photos = sorted((shared_data / "imagenet-samples").glob("*.JPEG"))
    if not photos:
        pytest.skip("no ImageNet sample photos in shared data")
    return photos


@pytest.fixture(scope="module")
def pipeline_repository(tmp_path_factory) -> Path:
    """`colors`, `colors_preprocess` and `colors_pipeline`, laid out as `resnet export` writes them (per module)."""
    return write_pipeline_repository(tmp_path_factory.mktemp("pipeline-repository"))


@pytest.fixture(scope="module")
def pipeline_triton(pipeline_repository, tmp_path_factory):
    """A real Triton (nvidia-pytriton's CPU build) serving `pipeline_repository`; skipped where it is missing."""
    pytest.importorskip("pytriton", reason="nvidia-pytriton (the bundled tritonserver) is not installed")
    from export.triton_server import TritonServer

    log_path = tmp_path_factory.mktemp("triton-logs") / "triton.log"
    with TritonServer(pipeline_repository, log_path=log_path) as server:
        yield server
