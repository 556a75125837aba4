"""OpenVINO backend: the bundle's ONNX graphs through OpenVINO's runtime (Intel CPUs, iGPUs, NPUs).

OpenVINO reads ONNX directly, so a bundle needs no second format. Per graph it gets:
- a device: the target's (`CPU`, `GPU`, `NPU`, `AUTO`); NPUs compile static shapes only, so the
  graphs with dynamic inputs (memory attention's N/M/Ms, the decoder's P) run on the CPU there;
- an inference precision: `f32` for fp32 graphs, set explicitly because OpenVINO's CPU plugin
  defaults to bf16 on CPUs that have it (AVX512_BF16/AMX), which would change fp32 numerics
  silently; `bf16` where the bundle picked bf16 and the device has it; int8 graphs are QDQ
  ONNX files that OpenVINO runs with its int8 kernels;
- a model cache (compiled blobs) in the user cache, never inside the bundle: a bundle may be
  read-only or sealed, and the cache is per machine anyway.

Like the rest of the runtime, this never imports torch, and it imports openvino without the
usage telemetry that `import openvino` otherwise sends (see import_openvino).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np

from fastsam2.runtime.errors import BackendError

# fastsam2 precision -> OpenVINO inference precision hint
OV_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}
DEVICES = ("CPU", "GPU", "NPU", "AUTO")

_CORE = None


def openvino_available() -> bool:
    # found, not imported: listing backends must not load OpenVINO (nor its telemetry)
    return importlib.util.find_spec("openvino") is not None


def import_openvino():
    """`import openvino` without its usage telemetry. Importing openvino imports its model
    converter, which sends an "import" event to Google Analytics through openvino_telemetry
    (and creates ~/intel/) unless the user opted out; seen as a DNS query under strace. With
    openvino_telemetry hidden during the import, the converter binds its own no-op stub."""
    if "openvino" in sys.modules:
        return sys.modules["openvino"]
    hide = "openvino_telemetry" not in sys.modules
    if hide:
        sys.modules["openvino_telemetry"] = None  # import fails -> openvino's telemetry_stub
    try:
        import openvino
    finally:
        if hide:
            sys.modules.pop("openvino_telemetry", None)
    return openvino


def core():
    """One OpenVINO Core per process (it owns the plugins and their thread pools)."""
    global _CORE
    if _CORE is None:
        _CORE = import_openvino().Core()
    return _CORE


def devices() -> list:
    return list(core().available_devices) if openvino_available() else []


def device_has_bf16(device: str = "CPU") -> bool:
    """Whether OpenVINO can run bf16 on `device` (CPU: AVX512_BF16 or AMX)."""
    try:
        caps = core().get_property(device, "OPTIMIZATION_CAPABILITIES")
    except Exception:  # the device is not there, or does not report capabilities
        return False
    return "BF16" in [str(c).upper() for c in caps]


def cache_dir(sha256: str) -> Path:
    """OpenVINO's compiled-model cache for one bundle: $XDG_CACHE_HOME/fastsam2/openvino/<sha>."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "fastsam2" / "openvino" / sha256[:16]


def graph_device(device: str, dynamic: bool) -> str:
    """The device one graph compiles for: NPUs take static shapes only."""
    return "CPU" if device == "NPU" and dynamic else device


def _onnx_name(port) -> str:
    """The graph's own tensor name: OpenVINO merges names onto a port (an input that feeds a
    Cast also carries "/memory_encoder/Cast_output_0"); the exporter's internal ones start with /."""
    return sorted(port.get_names(), key=lambda n: (n.startswith("/"), n))[0]


class OpenVINOSession:
    """One compiled graph with `.run(feeds) -> {output: array}` like OrtSession."""

    def __init__(self, path, device: str = "CPU", threads: int | None = None, precision: str = "fp32",
                 cache: Path | None = None, log=None):
        config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        if device == "CPU":
            # no pinning: on a CPU shared with other processes, threads pinned to busy cores
            # wait for them (bench/levers.py `session` measures pinning on vs off)
            config["ENABLE_CPU_PINNING"] = False
            if threads:
                config["INFERENCE_NUM_THREADS"] = int(threads)
        if device != "NPU":  # the NPU computes in fp16 whatever it is told; CPU and GPU obey
            config["INFERENCE_PRECISION_HINT"] = OV_HINTS[precision]
        if cache is not None:
            try:
                Path(cache).mkdir(parents=True, exist_ok=True)
                config["CACHE_DIR"] = str(cache)
            except OSError:
                pass  # an unwritable cache only costs compile time
        # OpenVINO compiles a graph once per cache (bf16 Hiera at 1024 px: ~100 s on 2 cores) and
        # then loads it in seconds: say so before the wait, not after it
        done = Path(cache) / f"compiled-{device}-{OV_HINTS[precision]}-{threads or 0}" if "CACHE_DIR" in config else None
        if log is not None and (done is None or not done.exists()):
            log(f"openvino: compiling {Path(path).name} for {device} in {OV_HINTS[precision]}"
                + (f" (once: cached in {cache})" if done is not None else " (no writable cache: every run)"))
        try:
            self.compiled = core().compile_model(str(path), device, config)
            if done is not None:
                with contextlib.suppress(OSError):
                    done.touch()
        except RuntimeError as e:
            first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            raise BackendError(f"OpenVINO could not compile {Path(path).name} for {device}: {first[:200]}") from None
        self.request = self.compiled.create_infer_request()
        self.input_names = [_onnx_name(i) for i in self.compiled.inputs]
        self.output_names = [_onnx_name(o) for o in self.compiled.outputs]
        self.device, self.precision = device, precision
        self.providers = [f"OpenVINO:{device}:{OV_HINTS[precision]}"]

    def run(self, feeds: dict) -> dict:
        res = self.request.infer({n: feeds[n] for n in self.input_names})
        # copies: the request reuses its output buffers on the next call, and the tracking
        # loop keeps some outputs (features, memories) across calls
        return {n: np.array(res[o], copy=True) for n, o in zip(self.output_names, self.compiled.outputs)}
