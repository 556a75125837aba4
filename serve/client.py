"""The client side of `fastsam2-run --server HOST:PORT`: a remote model that track() uses in place
of a bundle folder, and a remote session with the local Session's interface whose frames go
through one Triton sequence (gRPC). Needs numpy + tritonclient[grpc]; no onnxruntime.

    model = RemoteModel("gpu-box:8001")
    with contextlib.closing(model.open_session(keep=0.5, frame_size=(640, 480))) as s:
        s.add_prompt(1, points=[(150, 180)])
        r = s.push(rgb)          # a FrameResult, masks computed here from the server's logits

Every failure is a FastSam2Error: the server's own (InputError ... as a local run would raise),
ServerError when the server cannot be reached or goes away mid-stream, SessionLimitError when it
holds --max-sessions streams already.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from types import SimpleNamespace

import numpy as np

from fastsam2.runtime.errors import FastSam2Error, InputError
from fastsam2.runtime.sam2_math import Resizer
# the local session's own checks, so a remote stream refuses what a local one refuses, in its words
from fastsam2.runtime.session import (PromptSpec, check_frame, check_not_passed, check_object_id, check_spec,
                                      check_timestamp, frame_array, frame_result)

from . import commands
from . import protocol

_log = logging.getLogger(__name__)

CLIENT_HINT = "install the client: pip install 'fastsam2[client]'"
# transport failures: the server went away, or never answered in time
_LOST = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "UNKNOWN", "ABORTED")


def _grpc():
    try:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException
    except ImportError:
        raise protocol.ServerError(f"--server needs tritonclient[grpc]: {CLIENT_HINT}") from None
    return grpcclient, InferenceServerException


def parse_server(server: str) -> str:
    host, sep, port = str(server).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"--server must be HOST:PORT (Triton's gRPC port, 8001 by default), got {server!r}")
    return f"{host}:{int(port)}"


def parse_servers(servers: str) -> list:
    """"A,B,..." -> ["host:port", ...]: the servers a stream may run on, in order."""
    urls = [parse_server(s.strip()) for s in str(servers).split(",") if s.strip()]
    if not urls or len(urls) > MAX_SERVERS:
        raise InputError(f"--server takes 1..{MAX_SERVERS} HOST:PORT addresses, comma-separated, got {str(servers)[:80]!r}")
    return urls


MAX_SERVERS = 64
FAILOVER_ROUNDS = 8  # passes over the address list before a lost stream is given up
FAILOVER_WAIT_S = 1.0  # between passes: a balancer needs a health check or two to mark a node down


class RemoteModel:
    """What track() needs from a bundle, read from the server's tracker model. `server`: one
    HOST:PORT or several, comma-separated: the first reachable one serves; a stream whose server
    dies continues on the next (or the same balancer address) where the servers share a state
    store (fastsam2-serve --state-store)."""

    engines: dict = {}

    def __init__(self, server: str, *, timeout: float = 300.0):
        self.urls = parse_servers(server)
        self.timeout = float(timeout)
        errors = []
        for url in self.urls:
            try:
                config = self.connect(url)
                break
            except protocol.ServerError as e:
                errors.append(str(e))
        else:
            raise protocol.ServerError("; ".join(errors) if len(errors) == 1 else
                                f"no server of {', '.join(self.urls)} answers: {errors[-1]}")
        try:
            self.info = json.loads(config["parameters"][protocol.INFO_PARAMETER]["string_value"])
        except (KeyError, TypeError, ValueError):
            raise protocol.ServerError(f"the {protocol.MODEL!r} model at {self.url} was not written by fastsam2-serve") from None
        self.manifest = self.info["manifest"]
        self.settings = self.info["settings"]
        self.text_embeddings = {p: None for p in self.info["prompts"]}  # names only: the server embeds

    def connect(self, url: str) -> dict:
        """Talk to `url` from now on; returns its tracker model's config."""
        grpcclient, exc = _grpc()
        try:
            client = grpcclient.InferenceServerClient(url)
            if not client.is_model_ready(protocol.MODEL, client_timeout=30):
                raise protocol.ServerError(f"the Triton server at {url} has no ready {protocol.MODEL!r} model "
                                    f"(start it with fastsam2-serve)")
            config = client.get_model_config(protocol.MODEL, as_json=True, client_timeout=30)["config"]
        except exc as e:
            raise protocol.ServerError(f"cannot reach the Triton server at {url}: {e.message()}") from None
        self.url, self.client = url, client
        return config

    def summary(self) -> dict:
        return {**self.info["summary"], "server": self.url}

    def open_session(self, *, keep=None, backend: str = "auto", threads=None, fill: str = "no_mem",
                     num_frames=None, frame_size=None, warn=None, max_cond_frames=None) -> "RemoteSession":
        if threads is not None:
            (warn or _log.warning)("warning: --threads applies to local runs; the server sets its own threads")
        options = {"keep": keep, "fill": fill, "num_frames": num_frames,
                   "frame_size": None if frame_size is None else list(frame_size),
                   "max_cond_frames": max_cond_frames}
        session = RemoteSession(self, options)
        if backend not in (None, "auto") and session.backend != backend:
            session.close()
            raise InputError(f"--backend {backend}: the server at {self.url} runs {session.backend} "
                             f"(its backend is chosen with fastsam2-serve --backend)")
        return session


