"""The repository writer: configs from Triton's schema (parsed back), atomic versions, pruning, TensorRT configs."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading

import pytest
from tritonclient.grpc import model_config_pb2 as mc

import cli.files
from cli.main import main as resnet
from export import repository as repo
from export import tensorrt as trt_config
from export.errors import ExportError, RepositoryError
from server.spec import (
    ARCH_KEY,
    IMAGE_INPUT_NAME,
    INPUT_NAME,
    LABELS_FILENAME,
    OUTPUT_NAME,
    PRECISION_KEY,
    ROLE_KEY,
    PreprocessSpec,
    Role,
)
from tests.support import (
    REPO_ROOT,
    files_of_at_most,
    killed_when_ready,
    permission_denied,
    repository_tree,
    wait_until,
)


def classifier(target: str = "cpu", **overrides) -> repo.ClassifierSpec:
    values = dict(
        name="resnet50",
        arch="resnet50",
        precision="fp32",
        num_classes=1000,
        preprocess=PreprocessSpec.imagenet(),
        target=target,
    )
    return repo.ClassifierSpec(**{**values, **overrides})


def written_config(tmp_path, config: mc.ModelConfig, labels=None) -> mc.ModelConfig:
    model_dir = tmp_path / config.name
    repo.write_model(model_dir, config, labels)
    return repo.read_config(model_dir)


def params(config: mc.ModelConfig) -> dict[str, str]:
    return {key: value.string_value for key, value in config.parameters.items()}


def test_served_preprocessing_reads_back_the_spec_and_real_labels_only(tmp_path):
    spec = PreprocessSpec.cifar10()
    config = repo.classifier_config(classifier(name="r20", num_classes=2, preprocess=spec))
    repo.write_model(tmp_path / "r20", config, ["cat", "dog"])
    assert repo.served_preprocessing(tmp_path / "r20") == (spec, ["cat", "dog"])
    repo.write_model(tmp_path / "r20", config, repo.class_index_labels(2))  # nothing named the classes
    assert repo.served_preprocessing(tmp_path / "r20") == (spec, None)
    config.parameters["preprocess.crop"].string_value = "a lot"
    repo.write_model(tmp_path / "r20", config)
    with pytest.raises(RepositoryError, match="r20/config.pbtxt: bad preprocessing parameter"):
        repo.served_preprocessing(tmp_path / "r20")


def test_cpu_classifier_config_is_a_python_backend_model_with_batching_and_spec(tmp_path):
    spec = classifier(
        batching=repo.BatchingPolicy(max_batch_size=16, max_queue_delay_us=500, max_queue_size=64)
    )
    config = written_config(tmp_path, repo.classifier_config(spec), labels=["cat", "dog"])
    assert config.backend == "python" and config.max_batch_size == 16
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        (INPUT_NAME, mc.TYPE_FP32, [3, 224, 224])
    ]
    (output,) = config.output
    assert (output.name, list(output.dims), output.label_filename) == (OUTPUT_NAME, [1000], LABELS_FILENAME)
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 64
    assert config.dynamic_batching.default_queue_policy.timeout_action == mc.ModelQueuePolicy.REJECT
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert config.version_policy.latest.num_versions == 1
    assert config.model_warmup[0].inputs[INPUT_NAME].zero_data
    values = params(config)
    assert (values[ROLE_KEY], values[ARCH_KEY], values[PRECISION_KEY]) == (
        Role.CLASSIFIER,
        "resnet50",
        "fp32",
    )
    assert PreprocessSpec.from_parameters(values) == PreprocessSpec.imagenet()
    assert (tmp_path / "resnet50" / LABELS_FILENAME).read_text() == "cat\ndog\n"


def test_gpu_onnx_config_uses_tensorrt_accelerator_on_gpu_instances(tmp_path):
    config = written_config(tmp_path, repo.classifier_config(classifier("gpu", tensorrt_precision="FP16")))
    assert config.platform == "onnxruntime_onnx" and config.default_model_filename == "model.onnx"
    assert not config.backend
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    assert accelerator.parameters["precision_mode"] == "FP16"
    assert int(accelerator.parameters["max_workspace_size_bytes"]) > 0


def test_gpu_int8_and_tensorrt_plan_configs(tmp_path):
    int8 = written_config(
        tmp_path,
        repo.classifier_config(
            classifier("gpu", name="resnet50_int8", precision="int8", tensorrt_precision="INT8")
        ),
    )
    assert (
        int8.optimization.execution_accelerators.gpu_execution_accelerator[0].parameters["precision_mode"]
        == "INT8"
    )
    assert params(int8)[PRECISION_KEY] == "int8"
    plan = written_config(
        tmp_path,
        repo.classifier_config(classifier("gpu", name="resnet50_trt", runtime="tensorrt", precision="fp16")),
    )
    assert (plan.platform, plan.default_model_filename) == ("tensorrt_plan", "model.plan")
    assert plan.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert not plan.optimization.execution_accelerators.gpu_execution_accelerator


def test_preprocess_and_pipeline_configs_chain_image_bytes_to_logits(tmp_path):
    spec = classifier(preprocess=PreprocessSpec.cifar10(), num_classes=10, name="r20", arch="resnet20")
    pre = written_config(
        tmp_path, repo.preprocess_config("r20_preprocess", "resnet20", spec.preprocess, spec.batching)
    )
    assert pre.backend == "python"
    assert (pre.input[0].name, pre.input[0].data_type, list(pre.input[0].dims)) == (
        IMAGE_INPUT_NAME,
        mc.TYPE_STRING,
        [1],
    )
    assert (pre.output[0].name, list(pre.output[0].dims)) == (INPUT_NAME, [3, 32, 32])
    assert params(pre)[ROLE_KEY] == Role.PREPROCESS
    assert PreprocessSpec.from_parameters(params(pre)) == PreprocessSpec.cifar10()

    pipe = written_config(
        tmp_path, repo.pipeline_config("r20_pipeline", spec, "r20_preprocess"), labels=list("abcdefghij")
    )
    assert pipe.platform == "ensemble" and pipe.max_batch_size == spec.batching.max_batch_size
    assert pipe.output[0].label_filename == LABELS_FILENAME
    first, second = pipe.ensemble_scheduling.step
    assert first.model_name == "r20_preprocess" and second.model_name == "r20"
    assert first.output_map[INPUT_NAME] == second.input_map[INPUT_NAME]
    assert second.output_map[OUTPUT_NAME] == OUTPUT_NAME
    assert params(pipe)[ROLE_KEY] == Role.PIPELINE


def test_unknown_target_and_misnamed_folder_are_refused(tmp_path):
    with pytest.raises(RepositoryError, match="unknown target"):
        repo.classifier_config(classifier("tpu"))
    with pytest.raises(RepositoryError, match="folder name"):
        repo.write_model(tmp_path / "other", repo.classifier_config(classifier()))


def test_versions_are_numbered_never_reused_and_pruned(tmp_path):
    model_dir = tmp_path / "m"
    assert [repo.publish_version(model_dir, {"model.onnx": f"v{i}"}) for i in range(4)] == [1, 2, 3, 4]
    assert repo.prune_versions(model_dir, keep=2) == [1, 2]
    assert repo.versions(model_dir) == [3, 4]
    assert repo.publish_version(model_dir, {"model.onnx": "v5"}) == 5  # not 1 again, though 1 is gone
    assert (model_dir / "3" / "model.onnx").read_text() == "v2"
    with pytest.raises(RepositoryError):
        repo.prune_versions(model_dir, keep=0)


def test_published_files_are_readable_by_other_users(tmp_path):
    # A Triton or gateway container usually runs as another user than the one who exported the model.
    model_dir = tmp_path / "m"
    version = repo.publish_version(model_dir, {"model.onnx": "weights"})
    repo.write_model(model_dir, mc.ModelConfig(name="m"), labels=["a", "b"])
    for path, readable in (
        (model_dir / str(version), 0o555),
        (model_dir / str(version) / "model.onnx", 0o444),
        (model_dir / "config.pbtxt", 0o444),
        (model_dir / "labels.txt", 0o444),
    ):
        assert stat.S_IMODE(path.stat().st_mode) & readable == readable, path


def test_failed_rename_publishes_nothing_and_leaves_no_partial(tmp_path, monkeypatch):
    model_dir = tmp_path / "m"
    repo.publish_version(model_dir, {"model.onnx": "good"})

    def crash(*_):
        raise OSError("simulated crash during rename")

    monkeypatch.setattr(repo.os, "rename", crash)
    with pytest.raises(OSError, match="simulated"):
        repo.publish_version(model_dir, {"model.onnx": "new"})
    assert repo.versions(model_dir) == [1]
    assert (model_dir / "1" / "model.onnx").read_text() == "good"
    assert sorted(p.name for p in model_dir.iterdir()) == ["1"]


def test_a_failed_first_publish_leaves_no_model_folder(tmp_path):
    # A copy that fails (a full disk; here a source that is gone): an empty model folder left behind would stop
    # Triton ("Could not determine backend for model"). A model that has versions keeps its folder.
    gone = tmp_path / "gone.onnx"
    with pytest.raises(FileNotFoundError):
        repo.publish_version(tmp_path / "repository" / "new", {"model.onnx": gone})
    assert list((tmp_path / "repository").iterdir()) == []
    repo.publish_version(tmp_path / "repository" / "old", {"model.onnx": "good"})
    with pytest.raises(FileNotFoundError):
        repo.publish_version(tmp_path / "repository" / "old", {"model.onnx": gone})
    assert sorted(p.name for p in (tmp_path / "repository" / "old").iterdir()) == ["1"]


def test_a_config_that_cannot_be_written_leaves_no_partial_file(tmp_path):
    # files may not pass 1 kB in that process: its write fails as on a full disk
    script = textwrap.dedent(f"""
        from pathlib import Path
        from export.repository import atomic_write_text
        atomic_write_text(Path({str(tmp_path)!r}) / "config.pbtxt", "x" * 100_000)
    """)
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        preexec_fn=files_of_at_most(1000),
    )
    assert result.returncode == 1 and "File too large" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_process_killed_mid_write_leaves_only_a_hidden_partial(tmp_path):
    """A writer process is SIGKILLed halfway through copying the model file: the worst moment to crash."""
    model_dir, source = tmp_path / "m", tmp_path / "model.onnx"
    repo.publish_version(model_dir, {"model.onnx": "good"})
    source.write_bytes(b"x" * 1_000_000)
    script = textwrap.dedent(f"""
        import shutil, sys, time
        from pathlib import Path
        from export import repository

        def stalled_copy(src, dst):
            Path(dst).write_bytes(Path(src).read_bytes()[:500_000])
            print("half written", flush=True)
            time.sleep(600)

        repository.shutil.copyfile = stalled_copy
        repository.publish_version(Path({str(model_dir)!r}), {{"model.onnx": Path({str(source)!r})}})
    """)
    writer = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT, stdout=subprocess.PIPE)
    try:
        assert writer.stdout.readline() == b"half written\n"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
    assert repo.versions(model_dir) == [1]
    leftovers = [p.name for p in model_dir.iterdir() if p.name != "1"]
    assert len(leftovers) == 1 and leftovers[0].startswith(repo.PARTIAL_PREFIX)
    assert repo.publish_version(model_dir, {"model.onnx": "next"}) == 2
    os.utime(model_dir / leftovers[0], (0, 0))  # an old crash's leftovers are cleaned by pruning
    repo.prune_versions(model_dir, keep=5)
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "2"]


def publish_in_thread(repository, seen: list[str]) -> tuple[threading.Thread, list[int]]:
    published: list[int] = []

    def publish() -> None:
        with repo.Publication(repository, log=seen.append) as publication:
            config = mc.ModelConfig(name="m", backend="python")
            published.append(publication.add(repository / "m", {"model.py": "x"}, config))

    thread = threading.Thread(target=publish)
    thread.start()
    return thread, published


def test_a_publication_waits_for_the_export_that_holds_the_repository(tmp_path):
    held = cli.files.try_lock(tmp_path / repo.LOCK_FILENAME)  # as an export publishing holds it
    seen: list[str] = []
    thread, published = publish_in_thread(tmp_path, seen)
    wait_until(lambda: seen, 10, what="the publication waiting")
    holder = f"pid {os.getpid()} on {os.uname().nodename}, since "
    assert seen[0].startswith(f"waiting for another export to finish publishing into {tmp_path} ({holder}")
    assert len(seen) == 1
    thread.join(0.5)
    assert thread.is_alive() and not (tmp_path / "m").exists()  # nothing published while it waits
    held.close()
    thread.join(10)
    assert published == [1] and repo.versions(tmp_path / "m") == [1]
    # the kernel released it with its holder, and the next export locks it at once
    seen.clear()
    thread, published = publish_in_thread(tmp_path, seen)
    thread.join(10)
    assert published == [2] and seen == []


def test_a_holder_that_never_lets_go_is_named_after_the_wait(tmp_path):
    held = cli.files.try_lock(tmp_path / repo.LOCK_FILENAME)
    seen: list[str] = []
    with pytest.raises(RepositoryError) as error:
        repo.hold_repository(tmp_path, seen.append, wait_s=0.3)
    lock = tmp_path / repo.LOCK_FILENAME
    holder = seen[0].split(" (", 1)[1].rstrip(")")
    assert holder.startswith(f"pid {os.getpid()} on ")
    assert str(error.value) == (
        f"{lock} is still held by another export ({holder}) after 0.3 s of waiting, and publishing takes seconds: "
        "it is likely stuck; stop it (its lock goes with it) and export again (nothing of this export is published)"
    )
    held.close()


def test_a_repository_without_locks_is_published_unguarded_with_a_warning(tmp_path, monkeypatch, capsys):
    # some network and FUSE file systems have no flock: exports published there before the lock, and still do
    def no_locks(handle, operation):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(cli.files.fcntl, "flock", no_locks)
    with repo.Publication(tmp_path) as publication:
        publication.add(tmp_path / "m", {"model.py": "x"}, mc.ModelConfig(name="m", backend="python"))
    assert repo.versions(tmp_path / "m") == [1]
    lock = tmp_path / repo.LOCK_FILENAME
    assert capsys.readouterr().err == f"warning: cannot lock {lock} (its file system has no locks)\n"


def test_a_prune_that_fails_keeps_the_published_export(tmp_path, monkeypatch):
    config = mc.ModelConfig(name="m", backend="python")
    with repo.Publication(tmp_path) as publication:
        publication.add(tmp_path / "m", {"model.py": "x"}, config)

    with pytest.raises(RepositoryError) as error, repo.Publication(tmp_path) as publication:
        publication.add(tmp_path / "m", {"model.py": "y"}, config)
        monkeypatch.setattr(repo.shutil, "rmtree", permission_denied)
        publication.prune(1)
    assert str(error.value) == (
        "this export is published, but the versions of m beyond the newest 1 cannot be removed: Permission denied; "
        "the newest is served, remove the others by hand"
    )
    assert repo.versions(tmp_path / "m") == [1, 2]  # not undone: version 2 is the export, and is served


KILLED_MID_PUBLISH = """
import sys, time
from pathlib import Path
from tritonclient.grpc import model_config_pb2 as mc
from export import repository

