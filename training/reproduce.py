"""Reproduce the paper's CIFAR-10 study (Table 6 and Fig. 6): train the set, tabulate, plot, check the claims.

    python -m training.reproduce run --data data/cifar10-jpeg      # train every net (needs a GPU), then report
    python -m training.reproduce report                            # rebuild table + figure from finished runs

Every net is trained with `resnet train --recipe cifar-paper --arch <net>` and nothing else changed, so the numbers
are the recipe's. Small nets leave most of a GPU idle, so `--concurrent` of them share each visible GPU. Each run
directory gets a `run.json` (command, wall time, GPU, commit) next to the trainer's `metrics.jsonl`. Those small
files are copied into the records folder (`docs/reproduction-runs/<net>/`, kept in git) with, for a net that is not
finished, its last checkpoint: `report` reads only the records, so the committed table can be rebuilt from a fresh
clone, and `run` on another machine continues a stopped net from its record. `run` can be stopped (SIGTERM, Ctrl-C:
every trainer checkpoints) and started again: finished nets are skipped, the others resume.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import cli.files
import cli.processes
from cli.errors import ResnetError
from cli.help import HelpFormatter

REPO_ROOT = Path(__file__).resolve().parents[1]
RESIDUAL = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")
PLAIN = ("plain20", "plain32", "plain44", "plain56")
PAPER_SET = RESIDUAL + PLAIN
# Table 6 of the paper (CIFAR-10 test error, %). The plain nets' numbers are not tabulated, only plotted (Fig. 6).
PAPER_TEST_ERROR = {"resnet20": 8.75, "resnet32": 7.51, "resnet44": 7.17, "resnet56": 6.97, "resnet110": 6.43}
# What a run folder keeps in the records folder (besides an unfinished net's last checkpoint): small text, for git.
RECORD_FILES = ("run.json", "config.json", "metrics.jsonl")
# What run.json's `history` keeps of each segment: segments may differ in flags (--train-args) as well as in
# machine and commit, so each keeps its own command.
SEGMENT_START_KEYS = ("command", "commit", "gpu", "started")
SEGMENT_KEYS = (*SEGMENT_START_KEYS, "wall_s", "returncode")
TABLE_BEGIN = "<!-- reproduce:table:begin -->"
TABLE_END = "<!-- reproduce:table:end -->"


class ReproduceError(ResnetError):
    """No runs to report on, or a run folder the report cannot read."""


class ReproduceInterrupted(ReproduceError):
    exit_code = 143


STOPPED_BY_SIGNAL = 143  # `resnet train`'s exit status after it checkpointed on SIGTERM/SIGINT
# No net is started this close to --time-limit: it would be stopped before its first checkpoint.
LAUNCH_MARGIN_S = 60
# The table of test error at equal iterations: a row every 4k; evaluations every epoch (390 iterations) or
# every 4k both land within the slack before a mark.
EQUAL_ITERATIONS_EVERY = 4_000
EQUAL_ITERATIONS_SLACK = 1_000
# How far apart two nets' errors may be and still count as equal. Table 6 gives ResNet-110 as 6.61 +- 0.16% over
# five runs: two standard deviations of the difference of two runs is 2 * sqrt(2) * 0.16 = 0.45, rounded up.
NOISE_POINTS = 0.5


# --------------------------------------------------------------------------------------------- reading runs


@dataclass
class RunResult:
    arch: str
    train_curve: list[tuple[int, float]] = field(default_factory=list)  # (iteration, training error %)
    test_curve: list[tuple[int, float]] = field(default_factory=list)  # (iteration, test error %)
    info: dict = field(default_factory=dict)  # run.json: wall time, GPU, commit, command
    planned_iterations: int | None = None  # the trainer's config.json

    @property
    def finished(self) -> bool:
        """The runner recorded a clean exit; a stopped or still-running net is shown but not judged."""
        return self.info.get("returncode") == 0

    @property
    def test_error(self) -> float | None:
        return self.test_curve[-1][1] if self.test_curve else None

    @property
    def train_error(self) -> float | None:
        return self.train_curve[-1][1] if self.train_curve else None


def _error_percent(record: dict, prefixes: Iterable[str]) -> float | None:
    """Top-1 error in % from whichever of `<prefix>error`, `<prefix>acc1`, `<prefix>top1` a record carries."""
    for prefix in prefixes:
        for key, to_error in (
            ("error", None),
            ("err1", None),
            ("acc1", "acc"),
            ("top1", "acc"),
            ("acc", "acc"),
        ):
            value = record.get(prefix + key)
            if isinstance(value, int | float) and math.isfinite(value):
                if not to_error:
                    return float(value)
                # Accuracies may be fractions; errors are always % (a 0.5% training error is real).
                return 100.0 - (value * 100 if value <= 1.0 else float(value))
    return None


def read_metrics(path: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(training error curve, test error curve) from a trainer's metrics.jsonl.

    Records are JSON objects with an `iteration` (or `step`); evaluation records are marked by a `split`/`phase`
    of test/val/eval or by `test_`/`val_`/`eval_` keys, training records by `train`/`train_` keys.
    Accuracies in [0, 1] or in %, and errors, are all accepted.
    """
    train, test = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ReproduceError(f"{path}:{number} is not JSON: {error}") from error
        step = record.get("iteration", record.get("step"))
        if not isinstance(step, int | float):
            continue
        phase = str(record.get("split", record.get("phase", record.get("kind", "")))).lower()
        if phase in ("test", "val", "eval", "evaluate", "validation"):
            error = _error_percent(record, ("test_", "val_", "eval_", ""))
            if error is not None:
                test.append((int(step), error))
            continue
        if phase in ("", "train"):
            error = _error_percent(record, ("train_",) if not phase else ("train_", ""))
            if error is not None:
                train.append((int(step), error))
        error = _error_percent(record, ("test_", "val_", "eval_"))
        if error is not None:
            test.append((int(step), error))
    return train, test


