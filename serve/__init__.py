"""Serving many streams on NVIDIA Triton Inference Server: the model repository, the stateful
tracker model (one streaming session per Triton sequence), the server launcher and the client
behind `fastsam2-run --server`."""
