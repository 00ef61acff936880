"""gRPC vs HTTP (/v1 and KServe /v2) through one gateway: closed-loop clients, the same images and concurrency.

    python -m server.grpc_bench --http-url http://127.0.0.1:8080 --grpc-url 127.0.0.1:8081 \\
        --model resnet20_cifar10 --images photos/ --concurrency 1 8 32 --requests 600

"http" posts one raw image per request to `/v1/models/{model}/classify?top_k=5`; "http /v2" and "grpc" send the
same image to `{model}_pipeline` with `class_count=5` over Triton's protocol, HTTP (binary tensor data) or gRPC,
with tritonclient's asyncio clients. `compare()` is what `resnet bench` (loadtest/bench.py) calls;
`markdown_table()` renders its rows.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cli.help import HelpFormatter

TOP_K = 5
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


@dataclass(frozen=True)
class Measurement:
    protocol: str
    concurrency: int
    requests: int
    errors: int
    throughput: float  # successful requests (= images) per second
    p50_ms: float
    p99_ms: float


async def _closed_loop(
    send, images: list[bytes], concurrency: int, requests: int
) -> tuple[list[float], int, float]:
    latencies: list[float] = []
    errors = 0
    counter = iter(range(requests))

    async def user() -> None:
        nonlocal errors
        for number in counter:
            started = time.perf_counter()
            try:
                await send(images[number % len(images)])
            except Exception:  # noqa: BLE001 - counted, the run goes on
                errors += 1
                continue
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(user() for _ in range(concurrency)))
    return latencies, errors, time.perf_counter() - started


async def _http(
    url: str, model: str, images: list[bytes], concurrency: int, requests: int, api_key: str | None
):
    # aiohttp, the library under tritonclient.http.aio, so the two HTTP rows compare the APIs, not the clients
    # (httpx's pool, tried first, fell to half the throughput at 32 connections on 2 cores).
    import aiohttp

    headers = {
        "content-type": "application/octet-stream",
        **({"authorization": f"Bearer {api_key}"} if api_key else {}),
    }
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(url, headers=headers, connector=connector, timeout=timeout) as session:

        async def send(image: bytes) -> None:
            path = f"/v1/models/{model}/classify"
            async with session.post(path, params={"top_k": TOP_K}, data=image) as response:
                response.raise_for_status()
                await response.read()

        await send(images[0])  # warm the connection and the model
        return await _closed_loop(send, images, concurrency, requests)


async def _grpc(
    address: str, model: str, images: list[bytes], concurrency: int, requests: int, api_key: str | None
):
    import tritonclient.grpc.aio as grpcclient

    headers = {"authorization": f"Bearer {api_key}"} if api_key else None
    outputs = [grpcclient.InferRequestedOutput("logits", class_count=TOP_K)]
    async with grpcclient.InferenceServerClient(address) as client:

        async def send(image: bytes) -> None:
            tensor = grpcclient.InferInput("image", [1, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([image], dtype=np.object_).reshape(1, 1))
            await client.infer(f"{model}_pipeline", [tensor], outputs=outputs, headers=headers)

        await send(images[0])
        return await _closed_loop(send, images, concurrency, requests)


async def _kserve_http(
    url: str, model: str, images: list[bytes], concurrency: int, requests: int, api_key: str | None
):
    import tritonclient.http.aio as httpclient

    outputs = [httpclient.InferRequestedOutput("logits", class_count=TOP_K)]
    address = url.removeprefix("http://")
    async with httpclient.InferenceServerClient(address, conn_limit=concurrency) as client:

        async def send(image: bytes) -> None:
            tensor = httpclient.InferInput("image", [1, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([image], dtype=np.object_).reshape(1, 1))
            # a new dict each call: tritonclient writes the body's header length into the one it is given
            headers = {"authorization": f"Bearer {api_key}"} if api_key else None
            await client.infer(f"{model}_pipeline", [tensor], outputs=outputs, headers=headers)

        await send(images[0])
        return await _closed_loop(send, images, concurrency, requests)


PROTOCOLS = {"http": _http, "http /v2": _kserve_http, "grpc": _grpc}


def measure(
    protocol: str,
    target: str,
    model: str,
    images: list[bytes],
    concurrency: int,
    requests: int,
    api_key: str | None = None,
) -> Measurement:
    run = PROTOCOLS[protocol]
    latencies, errors, seconds = asyncio.run(run(target, model, images, concurrency, requests, api_key))
    millis = np.array(latencies or [float("nan")]) * 1000
    return Measurement(
        protocol,
        concurrency,
        requests,
        errors,
        len(latencies) / seconds,
        float(np.percentile(millis, 50)),
        float(np.percentile(millis, 99)),
    )


def compare(
    http_url: str,
    grpc_address: str,
    model: str,
    images: list[bytes],
    concurrencies=(1, 8, 32),
    requests: int = 400,
    api_key: str | None = None,
) -> list[Measurement]:
    """HTTP /v1, HTTP /v2 then gRPC at each concurrency, against one running gateway."""
    targets = {"http": http_url, "http /v2": http_url, "grpc": grpc_address.removeprefix("grpc://")}
    return [
        measure(protocol, target, model, images, concurrency, requests, api_key)
        for concurrency in concurrencies
        for protocol, target in targets.items()
    ]


def markdown_table(rows: list[Measurement]) -> str:
    lines = [
        "| concurrency | protocol | images/s | p50 ms | p99 ms | errors |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r.concurrency} | {r.protocol} | {r.throughput:.0f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.errors} |"
        for r in rows
    ]
    return "\n".join(lines)


def load_images(folder: Path) -> list[bytes]:
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SystemExit(f"no images in {folder}")
    return [p.read_bytes() for p in paths]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--http-url", default="http://127.0.0.1:8080")
    parser.add_argument("--grpc-url", default="127.0.0.1:8081")
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", type=Path, required=True, help="folder of images (searched recursively)")
    parser.add_argument("--limit", type=int, default=200, help="use at most this many images")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=400, help="requests per protocol and concurrency")
    parser.add_argument("--api-key")
    return parser


def main(args: argparse.Namespace) -> None:
    images = load_images(args.images)[: args.limit]
    rows = compare(
        args.http_url, args.grpc_url, args.model, images, args.concurrency, args.requests, args.api_key
    )
    print(markdown_table(rows))
    for row in rows:
        print(asdict(row))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
