"""Upper bounds on counts where a typo is ruinous rather than slow: ONNX Runtime and torch start every thread they
are given (`resnet serve --intra-op-threads 99999999` grew to 24 GB and the kernel's OOM killer ended it), and a
DataLoader forks every worker. No machine has cores for more."""

MAX_THREADS = 1024
MAX_WORKERS = 256
