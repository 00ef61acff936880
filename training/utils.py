"""Loop plumbing: distributed setup, atomic checkpoints, RNG state, the lr schedule, metrics output."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.distributed as dist

import cli.files
from training.errors import CheckpointError, ConfigError, RunFolderError

CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)\.pt$")
BEST_NAME = "best.pt"
LOCK_NAME = ".lock"  # held by the run writing into the folder


# ----------------------------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_kind: str) -> DistInfo:
    """Join the process group torchrun describes in the environment (NCCL on GPUs, gloo on CPUs)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo()
    info = DistInfo(
        int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"])
    )
    if device_kind == "cuda":
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return info


def resolve_device(name: str, info: DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device("cuda", info.local_rank) if name == "cuda" else torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: PyTorch sees no CUDA GPU here; use --device cpu (or auto)")
    return device


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum numbers over all ranks (identity without a process group)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


# ----------------------------------------------------------------------------------------------- checkpoints


def atomic_torch_save(obj: object, path: Path) -> None:
    """Readers never see half a checkpoint."""
    atomic_write(path, lambda file: torch.save(obj, file))


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """`path` replaced whole (cli.files); a failure leaves no temp file and is one RunFolderError naming `path`
    when the file system refused it."""
    with writing(path):
        cli.files.atomic_write(path, write)


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """A file system error while writing `path` (a disk full mid-run: the user's to fix, and nothing is lost) as
    one RunFolderError that names the file."""
    try:
        yield
    except Exception as error:
        cause = cli.files.os_error_behind(error)
        if cause is None:
            raise
        raise RunFolderError(
            f"cannot write {path}: {cause.strerror or cause}; the checkpoints written before it are intact, so fix "
            "the cause and continue with --resume auto"
        ) from error


def hold_run_folder(
    output_dir: Path, then: str = "then --resume auto; or give another --output-dir"
) -> BinaryIO | None:
    """Lock `output_dir` for this run until the returned file is closed (or the process ends: the kernel releases
    an flock then, so a crashed run leaves no stale lock). A second run into the folder, such as a job restarted
    while the first still runs, would interleave its checkpoints and metrics with the first's: it is refused."""
    try:
        return cli.files.try_lock(output_dir / LOCK_NAME) or _unguarded(output_dir)
    except cli.files.LockHeld as held:
        raise RunFolderError(
            f"{output_dir} is in use by another run ({held.holder}): wait for it to end or stop it, {then}"
        ) from None


def _unguarded(output_dir: Path) -> None:
    print(
        f"warning: cannot lock {output_dir} (its file system has no locks); a second run into it would not be "
        "refused",
        file=sys.stderr,
    )


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda file: file.write(text.encode()))