class RemoteSession:
    """One stream on the server: the local Session's interface (push, add_prompt, remove,
    close, prompt_log, backend, T, max_cond_frames). Prompts for a later frame travel with the
    next frame pushed; a prompt on the frame just pushed is a correction (one round trip)."""

    def __init__(self, model: RemoteModel, options: dict):
        self.model = model
        self.url = model.url
        self.sequence_id = secrets.randbits(62) + 1
        self.S = int(model.settings["image_size"])
        self.prompt_log: list = []
        self._ops: list = []
        self._frame = -1
        self._shape = None
        self._timestamp = None
        self._objects: list = []
        self._memory = 0
        self._resize = Resizer()
        self._closed = False
        self._options = options
        self._seq = 0  # requests answered after the open
        self._kept = []  # the last answered request: the state store may not hold it yet
        try:
            info, _ = self._call({"op": "open", "options": options}, start=True)
        except protocol.SessionLimitError:
            self.close()  # hand Triton's sequence slot back now rather than at the idle timeout
            raise
        self.backend = info["backend"]
        self.node = info.get("node")  # which server holds the stream now
        self._token = info["token"]
        self.T = int(info["tokens"])
        self.max_cond_frames = int(info["max_cond_frames"])

    # -- the Session interface ----------------------------------------------------------------
    @property
    def frame(self) -> int:
        return self._frame

    @property
    def objects(self) -> list:
        return list(self._objects)

    def memory_bytes(self) -> int:
        """The memory banks' bytes on the server, as of the last result."""
        return self._memory

    def add_prompt(self, obj_id, *, frame=None, points=(), neg_points=(), box=None, mask=None, text=None):
        obj_id = check_object_id(obj_id)
        frame = check_frame(self._frame + 1 if frame is None else frame, self._frame)
        check_not_passed(frame, self._frame, correction=True)
        spec = PromptSpec.checked(points=points, neg_points=neg_points, box=box, mask=mask, text=text)
        check_spec(spec, obj_id, frame, self._size(), self.S, self.model.text_embeddings)
        op = protocol.prompt_op(obj_id, frame, points=spec.points, neg_points=spec.neg_points, box=spec.box,
                                mask=spec.mask, text=spec.text)
        if frame > self._frame:
            self._ops.append(op)
            return None
        t0 = time.perf_counter()
        info, logits = self._call({"op": "correct", "ops": [op]}, what=f"the correction on frame {frame}")
        return self._result(info, logits, t0)

    def remove(self, obj_id, frame=None) -> None:
        obj_id = check_object_id(obj_id)
        frame = check_frame(self._frame + 1 if frame is None else frame, self._frame)
        check_not_passed(frame, self._frame, correction=False)
        self._ops.append({"op": "remove", "obj": obj_id, "frame": frame})

    def push(self, rgb, timestamp=None):
        t0 = time.perf_counter()
        rgb, timestamp = frame_array(rgb), check_timestamp(timestamp)
        commands.frame_shape(list(rgb.shape[:2]))  # the server's size limit, said before a large frame is sent
        ops, self._ops = self._ops, []
        cmd = {"op": "push", "ops": ops, "timestamp": None if timestamp is None else float(timestamp),
               "shape": list(rgb.shape[:2])}
        info, logits = self._call(cmd, frame=np.ascontiguousarray(rgb).reshape(-1), what=f"frame {self._frame + 1}")
        self._shape, self._timestamp = rgb.shape[:2], timestamp
        return self._result(info, logits, t0)

    def close(self) -> None:
        """End the sequence: the server frees the session now (else after its idle timeout)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._call({"op": "close"}, end=True, timeout=10)
        except FastSam2Error:  # the server is gone, or never held the stream: nothing to free
            pass

    def _size(self):
        """(w, h) of the stream's frames as the server's session knows it: the frames pushed,
        else the frame size the stream was opened with, else None."""
        if self._shape is not None:
            return int(self._shape[1]), int(self._shape[0])
        size = self._options.get("frame_size")
        return None if size is None else tuple(size)

    # -- transport ----------------------------------------------------------------------------
    def _call(self, cmd: dict, *, frame=None, start=False, end=False, timeout=None, what="the stream"):
        frame = protocol.PLACEHOLDER if frame is None else frame
        if start or end:
            cmd = cmd if start else {**cmd, "token": getattr(self, "_token", "")}
            return self._send(cmd, frame, start=start, end=end, timeout=timeout, what=what)
        seq = self._seq + 1
        cmd = {**cmd, "token": self._token, "seq": seq}
        try:
            out = self._send(cmd, frame, timeout=timeout, what=what)
        except protocol.ServerError as e:
            if not (getattr(e, "lost", False) and self.model.info.get("state_store")):
                raise
            self._failover(e, what)
            out = self._send(cmd, frame, timeout=timeout, what=what)
        self._seq, self._kept = seq, [(seq, cmd, frame, what)]
        return out

    def _send(self, cmd: dict, frame, *, start=False, end=False, timeout=None, what="the stream"):
        grpcclient, exc = _grpc()
        fin = grpcclient.InferInput(protocol.FRAME, list(frame.shape), "UINT8")
        fin.set_data_from_numpy(frame)
        cin = grpcclient.InferInput(protocol.COMMANDS, [1], "BYTES")
        cin.set_data_from_numpy(protocol.dumps(cmd))
        outs = [grpcclient.InferRequestedOutput(protocol.LOGITS), grpcclient.InferRequestedOutput(protocol.RESULT)]
        try:
            r = self.model.client.infer(protocol.MODEL, [fin, cin], outputs=outs, sequence_id=self.sequence_id,
                                        sequence_start=start, sequence_end=end,
                                        headers={protocol.STREAM_HEADER: str(self.sequence_id)},
                                        client_timeout=timeout or self.model.timeout)
        except exc as e:
            raise self._error(e, what) from None
        return protocol.loads(r.as_numpy(protocol.RESULT)), r.as_numpy(protocol.LOGITS)

    def _failover(self, lost: protocol.ServerError, what: str) -> None:
        """The server went away mid-stream: continue the stream on the next address (or the same
        balancer address), restored there from the shared state store, and send again what the
        store may not hold yet. The results are those of the uninterrupted stream."""
        urls = self.model.urls
        i = urls.index(self.url) if self.url in urls else -1
        order = urls[i + 1:] + urls[:i + 1]  # the next servers first; the same address last (a balancer)
        last = lost
        for _ in range(FAILOVER_ROUNDS):
            for url in order:
                try:
                    self.model.connect(url)
                    self.url = url
                    info, _ = self._send({"op": "open", "options": self._options, "resume": {"token": self._token}},
                                         protocol.PLACEHOLDER, start=True, what=f"{what} (resuming the stream)")
                    resumed, self.node = int(info["resumed"]), info.get("node")
                    if resumed < self._seq - 1:
                        raise protocol.ServerError(f"the state store holds request {resumed} of this stream, "
                                            f"{self._seq - resumed} behind what was sent")
                    for seq, cmd, frame, w in self._kept:  # what the restored state lacks
                        if seq > resumed:
                            self._send(cmd, frame, what=f"{w} (sent again)")
                    return
                except protocol.ServerError as e:
                    last = e
            time.sleep(FAILOVER_WAIT_S)
        raise protocol.ServerError(f"lost the Triton server on {what} and no server of {', '.join(urls)} could "
                            f"continue the stream: {last}")

    def _error(self, e, what: str):
        status, message = str(e.status() or ""), e.message() or str(e)
        if any(s in status for s in _LOST):
            err = protocol.ServerError(f"lost the Triton server at {self.url} on {what}: {message}")
            err.lost = True
            return err
        if "must specify the START flag" in message:
            # a restarted server, or (behind a balancer) another node than the one that held it
            err = protocol.ServerError(f"the server at {self.url} no longer holds this stream (idle longer than "
                                f"its idle timeout, or restarted): {message}")
            err.lost = True
            return err
        return protocol.decode_error(message)

    def _result(self, info: dict, logits: np.ndarray, t0: float):
        steps = {o["id"]: SimpleNamespace(low_res_logits=logits[i], object_score=o["object_score"],
                                          iou=o["iou"], kept_tokens=o["kept_tokens"], prompted=o["prompted"])
                 for i, o in enumerate(info["objects"])}
        self._frame = int(info["frame"])
        self._objects = sorted(steps)
        self._memory = int(info.get("memory_bytes", 0))
        self.prompt_log.extend(info.get("prompt_log", ()))
        # frame_ms: what the caller waited (transport and queueing included); latency_ms: the server's graphs
        return frame_result(self._frame, self._timestamp, steps, self._shape, info["latency_ms"],
                            (time.perf_counter() - t0) * 1e3, self._resize)


def read_metrics(url: str, timeout: float = 5.0) -> dict:
    """Triton's metrics endpoint (http://HOST:PORT/metrics) -> {name: summed value} for the
    fastsam2_* gauges the tracker instances publish."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as r:
        text = r.read().decode()
    out: dict = {}
    for line in text.splitlines():
        if line.startswith("fastsam2_"):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out
