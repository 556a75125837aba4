"""The Triton model repository for a bundle: plain Triton layout, one config.pbtxt per model.

    repo/
      fastsam2_tracker/              the stateful tracker (python backend, sequence batching)
        config.pbtxt
        1/model.py                   `from fastsam2.serve.tracker_model import TritonPythonModel`
        1/bundle/                    a copy of the bundle (sealed; checked when the model loads)
      image_encoder/ router/ memory_attention/ memory_encoder/ mask_decoder/
                                     layout "graphs" only: each graph a model of its own
        config.pbtxt                 (onnxruntime_onnx or tensorrt_plan), called by the tracker
        1/model.onnx | 1/model.plan  through BLS

Layout "in-process" (the default): the tracker runs the graphs itself with the runtime's
backends, which is all a server with only the python backend can do (nvidia-pytriton's wheel).
Layout "graphs": for servers with the onnxruntime / tensorrt backends (NVIDIA's container, Jetson):
Triton runs each graph, so several tracker instances share one copy of each graph and Triton
schedules them together. Each graph gets max_batch_size 0 (no batching across streams): its
dynamic axes, the objects of one stream's call (B) included, are -1 dims (see docs/serving.md).

Each config.pbtxt is a tritonclient ModelConfig message written in protobuf's text format.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from fastsam2.runtime import host
from fastsam2.runtime.backends import BACKENDS
from fastsam2.runtime.contract import GRAPH_ORDER, GRAPHS, geometry
from fastsam2.runtime.errors import BundleError, InputError, OutputError

from . import protocol

LAYOUTS = ("in-process", "graphs")
SERVE_BACKENDS = BACKENDS  # the runtime's, as every command lists them (openvino: --layout in-process)
DEFAULT_MAX_SESSIONS = 16
MODEL_PY = '''"""fastsam2 tracker model for Triton's python backend (written by fastsam2-serve).

The code lives in the installed fastsam2 package: the server's Python needs `fastsam2[runtime]`.
"""
from fastsam2.serve.tracker_model import TritonPythonModel  # noqa: F401
'''
_TYPES = {"float32": "TYPE_FP32", "int64": "TYPE_INT64"}
TRACKER_HEADER = ("# fastsam2 tracker: one streaming session per Triton sequence (docs/serving.md)\n"
                  "# protobuf text format: max_batch_size 0 and START's kind (CONTROL_SEQUENCE_START) are the "
                  "defaults, so not written\n")


def _model_config():
    """Triton's ModelConfig message and the text format it is written in (tritonclient's
    protobuf; imported here, as tritonclient.grpc takes ~170 ms to import)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2, text_format


def client_info(bundle, backend: str, layout: str, max_sessions, idle_timeout: float) -> dict:
    """What `fastsam2-run --server` needs to know about the bundle (read from the tracker's
    config through Triton's model-config API): the same fields track() reads from a bundle."""
    m = bundle.manifest
    return {"manifest": {"keep": m["keep"], "weights_random": m.get("weights_random"),
                         "router_trained": m.get("router_trained"),
                         "text": {"random": m["text"].get("random"), "model": m["text"].get("model")},
                         "keep_floor": m.get("keep_floor", 64)},
            "settings": bundle.settings, "prompts": list(bundle.text_embeddings),
            "summary": bundle.summary(), "backend": backend, "layout": layout,
            "max_sessions": max_sessions, "idle_timeout": idle_timeout}


def triton_idle_us(idle_timeout: float) -> int:
    """Triton's own sequence idle timeout: the tracker's backstop (10x its idle timeout, at
    least 5 minutes more)."""
    from .sessions import backstop_s

    return int(round(backstop_s(idle_timeout) * 1e6))


