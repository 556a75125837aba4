"""OpenVINO backend: the bundle's ONNX graphs through OpenVINO's runtime (Intel CPUs, iGPUs, NPUs).

OpenVINO reads ONNX directly, so a bundle needs no second format. Per graph it gets:
- a device: the target's (`CPU`, `GPU`, `NPU`, `AUTO`); NPUs compile static shapes only, so the
  graphs with dynamic inputs (memory attention's N/M/Ms, the decoder's P) run on the CPU there;
- an inference precision: `f32` for fp32 graphs, set explicitly because OpenVINO's CPU plugin
  defaults to bf16 on CPUs that have it (AVX512_BF16/AMX), which would change fp32 numerics
  silently; `bf16` where the bundle picked bf16 and the device has it; int8 graphs are QDQ
  ONNX files that OpenVINO runs with its int8 kernels;
- a model cache (compiled blobs) in the user cache, never written inside the bundle: a bundle
  may be read-only or sealed, and the cache is per machine anyway;
- the export's own compile, where its precision gate compiled a graph on OpenVINO (the bf16
  encoder: ~100 s at 1024 px on 2 cores): shipped in the bundle's openvino_cache/ (a blob per
  graph + index.json naming the OpenVINO version and CPU it was made on), sealed with the other
  files. A first run with an empty user cache imports it instead of compiling, where the
  OpenVINO version and the CPU's precision flags match; anything else compiles (one line why).

Like the rest of the runtime, this never imports torch, and it imports openvino without the
usage telemetry that `import openvino` otherwise sends (see import_openvino).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np

from fastsam2.runtime import host
from fastsam2.runtime.bundle_files import regular_file, sha256_file
from fastsam2.runtime.errors import BackendError, BundleError
from fastsam2.runtime.json_checks import parse_json

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


def _reason(e: BaseException) -> str:
    """OpenVINO's message in one short line: its "Exception from src/..." and "Check '...' failed"
    frames dropped, the plugin's own sentence kept."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    said = [ln for ln in lines if not ln.startswith(("Exception from ", "Check '"))]
    return ((said or lines or [type(e).__name__])[0])[:200]


# -- compiled blobs shipped in the bundle -----------------------------------------------------

SHIPPED_DIR = "openvino_cache"  # in the bundle, beside the graphs
SHIPPED_INDEX = "index.json"
_MAX_INDEX_BYTES = 1 << 20


def openvino_version() -> str:
    return str(import_openvino().get_version())


def shipped_index(root) -> Path:
    """The bundle's index of shipped compiles (the graphs sit at the bundle's top level)."""
    return Path(root) / SHIPPED_DIR / SHIPPED_INDEX


def read_shipped_index(root) -> list:
    """The index's entries (a list of dicts); BundleError where it is not one fastsam2 wrote."""
    f = regular_file(root, f"{SHIPPED_DIR}/{SHIPPED_INDEX}", "OpenVINO index")
    with open(f, "rb") as fh:
        data = parse_json(fh.read(_MAX_INDEX_BYTES + 1), str(f), _MAX_INDEX_BYTES)
    entries = data.get("compiled") if isinstance(data, dict) else None
    if (not isinstance(data, dict) or data.get("format") != 1 or not isinstance(entries, list)
            or not all(isinstance(e, dict) for e in entries)):
        raise BundleError(f"{f} is not an index of compiled graphs")
    return entries


def ship_compiled(session, graph_path) -> Path:
    """Write the compiled graph of `session` (an OpenVINOSession of the bundle graph
    `graph_path`) into the bundle's openvino_cache/, with its index entry: the precision gate's
    compile, kept for the user's first run. Returns the blob's path."""
    graph_path = Path(graph_path)
    root = graph_path.parent
    folder = root / SHIPPED_DIR
    folder.mkdir(exist_ok=True)
    name = f"{graph_path.stem}.{session.device}.{session.precision}.blob"
    tmp = folder / f".{name}.tmp"
    with open(tmp, "wb") as f:
        f.write(session.compiled.export_model().getbuffer())
    os.replace(tmp, folder / name)
    entry = {"graph_file": graph_path.name, "graph_sha256": sha256_file(graph_path), "device": session.device,
             "precision": session.precision, "file": name, "bytes": (folder / name).stat().st_size,
             "sha256": sha256_file(folder / name), "openvino": openvino_version(), "cpu_model": host.cpu_model(),
             "cpu_features": host.cpu_features()}
    entries = read_shipped_index(root) if shipped_index(root).exists() else []
    entries = [e for e in entries if (e.get("graph_file"), e.get("device"), e.get("precision"))
               != (entry["graph_file"], entry["device"], entry["precision"])] + [entry]
    shipped_index(root).write_text(json.dumps({"format": 1, "compiled": entries}, indent=2) + "\n")
    return folder / name


