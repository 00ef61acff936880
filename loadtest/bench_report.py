"""docs/benchmarks.md from `resnet bench` results: tables, ratios, the latency-throughput plot.

The page's header and the sections in OWNED_SECTIONS are rewritten on every run; any other `## ` section
(tables other parts of the project add) is kept verbatim after them.
"""

from __future__ import annotations

import re
from pathlib import Path

import cli.files

OWNED_SECTIONS = ("Runtime comparison", "Gateway efficiency", "Naive baseline", "gRPC vs HTTP", "Load test")


def plot_delay_sweep(gateway: dict, naive: dict | None, raw: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 4.5))
    points = [p for p in gateway["points"] if p["extra"]["batching"]]
    for key, color in (("p50_ms", "tab:green"), ("p99_ms", "tab:red")):
        axis.plot(
            [p["images_per_s"] for p in points],
            [p[key] for p in points],
            marker="o",
            color=color,
            label=f"gateway, batching on ({key[:3]})",
        )
        for p in points:
            axis.annotate(
                f"{p['extra']['max_delay_ms']:g} ms",
                (p["images_per_s"], p[key]),
                textcoords="offset points",
                xytext=(4, 2),
                fontsize=8,
            )
    off = next(p for p in gateway["points"] if not p["extra"]["batching"])
    axis.scatter(
        [off["images_per_s"]] * 2,
        [off["p50_ms"], off["p99_ms"]],
        marker="s",
        color="tab:gray",
        label="gateway, batching off (p50, p99)",
    )
    if naive:
        axis.scatter(
            [naive["images_per_s"]] * 2,
            [naive["p50_ms"], naive["p99_ms"]],
            marker="x",
            color="black",
            label="naive FastAPI + PyTorch (p50, p99)",
        )
    axis.axvline(
        raw["images_per_s"], linestyle="--", color="tab:blue", label="raw runtime at the start (in-process)"
    )
    axis.set_xlabel("throughput (images/s)")
    axis.set_ylabel("latency (ms)")
    axis.set_title(f"latency vs throughput, {off['concurrency']} requests in flight")
    axis.legend(fontsize=8)
    fig.tight_layout()
    cli.files.save_figure(fig, path, dpi=110)
    plt.close(fig)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def efficiency(point: dict) -> float:
    """A server's img/s over the raw runtime's img/s measured beside it."""
    return point["images_per_s"] / point["extra"]["raw_images_per_s"]


def render_sections(results: dict, img_prefix: str) -> dict[str, str]:
    """Markdown body of each owned section that this run has data for."""
    best = max(results["gateway"]["points"], key=efficiency)
    sections = {
        "Gateway efficiency": _gateway_section(results, best, img_prefix),
        "Load test": _loadtest_section(results.get("loadtest"), img_prefix),
    }
    if results["runtimes"]:
        sections["Runtime comparison"] = _runtime_section(results)
    if results.get("naive"):
        sections["Naive baseline"] = _naive_section(results["naive"], best)
    if results.get("grpc_vs_http"):
        sections["gRPC vs HTTP"] = _grpc_section(results["grpc_vs_http"])
    return sections


def _grpc_section(rows: list[dict]) -> str:
    from server.grpc_bench import Measurement, markdown_table

    return (
        "One gateway process (embedded ONNX Runtime, batching on) answering the same photos over its own HTTP API "
        "(`http`: `POST /v1/models/{name}/classify`, top-5 JSON) and over Triton's protocol (`<name>_pipeline` "
        "with `class_count`, tritonclient's asyncio clients) on HTTP (`http /v2`, binary tensor data) and gRPC, "
        "each concurrency measured in that order (`server.grpc_bench.compare`). Images/s counts successful "
        "requests, one image each. Both HTTP clients are aiohttp (the library under tritonclient.http.aio), so the "
        "HTTP rows compare the two APIs, not two client libraries; every client shares the gateway's cores, so a "
        "protocol's client-side cost is charged to it here.\n\n"
        + markdown_table([Measurement(**row) for row in rows])
    )


