# The gateway image: `resnet serve` (FastAPI + gRPC) in front of Triton, or ONNX Runtime embedded.
# Serving dependencies only (pyproject's base set): no torch, no CUDA. Configured by RESNET_* env vars.
#
#   docker build -f docker/gateway.Dockerfile -t resnet-serving/gateway .      # from the repository root
#   docker run --rm -p 8080:8080 resnet-serving/gateway                          # bundled model, embedded backend
#   docker run --rm -p 8080:8080 -e RESNET_BACKEND=triton -e RESNET_TRITON_URL=triton:8001 resnet-serving/gateway
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Only cli/ and server/ go into the wheel: setuptools' package discovery finds nothing else here, so the
# image cannot import training or export code even by accident.
COPY pyproject.toml README.md ./
COPY cli ./cli
COPY server ./server
RUN pip install . \
    && python -c "import server, cli.main" \
    && ! pip show torch >/dev/null 2>&1

FROM ${PYTHON_IMAGE} AS runtime
# The server binds 0.0.0.0 inside the container; compose decides what the host publishes.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RESNET_HOST=0.0.0.0 \
    RESNET_PORT=8080 \
    RESNET_GRPC_PORT=8081 \
    RESNET_MODEL_REPOSITORY=/models
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin resnet
COPY --from=build /opt/venv /opt/venv
# The bundled model makes the image work on its own; a deployment mounts its repository over /models.
COPY model_repository /models
USER 10001:10001
EXPOSE 8080 8081
# slim has no curl; the probe reads the gateway's own RESNET_* settings (its port, HTTPS when it serves TLS).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-m", "server.healthcheck"]
ENTRYPOINT ["resnet", "serve"]
CMD []
