"""Export -> verify -> publish on real networks (random weights, CPU), FP32 / FP16 / INT8, and the refusals."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from tritonclient.grpc import model_config_pb2 as mc

import cli.files
from export import benchmark as runtime_benchmark
from export import onnx as onnx_export
from export import quantize as quantize_module
from export import repository, workflow
from export.errors import (
    AccuracyBudgetError,
    ExportError,
    RepositoryError,
    VerificationError,
    WeightsUnavailableError,
)
from export.quantize import QuantizeOptions, Unreadable, preprocess_file, quantize_int8, top1
from export.repository import BatchingPolicy, read_config, versions
from export.source import from_arch, from_checkpoint, load_state_dict_from_url
from server.spec import INPUT_NAME, OUTPUT_NAME, PRECISION_KEY, PreprocessSpec
from tests.support import (
    REPO_ROOT,
    VENV_BIN,
    files_of_at_most,
    free_port,
    killed_when_ready,
    permission_denied,
    repository_tree,
    wait_until,
)
from training.errors import ConfigError

CIFAR10_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_images(folder: Path, count: int, size: int = 48, seed: int = 0) -> list[Path]:
    """Smooth random colour fields saved as JPEG: real decoding, real resizing, varied content."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((size + index % 7, size), Image.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        path = folder / f"{index:03d}.jpg"
        path.write_bytes(buffer.getvalue())
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def resnet18():
    return from_arch("resnet18", "random")


@pytest.fixture(scope="module")
def resnet20():
    return from_arch("resnet20", "random")


@pytest.fixture(scope="module")
def resnet18_onnx(resnet18, tmp_path_factory):
    return onnx_export.export_onnx(resnet18.model, tmp_path_factory.mktemp("onnx") / "fp32.onnx", 224)