def tracker_config(*, instances: int, max_sessions, idle_timeout: float, params: dict) -> str:
    mc, text_format = _model_config()
    c = mc.ModelConfig(name=protocol.MODEL, backend="python", max_batch_size=0)
    c.input.add(name=protocol.FRAME, data_type=mc.TYPE_UINT8, dims=[-1])
    c.input.add(name=protocol.COMMANDS, data_type=mc.TYPE_STRING, dims=[1])
    c.output.add(name=protocol.LOGITS, data_type=mc.TYPE_FP32, dims=[-1, -1, -1])
    c.output.add(name=protocol.RESULT, data_type=mc.TYPE_STRING, dims=[1])
    # a sequence = a stream; "oldest" keeps each sequence on one instance and sends no null
    # requests. Triton counts a sequence idle from its last request's arrival, time queued
    # behind other streams' frames included, so its timeout is only a backstop: the tracker
    # frees an idle session on its own clock (busy time not counted) and then ENDs the sequence
    sb = c.sequence_batching
    sb.max_sequence_idle_microseconds = triton_idle_us(idle_timeout)
    # refused sequences keep a candidate slot until their END (or idle timeout): room for them,
    # so a sequence over the limit is refused by the model instead of waiting in Triton's backlog
    limit = max_sessions or DEFAULT_MAX_SESSIONS
    sb.oldest.SetInParent()
    sb.oldest.max_candidate_sequences = limit + max(4, limit)
    sb.oldest.max_queue_delay_microseconds = 0
    control = mc.ModelSequenceBatching.Control
    sb.control_input.add(name=protocol.START).control.add(kind=control.CONTROL_SEQUENCE_START,
                                                          int32_false_true=[0, 1])
    sb.control_input.add(name=protocol.END).control.add(kind=control.CONTROL_SEQUENCE_END,
                                                        int32_false_true=[0, 1])
    sb.control_input.add(name=protocol.CORRID).control.add(kind=control.CONTROL_SEQUENCE_CORRID,
                                                           data_type=mc.TYPE_UINT64)
    c.instance_group.add(count=instances, kind=mc.ModelInstanceGroup.KIND_CPU)
    for k, v in params.items():
        c.parameters[k].string_value = str(v)
    return TRACKER_HEADER + text_format.MessageToString(c)


def graph_dims(spec, dims: dict, dynamic) -> list:
    """A tensor's Triton dims: -1 for every symbol the graph has dynamic (N, M, P, B: a stream's
    objects...), the geometry's value for the fixed ones."""
    return [-1 if isinstance(d, str) and d in dynamic else int(dims[d] if isinstance(d, str) else d)
            for d in spec.shape]


def graph_config(spec, platform: str, kind: str, count: int, dims: dict, accelerator: str = "") -> str:
    """Graph `spec` (a contract GraphSpec) as a model of its own. max_batch_size 0: Triton does
    not batch requests of different streams together; each dynamic axis, the objects axis B
    included, is a -1 dim the tracker fills per call. accelerator: "tensorrt" for ONNX Runtime's
    TensorRT execution provider."""
    mc, text_format = _model_config()
    c = mc.ModelConfig(name=spec.name, platform=platform, max_batch_size=0)
    for field, tensors in ((c.input, spec.inputs), (c.output, spec.outputs)):
        for t in tensors:
            field.add(name=t.name, data_type=mc.DataType.Value(_TYPES[t.dtype]),
                      dims=graph_dims(t, dims, spec.dynamic))
    c.instance_group.add(count=count, kind=mc.ModelInstanceGroup.Kind.Value(kind))
    if accelerator:
        c.optimization.execution_accelerators.gpu_execution_accelerator.add(name=accelerator)
    return (f"# fastsam2 graph {spec.name}: called by {protocol.MODEL} through BLS (docs/serving.md)\n"
            "# max_batch_size 0 (the default, so not written): Triton does not batch streams together\n"
            + text_format.MessageToString(c))


def _graph_models(bundle, backend: str, count: int) -> dict:
    """{graph: (config text, source file, file name)} for layout "graphs"."""
    text_dim = len(next(iter(bundle.text_embeddings.values()))) if bundle.text_embeddings else 512
    dims = geometry(int(bundle.settings["image_size"]), text_dim)
    out = {}
    for g in GRAPH_ORDER:
        if backend == "tensorrt":
            if not bundle.engines.get("graphs"):
                raise BundleError("the bundle has no TensorRT engines: build them on the device "
                                  "(engines/<target>/build_plan.sh) or serve the ONNX graphs (--backend ort-*)")
            src, name, platform, kind, accel = bundle.engine_file(g), "model.plan", "tensorrt_plan", "KIND_GPU", ""
        else:
            src, name, platform = bundle.graph_path(g, ort_variant=True), "model.onnx", "onnxruntime_onnx"
            kind = "KIND_CPU" if backend == "ort-cpu" else "KIND_GPU"
            accel = "tensorrt" if backend == "ort-trt" else ""
        out[g] = (graph_config(GRAPHS[g], platform, kind, count, dims, accel), src, name)
    return out


def _copy_bundle(src: Path, dst: Path) -> None:
    """Copy the bundle unless the same sealed bundle is already there."""
    def seal(p):
        try:
            return json.loads((p / "manifest.json").read_text()).get("seal")
        except (OSError, ValueError):
            return None

    if dst.is_dir() and seal(dst) is not None and seal(dst) == seal(src):
        return
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, symlinks=False)