def _runtime_section(results: dict) -> str:
    runtimes = results["runtimes"]
    batches = sorted({r["batch"] for r in runtimes})
    names = list(dict.fromkeys(r["runtime"] for r in runtimes))
    cell = {(r["runtime"], r["batch"]): r for r in runtimes}
    base = names[0]
    rows = []
    for name in names:
        speeds = [f"{cell[name, b]['images_per_s']:.1f}" if (name, b) in cell else "-" for b in batches]
        p50 = [
            f"{cell[name, b]['p50_ms']:.2f}" if (name, b) in cell else "-" for b in (batches[0], batches[-1])
        ]
        ratio = cell[name, batches[-1]]["images_per_s"] / cell[base, batches[-1]]["images_per_s"]
        rows.append([name, *speeds, *p50, f"{ratio:.2f}x"])
    header = [
        "runtime",
        *(f"img/s @ batch {b}" for b in batches),
        f"p50 ms @ batch {batches[0]}",
        f"p50 ms @ batch {batches[-1]}",
        f"vs PyTorch @ batch {batches[-1]}",
    ]
    return (
        f"Same network ({results['arch']}, random weights: speed does not depend on them), same random inputs, "
        f"{results['plan']['threads']} intra-op threads, one request at a time; img/s from the mean time per call, "
        f"p50 = median time per call. Triton runs the FP32 ONNX model "
        "in its Python backend (the CPU build has no ONNX Runtime backend) and is called over gRPC on loopback, "
        "so its numbers include that hop and the shared-memory transfer.\n\n" + _table(header, rows)
    )


def _gateway_section(results: dict, best: dict, img_prefix: str) -> str:
    raw, gateway = results["raw"], results["gateway"]
    rows = []
    for p in gateway["points"]:
        rows.append(
            [
                p["label"],
                f"{p['images_per_s']:.1f}",
                f"{p['p50_ms']:.1f}",
                f"{p['p99_ms']:.1f}",
                str(p["errors"]),
                f"{p['client_cores']:.2f}",
                f"{p['extra']['raw_images_per_s']:.1f}",
                f"**{efficiency(p):.2f}**",
            ]
        )
    return (
        f"End to end: JPEG photos in ({results['images']['count']} {results['images']['kind']}), top-5 JSON out, over "
        f"HTTP on loopback, an async client (aiohttp) keeping {results['plan']['concurrency']} requests in flight for "
        f"{results['plan']['seconds']:g} s after a {results['plan']['warmup_s']:g} s warm-up. **Raw runtime** = the same "
        f"photos decoded and preprocessed with the gateway's own `server.preprocessing` on {raw['decode_threads']} "
        f"threads (the gateway's pool), the next batches decoded while ONNX Runtime runs the current one with "
        f"{raw['threads']} intra-op threads and the gateway's session options (no spin-waiting), in one process with "
        f"no HTTP and no queue, at its "
        f"best batch size ({raw['best_batch']} of {', '.join(str(b) for b in raw['per_batch'])}): "
        f"{raw['images_per_s']:.1f} img/s at the start (inference alone on preprocessed tensors, same batch: "
        f"{raw['infer_only_images_per_s']:.1f} img/s). Because the load on these shared cores drifts, every server "
        f"is compared with the raw runtime measured right beside it ({results['plan']['raw_window_s']:g} s just before "
        f"and just after its window, averaged): *vs raw runtime* = img/s / raw img/s beside it. The client runs on "
        f"the same {results['machine']['cores']} cores as the server (its CPU use is a column), which the ratio "
        f"charges to the gateway. While other jobs share the cores, a process with more runnable threads gets a "
        f"larger share of them, and the gateway runs more threads (event loop, decoding pool, inference) than the raw "
        f"loop: a ratio above 1 comes from that, not from free work.\n\n"
        + _table(
            [
                "gateway",
                "img/s",
                "p50 ms",
                "p99 ms",
                "errors",
                "client CPU (cores)",
                "raw img/s beside",
                "vs raw runtime",
            ],
            rows,
        )
        + f"\n\nBest gateway / raw runtime: **{efficiency(best):.2f}** ({best['label']}; target >= 0.90)."
        + f"\n\n![latency vs throughput]({img_prefix}gateway_latency_throughput.png)"
    )


def _naive_section(naive: dict, best: dict) -> str:
    return (
        "What a user writes first (`loadtest/naive_server.py`): FastAPI, an async endpoint that decodes and runs the "
        "model inline on the event loop (one request at a time), Pillow + torchvision transforms, PyTorch eager, one "
        "forward per request; the same architecture (the repository's checkpoint when "
        "it has one, otherwise random weights: speed does not depend on them), same photos, same client and "
        "concurrency as above, with the raw runtime measured beside it the same way.\n\n"
        + _table(
            ["server", "img/s", "p50 ms", "p99 ms", "errors", "raw img/s beside", "vs raw runtime"],
            [
                [
                    naive["label"],
                    f"{naive['images_per_s']:.1f}",
                    f"{naive['p50_ms']:.1f}",
                    f"{naive['p99_ms']:.1f}",
                    str(naive["errors"]),
                    f"{naive['extra']['raw_images_per_s']:.1f}",
                    f"{efficiency(naive):.2f}",
                ],
                [
                    f"gateway ({best['label']})",
                    f"{best['images_per_s']:.1f}",
                    f"{best['p50_ms']:.1f}",
                    f"{best['p99_ms']:.1f}",
                    str(best["errors"]),
                    f"{best['extra']['raw_images_per_s']:.1f}",
                    f"{efficiency(best):.2f}",
                ],
            ],
        )
        + f"\n\nGateway / naive: **{efficiency(best) / efficiency(naive):.2f}x** in efficiency (each against the "
        f"raw runtime beside it), {best['images_per_s'] / naive['images_per_s']:.2f}x in raw img/s; p99 "
        f"{best['p99_ms']:.0f} ms against {naive['p99_ms']:.0f} ms."
    )