def test_onnx_is_checked_opset17_with_dynamic_batch_and_matches_torch(resnet18, resnet18_onnx):
    proto = onnx.load(str(resnet18_onnx))
    onnx.checker.check_model(proto, full_check=True)
    assert max(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")) >= 17
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value
    report = onnx_export.verify_onnx(resnet18.model, resnet18_onnx, 224, batch_sizes=(1, 3, 5))
    assert report.ok and report.relative_error < 1e-5 and report.top1_agreement == 1.0
    assert onnx_export.TRACE_BATCH not in report.batch_sizes


def test_fp16_variant_keeps_fp32_io_and_is_close(resnet18, resnet18_onnx, tmp_path):
    fp16 = onnx_export.convert_fp16(resnet18_onnx, tmp_path / "fp16.onnx")
    runtime = onnx_export.session(fp16)
    assert (
        runtime.get_inputs()[0].type == "tensor(float)" and runtime.get_outputs()[0].type == "tensor(float)"
    )
    assert fp16.stat().st_size < 0.6 * resnet18_onnx.stat().st_size
    report = onnx_export.verify_onnx(resnet18.model, fp16, 224, precision="fp16")
    assert report.ok and report.relative_error > 1e-6  # really half precision, and still within tolerance


def test_export_publishes_classifier_preprocess_and_pipeline(resnet18, tmp_path):
    options = workflow.ExportOptions(name="r18", repository=tmp_path, keep_versions=2, measure_latency=False)
    artifacts = workflow.export_to_repository(resnet18, options)
    assert [(a.model, a.version) for a in artifacts] == [("r18", 1)]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [repository.LOCK_FILENAME, "r18", "r18_pipeline", "r18_preprocess"]
    assert {p.name for p in (tmp_path / "r18" / "1").iterdir()} == {"model.onnx", "model.py"}
    assert [p.name for p in (tmp_path / "r18_pipeline" / "1").iterdir()] == [
        ".gitkeep"
    ]  # survives a git commit
    assert read_config(tmp_path / "r18").parameters[PRECISION_KEY].string_value == "fp32"
    labels = (tmp_path / "r18" / "labels.txt").read_text().splitlines()
    assert len(labels) == 1000 and labels[7] == "class_7"


def test_reexport_adds_versions_and_prunes(resnet20, tmp_path):
    options = workflow.ExportOptions(name="r20", repository=tmp_path, keep_versions=2, measure_latency=False)
    for _ in range(3):
        workflow.export_to_repository(resnet20, options)
    for model in ("r20", "r20_preprocess", "r20_pipeline"):
        assert versions(tmp_path / model) == [2, 3]  # a new number each time, pruned to --keep-versions


def test_a_publish_that_fails_half_way_undoes_all_it_published(resnet20, tmp_path):
    # The last model cannot be published (a file where its folder goes; a disk that fills does the same): the
    # models before it stayed published, and one left with a version but no config.pbtxt (the disk filled between
    # the two) stopped Triton from starting. Now the repository is as it was, after a first export and a re-export.
    options = workflow.ExportOptions(name="r20", repository=tmp_path, keep_versions=1, measure_latency=False)
    (tmp_path / "r20_fp16_pipeline").write_text("in the way")
    failing = replace(options, fp16=True, batching=BatchingPolicy(max_batch_size=8))
    for _ in range(2):
        before = repository_tree(tmp_path)
        with pytest.raises(RepositoryError) as error:
            workflow.export_to_repository(resnet20, failing)
        assert str(error.value).startswith(f"cannot publish r20_fp16_pipeline into {tmp_path}: File exists; ")
        assert str(error.value).endswith(
            "nothing of this export is published (the repository is as it was), so fix the cause and export again"
        )
        # the second time, its first models had replaced the config.pbtxt and labels.txt of the published ones
        assert repository_tree(tmp_path) == before
        workflow.export_to_repository(resnet20, options)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [repository.LOCK_FILENAME, "r20", "r20_fp16_pipeline", "r20_pipeline", "r20_preprocess"]
    assert read_config(tmp_path / "r20").max_batch_size == 32


def test_an_interrupted_publish_is_undone_and_an_undo_that_fails_names_what_is_left(tmp_path, monkeypatch):
    publication = repository.Publication(tmp_path)
    with pytest.raises(KeyboardInterrupt), publication:
        publication.add(tmp_path / "m", {"model.py": "x"}, mc.ModelConfig(name="m", backend="python"))
        raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == [repository.LOCK_FILENAME]

    publication = repository.Publication(tmp_path)
    with pytest.raises(RepositoryError) as error, publication:
        publication.add(tmp_path / "m", {"model.py": "x"}, mc.ModelConfig(name="m", backend="python"))
        monkeypatch.setattr(repository.shutil, "rmtree", permission_denied)
        raise OSError(28, "No space left on device")
    left = f"{tmp_path / 'm' / '1'}: Permission denied; {tmp_path / 'm'}: Permission denied"
    assert str(error.value) == (
        f"cannot publish m into {tmp_path}: No space left on device; undoing the export failed too ({left}): "
        "remove what is named there before Triton next starts"
    )


@pytest.mark.slow
def test_an_export_waits_for_another_publishing_and_checks_the_name_again_under_its_lock(resnet20, tmp_path):
    # Two exports of one name at once (two retraining jobs) both passed the check of what the name serves, then
    # wrote its one labels.txt in turns: both published (versions 1 and 2), and one's version was served with the
    # other's class names. Now an export waits for the repository's lock, and checks the name again under it.
    root, labels, log = tmp_path / "repo", tmp_path / "labels.txt", tmp_path / "export.log"
    root.mkdir()
    labels.write_text("".join(f"b{i}\n" for i in range(10)))
    held = cli.files.try_lock(root / repository.LOCK_FILENAME)  # as the other export, publishing, holds it
    with open(log, "w") as stderr:
        export = subprocess.Popen(
            [str(VENV_BIN / "resnet"), "export", *tiny_export(labels, root)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env={**os.environ, "COLUMNS": "300"},  # one log line per line
        )
    try:
        wait_until(lambda: "waiting for another" in log.read_text(), 120, what="the export waiting")
        assert (
            f"waiting for another export to finish publishing into {root} (pid {os.getpid()} on "
            in log.read_text()
        )
        # nothing published while it waits
        assert [p.name for p in root.iterdir()] == [repository.LOCK_FILENAME]
        # meanwhile the other export publishes the name with the CIFAR-10 class names, and ends
        spec = repository.ClassifierSpec("tiny", "resnet20", "fp32", 10, resnet20.spec)
        other = repository.Publication(root)  # its lock is `held`
        config = repository.classifier_config(spec)
        other.add(root / "tiny", {"model.onnx": b"weights"}, config, CIFAR10_LABELS)
        other.prune(3)
        held.close()
        export.wait(timeout=60)
    finally:
        export.kill()
    assert export.returncode == 1
    assert (
        log.read_text()
        .strip()
        .splitlines()[-1]
        .startswith(
            f"resnet: error: {root / 'tiny'} serves version 1 with one config.pbtxt and labels.txt; this model changes "
            "them (class names airplane -> b0, automobile -> b1, bird -> b2 and 7 more)"
        )
    )
    assert versions(root / "tiny") == [1]
    assert (root / "tiny" / "labels.txt").read_text().split() == CIFAR10_LABELS


KILLED_WHILE_PUBLISHING = """
import sys, time
from pathlib import Path
from export import repository

root = Path(sys.argv[1])
config = repository.read_config(root / "tiny")
with repository.Publication(root) as publication:
    publication.add(root / "tiny", {"model.onnx": b"weights"}, config, [f"b{i}" for i in range(10)])
    print("half published", flush=True)
    time.sleep(600)
"""


@pytest.mark.slow
def test_an_export_after_one_killed_while_publishing_undoes_it_then_publishes(resnet20, tmp_path):
    # An export killed outright (SIGKILL, the OOM killer) while publishing left its versions, served with its class
    # names: the next export of the name with the names it had before was refused, and nothing undid the first.
    root = tmp_path / "repo"
    options = workflow.ExportOptions(
        name="tiny", repository=root, labels=CIFAR10_LABELS, measure_latency=False
    )
    workflow.export_to_repository(resnet20, options)
    killed = killed_when_ready(KILLED_WHILE_PUBLISHING, str(root), ready="half published")
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"{label}\n" for label in CIFAR10_LABELS))
    result = run_cli(*tiny_export(labels, root), env={"COLUMNS": "300"})
    assert result.returncode == 0, result.stderr
    assert f"undid an export (pid {killed} on " in result.stderr
    assert (
        f"killed while publishing into {root} (tiny): the repository is as it was before it" in result.stderr
    )
    assert versions(root / "tiny") == [1, 2]  # 2: this export's, the killed one's undone
    assert (root / "tiny" / "labels.txt").read_text().split() == CIFAR10_LABELS
    assert (root / "tiny" / "2" / "model.onnx").read_bytes() != b"weights"


