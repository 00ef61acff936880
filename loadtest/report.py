"""Reading Locust's CSV output, checking thresholds, and plotting a run (matplotlib, headless).

Locust writes `<prefix>_stats.csv` (totals per request name plus an `Aggregated` row) and, with
`--csv-full-history`, `<prefix>_stats_history.csv`: one row per second and name, whose percentiles cover a
sliding window of the last seconds (2 s, set in the locustfile). Times are in milliseconds.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import cli.files

AGGREGATED = "Aggregated"


@dataclass(frozen=True)
class Summary:
    requests: int
    failures: int
    requests_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float

    @property
    def fail_ratio(self) -> float:
        return self.failures / self.requests if self.requests else 1.0


@dataclass(frozen=True)
class Thresholds:
    max_fail_ratio: float | None = None
    max_p95_ms: float | None = None
    max_p99_ms: float | None = None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:  # Locust writes "N/A" before the first response
        return math.nan


def read_summary(stats_csv: Path) -> Summary:
    with open(stats_csv, newline="") as handle:
        rows = {row["Name"]: row for row in csv.DictReader(handle)}
    if AGGREGATED not in rows:
        raise ValueError(f"{stats_csv} has no {AGGREGATED} row")
    row = rows[AGGREGATED]
    return Summary(
        requests=int(row["Request Count"]),
        failures=int(row["Failure Count"]),
        requests_per_s=_number(row["Requests/s"]),
        p50_ms=_number(row["50%"]),
        p95_ms=_number(row["95%"]),
        p99_ms=_number(row["99%"]),
        max_ms=_number(row["Max Response Time"]),
    )


def read_history(history_csv: Path) -> list[dict[str, float]]:
    """Per-second aggregated rows: t (s from start), users, rps, fps, p50, p95, p99.

    Throughput comes from the differences of the cumulative counts (exact per second); Locust's own
    Requests/s column is a 10-second moving average that lags behind a ramp's steps.
    """
    with open(history_csv, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["Name"] == AGGREGATED]
    if not rows:
        return []
    start = int(rows[0]["Timestamp"])
    history, previous = [], (start, 0, 0)
    for r in rows:
        now, total, failed = int(r["Timestamp"]), int(r["Total Request Count"]), int(r["Total Failure Count"])
        elapsed = max(1, now - previous[0])
        history.append(
            {
                "t": now - start,
                "users": int(r["User Count"]),
                "rps": (total - previous[1]) / elapsed,
                "fps": (failed - previous[2]) / elapsed,
                "p50": _number(r["50%"]),
                "p95": _number(r["95%"]),
                "p99": _number(r["99%"]),
            }
        )
        previous = (now, total, failed)
    return history


def broken_thresholds(summary: Summary, thresholds: Thresholds) -> list[str]:
    """One line per broken threshold (empty when the run passes)."""
    broken = []
    if summary.requests == 0:
        broken.append("no request completed")
    if thresholds.max_fail_ratio is not None and summary.fail_ratio > thresholds.max_fail_ratio:
        broken.append(
            f"fail ratio {summary.fail_ratio:.4f} > {thresholds.max_fail_ratio}"
            f" ({summary.failures} of {summary.requests} requests failed)"
        )
    for name, value, limit in (
        ("p95", summary.p95_ms, thresholds.max_p95_ms),
        ("p99", summary.p99_ms, thresholds.max_p99_ms),
    ):
        if limit is not None and not value <= limit:  # NaN (no data) breaks it too
            broken.append(f"{name} latency {value:.0f} ms > {limit:g} ms")
    return broken


def steps_by_users(history: list[dict[str, float]], settle_s: int = 2) -> list[dict[str, float]]:
    """Median throughput and latency per user count (a ramp's steps), skipping each step's first seconds."""
    groups: dict[int, list[dict[str, float]]] = {}
    for row in history:
        if row["users"] > 0:
            groups.setdefault(int(row["users"]), []).append(row)
    steps = []
    for users, rows in sorted(groups.items()):
        settled = [r for r in rows[settle_s:] if not math.isnan(r["p50"])] or [
            r for r in rows if not math.isnan(r["p50"])
        ]
        if not settled:
            continue
        steps.append(
            {
                "users": users,
                **{key: _median([r[key] for r in settled]) for key in ("rps", "p50", "p95", "p99")},
            }
        )
    return steps


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def plot_run(history: list[dict[str, float]], out_dir: Path, title: str) -> list[Path]:
    """timeline.png (throughput + users, p50/p95/p99 over time) and latency_vs_throughput.png (per user count)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    t = [r["t"] for r in history]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    top.plot(t, [r["rps"] for r in history], label="requests/s", color="tab:blue")
    top.plot(t, [r["fps"] for r in history], label="failures/s", color="tab:red")
    top.set_ylabel("requests/s")
    users_axis = top.twinx()
    users_axis.step(
        t, [r["users"] for r in history], where="post", color="tab:gray", alpha=0.6, label="users"
    )
    users_axis.set_ylabel("users")
    top.legend(loc="upper left")
    for key, color in (("p50", "tab:green"), ("p95", "tab:orange"), ("p99", "tab:red")):
        bottom.plot(t, [r[key] for r in history], label=key, color=color)
    bottom.set_ylabel("latency (ms)")
    bottom.set_xlabel("time (s)")
    bottom.legend(loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    paths.append(out_dir / "timeline.png")
    cli.files.save_figure(fig, paths[-1], dpi=110)
    plt.close(fig)

    steps = steps_by_users(history)
    if steps:
        fig, axis = plt.subplots(figsize=(7, 4.5))
        rps = [s["rps"] for s in steps]
        for key, color in (("p50", "tab:green"), ("p95", "tab:orange"), ("p99", "tab:red")):
            axis.plot(rps, [s[key] for s in steps], marker="o", label=key, color=color)
        for step in steps:
            axis.annotate(
                f"{step['users']}u",
                (step["rps"], step["p99"]),
                textcoords="offset points",
                xytext=(3, 3),
                fontsize=8,
            )
        axis.set_xlabel("throughput (requests/s)")
        axis.set_ylabel("latency (ms)")
        axis.set_title(f"{title}: latency vs throughput per user count")
        axis.legend()
        fig.tight_layout()
        paths.append(out_dir / "latency_vs_throughput.png")
        cli.files.save_figure(fig, paths[-1], dpi=110)
        plt.close(fig)
    return paths
