# The exporter: checkpoint -> verified ONNX -> TensorRT plan, built inside NVIDIA's TensorRT image so that
# the plan is made by the same TensorRT version (10.8.0.43 in release 25.01) that docker/triton.Dockerfile
# serves it with. Build plans on the GPU model that will serve them: a plan is specific to both.
#
#   docker build -f docker/export.Dockerfile -t resnet-serving/export .           # from the repository root
#   docker run --rm --gpus all -v "$PWD/runs:/workspace/runs:ro" \
#       -v "$PWD/model_repository:/workspace/model_repository" resnet-serving/export \
#       --checkpoint runs/imagenet-paper-resnet50/best.pt --name resnet50 --tensorrt
ARG NGC_RELEASE=25.01
FROM nvcr.io/nvidia/tensorrt:${NGC_RELEASE}-py3

ENV PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    XDG_CACHE_HOME=/tmp/cache \
    RESNET_EXPORT_TARGET=gpu
WORKDIR /opt/resnet
COPY pyproject.toml README.md ./
COPY cli ./cli
COPY server ./server
COPY training ./training
COPY export ./export
# TensorRT's Python bindings come with the base image and must not be replaced from PyPI: pip would pick a
# different TensorRT than the one Triton runs. The check fails the build if they are missing.
RUN python3 -m pip install "./[export]" \
    && python3 -c "import tensorrt, torch, onnx, export.cli; print('TensorRT', tensorrt.__version__, 'torch', torch.__version__)"

WORKDIR /workspace
ENTRYPOINT ["resnet", "export"]
CMD ["--help"]