def test_another_class_set_or_preprocessing_under_a_published_name_is_refused(resnet20, tmp_path):
    # Every version is served with the model's one config.pbtxt and labels.txt: a 2-class export under a 10-class
    # name was published, and the versions kept for rollback then failed every request (the gateway) or answered
    # with 2 names for 10 scores (Triton)
    options = workflow.ExportOptions(
        name="r20", repository=tmp_path, labels=CIFAR10_LABELS, measure_latency=False
    )
    workflow.export_to_repository(resnet20, options)
    swapped = [{"cat": "dog", "dog": "cat"}.get(label, label) for label in CIFAR10_LABELS]
    refusals = [
        (from_arch("resnet20", "random", num_classes=2), None, "(10 classes -> 2)"),
        (resnet20, swapped, "(class names cat -> dog, dog -> cat)"),
        (
            resnet20,
            None,
            "(class names airplane -> class_0, automobile -> class_1, bird -> class_2 and 7 more)",
        ),
        (
            from_arch("resnet18", "random", num_classes=10),
            CIFAR10_LABELS,
            "(preprocessing resize_shorter 32 -> 256",
        ),
    ]
    for source, labels, change in refusals:
        with pytest.raises(
            ExportError, match=re.escape(f"{tmp_path / 'r20'} serves version 1 with one")
        ) as error:
            workflow.validate(replace(options, labels=labels), source)
        assert change in str(error.value) and str(error.value).endswith(
            f"or move {tmp_path / 'r20'} away first"
        )
    workflow.validate(options, resnet20)  # the same classes and preprocessing: a new version
    workflow.validate(replace(options, name="r20_two", labels=None), refusals[0][0])  # or a new name
    unnamed = replace(options, name="unnamed", labels=None)
    workflow.export_to_repository(resnet20, unnamed)
    # naming class_N indexes changes nothing
    workflow.validate(replace(unnamed, labels=CIFAR10_LABELS), resnet20)
    (tmp_path / "unnamed" / "config.pbtxt").write_text("input {")  # cut short: a re-export repairs it
    workflow.validate(replace(unnamed, labels=["a", "b"]), refusals[0][0])
    assert versions(tmp_path / "r20") == [1]


def test_gpu_target_writes_onnxruntime_configs_with_tensorrt_fp16(resnet20, tmp_path):
    options = workflow.ExportOptions(
        name="r20", repository=tmp_path, target="gpu", fp16=True, measure_latency=False
    )
    artifacts = workflow.export_to_repository(resnet20, options)
    assert [a.model for a in artifacts] == ["r20", "r20_fp16"]
    config = read_config(tmp_path / "r20")
    assert config.platform == "onnxruntime_onnx"
    accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert (accelerator.name, accelerator.parameters["precision_mode"]) == ("tensorrt", "FP16")
    assert read_config(tmp_path / "r20_fp16").parameters[PRECISION_KEY].string_value == "fp16"
    assert {p.name for p in (tmp_path / "r20" / "1").iterdir()} == {"model.onnx"}  # no Python backend on GPU
    with pytest.raises(ExportError, match="tensorrt"):
        workflow.export_to_repository(
            resnet20, workflow.ExportOptions(name="r20", repository=tmp_path, target="cpu", tensorrt=True)
        )


