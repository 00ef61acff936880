"""The bundled default model (what `make serve` serves) classifies real CIFAR-10 test images as its card says.

A real `resnet serve` on loopback, real JPEGs from ../shared/data/cifar10-jpeg.tar.xz (skipped without it), a
fixed sample of the test set sent as multipart batches; the sample's accuracy must agree with the test error on
the model card (measured by `resnet evaluate` on all 10,000 test images) within sampling error.
"""

from __future__ import annotations

import json
import math
import random
import re
import subprocess
import tarfile
import urllib.request
import uuid
from pathlib import Path

import pytest

from export.repository import CLASSIFIER_MODEL_PY, PREPROCESS_MODEL_PY
from tests.support import REPO_ROOT, running_gateway

REPOSITORY = REPO_ROOT / "model_repository"
CARD = REPOSITORY / "resnet20_cifar10" / "model_card.md"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SAMPLE_SIZE = 500
REQUEST_BATCH = 50

pytestmark = pytest.mark.slow


def card_errors() -> dict[str, float]:
    """{"fp32": %, "int8": %} from the card's 'test error' line."""
    text = CARD.read_text()
    errors = {
        precision.lower(): float(value)
        for precision, value in re.findall(r"\*\*(FP32|INT8) (\d+(?:\.\d+)?)%\*\*", text)
    }
    assert set(errors) == {"fp32", "int8"}, f"model card {CARD} has no FP32/INT8 test error line"
    return errors


@pytest.fixture(scope="module")
def test_sample(shared_data: Path) -> list[tuple[bytes, str]]:
    """A fixed random sample of CIFAR-10 test JPEGs (bytes, class), streamed from the archive."""
    tarball = shared_data / "cifar10-jpeg.tar.xz"
    if not tarball.is_file():
        pytest.skip(f"{tarball} not found")
    images = []
    with tarfile.open(tarball) as archive:
        for member in archive:  # the test/ tree comes first in the archive: stop at train/
            parts = Path(member.name).parts
            if len(parts) == 4 and parts[1] == "train":
                break
            if member.isfile() and len(parts) == 4 and parts[1] == "test":
                images.append((archive.extractfile(member).read(), parts[2]))
    assert len(images) == 10_000, f"expected the 10,000 CIFAR-10 test images, found {len(images)}"
    return random.Random(2015).sample(images, SAMPLE_SIZE)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory) -> str:
    log = tmp_path_factory.mktemp("gateway") / "serve.log"
    with running_gateway("--repository", str(REPOSITORY), log_path=log) as (url, _):
        yield url


def classify(url: str, model: str, images: list[bytes]) -> list[str]:
    boundary = uuid.uuid4().hex
    body = (
        b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{i}.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n".encode()
            + image
            + b"\r\n"
            for i, image in enumerate(images)
        )
        + f"--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        f"{url}/v1/models/{model}/classify?top_k=1",
        data=body,
        method="POST",
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        results = json.load(response)
    return [result["predictions"][0]["label"] for result in results]


def test_bundled_models_are_listed_with_cifar_labels_and_preprocessing(gateway):
    with urllib.request.urlopen(f"{gateway}/v1/models", timeout=10) as response:
        models = {model["name"]: model for model in json.load(response)["models"]}
    for name in ("resnet20_cifar10", "resnet20_cifar10_int8"):
        assert name in models, f"{name} not served; got {sorted(models)}"
        assert models[name]["num_classes"] == 10
        assert models[name]["preprocess"]["crop"] == 32
    assert (REPOSITORY / "resnet20_cifar10" / "labels.txt").read_text().split() == CLASSES


@pytest.mark.parametrize("model", ["resnet20_cifar10", "resnet20_cifar10_int8"])
def test_accuracy_on_real_test_images_matches_the_model_card(gateway, test_sample, model):
    predicted = []
    for start in range(0, len(test_sample), REQUEST_BATCH):
        chunk = test_sample[start : start + REQUEST_BATCH]
        predicted += classify(gateway, model, [image for image, _ in chunk])
    correct = sum(label == truth for label, (_, truth) in zip(predicted, test_sample, strict=True))
    accuracy = correct / len(test_sample)
    expected = 1 - card_errors()["int8" if model.endswith("int8") else "fp32"] / 100
    # 4 standard errors of a 500-image sample (about 6 points at 85%): fails for a broken or swapped model.
    tolerance = 4 * math.sqrt(expected * (1 - expected) / len(test_sample))
    assert abs(accuracy - expected) <= tolerance, (
        f"{model}: {accuracy:.1%} on {len(test_sample)} test images, model card says {expected:.1%} "
        f"(tolerance {tolerance:.1%})"
    )
    assert len(set(predicted)) == 10  # every class gets predicted


# --- `make bundled-model`: the whole chain on a tiny stand-in for CIFAR-10 --------------------------------------


def fake_cifar_tarball(root: Path, train_per_class: int = 26, test_per_class: int = 3) -> Path:
    """A CIFAR-10-shaped JPEG tree (the real class names, 32x32 images), packed like ../shared's tarball."""
    from PIL import Image

    from tests.test_cifar import smooth_images

    tree = root / "cifar10-jpeg"
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        images = smooth_images(per_class * len(CLASSES), seed=len(split))
        for index, image in enumerate(images):
            folder = tree / split / CLASSES[index % len(CLASSES)]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{index:04d}.jpg", quality=90)
    tarball = root / "cifar10-jpeg.tar.xz"
    with tarfile.open(tarball, "w:xz") as archive:
        archive.add(tree, arcname="cifar10-jpeg")
    return tarball


def test_bundled_python_models_are_the_exporters_current_code():
    copies = sorted(REPOSITORY.glob("*/*/model.py"))
    assert len(copies) == 3  # the FP32 and INT8 classifiers, and the preprocessing model
    for copy in copies:
        preprocessing = copy.parent.parent.name.endswith("_preprocess")
        source = PREPROCESS_MODEL_PY if preprocessing else CLASSIFIER_MODEL_PY
        assert copy.read_text() == source.read_text(), f"{copy} is not a copy of {source}; copy it over"


def test_make_bundled_model_trains_exports_and_evaluates(tmp_path):
    if subprocess.run(["make", "-q", "setup"], cwd=REPO_ROOT, capture_output=True).returncode != 0:
        pytest.skip("the .venv is not set up (make setup): this test must not install it")
    repository, run = tmp_path / "repository", tmp_path / "run"
    variables = {
        "CIFAR_TARBALL": fake_cifar_tarball(tmp_path / "source"),
        "DATA": tmp_path / "data",
        "REPOSITORY": repository,
        "BUNDLED_RUN": run,
        "ITERATIONS": 4,
        "EXPORT_FLAGS": "--max-accuracy-drop 100",  # 30 test images of an untrained net: any drop is noise
    }
    command = ["make", "--no-print-directory", "bundled-model", *(f"{k}={v}" for k, v in variables.items())]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    assert (run / "checkpoint-0000004.pt").is_file()
    for model in ("resnet20_cifar10", "resnet20_cifar10_int8"):
        assert (repository / model / "1" / "model.onnx").is_file()
        assert [p.name for p in (repository / f"{model}_pipeline" / "1").iterdir()] == [".gitkeep"]
    evaluations = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(evaluations) == 3 and all(e["n"] == 30 for e in evaluations)  # checkpoint, FP32, INT8
    checkpoint, fp32, _ = evaluations
    assert fp32["top1"] == pytest.approx(checkpoint["top1"], abs=100 / 30 + 1e-9)  # at most one image apart