root = Path(sys.argv[1])
with repository.Publication(root) as publication:
    publication.add(root / "m", {"model.py": "new"}, mc.ModelConfig(name="m", backend="python"), ["x", "y"])
    publication.add(root / "n", {"model.py": "new"}, mc.ModelConfig(name="n", backend="python"))
    (root / "n" / "config.pbtxt").unlink()  # killed between n's version and its config: Triton would not start
    print("half published", flush=True)
    time.sleep(600)
"""


def published_m(root) -> None:
    with repo.Publication(root) as publication:
        publication.add(
            root / "m", {"model.py": "old"}, mc.ModelConfig(name="m", backend="python"), ["a", "b"]
        )
        publication.prune(3)


def test_an_export_killed_mid_publish_is_undone_by_the_next_one(tmp_path):
    # SIGKILL, the OOM killer or a lost machine gives an export no chance to undo itself: its models published
    # before it stayed, m with a version served with another version's class names, n with a version and no
    # config.pbtxt, which stops Triton from starting. Its journal lets the next export undo it.
    published_m(tmp_path)
    before = repository_tree(tmp_path)
    killed = killed_when_ready(KILLED_MID_PUBLISH, str(tmp_path), ready="half published")
    assert repo.versions(tmp_path / "m") == [1, 2] and repo.versions(tmp_path / "n") == [1]
    seen: list[str] = []
    with repo.Publication(tmp_path, log=seen.append):
        assert repository_tree(tmp_path) == before  # undone first, under the lock the killed export held
    assert seen == [
        f"undid an export (pid {killed} on {os.uname().nodename}, since {seen[0].split('since ')[1][:16]}) "
        f"killed while publishing into {tmp_path} (m, n): the repository is as it was before it"
    ]
    with repo.Publication(tmp_path, log=seen.append):  # once
        pass
    assert len(seen) == 1 and repository_tree(tmp_path) == before


def test_export_undo_unfinished_mends_a_repository_without_exporting(tmp_path, capsys):
    # Before, only the next export undid a killed one: until then Triton would not start on the repository (n has a
    # version and no config.pbtxt) and `resnet triton serve` could only warn
    published_m(tmp_path)
    before = repository_tree(tmp_path)
    killed = killed_when_ready(KILLED_MID_PUBLISH, str(tmp_path), ready="half published")
    assert "may be half published; `resnet export --repository" in repo.unfinished_publish_warning(tmp_path)
    undo = ["export", "--repository", str(tmp_path), "--undo-unfinished"]
    assert resnet(undo) == 0
    said = " ".join(capsys.readouterr().err.split())
    assert said.startswith(f"undid an export (pid {killed} on {os.uname().nodename}, since ")
    assert said.endswith(
        f"killed while publishing into {tmp_path} (m, n): the repository is as it was before it"
    )
    assert repository_tree(tmp_path) == before and repo.unfinished_publish_warning(tmp_path) is None
    assert resnet(undo) == 0
    assert " ".join(capsys.readouterr().err.split()) == (
        f"nothing to undo: no export was killed while publishing into {tmp_path}"
    )
    assert resnet(["export", "--repository", str(tmp_path / "none"), "--undo-unfinished"]) == 1
    assert capsys.readouterr().err == f"resnet: error: no model repository at {tmp_path / 'none'}\n"
    assert not (tmp_path / "none").exists()
    assert resnet([*undo, "--arch", "resnet20"]) == 1
    assert (
        capsys.readouterr().err
        == "resnet: error: --undo-unfinished exports nothing: give it --repository alone\n"
    )


def test_a_killed_export_that_cannot_be_undone_stops_the_next_until_mended(tmp_path, monkeypatch):
    published_m(tmp_path)
    journal = repo.Journal(holder="pid 7 on elsewhere, since 2026-12-07 21:00", versions_before={"m": []})
    journal.save(tmp_path)

    monkeypatch.setattr(repo.shutil, "rmtree", permission_denied)
    with pytest.raises(RepositoryError) as error, repo.Publication(tmp_path):
        pass
    journal_path = tmp_path / repo.JOURNAL_FILENAME
    assert str(error.value) == (
        f"an export (pid 7 on elsewhere, since 2026-12-07 21:00) was killed while publishing into {tmp_path}, and "
        f"undoing it failed ({tmp_path / 'm' / '1'}: Permission denied): fix that, or remove {journal_path} once the "
        "repository holds what you want served, and export again"
    )
    assert repo.versions(tmp_path / "m") == [1] and journal_path.is_file()
    held = cli.files.try_lock(tmp_path / repo.LOCK_FILENAME)  # the lock was let go
    held.close()
    journal_path.write_text('{"holder": "pid 7')  # (written atomically: only by hand)
    with pytest.raises(
        RepositoryError, match=r"^cannot read .*\.resnet-export\.journal \(Unterminated string"
    ):
        repo.Publication(tmp_path).__enter__()


def test_a_repository_that_cannot_be_made_is_one_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(RepositoryError, match=r"^cannot make the repository .*/file/repo: Not a directory$"):
        repo.Publication(tmp_path / "file" / "repo").__enter__()


def test_config_text_round_trips_and_rejects_garbage(tmp_path):
    config = repo.classifier_config(classifier())
    assert repo.read_config_text(repo.config_text(config)) == config
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.pbtxt").write_text("max_batch_size: lots")
    with pytest.raises(RepositoryError, match="cannot read"):
        repo.read_config(tmp_path / "bad")


# --- TensorRT: configuration logic runs everywhere, the build only where tensorrt is installed ---------------


def test_tensorrt_profile_spans_one_to_max_batch_with_opt_near_half():
    shapes = trt_config.optimization_profile(224, 32)
    assert (
        shapes.min == (1, 3, 224, 224) and shapes.max == (32, 3, 224, 224) and shapes.opt == (16, 3, 224, 224)
    )
    assert trt_config.optimization_profile(32, 1).opt == (1, 3, 32, 32)
    assert trt_config.optimization_profile(32, 24).opt[0] == 8
    assert trt_config.optimization_profile(32, 8, opt_batch_size=4).opt[0] == 4
    with pytest.raises(ExportError):
        trt_config.optimization_profile(32, 8, opt_batch_size=16)
    with pytest.raises(ExportError):
        trt_config.optimization_profile(32, 0)


def test_tensorrt_builder_flags():
    assert trt_config.builder_flag_names(fp16=False, int8=False) == []
    assert trt_config.builder_flag_names(fp16=True, int8=False) == ["FP16"]
    assert trt_config.builder_flag_names(fp16=False, int8=True) == ["FP16", "INT8"]


@pytest.mark.skipif(
    trt_config.tensorrt_available(), reason="checks the message shown where tensorrt is missing"
)
def test_tensorrt_build_without_tensorrt_says_so(tmp_path):
    with pytest.raises(ExportError, match="tensorrt"):
        trt_config.build_plan(tmp_path / "m.onnx", tmp_path / "model.plan", 224, 8)


@pytest.mark.gpu
@pytest.mark.skipif(not trt_config.tensorrt_available(), reason="tensorrt is not installable on this machine")
def test_tensorrt_plan_builds(tmp_path):
    import torchvision

    from export.onnx import export_onnx

    onnx_path = export_onnx(torchvision.models.resnet18(), tmp_path / "model.onnx", 224)
    plan = trt_config.build_plan(
        onnx_path, tmp_path / "model.plan", 224, 8, fp16=True, timing_cache=tmp_path / "timing.cache"
    )
    assert plan.stat().st_size > 1_000_000 and (tmp_path / "timing.cache").is_file()