def test_parity_failure_refuses_publishing(resnet20, tmp_path, monkeypatch):
    """A subtly wrong ONNX file (classifier bias shifted) must fail verification and publish nothing."""
    real_export = onnx_export.export_onnx

    def broken_export(model, path, crop, **kwargs):
        real_export(model, path, crop, **kwargs)
        proto = onnx.load(str(path))
        bias = next(t for t in proto.graph.initializer if t.name.endswith("fc.bias"))
        shifted = onnx.numpy_helper.to_array(bias).copy()
        shifted[::2] += 5.0
        bias.CopyFrom(onnx.numpy_helper.from_array(shifted, bias.name))
        onnx.save(proto, str(path))
        return path

    monkeypatch.setattr(onnx_export, "export_onnx", broken_export)
    options = workflow.ExportOptions(name="r18", repository=tmp_path / "repo", measure_latency=False)
    with pytest.raises(VerificationError, match="does not match PyTorch.*nothing published"):
        workflow.export_to_repository(resnet20, options)
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())


def test_int8_calibrates_on_images_checks_accuracy_and_publishes(resnet18, resnet18_onnx, tmp_path):
    calib = tmp_path / "calib"
    write_images(calib, 16)
    eval_dir = tmp_path / "eval"
    for index in (0, 1):  # named as the labels a model without class names gets
        write_images(eval_dir / f"class_{index}", 4, seed=index)
    # a corrupt file in each folder is skipped and counted, not the end of the export
    (calib / "0000_broken.jpg").write_bytes(b"not a jpeg")
    (eval_dir / "class_1" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    options = workflow.ExportOptions(
        name="r18",
        repository=tmp_path / "repo",
        int8=True,
        calib_data=calib,
        eval_data=eval_dir,
        max_accuracy_drop=100,
        quantize=QuantizeOptions(max_calibration_images=16),
        measure_latency=False,
    )
    artifacts = workflow.export_to_repository(resnet18, options)
    assert [a.model for a in artifacts] == ["r18", "r18_int8"]
    int8 = tmp_path / "repo" / "r18_int8" / "1" / "model.onnx"
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(int8)).graph.node)
    assert int8.stat().st_size < 0.4 * resnet18_onnx.stat().st_size
    assert read_config(tmp_path / "repo" / "r18_int8").parameters[PRECISION_KEY].string_value == "int8"
    assert (tmp_path / "repo" / "r18_int8_pipeline" / "config.pbtxt").is_file()
    assert " pt, n=8, 1 unreadable skipped)" in artifacts[1].check


@pytest.mark.parametrize(
    ("folders", "message"),
    [
        # labelled by sorted folder order before: the INT8 check measured both models against wrong labels
        (["cat", "zebra"], "has classes the model does not know: zebra"),
        (["n01440764", "n01443537"], "none of its 2 class folders is one of the model's 10 class names"),
    ],
)
def test_eval_data_that_cannot_be_labelled_is_refused_before_any_work(resnet20, tmp_path, folders, message):
    for name in folders:
        write_images(tmp_path / "eval" / name, 1)
    options = workflow.ExportOptions(
        name="r20",
        repository=tmp_path / "repo",
        int8=True,
        calib_data=tmp_path / "eval" / folders[0],
        eval_data=tmp_path / "eval",
        labels=CIFAR10_LABELS,
    )
    with pytest.raises(ExportError, match=message):
        workflow.validate(options, resnet20)
    assert not (tmp_path / "repo").exists()


