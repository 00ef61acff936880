"""Checkpoint -> verified ONNX / FP16 / INT8 / TensorRT -> Triton model repository; and running Triton.

Modules: `source` (checkpoints, torchvision weights), `onnx` (export, verify, FP16), `quantize` (INT8),
`tensorrt` (plans), `repository` (config.pbtxt, atomic versions), `workflow` (`export_to_repository`),
`triton_server` (`TritonServer`, `resnet triton serve`), `cli` (`resnet export`), `benchmark`.
Kept import-light: `export.repository` and `export.triton_server` do not import torch.
"""
