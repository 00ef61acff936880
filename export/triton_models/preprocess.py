"""Triton Python backend: encoded image bytes ("image", TYPE_STRING) -> the classifier's "input" tensor.

It runs the gateway's own preprocessing (`server.preprocessing`) with the PreprocessSpec stored in this model's
config `parameters`, so Triton's pipeline and the gateway give the same tensor for the same image. Copied as
`<version>/model.py` by the exporter; `server` is importable through the PYTHONPATH `resnet triton serve` sets.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

IMAGE_INPUT_NAME = "image"
OUTPUT_NAME = "input"


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        try:
            from server.errors import GatewayError
            from server.preprocessing import preprocess_image
            from server.spec import PreprocessSpec, SpecError
        except ImportError as error:
            raise pb_utils.TritonModelException(
                f"{config['name']}: the `server` package is not importable ({error}); "
                "start Triton with `resnet triton serve`, which sets PYTHONPATH"
            ) from error
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        try:
            self.spec = PreprocessSpec.from_parameters(parameters)
        except SpecError as error:
            raise pb_utils.TritonModelException(f"{config['name']}: {error}") from error
        self.preprocess_image = preprocess_image
        self.image_error = GatewayError

    def execute(self, requests):
        responses = []
        for request in requests:
            images = pb_utils.get_input_tensor_by_name(request, IMAGE_INPUT_NAME).as_numpy()
            try:
                batch = np.stack(
                    [self.preprocess_image(bytes(item), self.spec) for item in images.reshape(-1)]
                )
            except (
                self.image_error
            ) as error:  # the client's bytes are bad: answer this request, keep serving the rest
                message = f"cannot preprocess image: {error.message}"
                # INVALID_ARG: HTTP 400 / gRPC INVALID_ARGUMENT; the default code, INTERNAL, is a 500
                bad_image = pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=bad_image))
                continue
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(OUTPUT_NAME, batch.astype(np.float32))]
                )
            )
        return responses