def checkpoint_path(output_dir: Path, iteration: int) -> Path:
    return output_dir / f"checkpoint-{iteration:07d}.pt"


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for path in Path(output_dir).glob("checkpoint-*.pt"):
        match = CHECKPOINT_PATTERN.search(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def load_latest_checkpoint(output_dir: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint in `output_dir` that loads, or None when there is none.

    Writes are atomic, so a crash leaves no half-written file; but a disk error or a bad copy can still damage
    the newest one, and then the run goes on from the one before it (with a warning) instead of stopping.
    """
    damaged = []
    for _, path in reversed(list_checkpoints(output_dir)):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as error:
            print(f"warning: skipping {path.name}: {error}", file=sys.stderr)
            damaged.append(path.name)
    if damaged:
        raise CheckpointError(
            f"no checkpoint in {output_dir} can be read ({', '.join(damaged)}); "
            "move them aside to start from scratch"
        )
    return None


def prune_checkpoints(output_dir: Path, keep_last: int) -> None:
    for _, path in list_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
        path.unlink(missing_ok=True)


def mark_best(checkpoint: Path, output_dir: Path) -> None:
    """best.pt becomes the same file as `checkpoint` (a hard link, renamed into place atomically)."""
    tmp = output_dir / f".{BEST_NAME}.tmp"
    tmp.unlink(missing_ok=True)
    try:
        with writing(output_dir / BEST_NAME):
            try:
                os.link(checkpoint, tmp)
            except OSError:
                import shutil

                shutil.copyfile(checkpoint, tmp)
            os.replace(tmp, output_dir / BEST_NAME)
    finally:
        tmp.unlink(missing_ok=True)


def _suggested_file(run_folder: Path) -> str:
    """' such as <folder>/best.pt' (else its newest checkpoint), or '' when the folder holds neither."""
    best = run_folder / BEST_NAME
    newest = [path for _, path in list_checkpoints(run_folder)[-1:]]
    found = [best] if best.is_file() else newest
    return f" such as {found[0]}" if found else ""


def read_torch_file(path: str | Path, map_location="cpu") -> object:
    """`torch.load` of a checkpoint or state dict; a missing, foreign or damaged file is one CheckpointError."""
    path = Path(path)
    if path.is_dir():  # most often a run's output folder: name the file in it that was probably meant
        raise CheckpointError(f"checkpoint {path} is a folder; give a checkpoint file{_suggested_file(path)}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # noqa: BLE001 - torch raises many types for a damaged file
        raise CheckpointError(
            f"cannot read checkpoint {path}: not a PyTorch checkpoint, or a damaged one "
            f"({type(error).__name__}: {error})"
        ) from error


def state_dict_mismatch(error: RuntimeError) -> str:
    """torch's `load_state_dict` error in one line: its first problem, not its header ("Error(s) in loading
    state_dict for ...:") and not the hundreds of key names a wrong architecture lists."""
    problems = [line.strip() for line in str(error).splitlines()[1:] if line.strip()] or [str(error)]
    first = problems[0] if len(problems[0]) <= 200 else f"{problems[0][:200]}..."
    return first + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else "")


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    checkpoint = read_torch_file(path, map_location)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "arch" not in checkpoint:
        raise CheckpointError(f"{path} is not a resnet-serving checkpoint (no 'model'/'arch' entries)")
    return checkpoint


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        # This process's GPU only: a checkpoint may be resumed where fewer GPUs are visible.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, list | tuple):  # older checkpoints: one state per GPU visible when saved
            device = torch.cuda.current_device()
            cuda = cuda[device] if device < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------- schedule


class StepSchedule:
    """LambdaLR factor: ÷`gamma` at each milestone (iterations); while warming up, `warmup_factor` instead.

    A callable object (not a lambda) so LambdaLR's state_dict saves and restores the warm-up state.
    """

    def __init__(self, milestones: list[int], gamma: float, warmup_factor: float | None) -> None:
        self.milestones = list(milestones)
        self.gamma = gamma
        self.warmup_factor = warmup_factor
        self.warming_up = warmup_factor is not None

    def __call__(self, iteration: int) -> float:
        if self.warming_up:
            return self.warmup_factor
        return self.gamma ** sum(iteration >= m for m in self.milestones)


# ----------------------------------------------------------------------------------------------- metrics


def accuracy_counts(
    logits: torch.Tensor, labels: torch.Tensor, topk: tuple[int, ...] = (1, 5)
) -> list[float]:
    """Number of samples whose label is among the top-k predictions, for each k (k capped at #classes)."""
    maxk = min(max(topk), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices
    hits = top == labels[:, None]
    return [hits[:, : min(k, maxk)].any(dim=1).sum().item() for k in topk]


def quieting_tensorboard(hook: Callable[[threading.ExceptHookArgs], object]) -> Callable:
    """`hook` (a threading.excepthook) less the OSError of TensorBoard's writer thread: that thread dies on a full
    disk, and the training thread raises the same error from its next add_scalar as one line naming the folder;
    the thread's traceback would only repeat it."""

    def quiet(args: threading.ExceptHookArgs) -> None:
        if isinstance(args.exc_value, OSError) and type(args.thread).__module__.startswith("tensorboard."):
            return
        hook(args)

    quiet.quiets_tensorboard = True
    return quiet


class MetricsWriter:
    """metrics.jsonl (one JSON object per line) plus TensorBoard scalars; rank 0 only.

    Each line carries its own `time` (Unix seconds): a copy of the file (a run record, a git checkout) resets the
    file's mtime, and the last line's time is what dates the end of a run killed before it could record itself.
    """

    def __init__(self, output_dir: Path, tensorboard: bool) -> None:
        self.path, self.tb_path = output_dir / "metrics.jsonl", output_dir / "tensorboard"
        with writing(self.path):
            self.file = open(self.path, "a", buffering=1)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                return
            # the hook in place (a user's, or Python's), wrapped once
            if not getattr(threading.excepthook, "quiets_tensorboard", False):
                threading.excepthook = quieting_tensorboard(threading.excepthook)
            with writing(self.tb_path):
                self.tb = SummaryWriter(str(self.tb_path))

    def write(self, kind: str, iteration: int, **values: float) -> None:
        line = {"kind": kind, "iteration": iteration, **values, "time": round(time.time(), 1)}
        with writing(self.path):
            self.file.write(json.dumps(line) + "\n")
        if self.tb is None:
            return
        # TensorBoard writes in a thread of its own, and add_scalar raises what that thread met
        with writing(self.tb_path):
            for key, value in values.items():
                if isinstance(value, int | float):
                    self.tb.add_scalar(f"{kind}/{key}", value, iteration)

    def close(self) -> None:
        with writing(self.path):  # a line a full disk refused is flushed again here
            self.file.close()
        if self.tb is not None:
            with writing(self.tb_path):
                self.tb.close()