def shipped_blob(graph_path, device: str, precision: str, graph_sha256: str | None = None) -> tuple:
    """(blob bytes, entry) where the bundle ships a compile of `graph_path` for `device` and
    `precision` that this machine may import; (None, why not) where it ships one that does not
    fit here; (None, None) where it ships none. The bundle is untrusted input here: a bad index
    or blob is a reason, never an exception."""
    graph_path = Path(graph_path)
    if not shipped_index(graph_path.parent).exists():
        return None, None
    try:
        key = (graph_path.name, device, precision)
        e = next((e for e in read_shipped_index(graph_path.parent)
                  if (e.get("graph_file"), e.get("device"), e.get("precision")) == key), None)
        if e is None:
            return None, None
        if e.get("openvino") != openvino_version():
            return None, f"was made with OpenVINO {str(e.get('openvino'))[:40]}"
        if e.get("cpu_features") != host.cpu_features():
            return None, (f"was made on another CPU ({str(e.get('cpu_model'))[:60]}: "
                          f"{' '.join(map(str, e.get('cpu_features') or []))[:120] or 'no listed flags'})")
        if e.get("graph_sha256") != (graph_sha256 or sha256_file(graph_path)):
            return None, f"was made from another {graph_path.name}"
        f = regular_file(graph_path.parent, f"{SHIPPED_DIR}/{e.get('file')}", "compiled graph")
        if f.stat().st_size != e.get("bytes"):
            return None, f"{f.name} is {f.stat().st_size} bytes, not the {e.get('bytes')} its index says"
        blob = f.read_bytes()
        if hashlib.sha256(blob).hexdigest() != e.get("sha256"):
            return None, f"{f.name} is corrupt (its sha256 does not match its index)"
        return blob, e
    except (BundleError, OSError, AttributeError, TypeError, ValueError) as err:
        return None, f"cannot be read ({' '.join(str(err).split())[:160]})"


# -- sessions ---------------------------------------------------------------------------------

class OpenVINOSession:
    """One compiled graph with `.run(feeds) -> {output: array}` like OrtSession.

    Where it comes from, in order: the user cache (compiled here before), the bundle's
    openvino_cache/ (compiled by the export on a CPU like this one), a compile (cached)."""

    def __init__(self, path, device: str = "CPU", threads: int | None = None, precision: str = "fp32",
                 cache: Path | None = None, log=None, graph_sha256: str | None = None):
        config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        if device == "CPU":
            # no pinning: on a CPU shared with other processes, threads pinned to busy cores
            # wait for them (bench/levers.py `session` measures pinning on vs off)
            config["ENABLE_CPU_PINNING"] = False
            if threads:
                config["INFERENCE_NUM_THREADS"] = int(threads)
        if device != "NPU":  # the NPU computes in fp16 whatever it is told; CPU and GPU obey
            config["INFERENCE_PRECISION_HINT"] = OV_HINTS[precision]
        self.device, self.precision = device, precision
        self.compiled, self.source = None, "compiled"
        done = None
        if cache is not None:
            try:
                Path(cache).mkdir(parents=True, exist_ok=True)
                # not per thread count: OpenVINO's cache key leaves it out (measured: a compile
                # with 2 threads loads the blob one without INFERENCE_NUM_THREADS wrote)
                done = Path(cache) / f"compiled-{device}-{OV_HINTS[precision]}"
            except OSError:
                pass  # an unwritable cache only costs compile time
        why_not = None
        if done is None or not done.exists():
            blob, entry = shipped_blob(path, device, precision, graph_sha256)
            if blob is not None:
                self.compiled, why_not = self._import(blob, device, config)
                if self.compiled is not None:
                    self.source = "bundle"
                    if log is not None:
                        log(f"openvino: using the bundle's compiled {Path(path).stem} "
                            f"(made on {str(entry.get('cpu_model'))[:60]})")
            else:
                why_not = entry
        if self.compiled is None:
            self.compiled = self._compile(path, device, precision, config, cache, done, why_not, log)
        self.request = self.compiled.create_infer_request()
        self.input_names = [_onnx_name(i) for i in self.compiled.inputs]
        self.output_names = [_onnx_name(o) for o in self.compiled.outputs]
        self.providers = [f"OpenVINO:{device}:{OV_HINTS[precision]}"]

    @staticmethod
    def _import(blob: bytes, device: str, config: dict) -> tuple:
        """(compiled model, None), or (None, why) where OpenVINO refuses the blob: it checks its
        own version and the CPU's instruction sets and throws on a truncated or garbled one
        (measured on 2026.4: none of those crashes it; a flipped weight byte it does not see,
        which is what the sha256 before this call is for)."""
        try:
            return core().import_model(blob, device, config), None
        except RuntimeError as e:
            return None, f"does not load here: {_reason(e)}"

    @staticmethod
    def _compile(path, device, precision, config, cache, done, why_not, log):
        if done is not None:
            config = {**config, "CACHE_DIR": str(cache)}
        # OpenVINO compiles a graph once per cache (bf16 Hiera at 1024 px: ~100 s on 2 cores) and
        # then loads it in seconds: say so before the wait, not after it
        if log is not None and (done is None or not done.exists()):
            log(f"openvino: compiling {Path(path).name} for {device} in {OV_HINTS[precision]}"
                + (f" (once: cached in {cache})" if done is not None else " (no writable cache: every run)")
                + (f"; the bundle's compiled {Path(path).stem} {why_not}" if why_not else ""))
        try:
            compiled = core().compile_model(str(path), device, config)
        except RuntimeError as e:
            raise BackendError(f"OpenVINO could not compile {Path(path).name} for {device}: {_reason(e)}") from None
        if done is not None:
            with contextlib.suppress(OSError):
                done.touch()
        return compiled

    def run(self, feeds: dict) -> dict:
        res = self.request.infer({n: feeds[n] for n in self.input_names})
        # copies: the request reuses its output buffers on the next call, and the tracking
        # loop keeps some outputs (features, memories) across calls
        return {n: np.array(res[o], copy=True) for n, o in zip(self.output_names, self.compiled.outputs)}
