"""Torch-free runtime: load a bundle, chain its graphs frame by frame, write masks.

This package must never import torch (tests/runtime/test_no_torch.py guards it).
"""

from fastsam2.runtime.errors import (  # noqa: F401
    BackendError,
    BundleError,
    CheckpointError,
    FastSam2Error,
    InputError,
    OutputError,
)