def test_int8_over_the_accuracy_budget_is_refused(resnet20, tmp_path, monkeypatch):
    """Labels are the FP32 model's own predictions (FP32 top-1 = 100%); an INT8 model with its classifier
    damaged must lose more than the budget and be refused."""
    spec = PreprocessSpec.cifar10()
    fp32 = onnx_export.export_onnx(resnet20.model, tmp_path / "fp32.onnx", 32)
    eval_dir, images = tmp_path / "eval", write_images(tmp_path / "all", 24)
    runtime = onnx_export.session(fp32)
    for path in images:
        predicted = int(
            runtime.run([OUTPUT_NAME], {INPUT_NAME: preprocess_file(path, spec)[None]})[0].argmax()
        )
        (eval_dir / f"{predicted:04d}").mkdir(parents=True, exist_ok=True)
        os.replace(path, eval_dir / f"{predicted:04d}" / path.name)
    classes = [f"{i:04d}" for i in range(10)]
    samples = [(p, int(p.parent.name)) for p in eval_dir.rglob("*.jpg")]
    assert top1(fp32, samples, spec) == 1.0

    def damaged_int8(fp32_path, int8_path, calib_dir, spec, options=None, **kwargs):
        quantize_int8(fp32_path, int8_path, calib_dir, spec, options, **kwargs)
        proto = onnx.load(str(int8_path))  # negate the logits: argmax becomes argmin
        producer = next(n for n in proto.graph.node if OUTPUT_NAME in n.output)
        producer.output[list(producer.output).index(OUTPUT_NAME)] = "logits_before_damage"
        proto.graph.node.append(onnx.helper.make_node("Neg", ["logits_before_damage"], [OUTPUT_NAME]))
        onnx.save(proto, str(int8_path))
        return int8_path

    monkeypatch.setattr(workflow, "quantize_int8", damaged_int8)
    source = from_arch("resnet20", "random")
    options = workflow.ExportOptions(
        name="r18",
        repository=tmp_path / "repo",
        int8=True,
        calib_data=eval_dir,
        eval_data=eval_dir,
        labels=classes,
        quantize=QuantizeOptions(max_calibration_images=8),
        measure_latency=False,
    )
    source.classes = classes
    with pytest.raises(AccuracyBudgetError, match="budget 1.*nothing published"):
        workflow.export_to_repository(source, options)
    assert not (tmp_path / "repo").exists()


def test_checkpoint_round_trip_keeps_classes_and_spec(tmp_path):
    from training.models import build_model

    model = build_model("resnet20")
    classes = [f"thing{i}" for i in range(10)]
    torch.save(
        {
            "model": model.state_dict(),
            "arch": "resnet20",
            "num_classes": 10,
            "classes": classes,
            "preprocess": PreprocessSpec.cifar10().to_dict(),
        },
        tmp_path / "ours.pt",
    )
    source = from_checkpoint(tmp_path / "ours.pt")
    assert (source.arch, source.classes, source.spec) == ("resnet20", classes, PreprocessSpec.cifar10())
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(ExportError, match="pass --arch"):
        from_checkpoint(tmp_path / "bare.pt")
    with pytest.raises(
        ExportError, match=r"does not fit resnet32: Missing key\(s\) in state_dict: \"layer1.3"
    ):
        from_checkpoint(tmp_path / "bare.pt", arch="resnet32")  # torch's first problem, not its header
    assert from_checkpoint(tmp_path / "bare.pt", arch="resnet20").classes is None
    with pytest.raises(ExportError, match="ours.pt is a resnet20 checkpoint, not resnet56: leave --arch out"):
        from_checkpoint(tmp_path / "ours.pt", arch="resnet56")


def test_checkpoint_stride_variant_is_honoured(tmp_path):
    """v1 and v1.5 bottlenecks have the same weight shapes; only the checkpoint can say which one it is."""
    from training.models import build_model

    model = build_model("resnet50", num_classes=4, stride_variant="v1")
    torch.save({"model": model.state_dict(), "arch": "resnet50", "stride_variant": "v1"}, tmp_path / "v1.pt")
    loaded = from_checkpoint(tmp_path / "v1.pt").model
    inputs = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs), model.eval()(inputs))


def test_unreachable_weights_url_fails_fast_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = f"http://127.0.0.1:{free_port()}/resnet18-f37072fd.pth"
    with pytest.raises(WeightsUnavailableError, match="cannot download .*pass --checkpoint"):
        load_state_dict_from_url(url, timeout=2)
    assert not list(tmp_path.rglob("*.pth")) and not list(tmp_path.rglob("*.part"))


def test_weights_download_is_cached_and_hash_checked(tmp_path, monkeypatch):
    """A real HTTP server on loopback stands in for download.pytorch.org."""
    import functools
    import hashlib
    import http.server
    import threading

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    served = tmp_path / "served"
    served.mkdir()
    torch.save({"w": torch.arange(4.0)}, served / "payload.pth")
    digest = hashlib.sha256((served / "payload.pth").read_bytes()).hexdigest()
    os.replace(served / "payload.pth", served / f"tiny-{digest[:8]}.pth")
    (served / "tiny-00000000.pth").write_bytes((served / f"tiny-{digest[:8]}.pth").read_bytes())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        state = load_state_dict_from_url(f"{base}/tiny-{digest[:8]}.pth", timeout=5)
        assert torch.equal(state["w"], torch.arange(4.0))
        (served / f"tiny-{digest[:8]}.pth").unlink()  # the second load must come from the cache
        assert torch.equal(
            load_state_dict_from_url(f"{base}/tiny-{digest[:8]}.pth", timeout=5)["w"], state["w"]
        )
        with pytest.raises(WeightsUnavailableError, match="does not match 00000000"):
            load_state_dict_from_url(f"{base}/tiny-00000000.pth", timeout=5)
    finally:
        server.shutdown()
    assert not list((tmp_path / "torch").rglob("tiny-00000000*"))


