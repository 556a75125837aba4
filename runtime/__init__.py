"""Torch-free runtime: load a bundle, chain its graphs frame by frame, write masks.

This package must never import torch (tests/runtime/test_no_torch.py guards it).
"""

import os

# ONNX Runtime 1.2x+ on Linux/macOS records telemetry (1DS: a device id and an event store under
# $XDG_CACHE_HOME/Microsoft/DeveloperTools/.onnxruntime, uploaded to Microsoft) from the moment
# it is imported. Opt out here, before any runtime module can import it (a library user's own
# earlier import of onnxruntime is theirs), unless the user chose otherwise; both names, since
# onnxruntime renamed the variable (ORT_DISABLE_TELEMETRY in 1.32, ORT_TELEMETRY_DISABLED later).
for _name in ("ORT_DISABLE_TELEMETRY", "ORT_TELEMETRY_DISABLED"):
    os.environ.setdefault(_name, "1")

from fastsam2.runtime.errors import (  # noqa: F401
    BackendError,
    BundleError,
    CheckpointError,
    FastSam2Error,
    InputError,
    OutputError,
)