def collect_runs(runs_dir: Path) -> dict[str, RunResult]:
    """Every `<runs_dir>/<arch>/metrics.jsonl` that holds at least one test evaluation, finished or not."""
    results = {}
    for metrics in sorted(runs_dir.glob("*/metrics.jsonl")):
        folder = metrics.parent
        info = _read_json(folder / "run.json")
        arch = info.get("arch", folder.name)
        train, test = read_metrics(metrics)
        if test:
            planned = _read_json(folder / "config.json").get("iterations")
            results[arch] = RunResult(arch, train, test, info, planned)
    return results


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as error:
        raise ReproduceError(f"{path} is not JSON: {error}") from error


# --------------------------------------------------------------------------------------------- records


def _checkpoints(folder: Path) -> list[tuple[int, Path]]:
    from training.utils import list_checkpoints  # torch: only where checkpoints are handled

    return list_checkpoints(folder)


def _progress(folder: Path) -> tuple[bool, int]:
    """(finished, last iteration logged or checkpointed): of two copies of a run, the larger is further along."""
    metrics = folder / "metrics.jsonl"
    if not metrics.is_file():
        return (False, -1)
    train, test = read_metrics(metrics)
    steps = [step for step, _ in train + test] + [step for step, _ in _checkpoints(folder)]
    return (_read_json(folder / "run.json").get("returncode") == 0, max(steps, default=0))


def _mirror(source: Path, target: Path, checkpoint: Path | None) -> None:
    """Make `target` hold `source`'s record files and `checkpoint` (no other checkpoint)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in RECORD_FILES:
        if (source / name).is_file():
            cli.files.atomic_copy(source / name, target / name)
    if checkpoint is not None and not (target / checkpoint.name).is_file():
        cli.files.atomic_copy(checkpoint, target / checkpoint.name)
    for stale in target.glob("checkpoint-*.pt"):
        if checkpoint is None or stale.name != checkpoint.name:
            stale.unlink()


def save_records(runs_dir: Path, records_dir: Path) -> list[str]:
    """Copy every run that is further along than its record into `records_dir`; returns the nets copied.

    An unfinished net's record keeps its last checkpoint (2.2 MB for plain-20), so that another
    machine can continue it; a finished net's record drops it."""
    saved = []
    for metrics in sorted(runs_dir.glob("*/metrics.jsonl")):
        folder = metrics.parent
        record = records_dir / folder.name
        progress = _progress(folder)
        if folder.resolve() == record.resolve() or progress <= _progress(record):
            continue
        finished, _ = progress
        checkpoints = [] if finished else _checkpoints(folder)
        _mirror(folder, record, checkpoints[-1][1] if checkpoints else None)
        saved.append(folder.name)
    return saved


def restore_record(records_dir: Path, folder: Path) -> bool:
    """Seed a run folder from its record when the record is further along (a run begun on another machine)."""
    record = records_dir / folder.name
    if not record.is_dir() or record.resolve() == folder.resolve() or _progress(folder) >= _progress(record):
        return False
    checkpoints = _checkpoints(record)
    _mirror(record, folder, checkpoints[-1][1] if checkpoints else None)
    print(f"{folder.name}: continuing from its record in {record}", flush=True)
    return True


# --------------------------------------------------------------------------------------------- the report


