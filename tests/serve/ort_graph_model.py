"""A stand-in for Triton's onnxruntime backend, which nvidia-pytriton's server lacks: a python
backend model that runs its folder's model.onnx with ONNX Runtime CPU. The graphs-layout test
swaps it into each graph model so the tracker's BLS path runs end to end on this server, with
Triton checking every request against the graph's config.pbtxt (names, dtypes, dims)."""

import json
from pathlib import Path

import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        folder = Path(args["model_repository"]) / str(args["model_version"])
        self.session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o["name"] for o in config["output"]]

    def execute(self, requests):
        responses = []
        for r in requests:
            feeds = {n: pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.inputs}
            values = self.session.run(self.outputs, feeds)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(n, v) for n, v in zip(self.outputs, values)]))
        return responses
