"""The baseline a user would write first: FastAPI + PyTorch eager, one forward pass per request.

    python -m loadtest.naive_server --arch resnet20 --port 8090
    python -m loadtest.naive_server --checkpoint runs/resnet20/best.pt --port 8090

Deliberately naive (it is the "before" of the benchmark): Pillow + torchvision transforms and the forward
pass inline in an async endpoint (so one request at a time, on the event loop; PyTorch's intra-op threads
still use every core), no batching, no ONNX, no request limits. It answers the same
API subset as the gateway (`GET /v1/models`, `POST /v1/models/{name}/classify` with a raw image body or
multipart `file` fields, `/healthz`, `/readyz`) so the same Locust users and bench client drive both.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from PIL import Image, UnidentifiedImageError


def build_app(model: torch.nn.Module, name: str, labels: list[str], transform) -> FastAPI:
    app = FastAPI(title="naive ResNet server")
    model = model.eval()

    def classify(data: bytes, top_k: int) -> dict:
        try:
            image = Image.open(io.BytesIO(data)).convert("RGB")
        except (UnidentifiedImageError, OSError) as error:
            raise HTTPException(400, f"not an image: {error}") from error
        with torch.inference_mode():
            probabilities = model(transform(image).unsqueeze(0)).softmax(dim=1)[0]
        scores, indices = probabilities.topk(min(top_k, len(labels)))
        return {
            "model": name,
            "version": "1",
            "predictions": [
                {"index": int(i), "label": labels[int(i)], "score": float(s)}
                for s, i in zip(scores, indices, strict=True)
            ],
        }

    @app.get("/healthz")
    @app.get("/readyz")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    def list_models() -> dict:
        return {
            "models": [{"name": name, "versions": ["1"], "labels": len(labels), "backend": "pytorch-eager"}]
        }

    @app.post("/v1/models/{model_name}/classify")
    async def classify_endpoint(model_name: str, request: Request, top_k: int = 5):
        if model_name != name:
            raise HTTPException(404, f"unknown model {model_name!r}")
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form()
            files = [await upload.read() for upload in form.getlist("file")]
            return [classify(data, top_k) for data in files]
        return classify(await request.body(), top_k)

    return app


def load(args: argparse.Namespace):
    from export.source import from_arch, from_checkpoint
    from training.presets import eval_transform

    source = from_checkpoint(Path(args.checkpoint)) if args.checkpoint else from_arch(args.arch, "random")
    labels = source.classes or [f"class_{i}" for i in range(source.num_classes)]
    if args.labels:
        labels = Path(args.labels).read_text().splitlines()
    return source.model, labels, eval_transform(source.spec)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint", default="", help="training checkpoint to serve (default: random weights)"
    )
    parser.add_argument("--arch", default="resnet20", help="architecture when no checkpoint is given")
    parser.add_argument(
        "--labels", default="", help="labels file, one per line (default: the checkpoint's classes)"
    )
    parser.add_argument("--name", default="resnet20_cifar10", help="model name in the URL")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    return parser


def main(args: argparse.Namespace) -> None:
    model, labels, transform = load(args)
    uvicorn.run(
        build_app(model, args.name, labels, transform), host=args.host, port=args.port, log_level="warning"
    )


if __name__ == "__main__":
    main(get_args_parser().parse_args())