def check_claims(results: dict[str, RunResult]) -> list[tuple[str, bool | None, str]]:
    """The paper's CIFAR-10 claims as (claim, holds (None: not enough runs), evidence), from finished runs only."""
    results = {arch: run for arch, run in results.items() if run.finished}

    def errors(archs: Iterable[str], kind: str) -> list[tuple[str, float]] | None:
        values = [(a, getattr(results[a], kind)) for a in archs if a in results]
        return values if len(values) >= 2 and all(v is not None for _, v in values) else None

    claims = []
    for label, archs, kind, want in (
        ("ResNet test error falls with depth (20 -> 56)", RESIDUAL[:4], "test_error", "falls"),
        ("plain nets get worse with depth (training error, 20 -> 56)", PLAIN, "train_error", "rises"),
        ("plain nets get worse with depth (test error, 20 -> 56)", PLAIN, "test_error", "rises"),
    ):
        values = errors(archs, kind)
        if values is None:
            claims.append((label, None, "needs at least two of " + ", ".join(archs)))
            continue
        claims.append((label, _trend_holds([v for _, v in values], want), _chain(values)))
    deepest = errors(RESIDUAL[3:], "test_error")
    label = f"ResNet-110 at least as good as ResNet-56 (test error, within {NOISE_POINTS} points)"
    if deepest is None:
        claims.append((label, None, "needs resnet56 and resnet110"))
    else:
        claims.append((label, deepest[1][1] <= deepest[0][1] + NOISE_POINTS, _chain(deepest)))
    claims.append(_residual_beats_plain(results))
    return claims


def _residual_beats_plain(results: dict[str, RunResult]) -> tuple[str, bool | None, str]:
    label = "ResNets beat plain nets of the same depth (test error)"
    pairs = [(f"resnet{d}", f"plain{d}") for d in (20, 32, 44, 56)]
    pairs = [(r, p) for r, p in pairs if r in results and p in results]
    if not pairs:
        return label, None, "needs resnetN and plainN"
    holds = all(results[r].test_error < results[p].test_error for r, p in pairs)
    evidence = ", ".join(
        f"{r} {results[r].test_error:.2f}% vs {p} {results[p].test_error:.2f}%" for r, p in pairs
    )
    return label, holds, evidence


def _trend_holds(values: list[float], want: str) -> bool:
    """Deepest vs shallowest goes the wanted way, and no step between neighbours goes back by more than noise."""
    sign = 1 if want == "rises" else -1
    steps = [sign * (deeper - shallower) for shallower, deeper in itertools.pairwise(values)]
    return sign * (values[-1] - values[0]) > 0 and all(step >= -NOISE_POINTS for step in steps)


def _chain(values: list[tuple[str, float]]) -> str:
    return " -> ".join(f"{arch} {value:.2f}%" for arch, value in values)


def _short_commit(commit: str) -> str:
    sha, dirty, _ = commit.partition("-dirty")
    return sha[:9] + dirty


def _per_segment(run: RunResult, key: str, shorten: Callable[[str], str] = str) -> str:
    """Each distinct value of `key` over the run's segments, in the order they ran."""
    values = [shorten(str(entry.get(key) or "n/a")) for entry in run.info.get("history", [run.info])]
    return ", ".join(dict.fromkeys(values))


