"""fastsam2: SAM2 video tracking with text-driven token pruning, for edge devices.

The code lives in rooms mapped onto this package (see pyproject.toml):
``fastsam2.export`` (torch side), ``fastsam2.runtime`` (numpy side, never imports torch),
``fastsam2.calibration`` and ``fastsam2.profiles``.
"""

__version__ = "0.1.0"