def test_torchvision_weights_give_their_preprocessing_and_classes():
    import torchvision

    from export.source import spec_from_torchvision

    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V2
    assert spec_from_torchvision(weights) == PreprocessSpec(resize_shorter=232, crop=224)
    assert (
        spec_from_torchvision(torchvision.models.ResNet50_Weights.IMAGENET1K_V1) == PreprocessSpec.imagenet()
    )
    assert len(weights.meta["categories"]) == 1000


@pytest.mark.slow
def test_cli_export_prints_summary_and_publishes(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"thing {i}\n" for i in range(10)))
    result = run_cli(
        *tiny_export(labels, tmp_path / "repo"),
        "--max-batch-size",
        "8",
        "--keep-versions",
        "1",
    )
    assert result.returncode == 0, result.stderr
    assert "Published to" in result.stdout and "tiny" in result.stdout and "rel. err" in result.stdout
    config = read_config(tmp_path / "repo" / "tiny")
    assert config.max_batch_size == 8
    assert (tmp_path / "repo" / "tiny" / "labels.txt").read_text().splitlines()[3] == "thing 3"


def tiny_export(labels: Path, repository: Path) -> list[str]:
    """`resnet export` arguments for a ResNet-20 named tiny."""
    return ["--arch", "resnet20", "--name", "tiny", "--labels", str(labels), "--repository", str(repository)]


def run_cli(*args: str, env: dict | None = None, **popen) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "resnet"), "export", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        **popen,
    )


@pytest.mark.slow
def test_a_full_scratch_disk_is_named_as_the_scratch_disk(resnet20, tmp_path):
    # Files may not grow past a size in that process, as on a full TMPDIR (the repository is often on another
    # disk): the ONNX export's failed write was a bare `[Errno 27] File too large`, as was the INT8 quantizer's
    # (its own temporary folder, beside ours); a repository on another disk was where users looked.
    fp32_size = onnx_export.export_onnx(resnet20.model, tmp_path / "fp32.onnx", 32).stat().st_size
    write_images(tmp_path / "calib" / "x", 8, size=40)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    # the pre-processed model the quantizer writes is a few hundred bytes larger than the FP32 one
    for flags, limit in (
        ((), 100_000),
        (("--int8", "--calib-data", str(tmp_path / "calib")), fp32_size + 100),
    ):
        result = run_cli(
            "--arch",
            "resnet20",
            "--repository",
            str(tmp_path / "repo"),
            *flags,
            env={"TMPDIR": str(scratch)},
            preexec_fn=files_of_at_most(limit),
        )
        assert result.returncode == 1
        assert result.stderr.strip().splitlines()[-1] == (
            f"resnet: error: cannot write the export's scratch files in {scratch} (TMPDIR): File too large; free "
            "space there or point TMPDIR at a larger disk (nothing was published)"
        )
        assert not (tmp_path / "repo").exists()
        assert not [*scratch.glob("resnet-export-*"), *scratch.glob("quant-*")]  # (a library leaves a .ses)


