"""CPU precisions per graph: which file and which arithmetic each graph runs in on a CPU backend.

Export writes reduced-precision variants of some graphs next to the fp32 ones and records, per
graph, the precision the target picked after the agreement gate (fastsam2.export.precision):
    manifest["graphs"][g]["variants"][precision] = {"file", "sha256", "bytes", "format", gate numbers}
    manifest["precision"] = {graph: precision}
- int8: a quantised ONNX file (QDQ, or ONNX Runtime's dynamic int8);
- bf16: a hint on the fp32 file (OpenVINO's inference precision; MLAS's bf16 GEMMs on ARM64),
  only where the CPU has bf16 arithmetic; elsewhere the graph runs fp32 and the run says so.
The runtime follows the manifest; `precision=` or $FASTSAM2_PRECISION overrides it.
"""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path

from fastsam2.runtime import host
from fastsam2.runtime.bundle import sha256_file
from fastsam2.runtime.contract import GRAPH_ORDER
from fastsam2.runtime.errors import BackendError, BundleError, InputError

log = logging.getLogger(__name__)

CPU_BACKENDS = ("ort-cpu", "openvino")  # where the bundle's CPU precisions apply
CPU_PRECISIONS = ("fp32", "bf16", "int8")
PRECISION_ENV = "FASTSAM2_PRECISION"  # e.g. "fp32", "int8", "image_encoder=int8,memory_attention=fp32"


def parse_precision(text: str | None) -> dict:
    """"int8" -> {"*": "int8"}; "image_encoder=int8,memory_attention=fp32" -> per graph."""
    out = {}
    for part in (text or "").replace(" ", "").split(","):
        if not part:
            continue
        graph, _, prec = part.rpartition("=")
        graph = graph or "*"
        if prec not in CPU_PRECISIONS or (graph != "*" and graph not in GRAPH_ORDER):
            raise InputError(f"precision {part!r}: use one of {', '.join(CPU_PRECISIONS)}, for all graphs "
                             f"or as graph=precision with a graph from {', '.join(GRAPH_ORDER)}")
        out[graph] = prec
    return out


def graph_precisions(bundle, backend: str, override: str | None = None, warn=None) -> dict:
    """{graph: precision} this backend runs: the bundle's pick, or the override (argument, else
    $FASTSAM2_PRECISION). A precision the backend or CPU cannot run falls back to fp32, said once
    (to `warn`, the callback runtime/backends.py passes; by default this module's logger)."""
    warn = warn or log.warning
    picked = {g: p for g, p in (bundle.manifest.get("precision") or {}).items() if g in GRAPH_ORDER}
    asked = parse_precision(override if override is not None else os.environ.get(PRECISION_ENV))
    if backend not in CPU_BACKENDS:  # GPU backends: fp32 graphs, the engines' own precision
        if any(p != "fp32" for p in asked.values()):
            warn(f"warning: {backend} runs the fp32 graphs; the CPU precision asked for applies to "
                 f"{' and '.join(CPU_BACKENDS)} only")
        return {g: "fp32" for g in GRAPH_ORDER}
    out = {}
    for g in GRAPH_ORDER:
        variants = bundle.manifest["graphs"][g].get("variants") or {}
        want = asked.get(g, asked.get("*", picked.get(g, "fp32")))
        if want != "fp32" and want not in variants:
            if g in asked or ("*" not in asked and g in picked):
                raise BundleError(f"the bundle has no {want} variant of {g} (it has: "
                                  f"{', '.join(['fp32', *variants])}); export it with --precision {want}")
            want = "fp32"  # "int8" for all graphs means: the graphs that have an int8 variant
        why = _unsupported(want, backend, variants.get(want, {}))
        if why:
            warn(f"warning: {g} runs in fp32, not {want}: {why}")
            want = "fp32"
        out[g] = want
    if asked.get("*", "fp32") != "fp32" and all(p == "fp32" for p in out.values()):
        want = asked["*"]
        if any(want in (bundle.manifest["graphs"][g].get("variants") or {}) for g in GRAPH_ORDER):
            raise BackendError(f"{backend} runs none of the bundle's {want} variants here (see the warnings "
                               f"above); try another --backend")
        raise BundleError(f"the bundle has no {want} variant of any graph; export it with --precision {want}")
    return out


def _unsupported(precision: str, backend: str, variant: dict) -> str | None:
    if precision == "fp32":
        return None
    if precision == "bf16":
        if backend == "openvino":
            from fastsam2.runtime.openvino_backend import device_has_bf16

            return None if device_has_bf16("CPU") else "OpenVINO reports no BF16 on this CPU (needs AVX512_BF16 or AMX)"
        if platform.machine().lower() not in ("aarch64", "arm64"):
            return "ONNX Runtime runs bf16 matrix products on ARM64 only; use --backend openvino"
        return None if host.cpu_has_bf16() else "this CPU has no BF16 extension"
    if backend == "openvino" and variant.get("format") == "dynamic":
        return "OpenVINO runs int8 from QDQ graphs, and this variant is ONNX Runtime's dynamic int8"
    return None


def variant_path(bundle, graph: str, precision: str) -> Path:
    """The file a graph runs from in `precision`, checked against the manifest's sha256."""
    if precision == "fp32":
        return bundle.graph_path(graph)
    v = bundle.manifest["graphs"][graph]["variants"][precision]
    f = bundle.file(v["file"])
    if f != bundle.graph_path(graph):  # bf16 is a hint on the fp32 file, checked at load
        if not f.is_file():
            raise BundleError(f"bundle file missing: {f}")
        if sha256_file(f) != v["sha256"]:
            raise BundleError(f"bundle file {f} changed since export (sha256 mismatch): export it again")
    return f