def default_threads(instances: int) -> int:
    return max(1, host.usable_cpus() // max(1, instances))


MAX_IDLE_TIMEOUT = 7 * 24 * 3600.0


def check_idle_timeout(idle_timeout) -> float:
    import math

    if isinstance(idle_timeout, bool) or not isinstance(idle_timeout, (int, float)) \
            or not math.isfinite(idle_timeout) or not 0 < idle_timeout <= MAX_IDLE_TIMEOUT:
        raise InputError(f"--idle-timeout must be a number of seconds > 0 and <= {MAX_IDLE_TIMEOUT:g} "
                         f"(a week), got {idle_timeout}")
    return float(idle_timeout)


def write_repository(bundle_dir, repo, *, instances: int = 1, backend: str = "auto", layout: str = "in-process",
                     max_sessions: int | None = DEFAULT_MAX_SESSIONS, idle_timeout: float = 60.0,
                     threads: int | None = None, state_dir: str = "", state_store: bool = False,
                     node: str = "") -> dict:
    """Write (or refresh) the model repository for `bundle_dir` under `repo`; returns the
    client info the tracker publishes. The repository holds only fastsam2's models: another
    folder's models would be loaded too, so an unrelated non-empty folder is refused."""
    from fastsam2.runtime.bundle import load_bundle

    if backend not in SERVE_BACKENDS:
        raise InputError(f"--backend must be one of {', '.join(SERVE_BACKENDS)}, got {backend!r}")
    if backend == "openvino" and layout == "graphs":
        raise InputError("--backend openvino runs the graphs in the tracker's process: use --layout in-process "
                         "(--layout graphs runs them on Triton's onnxruntime or tensorrt backend)")
    if layout not in LAYOUTS:
        raise InputError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if instances < 1:
        raise InputError(f"--instances must be >= 1, got {instances}")
    if max_sessions is not None and max_sessions < 1:
        raise InputError(f"--max-sessions must be >= 1, got {max_sessions}")
    check_idle_timeout(idle_timeout)
    bundle = load_bundle(bundle_dir)
    repo = Path(repo)
    ours = {protocol.MODEL, *GRAPH_ORDER}
    if repo.is_dir():
        other = sorted(p.name for p in repo.iterdir() if p.name not in ours)
        if other:
            raise OutputError(f"{repo} holds {other[0]!r}, which is not a fastsam2 model: give an empty "
                              f"or fastsam2-written folder as --repo")
    elif repo.exists():
        raise OutputError(f"--repo {repo} is not a folder")
    info = {**client_info(bundle, backend, layout, max_sessions, idle_timeout), "state_store": bool(state_store)}
    params = {"bundle": "bundle", "backend": backend, "threads": threads or default_threads(instances),
              "max_sessions": max_sessions or 0, "idle_timeout": idle_timeout, "state_dir": state_dir,
              # the store's URL (it may hold a password) reaches the model through the server's
              # environment (FASTSAM2_STATE_STORE), not through the model config clients can read
              "state_store": "env" if state_store else "", "node": node,
              "graphs": "bls" if layout == "graphs" else "in_process", protocol.INFO_PARAMETER: json.dumps(info)}
    try:
        if layout == "graphs":
            graphs = _graph_models(bundle, backend, instances)
            params["graph_models"] = json.dumps({g: g for g in graphs})
            for g, (config, src, name) in graphs.items():
                (repo / g / "1").mkdir(parents=True, exist_ok=True)
                (repo / g / "config.pbtxt").write_text(config)
                shutil.copyfile(src, repo / g / "1" / name)
        else:
            for g in GRAPH_ORDER:  # a repository written earlier with layout "graphs"
                shutil.rmtree(repo / g, ignore_errors=True)
        tracker = repo / protocol.MODEL
        (tracker / "1").mkdir(parents=True, exist_ok=True)
        (tracker / "config.pbtxt").write_text(tracker_config(instances=instances, max_sessions=max_sessions,
                                                             idle_timeout=idle_timeout, params=params))
        (tracker / "1" / "model.py").write_text(MODEL_PY)
        _copy_bundle(bundle.path, tracker / "1" / "bundle")
    except OSError as e:
        raise OutputError(f"cannot write the repository {repo}: {e}") from None
    return info


def parse_config(path):
    """A config.pbtxt parsed with Triton's own ModelConfig schema (tritonclient's protobuf)."""
    mc, text_format = _model_config()
    return text_format.Parse(Path(path).read_text(), mc.ModelConfig())