def render_table(results: dict[str, RunResult]) -> str:
    lines = [
        "| net | paper test error | our test error | our training error | iterations | wall time | device | commit |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for arch in [a for a in PAPER_SET if a in results] + sorted(set(results) - set(PAPER_SET)):
        run = results[arch]
        paper = PAPER_TEST_ERROR.get(arch)
        wall = run.info.get("wall_s")
        lines.append(
            f"| {arch} | {f'{paper:.2f}%' if paper else 'Fig. 6 only'} | {run.test_error:.2f}% | "
            f"{f'{run.train_error:.2f}%' if run.train_error is not None else 'n/a'} | {_iterations(run)} | "
            f"{_duration(wall) if wall else 'n/a'} | {_per_segment(run, 'gpu')} | "
            f"{_per_segment(run, 'commit', _short_commit)} |"
        )
    # Near zero the two measures differ visibly (ResNet-110: 0.08% logged last, 0.05% over 63k-64k), so say which.
    lines += [
        "",
        "Training error in this table is the last value logged: the mean over the run's last `--log-every` "
        "iterations (50 by default).",
    ]
    unfinished = [arch for arch, run in results.items() if not run.finished]
    if unfinished:
        lines += [
            "",
            f"Not finished yet, so left out of the claims: {', '.join(unfinished)} (test error at the "
            "last evaluation so far, training error at the last logged iterations; wall time of the completed "
            "segments).",
        ]
    killed = [arch for arch, run in results.items() if any(map(_was_killed, run.info.get("history", [])))]
    if killed:
        lines += [
            "",
            f"A segment of {', '.join(killed)} was killed with no chance to record its end: its wall time "
            "runs to the last metrics line it wrote.",
        ]
    sourced = [(arch, run.info["source"]) for arch, run in results.items() if run.info.get("source")]
    if sourced:
        lines += ["", *(f"Where the {arch} row comes from: {source}." for arch, source in sourced)]
    for side_by_side in (render_equal_iterations(results), render_training_windows(results)):
        lines += ["", *side_by_side] if side_by_side else []
    lines += ["", "Claims (paper, Sec. 4.2 and Fig. 6):", ""]
    for claim, holds, evidence in check_claims(results):
        verdict = {True: "holds", False: "**does not hold**", None: "not checked"}[holds]
        lines.append(f"- {claim}: {verdict} ({evidence})")
    return "\n".join(lines)


def render_equal_iterations(results: dict[str, RunResult], every: int = EQUAL_ITERATIONS_EVERY) -> list[str]:
    """Test error of every net at the same iterations, plain and residual of a depth side by side: the
    comparison an unfinished net can already give."""
    caption = (
        f"Test error at equal iterations (the last evaluation at or up to {EQUAL_ITERATIONS_SLACK:,} iterations "
        "before each mark; the learning rate drops at 32k and 48k):"
    )
    return _side_by_side({arch: run.test_curve for arch, run in results.items()}, _error_at, caption, every)


def render_training_windows(results: dict[str, RunResult], every: int = EQUAL_ITERATIONS_EVERY) -> list[str]:
    """Training error of every net over the same windows: at lr 0.1 one test evaluation swings by points, the
    mean of a window's logged training errors by much less."""
    caption = (
        f"Training error at equal iterations (the mean of the values logged in the {EQUAL_ITERATIONS_SLACK:,} "
        "iterations up to each mark):"
    )
    curves = {arch: run.train_curve for arch, run in results.items()}
    return _side_by_side(curves, _mean_error_in_window, caption, every)


def _side_by_side(
    curves: dict[str, list[tuple[int, float]]],
    value_at: Callable[[list[tuple[int, float]], int], float | None],
    caption: str,
    every: int,
) -> list[str]:
    last = max((curve[-1][0] for curve in curves.values() if curve), default=0)
    if last < every:  # a preview shorter than one row
        return []
    order = [f"{family}{depth}" for depth in (20, 32, 44, 56, 110) for family in ("plain", "resnet")]
    nets = [arch for arch in order if arch in curves] + sorted(set(curves) - set(order))
    lines = [caption, "", "| iteration | " + " | ".join(nets) + " |", "| ---: |" + " ---: |" * len(nets)]
    for mark in range(every, last + 1, every):
        cells = [value_at(curves[arch], mark) for arch in nets]
        lines.append(
            f"| {mark // 1000}k | " + " | ".join(f"{e:.2f}%" if e is not None else "" for e in cells) + " |"
        )
    return lines


def _in_window(curve: list[tuple[int, float]], mark: int) -> list[float]:
    return [error for step, error in curve if mark - EQUAL_ITERATIONS_SLACK < step <= mark]


def _error_at(curve: list[tuple[int, float]], mark: int) -> float | None:
    errors = _in_window(curve, mark)
    return errors[-1] if errors else None


def _mean_error_in_window(curve: list[tuple[int, float]], mark: int) -> float | None:
    # An unfinished run's last window is cut short, and its later, lower values would beat a full window.
    if not curve or curve[-1][0] < mark:
        return None
    errors = _in_window(curve, mark)
    return sum(errors) / len(errors) if errors else None


def _iterations(run: RunResult) -> str:
    done = f"{run.test_curve[-1][0]:,}"
    if run.finished:
        return done
    planned = f" of {run.planned_iterations:,}" if run.planned_iterations else ""
    return f"{done}{planned} (unfinished)"


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def write_table(doc: Path, table: str) -> None:
    """Replace the text between the table markers in `doc` (appended with markers if they are missing)."""
    block = f"{TABLE_BEGIN}\n{table}\n{TABLE_END}"
    text = doc.read_text() if doc.is_file() else "# Reproduction\n"
    pattern = re.compile(re.escape(TABLE_BEGIN) + r".*?" + re.escape(TABLE_END), re.S)
    text = (
        pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    )
    cli.files.atomic_write_text(doc, text)


def error_axis_top(results: dict[str, RunResult]) -> int:
    """The paper's 0-20% frame (early epochs clipped, as there), unless the runs end above it (CPU previews).

    A net stopped early in its schedule is judged only when no run has finished: its error is still falling.
    """
    finished = [run for run in results.values() if run.finished] or list(results.values())
    highest = max(run.test_error for run in finished)
    return 20 if highest <= 20 else min(100, 10 * math.ceil(highest / 10) + 10)


def plot_figure6(results: dict[str, RunResult], path: Path) -> Path:
    """The paper's Fig. 6 layout: plain nets left, ResNets right; thin dashed = training, bold = test error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True, sharey=True)
    for ax, family, title in ((axes[0], PLAIN, "plain"), (axes[1], RESIDUAL, "ResNet")):
        for color, arch in zip(plt.cm.viridis([0.0, 0.3, 0.55, 0.8, 0.95]), family, strict=False):
            if arch not in results:
                continue
            run = results[arch]
            depth = arch.removeprefix("resnet").removeprefix("plain")
            if run.train_curve:
                x, y = zip(*run.train_curve, strict=True)
                ax.plot([i / 1e4 for i in x], y, color=color, linewidth=0.7, linestyle="--", alpha=0.8)
            x, y = zip(*run.test_curve, strict=True)
            label = f"{title}-{depth}" + ("" if run.finished else f" (unfinished, {x[-1] / 1e3:g}k)")
            ax.plot([i / 1e4 for i in x], y, color=color, linewidth=2.0, label=label)
        if not any(arch in results for arch in family):
            ax.text(0.5, 0.5, "not run yet", transform=ax.transAxes, ha="center", va="center", color="gray")
        ax.set_title(f"{title} nets on CIFAR-10")
        ax.set_xlabel("iterations (1e4)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper right")
    axes[0].set_ylabel("error (%)  — dashed: training, bold: test")
    axes[0].set_ylim(0, error_axis_top(results))
    fig.tight_layout()
    try:
        cli.files.save_figure(fig, path, dpi=120)
    finally:
        plt.close(fig)
    return path


def report(runs_dir: Path, doc: Path, figure: Path) -> dict[str, RunResult]:
    results = collect_runs(runs_dir)
    if not results:
        raise ReproduceError(
            f"no finished runs under {runs_dir} (expected <arch>/metrics.jsonl with test evaluations)"
        )
    figure_path = plot_figure6(results, figure)
    relative = os.path.relpath(figure_path, doc.parent)
    write_table(doc, render_table(results) + f"\n\n![Fig. 6 reproduced]({relative})")
    return results


# --------------------------------------------------------------------------------------------- running


def git_commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def gpu_names() -> list[str]:
    try:
        import torch
    except ImportError:
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def visible_device(slot: str) -> str:
    """The CUDA_VISIBLE_DEVICES entry for GPU `slot` as the runner counts them: the runner may itself be given a
    subset (a scheduler's allocation, UUIDs, MIG), where its GPU 0 is not the machine's GPU 0."""
    given = [
        entry.strip() for entry in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if entry.strip()
    ]
    return given[int(slot)] if int(slot) < len(given) else slot


def train_command(arch: str, data: str, output_dir: Path, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cli.main",
        "train",
        "--recipe",
        "cifar-paper",
        "--arch",
        arch,
        "--data",
        data,
        "--output-dir",
        str(output_dir),
        "--resume",
        "auto",  # a stopped run continues from its last checkpoint; a new one starts from scratch
        *extra,
    ]


class _Interrupted:
    """SIGTERM/SIGINT to the runner: stop launching, pass the signal on (each trainer checkpoints), wait."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __enter__(self) -> _Interrupted:
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.signal = signum


def run_all(
    archs: list[str],
    data: str,
    runs_dir: Path,
    concurrent: int,
    extra: list[str],
    records_dir: Path | None = None,
    time_limit: float | None = None,
) -> list[str]:
    """Train `archs`, `concurrent` per GPU at a time; returns the archs whose training failed.

    Re-running continues: nets that finished (run.json with exit 0) are skipped, stopped ones resume from their
    last checkpoint and add to their wall time; with `records_dir`, a net whose record is further along than
    its run folder (it ran on another machine) continues from the record, and every run is recorded at the end.
    A SIGTERM/SIGINT is passed to every trainer (each writes a checkpoint), then `ReproduceInterrupted` is
    raised once all have exited. After `time_limit` seconds the trainers are stopped the same way, but as a
    planned end of this slice of the study: it returns normally, so the report is written."""
    from training.utils import hold_run_folder

    runs_dir.mkdir(parents=True, exist_ok=True)
    # a second study into the same folder would start each net's trainer again, beside the running one
    lock = hold_run_folder(runs_dir, then="then run the same command again; or give another --runs-dir")
    try:
        for arch in archs if records_dir else []:
            restore_record(records_dir, runs_dir / arch)
        deadline = time.monotonic() + time_limit if time_limit else None
        try:
            return _train_all(archs, data, runs_dir, concurrent, extra, deadline)
        finally:
            if records_dir:
                for arch in save_records(runs_dir, records_dir):
                    print(f"{arch}: recorded in {records_dir / arch}", flush=True)
    finally:
        if lock is not None:
            lock.close()


def _train_all(
    archs: list[str], data: str, runs_dir: Path, concurrent: int, extra: list[str], deadline: float | None
) -> list[str]:
    gpus = gpu_names()
    free_slots = [str(i) for i in range(len(gpus))] * concurrent if gpus else [None] * concurrent
    commit, running, failed, signalled = git_commit(), {}, [], set()
    pending = [arch for arch in archs if not _finished(runs_dir / arch, arch)]
    timed_out = False
    with _Interrupted() as interrupted:
        while running or (pending and interrupted.signal is None):
            may_start = deadline is None or time.monotonic() < deadline - LAUNCH_MARGIN_S
            if interrupted.signal is None and deadline is not None:
                # Past the limit, or too close to it to start the next net with nothing else running.
                if time.monotonic() >= deadline or not (running or may_start):
                    timed_out, interrupted.signal = True, signal.SIGTERM
            while pending and free_slots and interrupted.signal is None and may_start:
                slot = free_slots.pop(0)
                process, info = _launch(pending.pop(0), data, runs_dir, slot, gpus, commit, extra)
                running[process] = (slot, info, time.monotonic())
            if interrupted.signal is not None:
                for process in set(running) - signalled:
                    process.send_signal(interrupted.signal)
                    signalled.add(process)
            time.sleep(2)
            for process in [p for p in running if p.poll() is not None]:
                slot, info, start = running.pop(process)
                free_slots.append(slot)
                if _record(runs_dir / info["arch"], info, time.monotonic() - start, process.returncode):
                    failed.append(info["arch"])
    if timed_out:
        left = [arch for arch in archs if not _finished(runs_dir / arch, arch, quiet=True)]
        print(
            f"time limit reached; not finished: {', '.join(left) or 'none'} (run the same command again)",
            flush=True,
        )
    elif interrupted.signal is not None:
        raise ReproduceInterrupted(
            f"interrupted by signal {interrupted.signal}: the runs stopped at a checkpoint; "
            "run the same command again to continue"
        )
    return [arch for arch in archs if arch in failed]  # the order asked for, not the order they ended in


def _finished(folder: Path, arch: str, quiet: bool = False) -> bool:
    if _read_json(folder / "run.json").get("returncode") == 0:
        if not quiet:
            print(f"{arch}: finished earlier ({folder / 'run.json'}), skipped", flush=True)
        return True
    return False


def _launch(
    arch: str, data: str, runs_dir: Path, slot: str | None, gpus: list[str], commit: str, extra: list[str]
) -> tuple[subprocess.Popen, dict]:
    folder = runs_dir / arch
    folder.mkdir(parents=True, exist_ok=True)
    command = train_command(arch, data, folder, extra)
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": visible_device(slot)} if slot is not None else {})}
    info = {
        "arch": arch,
        "command": shlex.join(command),
        "gpu": gpus[int(slot)] if slot is not None else f"CPU ({os.cpu_count()} cores)",
        "commit": commit,
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    # Before the trainer writes: the last metrics line of a segment killed earlier dates that segment's end.
    _open_segment(folder, info)
    with open(folder / "train.log", "ab") as log:
        # Its own session: a Ctrl-C in the terminal reaches the runner only, which passes it on once.
        process = subprocess.Popen(
            cli.processes.ending_with_this_process(command),
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    print(f"started {arch} on {info['gpu']} (log: {folder / 'train.log'})", flush=True)
    return process, info


def _earlier_segments(previous: dict) -> list[dict]:
    """The segments a record already holds; one written before `history` existed becomes one entry."""
    if not previous:
        return []
    if "history" in previous:
        return previous["history"]
    # Such a record kept only its last segment's commit, device and start; `segments` says how many it covers.
    return [{**{key: previous.get(key) for key in SEGMENT_KEYS}, "segments": previous.get("segments", 1)}]


def _is_open(segment: dict) -> bool:
    return bool(segment.get("running"))


def _was_killed(segment: dict) -> bool:
    return bool(segment.get("killed"))


def _closed(segment: dict, folder: Path) -> dict:
    """A segment still open when the next one starts was killed outright (SIGKILL, a lost VM): it gets the wall
    time up to the last metrics line its trainer wrote, no exit code, and `killed`."""
    if not _is_open(segment):
        return segment
    started = dt.datetime.fromisoformat(segment["started"]).timestamp()
    last_seen = _last_logged(folder / "metrics.jsonl") or started
    closed = {key: value for key, value in segment.items() if key != "running"}
    return closed | {"wall_s": round(max(0.0, last_seen - started), 1), "returncode": None, "killed": True}


def _last_logged(metrics: Path) -> float | None:
    """When the trainer wrote the last metrics line: the line's own `time`, else (a log from before lines carried
    one) the file's mtime, which is right only on the machine that wrote it."""
    if not metrics.is_file():
        return None
    last = next((line for line in reversed(metrics.read_text().splitlines()) if line.strip()), "")
    try:
        logged = json.loads(last).get("time")
    except (json.JSONDecodeError, AttributeError):
        logged = None
    return float(logged) if isinstance(logged, int | float) else metrics.stat().st_mtime


def _write_record(folder: Path, info: dict, history: list[dict], returncode: int | None) -> None:
    record = {
        **info,
        "wall_s": round(sum(entry.get("wall_s") or 0 for entry in history), 1),
        "segments": sum(entry.get("segments", 1) for entry in history),
        "history": history,
        "returncode": returncode,
    }
    cli.files.atomic_write_text(folder / "run.json", json.dumps(record, indent=2) + "\n")


def _segment_start(info: dict) -> dict:
    return {key: info[key] for key in SEGMENT_START_KEYS}


def _open_segment(folder: Path, info: dict) -> None:
    """Note a segment in run.json as it starts, so that one killed with no chance to record itself still counts."""
    earlier = [_closed(entry, folder) for entry in _earlier_segments(_read_json(folder / "run.json"))]
    segment = _segment_start(info) | {"wall_s": None, "running": True}
    _write_record(folder, info, [*earlier, segment], None)


def _record(folder: Path, info: dict, wall: float, returncode: int) -> bool:
    """Close this segment in run.json (commit, device, wall time, exit code); True if the trainer failed.

    A net stopped on one machine may be continued on another, at another commit, so each segment keeps its own.
    """
    segment = _segment_start(info) | {"wall_s": round(wall, 1), "returncode": returncode}
    earlier = [entry for entry in _earlier_segments(_read_json(folder / "run.json")) if not _is_open(entry)]
    _write_record(folder, info, [*earlier, segment], returncode)
    stopped = returncode == STOPPED_BY_SIGNAL
    outcome = "stopped at a checkpoint" if stopped else f"exit {returncode}"
    print(f"finished {info['arch']}: {outcome} after {_duration(wall)}", flush=True)
    return returncode not in (0, STOPPED_BY_SIGNAL)


# --------------------------------------------------------------------------------------------- CLI


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.reproduce",
        description="Reproduce the paper's CIFAR-10 results (Table 6, Fig. 6) with `resnet train --recipe "
        "cifar-paper`, then write the table (paper vs ours) to docs/reproduction.md and the figure "
        "to docs/img/.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "action",
        nargs="?",
        choices=("run", "report"),
        default="run",
        help="run: train the nets, then report; report: only rebuild table and figure",
    )
    parser.add_argument(
        "--data",
        default=os.environ.get("RESNET_DATA_PATH", "data/cifar10-jpeg"),
        help="CIFAR-10 root (pickle batches or JPEG tree) (env RESNET_DATA_PATH)",
    )
    parser.add_argument(
        "--runs-dir",
        type=Path,
        default=Path(os.environ.get("RESNET_REPRODUCE_DIR", "runs/reproduce")),
        help="one sub-folder per net (env RESNET_REPRODUCE_DIR)",
    )
    parser.add_argument(
        "--archs",
        nargs="+",
        default=list(PAPER_SET),
        choices=PAPER_SET,
        metavar="ARCH",
        help=f"nets to train, from: {' '.join(PAPER_SET)}",
    )
    parser.add_argument(
        "--concurrent",
        type=int,
        default=int(os.environ.get("RESNET_REPRODUCE_CONCURRENT", 3)),
        help="runs sharing each GPU at once (env RESNET_REPRODUCE_CONCURRENT)",
    )
    parser.add_argument(
        "--doc",
        type=Path,
        default=REPO_ROOT / "docs" / "reproduction.md",
        help="markdown file whose table block is rewritten",
    )
    parser.add_argument(
        "--figure",
        type=Path,
        default=REPO_ROOT / "docs" / "img" / "cifar10-figure6.png",
        help="where the Fig. 6 plot goes",
    )
    parser.add_argument(
        "--records",
        help="where each run's run.json, config.json, metrics.jsonl (and an unfinished net's last checkpoint) "
        "are kept for git, and what `report` reads; '' for the runs folder itself "
        "(default: beside --doc, e.g. docs/reproduction-runs/) (env RESNET_REPRODUCE_RECORDS)",
    )
    parser.add_argument(
        "--time-limit",
        type=duration_seconds,
        default=os.environ.get("RESNET_REPRODUCE_TIME_LIMIT"),
        metavar="DURATION",
        help="stop every net at a checkpoint after this long (e.g. 570, 9.5m, 2h), record and report; the "
        "same command continues later. For job schedulers and lent machines that end a job: leave a minute "
        "for the trainers to stop (env RESNET_REPRODUCE_TIME_LIMIT)",
    )
    parser.add_argument(
        "--train-args",
        default="",
        help="extra flags for every `resnet train` (e.g. '--amp bf16'); leave empty for the recipe",
    )
    return parser


def duration_seconds(text: str) -> float:
    """'570' or '570s', '9.5m', '2h' -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not match or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 570, 9.5m or 2h")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]


def records_folder(args: argparse.Namespace) -> Path | None:
    """--records, else RESNET_REPRODUCE_RECORDS, else `<doc>-runs/` beside the doc: one record set per page."""
    chosen = args.records if args.records is not None else os.environ.get("RESNET_REPRODUCE_RECORDS")
    if chosen is None:
        return args.doc.with_name(f"{args.doc.stem}-runs")
    return Path(chosen) if chosen else None


def train_flags(args: argparse.Namespace) -> list[str]:
    """--train-args as a list, and a --data every trainer can read: checked once, not by nine failed trainers."""
    if not Path(args.data).is_dir():
        raise ReproduceError(
            f"--data {args.data} is not a folder (`make cifar` extracts the CIFAR-10 tarball)"
        )
    try:
        return shlex.split(args.train_args)
    except ValueError as error:
        raise ReproduceError(f"--train-args {args.train_args!r}: {error}") from None


def check_paths(args: argparse.Namespace, records: Path | None) -> None:
    """Folders that are files and files that are folders, refused before a net starts (not minutes in)."""
    for flag, folder in (("--runs-dir", args.runs_dir), ("--records", records)):
        if folder is not None and folder.exists() and not folder.is_dir():
            raise ReproduceError(f"{flag} {folder} is a file; give a folder")
    for flag, file in (("--doc", args.doc), ("--figure", args.figure)):
        if file.is_dir():
            raise ReproduceError(f"{flag} {file} is a folder; give a file")


def failure(runs_dir: Path, failed: list[str]) -> ReproduceError:
    """Which nets failed, and the last line of the first one's log: the trainers' error is usually the same."""
    log = Path(runs_dir) / failed[0] / "train.log"
    lines = log.read_text(errors="replace").strip().splitlines() if log.is_file() else []
    last = f"; {failed[0]}'s ends: {lines[-1]}" if lines else ""
    return ReproduceError(f"training failed for {', '.join(failed)} (see their train.log{last})")


def main(args: argparse.Namespace) -> int:
    if args.concurrent < 1:
        raise ReproduceError(f"--concurrent must be at least 1, got {args.concurrent}")
    records = records_folder(args)
    check_paths(args, records)
    failed = []
    if args.action == "run":
        extra = train_flags(args)
        if not gpu_names():
            print("warning: no GPU visible; the paper set takes days on a CPU", file=sys.stderr)
        failed = run_all(
            args.archs, args.data, args.runs_dir, args.concurrent, extra, records, args.time_limit
        )
    elif records:
        save_records(args.runs_dir, records)
    if not collect_runs(records or args.runs_dir):
        if failed:
            raise failure(args.runs_dir, failed)
        if args.action == "run":  # stopped (--time-limit) before any net's first evaluation
            print(f"no test evaluation yet, so {args.doc} is unchanged")
            return 0
        searched = f"{args.runs_dir} or {records}" if records else f"{args.runs_dir}"
        raise ReproduceError(
            f"no runs under {searched} (expected <arch>/metrics.jsonl with test evaluations)"
        )
    results = report(records or args.runs_dir, args.doc, args.figure)
    print(render_table(results))
    print(f"\nwrote {args.doc} and {args.figure}")
    if failed:
        raise failure(args.runs_dir, failed)
    return 0


if __name__ == "__main__":
    from cli.main import run_script

    run_script(get_args_parser, main)
