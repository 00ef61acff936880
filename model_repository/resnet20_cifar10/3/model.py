"""Triton Python backend: a classifier that runs `model.onnx` (beside this file) with ONNX Runtime on the CPU.

Copied as `<version>/model.py` by the exporter (the Triton here has only the Python backend). Requests that
arrive together (dynamic batching) run as one ONNX Runtime batch; a malformed request gets its own error
response and does not fail the others.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        if not os.path.isfile(path):
            raise pb_utils.TritonModelException(f"{config['name']}: {path} is missing")
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(parameters.get("onnxruntime.intra_op_num_threads", "0"))
        options.log_severity_level = 3
        # Spinning worker threads starve the stub's other work (and neighbours) on a shared CPU: off by default.
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", parameters.get("onnxruntime.allow_spinning", "0")
        )
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        inputs = {i["name"]: i for i in config["input"]}
        outputs = {o["name"]: o for o in config["output"]}
        if (
            INPUT_NAME not in inputs
            or OUTPUT_NAME not in outputs
            or [o.name for o in self.session.get_outputs()] != [OUTPUT_NAME]
        ):
            raise pb_utils.TritonModelException(
                f"{config['name']}: expected tensors {INPUT_NAME!r} -> {OUTPUT_NAME!r}"
            )
        self.sample_shape = tuple(int(d) for d in inputs[INPUT_NAME]["dims"])
        onnx_shape = tuple(self.session.get_inputs()[0].shape[1:])
        if onnx_shape != self.sample_shape:
            raise pb_utils.TritonModelException(
                f"{config['name']}: model.onnx takes {onnx_shape}, config says {self.sample_shape}"
            )
        # A version kept for rollback under a config rewritten for other classes must not load: each request
        # would otherwise get scores that the labels do not name.
        classes = int(outputs[OUTPUT_NAME]["dims"][-1])
        width = self.session.get_outputs()[0].shape[-1]
        if isinstance(width, int) and width != classes:
            raise pb_utils.TritonModelException(
                f"{config['name']}: model.onnx gives {width} classes, config says {classes}"
            )

    def execute(self, requests):
        arrays, errors = [], []
        for request in requests:
            array = pb_utils.get_input_tensor_by_name(request, INPUT_NAME).as_numpy()
            ok = array.dtype == np.float32 and tuple(array.shape[1:]) == self.sample_shape
            errors.append(
                None
                if ok
                else f"{INPUT_NAME} must be FP32 [batch, {', '.join(map(str, self.sample_shape))}], got {array.dtype} {list(array.shape)}"
            )
            arrays.append(array if ok else None)
        valid = [a for a in arrays if a is not None]
        outputs = iter([])
        if valid:
            logits = self.session.run([OUTPUT_NAME], {INPUT_NAME: np.concatenate(valid)})[0]
            outputs = iter(np.split(logits, np.cumsum([len(a) for a in valid])[:-1]))
        responses = []
        for error in errors:
            if error:
                # INVALID_ARG: HTTP 400 / gRPC INVALID_ARGUMENT; the default code, INTERNAL, is a 500
                bad_input = pb_utils.TritonError(error, pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=bad_input))
            else:
                responses.append(
                    pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(OUTPUT_NAME, next(outputs))])
                )
        return responses

    def finalize(self):
        self.session = None
