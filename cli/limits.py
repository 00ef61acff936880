"""Upper bounds on counts where a typo is ruinous rather than slow: ONNX Runtime and torch start every thread they
are given (`resnet serve --intra-op-threads 99999999` grew to 24 GB and the kernel's OOM killer ended it), and a
DataLoader forks every worker, Triton every Python-backend instance. No machine has cores for more."""

MAX_THREADS = 1024
MAX_WORKERS = 256
# Each instance of a Python-backend model is a process with its own ONNX Runtime session and weights.
MAX_INSTANCES = 64
MAX_BATCH_SIZE = 4096  # the largest batch the gateway assembles and an export configures