@pytest.mark.slow
def test_a_sigterm_mid_export_removes_its_scratch_folder_and_publishes_nothing(tmp_path):
    # docker stop, a job's time limit: the export stopped where it stood and left its scratch folder (98 MB for
    # this ResNet-50) in TMPDIR, every time. Sent as soon as the FP32 model is written, before its verification.
    scratch, repository = tmp_path / "scratch", tmp_path / "repo"
    scratch.mkdir()
    command = [str(VENV_BIN / "resnet"), "export", "--arch", "resnet50", "--repository", str(repository)]
    export = subprocess.Popen(
        command, env={**os.environ, "TMPDIR": str(scratch)}, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_until(lambda: any(scratch.glob("resnet-export-*/fp32.onnx")), 120, what="the FP32 model written")
        export.send_signal(signal.SIGTERM)
        _, stderr = export.communicate(timeout=60)
    finally:
        export.kill()
    assert export.returncode == 143
    assert stderr.strip().splitlines()[-1] == "resnet: error: stopped by SIGTERM"
    assert not any(scratch.glob("resnet-export-*")) and not repository.exists()


def test_a_model_the_quantizer_cut_short_on_a_full_disk_is_named_so(resnet18_onnx, tmp_path, monkeypatch):
    # ONNX Runtime's pre-processing writes through ONNX's C++ shape inference, which does not check its write: on
    # a full tmpfs (2.6 MB, `resnet export --int8`) the model came back cut short and the export ended in a
    # protobuf DecodeError traceback. The cut is made here as the disk made it.
    def cut_short(source, target, **_):
        Path(target).write_bytes(Path(source).read_bytes()[:100_000])
        onnx.load(target)

    monkeypatch.setattr(quantize_module, "quant_pre_process", cut_short)
    with pytest.raises(ExportError) as error:
        quantize_module.quantize_with_reader(resnet18_onnx, tmp_path / "int8.onnx", iter([]))
    assert str(error.value).startswith(
        f"ONNX Runtime's quantization pre-processing wrote a model it cannot read back in {tempfile.gettempdir()}: "
        "is TMPDIR full? (its writes are not checked, so a full disk cuts the model short without an error; it "
        "needs room for a few copies of the 46."
    )


@pytest.mark.slow
def test_cli_offline_torchvision_weights_is_one_line_error(tmp_path):
    result = run_cli(
        "--arch",
        "resnet18",
        "--weights",
        "torchvision",
        "--repository",
        str(tmp_path / "repo"),
        env={"TORCH_HOME": str(tmp_path / "torch"), "RESNET_DOWNLOAD_TIMEOUT": "3"},
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "resnet: error: cannot download https://download.pytorch.org/"
    )
    assert not (tmp_path / "repo").exists()


@pytest.mark.slow
def test_cli_int8_without_calibration_data_is_one_line_error(tmp_path):
    result = run_cli("--arch", "resnet20", "--int8", "--repository", str(tmp_path / "repo"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "resnet: error: --int8 needs --calib-data DIR (a folder of real images to calibrate on)"
    )


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ({"batching": BatchingPolicy(instances=0)}, "--instances must be from 1 to 64"),
        # each a Python-backend process in Triton: 100000 was published as it was
        ({"batching": BatchingPolicy(instances=100_000)}, "--instances must be from 1 to 64"),
        ({"batching": BatchingPolicy(max_batch_size=10**8)}, "--max-batch-size must be from 1 to 4096"),
        ({"batching": BatchingPolicy(max_queue_delay_us=-5)}, "--max-queue-delay-us must be 0 or more"),
        ({"quantize": QuantizeOptions(max_calibration_images=0)}, "--calib-images must be at least 1"),
        ({"max_accuracy_drop": -1.0}, "--max-accuracy-drop is in top-1 points"),
        (
            {"name": "resnet20_pipeline"},
            "ends in '_pipeline', which export keeps for the <name>_pipeline model",
        ),
        ({"name": "r20_preprocess"}, "ends in '_preprocess'"),
    ],
    ids=[
        "no instances",
        "a process per instance",
        "a batch past the gateway's",
        "negative delay",
        "no calibration images",
        "negative accuracy budget",
        "another model's ensemble name",
        "another model's preprocess name",
    ],
)
def test_flags_that_cannot_work_are_refused_before_any_work(resnet20, tmp_path, field, message):
    options = workflow.ExportOptions(**{"name": "r20", "repository": tmp_path / "repo", **field})
    with pytest.raises(ExportError, match=message):
        workflow.validate(options, resnet20)


@pytest.mark.parametrize("flags", [["--weights", "torchvision"], ["--num-classes", "5"]])
def test_arch_only_flags_beside_a_checkpoint_are_refused(flags, tmp_path):
    result = run_cli("--checkpoint", str(tmp_path / "any.pt"), *flags, "--repository", str(tmp_path / "repo"))
    assert result.returncode == 1
    assert result.stderr == (
        "resnet: error: --weights and --num-classes go with --arch alone: a --checkpoint has its own\n"
    )


@pytest.mark.parametrize("num_classes", [0, -3])
def test_a_class_count_below_one_is_refused(num_classes):
    with pytest.raises(ExportError, match=f"--num-classes must be at least 1, got {num_classes}"):
        from_arch("resnet20", "random", num_classes)


