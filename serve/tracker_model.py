"""The stateful tracker model (Triton python backend): one streaming Session per Triton sequence.

The repository's `fastsam2_tracker/1/model.py` imports `TritonPythonModel` from here, so the model
is the installed fastsam2 (the server's Python needs `fastsam2[runtime]`). Triton's sequence
batcher keeps every request of a sequence on the same model instance; this instance keeps
{correlation id: Session} (serve/sessions.py): START opens one, END frees it, and a sequence idle
longer than the idle timeout is freed by a reaper thread (Triton frees its slot but does not tell
the model). Within an instance, requests of different streams run one after another; the graph
sessions (ONNX Runtime / TensorRT) are opened once per instance and shared by its sessions,
which hold only their memory banks.

Two ways to run the graphs, chosen by the repository writer (parameter "graphs"):
  in_process  the instance opens the bundle's graphs with the runtime's own backends (the only
              way where the server has just the python backend, e.g. nvidia-pytriton's wheel)
  bls         each graph is a model of its own (onnxruntime / tensorrt backend) and the tracker
              calls it through BLS, so Triton schedules the graphs of every stream together

Live numbers go to Triton's metrics endpoint (Prometheus text): fastsam2_live_sessions,
fastsam2_memory_bank_bytes, fastsam2_sessions_freed_idle, fastsam2_process_rss_bytes, labelled
by instance.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import traceback
from pathlib import Path

import numpy as np

try:  # only inside Triton's python backend stub
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - imported for documentation / tests outside Triton
    pb_utils = None

from fastsam2.runtime.errors import FastSam2Error, InputError

from . import protocol as P
from .sessions import SessionTable, Slots

FILLS = ("no_mem", "last")


def _params(config: dict) -> dict:
    return {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class BlsGraph:
    """One graph served as its own Triton model, called through BLS: `.run(feeds) -> outputs`,
    the interface every runtime backend gives the tracking loop."""

    def __init__(self, model: str, outputs: list):
        self.model, self.outputs = model, list(outputs)

    def run(self, feeds: dict) -> dict:
        inputs = [pb_utils.Tensor(k, np.ascontiguousarray(v)) for k, v in feeds.items()]
        resp = pb_utils.InferenceRequest(model_name=self.model, inputs=inputs,
                                         requested_output_names=self.outputs).exec()
        if resp.has_error():
            raise P.ServerError(f"graph model {self.model!r} failed: {resp.error().message()}")
        return {n: pb_utils.get_output_tensor_by_name(resp, n).as_numpy() for n in self.outputs}


def bls_sessions(graph_models: dict) -> dict:
    from fastsam2.runtime.contract import GRAPHS

    return {g: BlsGraph(model, GRAPHS[g].output_names) for g, model in graph_models.items()}


class TritonPythonModel:
    def initialize(self, args):
        from fastsam2.runtime.bundle import load_bundle

        config = json.loads(args["model_config"])
        params = _params(config)
        self.instance = args.get("model_instance_name", "instance")
        folder = Path(args["model_repository"]) / str(args.get("model_version", "1"))
        self.bundle = load_bundle(folder / params.get("bundle", "bundle"))
        threads = int(params.get("threads") or 0) or None
        if params.get("graphs", "in_process") == "bls":
            self.backend = "triton-bls"
            self.graphs = bls_sessions(json.loads(params["graph_models"]))
        else:
            from fastsam2.runtime.backends import open_backend

            self.backend, self.graphs = open_backend(params.get("backend", "auto"), self.bundle, threads,
                                                     warn=self._log)
        limit = int(params.get("max_sessions") or 0) or None
        state = params.get("state_dir") or os.path.join(tempfile.gettempdir(), f"fastsam2-serve-{os.getppid()}")
        self.table = SessionTable(self._open_session, Slots(state, self.instance, limit),
                                  float(params.get("idle_timeout") or 60))
        self._metrics()
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="fastsam2-reaper", daemon=True)
        self._reaper.start()
        self._log(f"fastsam2 tracker {self.instance}: backend {self.backend}, max sessions "
                  f"{limit or 'unlimited'}, idle timeout {self.table.idle_timeout:g} s")

    # -- sessions -----------------------------------------------------------------------------
    def _open_session(self, options: dict):
        from fastsam2.runtime.bank import DEFAULT_MAX_COND
        from fastsam2.runtime.session import Session

        fill = options.get("fill") or "no_mem"
        if fill not in FILLS:
            raise InputError(f"fill must be one of {', '.join(FILLS)}, got {fill!r}")
        size = options.get("frame_size")
        return Session.open(self.bundle, keep=options.get("keep"), fill=fill, num_frames=options.get("num_frames"),
                            max_cond_frames=int(options.get("max_cond_frames") or DEFAULT_MAX_COND),
                            frame_size=tuple(size) if size else None, graphs=(self.backend, self.graphs))

    def _reap_loop(self):
        period = max(0.1, min(1.0, self.table.idle_timeout / 4))
        while not self._stop.wait(period):
            if self.table.reap():
                self._update_metrics()

    # -- requests -----------------------------------------------------------------------------
    def execute(self, requests):
        with self.table.busy():
            responses = [self._respond(r) for r in requests]
        self._update_metrics()
        return responses

    def _respond(self, request):
        try:
            return self._handle(request)
        except FastSam2Error as e:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(P.error_message(e)))
        except Exception as e:  # a bug: keep the traceback in the server's log
            self._log(traceback.format_exc(), error=True)
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(
                f"ServerError: internal error in the tracker model: {type(e).__name__}: {e}"))

    def _control(self, request, name: str) -> int:
        t = pb_utils.get_input_tensor_by_name(request, name)
        return int(t.as_numpy().reshape(-1)[0]) if t is not None else 0

    def _handle(self, request):
        corrid = self._control(request, P.CORRID) or request.correlation_id()
        start, end = self._control(request, P.START), self._control(request, P.END)
        cmd = P.loads(pb_utils.get_input_tensor_by_name(request, P.COMMANDS).as_numpy())
        op = cmd.get("op", "push")
        with self.table.lock:
            try:
                if start:
                    session = self.table.open(corrid, cmd.get("options") or {})
                if op == "open":
                    if not start:
                        raise InputError("an open request must start its sequence")
                    return self._reply(None, {"backend": self.backend, "tokens": session.T,
                                              "max_cond_frames": session.max_cond_frames})
                if op == "close":
                    self.table.close(corrid)
                    return self._reply(None, {"closed": True})
                session = self.table.get(corrid)
                if op == "push":
                    frame = pb_utils.get_input_tensor_by_name(request, P.FRAME).as_numpy()
                    return self._push(session, cmd, frame)
                if op == "correct":
                    return self._correct(session, cmd)
                raise InputError(f"unknown op {op!r}")
            finally:
                if end:
                    self.table.close(corrid)

    def _apply(self, session, ops: list) -> None:
        for o in ops:
            if o.get("op") == "remove":
                session.remove(o["obj"], o.get("frame"))
            elif o.get("op") == "prompt":
                session.add_prompt(o["obj"], **P.prompt_kwargs(o))
            else:
                raise InputError(f"unknown prompt op {o.get('op')!r}")

    def _push(self, session, cmd: dict, frame: np.ndarray):
        self._apply(session, cmd.get("ops", ()))
        logged = len(session.prompt_log)
        res = session.push(frame, timestamp=cmd.get("timestamp"))
        return self._result(session, res, logged)

    def _correct(self, session, cmd: dict):
        logged, res = len(session.prompt_log), None
        for o in cmd.get("ops", ()):
            if o.get("op") != "prompt":
                raise InputError("a correction carries prompts only")
            res = session.add_prompt(o["obj"], **{**P.prompt_kwargs(o), "frame": session.frame})
        if res is None:
            raise InputError("a correction needs a prompt")
        return self._result(session, res, logged)

    def _result(self, session, res, logged: int):
        logits, info = P.encode_result(res, session.prompt_log[logged:], session.memory_bytes())
        return self._reply(logits, info)

    def _reply(self, logits, info: dict):
        logits = np.zeros((0, 1, 1), np.float32) if logits is None else logits
        return pb_utils.InferenceResponse([pb_utils.Tensor(P.LOGITS, logits),
                                           pb_utils.Tensor(P.RESULT, P.dumps(info))])

    # -- metrics and log ----------------------------------------------------------------------
    def _metrics(self):
        labels = {"instance": self.instance}
        gauge = pb_utils.MetricFamily.GAUGE
        self._gauges = {}
        for name, text in (("fastsam2_live_sessions", "streams with a session on this model instance"),
                           ("fastsam2_memory_bank_bytes", "bytes held by the sessions' memory banks"),
                           ("fastsam2_sessions_freed_idle", "sessions freed by the idle timeout"),
                           ("fastsam2_process_rss_bytes", "resident memory of the model instance's process")):
            family = pb_utils.MetricFamily(name=name, description=text, kind=gauge)
            self._gauges[name] = (family, family.Metric(labels=labels))
        self._update_metrics()

    def _update_metrics(self):
        with self.table.lock:
            # the live count last: a scrape that sees it change sees the rest of the update too
            values = {"fastsam2_memory_bank_bytes": self.table.memory_bytes(),
                      "fastsam2_sessions_freed_idle": self.table.freed_idle,
                      "fastsam2_process_rss_bytes": _rss_bytes(),
                      "fastsam2_live_sessions": len(self.table)}
            for name, v in values.items():
                self._gauges[name][1].set(float(v))

    def _log(self, message: str, error: bool = False):
        logger = getattr(pb_utils, "Logger", None)
        if logger is not None:
            (logger.log_error if error else logger.log_info)(message)

    def finalize(self):
        self._stop.set()
        self.table.close_all()
