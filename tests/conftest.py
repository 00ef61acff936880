from __future__ import annotations

from pathlib import Path

import pytest

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