@pytest.mark.slow
def test_cli_bad_batching_flag_is_one_line_error(tmp_path):
    result = run_cli(
        "--arch", "resnet20", "--max-queue-delay-us", "-5", "--repository", str(tmp_path / "repo")
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["resnet: error: --max-queue-delay-us must be 0 or more"]
    assert not (tmp_path / "repo").exists()


def test_cli_help_explains_sources_and_variants():
    from export.cli import get_args_parser

    text = get_args_parser().format_help()
    for flag in (
        "--checkpoint",
        "--weights",
        "--int8",
        "--calib-data",
        "--max-accuracy-drop",
        "--tensorrt",
        "--keep-versions",
        "--target",
    ):
        assert flag in text


@pytest.mark.slow
def test_resnet50_fp32_and_int8_export(tmp_path):
    calib = tmp_path / "calib"
    write_images(calib, 8, size=256)
    source = from_arch("resnet50", "random")
    options = workflow.ExportOptions(
        name="r50",
        repository=tmp_path / "repo",
        int8=True,
        calib_data=calib,
        quantize=QuantizeOptions(max_calibration_images=8),
    )
    artifacts = workflow.export_to_repository(source, options)
    assert [a.model for a in artifacts] == ["r50", "r50_int8"]
    assert all(a.latency_ms and a.latency_ms > 0 for a in artifacts)
    assert "agrees with FP32" in artifacts[1].check
    assert artifacts[1].size_bytes < 0.4 * artifacts[0].size_bytes


def test_images_that_cannot_be_read_are_skipped_and_named_and_none_readable_is_an_error(resnet20, tmp_path):
    spec = PreprocessSpec.cifar10()
    fp32 = onnx_export.export_onnx(resnet20.model, tmp_path / "fp32.onnx", 32)
    good = write_images(tmp_path / "good", 3)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    runtime = onnx_export.session(fp32)
    labels = [
        int(runtime.run([OUTPUT_NAME], {INPUT_NAME: preprocess_file(p, spec)[None]})[0].argmax())
        for p in good
    ]
    unreadable = Unreadable()
    samples = [(good[0], labels[0]), (broken, 0), *zip(good[1:], labels[1:], strict=True)]
    assert (
        top1(fp32, samples, spec, batch_size=2, unreadable=unreadable) == 1.0
    )  # over the three it could read
    assert list(unreadable.found) == [broken]
    assert unreadable.summary().startswith(f"1 unreadable image skipped (e.g. {broken}: ")
    with pytest.raises(ExportError, match=r"none of the 1 images can be read: 1 unreadable image skipped"):
        top1(fp32, [(broken, 0)], spec)


def test_bad_calibration_image_names_the_file(tmp_path):
    (tmp_path / "calib").mkdir()
    (tmp_path / "calib" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ExportError, match="broken.jpg"):
        preprocess_file(tmp_path / "calib" / "broken.jpg", PreprocessSpec.cifar10())


if sys.platform != "linux":  # pragma: no cover
    pytest.skip("exports are tested on Linux", allow_module_level=True)


def run_runtime_benchmark(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "export.benchmark", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # before: tracebacks (int(), a division by zero), torch spawning 99999999 threads, a timing loop that
        # never ended
        (["--batch-sizes", "1,abc"], "expected comma-separated batch sizes, got '1,abc'"),
        (["--batch-sizes", "0"], "batch sizes must be at least 1, got '0'"),
        (["--threads", "99999999"], "--threads must be from 1 to 1024, got 99999999"),
        (["--min-seconds", "inf"], "--min-seconds must be more than 0 and at most 3600, got inf"),
    ],
)
def test_runtime_benchmark_refuses_bad_flags(args, message, capsys):
    with pytest.raises((SystemExit, ConfigError)) as refused:
        runtime_benchmark.main(runtime_benchmark.get_args_parser().parse_args(args))
    said = capsys.readouterr().err if refused.type is SystemExit else str(refused.value)
    assert message in said


@pytest.mark.slow
def test_runtime_benchmark_is_a_command_with_one_line_errors_and_a_table():
    unknown = run_runtime_benchmark("--arch", "resnet51")  # a traceback from the model factory before
    assert unknown.returncode == 1
    assert (
        unknown.stderr.startswith("resnet: error: unknown architecture 'resnet51'")
        and unknown.stderr.count("\n") == 1
    )
    result = run_runtime_benchmark("--arch", "resnet20", "--batch-sizes", "1,2", "--min-seconds", "0.05")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = result.stdout.strip().splitlines()
    assert rows[0].startswith("| runtime | img/s @ batch 1 | img/s @ batch 2 |")
    assert [row.split(" | ")[0] for row in rows[2:]] == [
        "| PyTorch eager FP32",
        "| ONNX Runtime FP32",
        "| ONNX Runtime INT8 (QDQ)",
    ]
