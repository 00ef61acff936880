# Triton Inference Server for the GPU deployment, plus what our Python-backend models import.
#
# NGC release 25.01 (pin it together with docker/export.Dockerfile: a TensorRT plan only loads in the
# TensorRT version that built it). From Triton's release notes and compatibility matrix:
#   Triton 2.54.0 | TensorRT 10.8.0.43 | ONNX Runtime backend 1.20.1 | CUDA 12.8.0 (driver >= 560, or a
#   data-center R470/R525/R535/R545 driver) | Ubuntu 24.04 with Python 3.12.3 | compute capability >= 7.5
#
#   docker build -f docker/triton.Dockerfile -t resnet-serving/triton .          # from the repository root
#   docker run --rm --gpus all --shm-size 1g -v "$PWD/model_repository:/models:ro" \
#       -p 127.0.0.1:8000-8002:8000-8002 resnet-serving/triton
ARG NGC_RELEASE=25.01
FROM nvcr.io/nvidia/tritonserver:${NGC_RELEASE}-py3

# Ubuntu 24.04 marks its Python as externally managed (PEP 668); this image exists to extend it.
ENV PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/resnet
COPY docker/requirements-triton.txt ./
RUN python3 -m pip install --requirement requirements-triton.txt
# Our `server` package (preprocessing + spec) without the gateway's dependencies: the Python backend
# stub imports it from the system site-packages.
COPY pyproject.toml README.md ./
COPY cli ./cli
COPY server ./server
RUN python3 -m pip install --no-deps . \
    && python3 -c "import numpy, server.preprocessing; assert int(numpy.__version__.split('.')[0]) < 2"

# The bundled model makes the image work on its own; compose mounts the deployment's repository over it.
COPY model_repository /models
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2)"]
# explicit: every model loads at start, and a new version goes live only when asked; a model that fails to load
# leaves the others serving (see docs/deployment.md and the comment in compose.yaml).
CMD ["tritonserver", "--model-repository=/models", "--model-control-mode=explicit", "--load-model=*", \
     "--exit-on-error=false", "--strict-readiness=false", "--exit-timeout-secs=30"]
