"""The stateful tracker model (Triton python backend): one streaming Session per Triton sequence.

The repository's `fastsam2_tracker/1/model.py` imports `TritonPythonModel` from here, so the model
is the installed fastsam2 (the server's Python needs `fastsam2[runtime]`). Triton's sequence
batcher keeps every request of a sequence on the same model instance; this instance keeps
{correlation id: Session} (serve/sessions.py): START opens one (refused on a live id; the reply
carries the token every later request of the stream must send), END frees it, and a sequence idle
longer than the idle timeout is freed by a reaper thread, which then ends the Triton sequence
itself (an END request to this model), as it does for a refused START, so neither holds one of
Triton's candidate slots. Every COMMANDS is checked and bounded by serve/commands.py first.
Within an instance, requests of different streams run one after another; the graph sessions
(ONNX Runtime / TensorRT) are opened once per instance and shared by its sessions, which hold
only their memory banks.

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
from types import SimpleNamespace

import numpy as np

try:  # only inside Triton's python backend stub
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - imported for documentation / tests outside Triton
    pb_utils = None

from fastsam2.runtime import host
from fastsam2.runtime.errors import FastSam2Error, InputError

from . import commands
from . import protocol
from .sessions import SessionTable, Slots
from .stream_state import stream_name

FILLS = ("no_mem", "last")


def _params(config: dict) -> dict:
    return {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}


def served_session_class():
    """The runtime's Session, minus what a server never sends: a push returns each object's
    low-res logits and numbers (what the client makes masks from), not full-resolution masks,
    and the objects a stream tracks or has scheduled are counted for the server's limit."""
    from fastsam2.runtime.session import Session

    class ServedSession(Session):
        def scheduled_objects(self) -> set:
            return set(self._trackers) | {o for p in self._pending.values() for o in p}

        def _result(self, seconds: float):
            cur = self._pushed
            objects = {o: SimpleNamespace(logits=np.asarray(st.low_res_logits, np.float32).reshape(
                           st.low_res_logits.shape[-2:]), object_score=float(st.object_score),
                           iou=float(st.iou), kept_tokens=int(st.kept_tokens), prompted=bool(st.prompted))
                       for o, st in cur["results"].items()}
            return SimpleNamespace(frame=self._frame, objects=objects, latency_ms=dict(cur["lat"]),
                                   frame_ms=seconds * 1e3)

    return ServedSession


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
            raise protocol.ServerError(f"graph model {self.model!r} failed: {resp.error().message()}")
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
        self.node = params.get("node") or self.instance
        self.state, self._seq = None, {}  # the state store (--state-store), the last request per stream
        if params.get("state_store") == "env":  # fastsam2-serve --state-store
            from .state_store import STORE_ENV, open_store
            from .stream_state import StreamState

            ttl = max(1.0, float(params.get("idle_timeout") or 60))
            self.state = StreamState(open_store(os.environ.get(STORE_ENV, ""), ttl=ttl))
        limit = int(params.get("max_sessions") or 0) or None
        state = params.get("state_dir") or os.path.join(tempfile.gettempdir(), f"fastsam2-serve-{os.getppid()}")
        self.table = SessionTable(self._open_session, Slots(state, self.instance, limit),
                                  float(params.get("idle_timeout") or 60), on_free=self._release_later)
        # the key of the END requests this instance sends itself to free a Triton sequence slot
        self._release_key = os.urandom(16).hex()
        self._metrics()
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="fastsam2-reaper", daemon=True)
        self._reaper.start()
        self._log(f"fastsam2 tracker {self.instance}: backend {self.backend}, max sessions "
                  f"{limit or 'unlimited'}, idle timeout {self.table.idle_timeout:g} s")

    # -- sessions -----------------------------------------------------------------------------
    def _open_session(self, options: dict):
        from fastsam2.runtime.bank import DEFAULT_MAX_COND

        fill = options.get("fill") or "no_mem"
        if fill not in FILLS:
            raise InputError(f"fill must be one of {', '.join(FILLS)}, got {fill!r}")
        size = options.get("frame_size")
        return served_session_class().open(self.bundle, keep=options.get("keep"), fill=fill, num_frames=options.get("num_frames"),
                            max_cond_frames=int(options.get("max_cond_frames") or DEFAULT_MAX_COND),
                            frame_size=tuple(size) if size else None, graphs=(self.backend, self.graphs))

    def _reap_loop(self):
        period = max(0.1, min(1.0, self.table.idle_timeout / 4))
        while not self._stop.wait(period):
            if self.table.reap():
                self._update_metrics()

    def _release_later(self, corrid) -> None:
        """End Triton's sequence `corrid` (a refused START, a stream freed for idleness), so its
        candidate slot is free now rather than at Triton's own (much longer) idle timeout. An END
        request to this model, sent from a thread: it runs after the current execute() returns."""
        if pb_utils is None or getattr(self, "_stop", None) is None or self._stop.is_set():
            return
        threading.Thread(target=self._release, args=(corrid,), name="fastsam2-release", daemon=True).start()

    def _release(self, corrid) -> None:
        try:
            req = pb_utils.InferenceRequest(
                model_name=protocol.MODEL, correlation_id=int(corrid), requested_output_names=[protocol.RESULT],
                inputs=[pb_utils.Tensor(protocol.FRAME, protocol.PLACEHOLDER),
                        pb_utils.Tensor(protocol.COMMANDS, protocol.dumps({"op": "close", "token": self._release_key}))])
            req.set_flags(pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END)
            req.exec()
        except Exception as e:  # the slot then waits for Triton's idle timeout, as before
            self._log(f"fastsam2: could not end sequence {corrid}: {e}", error=True)

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
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(protocol.error_message(e)))
        except Exception as e:  # a bug: keep the traceback in the server's log
            self._log(traceback.format_exc(), error=True)
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(
                f"ServerError: internal error in the tracker model: {type(e).__name__}: {e}"))

    def _control(self, request, name: str) -> int:
        t = pb_utils.get_input_tensor_by_name(request, name)
        return int(t.as_numpy().reshape(-1)[0]) if t is not None else 0

    def _handle(self, request):
        corrid = self._control(request, protocol.CORRID) or request.correlation_id()
        start, end = self._control(request, protocol.START), self._control(request, protocol.END)
        try:
            cmd = commands.parse(pb_utils.get_input_tensor_by_name(request, protocol.COMMANDS).as_numpy().reshape(-1)[0])
            op, token = cmd.get("op", "push"), cmd.get("token")
            if op == "close" and token == self._release_key:
                return self._reply(None, {"closed": False})  # our own END: Triton frees the slot
            if start != (op == "open"):
                raise InputError("a sequence starts with an open request (START flag), and only there")
        except FastSam2Error:
            if start and corrid not in self.table.sessions:  # a refused START: free its slot now
                self._release_later(corrid)
            raise
        with self.table.lock:
            try:
                if op == "open":
                    reply, token = self._open(corrid, cmd)
                    return reply
                session = self.table.get(corrid, token)  # the opener's token, or refused
                if op == "close":
                    if self.state is not None:
                        self.state.forget(stream_name(corrid, token), drop=True)
                    return self._reply(None, {"closed": self.table.close(corrid, token)})
                self._save(corrid, token, session)  # the client has the previous reply: keep it
                reply = (self._push(session, cmd, self._frame(request, cmd["shape"])) if op == "push"
                         else self._correct(session, cmd))
                self._seq[corrid] = cmd.get("seq") or self._seq.get(corrid, 0) + 1
                return reply
            finally:
                if end and token is not None:  # a wrong token closes nothing
                    self.table.close(corrid, token)
                    self._seq.pop(corrid, None)

    def _save(self, corrid, token, session) -> None:
        """The stream's state after its previous request, into the state store (serve/stream_state.py)."""
        if self.state is not None:
            self.state.saved(stream_name(corrid, token), session, self._seq.get(corrid, 0))

    def _open(self, corrid, cmd: dict):
        resume, extra = cmd.get("resume"), {}
        try:
            if resume is None:
                session, token = self.table.open(corrid, cmd["options"])
            else:
                session, token, seq = self._resume(corrid, resume["token"])
                extra = {"resumed": seq, "frame": session.frame}
        except FastSam2Error as e:
            if not getattr(e, "live", False):  # a live id's sequence belongs to its opener
                self._release_later(corrid)
            raise
        self._seq[corrid] = extra.get("resumed", 0)
        return self._reply(None, {"backend": self.backend, "tokens": session.T, "token": token, "node": self.node,
                                  "max_cond_frames": session.max_cond_frames, **extra}), token

    def _resume(self, corrid, token: str) -> tuple:
        """A stream another node held, restored from the state store with its token."""
        if self.state is None:
            raise protocol.ServerError("this server has no state store (fastsam2-serve --state-store): it cannot "
                                "continue a stream another server held")
        graphs = (self.backend, self.graphs)
        found = self.state.restored(stream_name(corrid, token), lambda blobs: served_session_class().restore(
            self.bundle, blobs, graphs=graphs))
        if found is None:
            raise protocol.ServerError(f"the state store holds no state for stream {corrid} (it ended, expired "
                                f"after the idle timeout, or was never saved)")
        session, seq = found
        self.table.adopt(corrid, session, token)
        return session, token, seq

    def _frame(self, request, shape: tuple) -> np.ndarray:
        """FRAME is flat (the config's dims [-1], so Triton checks its byte size against its
        one dimension before the model process sees it); its shape travels in the command."""
        flat = pb_utils.get_input_tensor_by_name(request, protocol.FRAME).as_numpy()
        h, w = shape
        if flat.size != h * w * 3:
            raise InputError(f"FRAME holds {flat.size} bytes; a {w}x{h} RGB frame is {h * w * 3}")
        return flat.reshape(h, w, 3)

    def _apply(self, session, ops: list) -> None:
        for o in ops:
            if o.get("op") == "remove":
                session.remove(o["obj"], o.get("frame"))
            elif o.get("op") == "prompt":
                session.add_prompt(o["obj"], **protocol.prompt_kwargs(o))
            else:
                raise InputError(f"unknown prompt op {o.get('op')!r}")

    def _push(self, session, cmd: dict, frame: np.ndarray):
        new = {o["obj"] for o in cmd["ops"] if o["op"] == "prompt"}
        if len(session.scheduled_objects() | new) > commands.MAX_OBJECTS:
            raise InputError(f"a stream tracks at most {commands.MAX_OBJECTS} objects on this server (the "
                             f"request would make {len(session.scheduled_objects() | new)})")
        self._apply(session, cmd.get("ops", ()))
        logged = len(session.prompt_log)
        res = session.push(frame, timestamp=cmd.get("timestamp"))
        return self._result(session, res, logged)

    def _correct(self, session, cmd: dict):
        logged, res = len(session.prompt_log), None
        if len(session.scheduled_objects() | {o["obj"] for o in cmd["ops"]}) > commands.MAX_OBJECTS:
            raise InputError(f"a stream tracks at most {commands.MAX_OBJECTS} objects on this server")
        for o in cmd["ops"]:
            res = session.add_prompt(o["obj"], **{**protocol.prompt_kwargs(o), "frame": session.frame})
        return self._result(session, res, logged)

    def _result(self, session, res, logged: int):
        logits, info = protocol.encode_result(res, session.prompt_log[logged:], session.memory_bytes())
        return self._reply(logits, info)

    def _reply(self, logits, info: dict):
        logits = np.zeros((0, 1, 1), np.float32) if logits is None else logits
        return pb_utils.InferenceResponse([pb_utils.Tensor(protocol.LOGITS, logits),
                                           pb_utils.Tensor(protocol.RESULT, protocol.dumps(info))])

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
                      "fastsam2_process_rss_bytes": host.rss_mb() * 2 ** 20,
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