def _loadtest_section(load: dict | None, img_prefix: str) -> str:
    if load:
        s = load["summary"]
        rows = [
            [
                str(step["users"]),
                f"{step['rps']:.1f}",
                f"{step['p50']:.0f}",
                f"{step['p95']:.0f}",
                f"{step['p99']:.0f}",
            ]
            for step in load["steps"]
        ]
        return (
            f"`resnet loadtest --scenario ramp --users {load['users']} --duration {load['duration_s']:g}s` against the "
            f"gateway (batching on): Locust HTTP users with zero think time, tasks weighted 8:2:1 for one photo, four "
            f"photos in one multipart request, and the model listing. Overall {s['requests']} requests, {s['failures']} failed, {s['requests_per_s']:.1f} "
            f"req/s, p50 {s['p50_ms']:.0f} ms, p95 {s['p95_ms']:.0f} ms, p99 {s['p99_ms']:.0f} ms. Per ramp step "
            f"(median of each step's seconds; Locust itself shares the cores):\n\n"
            + _table(["users", "req/s", "p50 ms", "p95 ms", "p99 ms"], rows)
            + f"\n\n![load test timeline]({img_prefix}loadtest_timeline.png)\n"
            + f"![latency vs throughput per step]({img_prefix}loadtest_latency_vs_throughput.png)"
        )
    return "Not run (`--quick`); see `resnet loadtest` in the README."


def split_sections(text: str) -> tuple[str, list[tuple[str, str]]]:
    """The text before the first `## ` heading, and (title, body) for each `## ` section, in order."""
    parts = re.split(r"^## (.+)$", text, flags=re.MULTILINE)
    return parts[0], [(parts[i].strip(), parts[i + 1].strip("\n")) for i in range(1, len(parts), 2)]


def replace_section(path: Path, title: str, body: str) -> None:
    """`path` with its `## title` section replaced by `body` (added at the end when it has none); the rest kept."""
    head, sections = split_sections(path.read_text()) if path.is_file() else ("# Benchmarks\n\n", [])
    sections = [(name, body if name == title else text) for name, text in sections]
    if title not in [name for name, _ in sections]:
        sections.append((title, body))
    text = head.rstrip("\n") + "\n\n" + "\n".join(f"## {name}\n\n{text.strip()}\n" for name, text in sections)
    cli.files.atomic_write_text(path, text)


def write_markdown(results: dict, path: Path, img_prefix: str) -> None:
    _, existing = split_sections(path.read_text()) if path.is_file() else ("", [])
    machine = results["machine"]
    header = (
        "# Benchmarks\n\n"
        "<!-- Generated by `resnet bench`; sections below whose titles `loadtest/bench_report.py` does not own are kept "
        "as they are. Edit the code, not the numbers. -->\n\n"
        "Each `## ` section belongs to one part of the project and says how its numbers were measured. The first "
        f"{len(OWNED_SECTIONS)} come from one run of `resnet bench`:\n\n"
        f"Command: `{results['command']}` ({results['date']}, {results['elapsed_s']:.0f} s). Raw results: "
        f"`{results['json_name']}`.\n\n"
        f"Machine: {machine['cpu']}, {machine['cores']} cores, no GPU; Python {machine['python']}, torch "
        f"{machine['torch']}, onnxruntime {machine['onnxruntime']}, tritonserver {machine['tritonserver']}. "
        f"Model: `{results['model']}` ({results['arch']}, {results['weights']}).\n\n"
        "**Noise:** this machine's cores are shared with other jobs while the suite runs, so absolute numbers move "
        "between runs; the ratios between rows of one run (same moment, same inputs) are what to read.\n"
    )
    ours = render_sections(results, img_prefix)
    body = [f"## {title}\n\n{ours[title]}\n" for title in OWNED_SECTIONS if title in ours]
    body += [f"## {title}\n\n{text.strip()}\n" for title, text in existing if title not in OWNED_SECTIONS]
    cli.files.atomic_write_text(path, header + "\n" + "\n".join(body))
