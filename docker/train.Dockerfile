# The trainer: NVIDIA's PyTorch image (CUDA, cuDNN, NCCL and a tuned torch build), our code on top, and
# torchrun as the launcher. Release 25.12 carries torch 2.10.0a0+b4e4ee81d3.nv25.12 and Python 3.12.3.
# Checkpoints are plain state dicts, so this release need not match the Triton/TensorRT one.
#
#   docker build -f docker/train.Dockerfile -t resnet-serving/train .             # from the repository root
#   # one node, every GPU (the default command):
#   docker run --rm --gpus all --ipc host -v "$PWD/data:/workspace/data" -v "$PWD/runs:/workspace/runs" \
#       resnet-serving/train --standalone --nproc-per-node gpu -m cli.main train --help
#   # several nodes: see docs/deployment.md ("Train on several nodes").
ARG PYTORCH_RELEASE=25.12
FROM nvcr.io/nvidia/pytorch:${PYTORCH_RELEASE}-py3

ENV PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    XDG_CACHE_HOME=/tmp/cache
WORKDIR /opt/resnet
# The base image's torch/torchvision stay: installing the `train` extra would replace them with PyPI builds.
COPY docker/requirements-train.txt ./
RUN python3 -m pip install --requirement requirements-train.txt
COPY pyproject.toml README.md ./
COPY cli ./cli
COPY server ./server
COPY training ./training
RUN python3 -m pip install --no-deps . \
    && python3 -c "import torch, torchvision, training.train; print('torch', torch.__version__)"

WORKDIR /workspace
ENTRYPOINT ["torchrun"]
CMD ["--standalone", "--nproc-per-node", "gpu", "-m", "cli.main", "train"]
