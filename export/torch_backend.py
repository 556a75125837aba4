"""Run the graph modules in PyTorch behind the runtime's session interface.

This is the PyTorch pruned tracker: the runtime loop (numpy) driving the very modules that are
exported. It is the reference every ONNX / TensorRT path is held to, and at keep 1.0 it is held
to the official SAM2VideoPredictor.
"""

from __future__ import annotations

import numpy as np
import torch

from fastsam2.runtime.contract import GRAPHS


class TorchSession:
    def __init__(self, name: str, module: torch.nn.Module):
        self.name = name
        self.module = module
        self.spec = GRAPHS[name]
        self.input_names = self.spec.input_names
        self.output_names = self.spec.output_names

    @torch.inference_mode()
    def run(self, feeds: dict) -> dict:
        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in self.input_names]
        outs = self.module(*args)
        if isinstance(outs, torch.Tensor):
            outs = (outs,)
        return {n: o.detach().float().numpy() for n, o in zip(self.output_names, outs)}


def torch_sessions(pruned) -> dict:
    return {name: TorchSession(name, m) for name, m in pruned.graphs.items()}
