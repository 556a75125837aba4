"""A server no client can break (issue 22, section 4): each probe a hostile client sent is sent
raw here (plain HTTP or tritonclient gRPC, not through fastsam2's client) to one real tritonserver
(module-wide), while a live stream is open; after each, the node is still healthy (its model
process alive, the model ready) and the live stream still tracks its next frame."""

from __future__ import annotations

import json
import secrets
import urllib.error
import urllib.request

import numpy as np
import pytest

from serve_helpers import SERVE_MARK, running_server

pytestmark = SERVE_MARK
MODEL = "fastsam2_tracker"


@pytest.fixture(scope="module")
def server(bundle_dir, tmp_path_factory):
    with running_server(bundle_dir, tmp_path_factory.mktemp("hostile") / "repo", max_sessions=2,
                        idle_timeout=60.0) as s:
        s.check_health()
        yield s


@pytest.fixture(scope="module")
def live(server):
    """A stream of the honest client, open for the whole module: object 1 clicked."""
    from fastsam2.serve.client import RemoteModel

    s = RemoteModel(server.grpc_url).open_session()
    s.add_prompt(1, points=[(100, 80)])
    s.push(frame())
    yield s
    s.close()


def frame(h=240, w=320, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def still_serving(server, live):
    """The node answers ready, its model process is the one it started with, and the live
    stream tracks one more frame."""
    server.check_health()
    before = live.frame
    r = live.push(frame(seed=live.frame + 1))
    assert r.frame == before + 1 and 1 in r.objects


def http_infer(server, inputs, parameters) -> tuple:
    body = json.dumps({"inputs": inputs, "parameters": parameters}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{server.http_port}/v2/models/{MODEL}/infer", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def grpc_infer(server, cmd, *, frame_bytes=None, sequence_id, start=False, end=False, timeout=60):
    """One raw request; returns (RESULT dict, None) or (None, the error message)."""
    import tritonclient.grpc as g
    from tritonclient.utils import InferenceServerException

    data = np.zeros(3, np.uint8) if frame_bytes is None else frame_bytes
    fin = g.InferInput("FRAME", list(data.shape), "UINT8")
    fin.set_data_from_numpy(data)
    raw = cmd if isinstance(cmd, bytes) else json.dumps(cmd).encode()
    cin = g.InferInput("COMMANDS", [1], "BYTES")
    cin.set_data_from_numpy(np.array([raw], dtype=object))
    client = g.InferenceServerClient(server.grpc_url)
    try:
        r = client.infer(MODEL, [fin, cin], sequence_id=sequence_id, sequence_start=start, sequence_end=end,
                         client_timeout=timeout)
    except InferenceServerException as e:
        return None, e.message()
    finally:
        client.close()
    return json.loads(r.as_numpy("RESULT")[0]), None


def grpc_raw(server, shape, data: bytes, cmd: bytes, **sequence):
    """A ModelInfer request built by hand: FRAME declared `shape` whatever `data` holds."""
    import struct

    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    req = service_pb2.ModelInferRequest(model_name=MODEL)
    req.parameters["sequence_id"].int64_param = sequence.get("sequence_id", secrets.randbits(62) + 1)
    req.parameters["sequence_start"].bool_param = sequence.get("start", True)
    req.parameters["sequence_end"].bool_param = sequence.get("end", True)
    for name, dtype, dims in (("FRAME", "UINT8", shape), ("COMMANDS", "BYTES", [1])):
        t = req.inputs.add()
        t.name, t.datatype = name, dtype
        t.shape.extend(dims)
    req.raw_input_contents.extend([data, struct.pack("<I", len(cmd)) + cmd])
    with grpc.insecure_channel(server.grpc_url) as channel:
        try:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=60)
            return None
        except grpc.RpcError as e:
            return e.details()


SHAPES = [[4294967296, 4294967296, 3], [0, 2 ** 62, 3], [2 ** 62], [2 ** 40, 3]]


@pytest.mark.parametrize("shape", SHAPES)
def test_a_declared_shape_with_no_data_is_refused(server, live, shape):
    """gRPC: [2**32, 2**32, 3] with no data once killed the model process for good while Triton
    still said ready (its byte count overflows to 0); the flat FRAME input makes Triton check the
    bytes against one dimension before the model sees them."""
    err = grpc_raw(server, shape, b"", b'{"op":"open","options":{}}')
    assert err is not None and ("unexpected shape" in err or "byte size mismatch" in err), err
    # a push on the live stream declaring a huge frame
    err = grpc_raw(server, shape, b"", json.dumps({"op": "push", "token": live._token, "shape": [240, 320]}).encode(),
                   sequence_id=live.sequence_id, start=False, end=False)
    assert err is not None and ("unexpected shape" in err or "byte size mismatch" in err), err
    still_serving(server, live)


@pytest.mark.parametrize("shape", SHAPES)
def test_http_inference_is_closed_to_clients(server, live, shape):
    """HTTP: Triton 2.51's front end allocates a JSON request's declared size before any check
    (a declared [2**62] aborts the whole server): inference over HTTP needs the launcher's key,
    while health and metadata stay open for balancers."""
    code, body = http_infer(server, [
        {"name": "FRAME", "shape": shape, "datatype": "UINT8", "data": []},
        {"name": "COMMANDS", "shape": [1], "datatype": "BYTES", "data": ['{"op":"open","options":{}}']}],
        {"sequence_id": secrets.randbits(62) + 1, "sequence_start": True, "sequence_end": True})
    assert code == 403 and "restricted" in body.get("error", ""), (code, body)
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/v2/health/ready", timeout=10) as r:
        assert r.status == 200
    still_serving(server, live)


def test_frames_over_the_size_limit_are_refused_not_processed(server, live):
    from fastsam2.runtime.errors import InputError
    from fastsam2.serve.client import RemoteModel

    s = RemoteModel(server.grpc_url).open_session()
    try:
        with pytest.raises(InputError, match=r"64x4100: this server takes 2\.\.4096 px a side"):
            s.push(np.zeros((4100, 64, 3), np.uint8))  # the client says so before sending it
        res, err = grpc_infer(server, {"op": "push", "token": s._token, "shape": [4100, 64]},
                              frame_bytes=np.zeros(4100 * 64 * 3, np.uint8), sequence_id=s.sequence_id)
        assert res is None and err == "InputError: a frame is 64x4100: this server takes 2..4096 px a side " \
                                      "(downscale larger frames)", err
        # a frame whose bytes do not match its declared shape
        res, err = grpc_infer(server, {"op": "push", "token": s._token, "shape": [240, 320]},
                              frame_bytes=np.zeros(10, np.uint8), sequence_id=s.sequence_id)
        assert res is None and err.startswith("InputError: FRAME holds 10 bytes"), err
    finally:
        s.close()
    still_serving(server, live)


def test_objects_points_and_max_cond_frames_are_bounded(server, live):
    from fastsam2.runtime.errors import InputError
    from fastsam2.serve.client import RemoteModel

    model = RemoteModel(server.grpc_url)
    with pytest.raises(InputError, match=r"max_cond_frames \(the server's limit\) must be an integer 1\.\.16, got 20000"):
        model.open_session(max_cond_frames=20000)
    s = model.open_session()
    try:
        for o in range(1, 34):
            s.add_prompt(o, points=[(10 + o, 10)])
        with pytest.raises(InputError, match="a stream tracks at most 32 objects on this server"):
            s.push(frame())
        s._ops = []
        with pytest.raises(InputError, match="65 points: at most 64 clicks per object and frame"):
            s.add_prompt(1, points=[(1 + i, 5) for i in range(65)])  # the client checks as a local session does
        from fastsam2.serve import protocol  # past the client's check: the server's own bound answers
        s._ops = [protocol.prompt_op(1, s.frame + 1, points=[(1 + i, 5) for i in range(65)])]
        with pytest.raises(InputError, match=r"points \(at most 64 per prompt\)"):
            s.push(frame())
        s._ops = []
        s.add_prompt(1, points=[(20, 20)])
        assert list(s.push(frame()).objects) == [1]  # refusals changed nothing
    finally:
        s.close()
    still_serving(server, live)


MALFORMED = [
    b"not json", b"\xff\xfe", b"[1, 2]", b'{"op": "dance"}', b'{"op": "push"}',
    b'{"op": "push", "token": 7, "shape": [240, 320]}',
    b'{"op": "push", "token": "t", "shape": "240x320"}',
    b'{"op": "push", "token": "t", "shape": [240, 320], "ops": {"op": "prompt"}}',
    b'{"op": "push", "token": "t", "shape": [240, 320], "ops": [{"op": "prompt", "obj": "one"}]}',
    b'{"op": "push", "token": "t", "shape": [240, 320], "ops": [{"op": "prompt"}]}',
    b'{"op": "push", "token": "t", "shape": [240, 320], "ops": [{"op": "prompt", "obj": 1, "points": [[1, NaN]]}]}',
    b'{"op": "push", "token": "t", "shape": [240, 320], "ops": [{"op": "prompt", "obj": 1, '
    b'"mask": {"shape": [240, 320], "bits": "@@@not base64"}}]}',
    b'{"op": "push", "token": "t", "shape": [240, 320], "ops": [{"op": "prompt", "obj": 1, '
    b'"mask": {"shape": [240, 320], "bits": "AAAA"}}]}',
    b'{"op": "push", "token": "t", "shape": [240, 320], "timestamp": "noon"}',
    b"[" * 100000,
]


def test_malformed_commands_are_input_errors_without_a_traceback(server, live):
    for raw in MALFORMED:  # on the live stream's id: refused before its session is touched
        res, err = grpc_infer(server, raw, frame_bytes=np.zeros(240 * 320 * 3, np.uint8), sequence_id=live.sequence_id)
        assert res is None and err.startswith("InputError: ") and "\n" not in err, (raw[:60], err)
    assert not [ln for ln in server.tail if "Traceback" in ln or "internal error" in ln]
    still_serving(server, live)


def test_a_stream_is_bound_to_its_opener(server, live):
    # a START on the live id is refused, and the stream goes on
    res, err = grpc_infer(server, {"op": "open", "options": {}}, sequence_id=live.sequence_id, start=True)
    assert res is None and err.startswith(f"InputError: stream {live.sequence_id} is live on this server"), err
    still_serving(server, live)
    # requests without the opener's token are refused; an END with a wrong token closes nothing
    for token in ("", "0" * 32):
        res, err = grpc_infer(server, {"op": "push", "token": token, "shape": [240, 320]},
                              frame_bytes=frame().reshape(-1), sequence_id=live.sequence_id)
        assert res is None and "the request's token is not its opener's" in err, err
    res, err = grpc_infer(server, {"op": "close", "token": "0" * 32}, sequence_id=live.sequence_id)
    assert res is None and "the request's token is not its opener's" in err, err
    still_serving(server, live)


def test_refused_starts_never_ended_do_not_fill_the_slots(server, live):
    """--max-sessions 2 (Triton has 6 candidate slots): one more honest stream fills the server;
    then 8 STARTs refused and never ENDed; the next START is refused at once, not queued until
    an idle timeout, and once a slot is free a new stream opens."""
    from fastsam2.serve.client import RemoteModel
    from fastsam2.serve.protocol import SessionLimitError

    model = RemoteModel(server.grpc_url)
    other = model.open_session()
    try:
        for _ in range(8):
            res, err = grpc_infer(server, {"op": "open", "options": {}}, sequence_id=secrets.randbits(62) + 1,
                                  start=True, timeout=30)
            assert res is None and err.startswith("SessionLimitError: "), err
        with pytest.raises(SessionLimitError, match="--max-sessions"):
            model.open_session()
        still_serving(server, live)
    finally:
        other.close()
    model.open_session().close()


def test_the_server_builds_no_full_resolution_masks(bundle_dir, monkeypatch):
    """What the tracker model runs per push: each object's low-res logits and numbers (all the
    client needs to make masks with the local code), never masks at the frame's resolution."""
    from fastsam2.runtime import results, session
    from fastsam2.serve.tracker_model import served_session_class

    def no_masks(*a, **k):
        raise AssertionError("full-resolution masks built on the server")

    monkeypatch.setattr(session, "frame_result", no_masks)
    monkeypatch.setattr(results, "frame_result", no_masks, raising=False)
    s = served_session_class().open(bundle_dir, backend="ort-cpu", threads=1)
    try:
        s.add_prompt(1, points=[(2000, 30)])
        r = s.push(np.zeros((64, 4096, 3), np.uint8))
        assert list(r.objects) == [1] and r.objects[1].logits.shape == (64, 64)  # S/4 at 256 px
        assert not hasattr(r.objects[1], "mask") and s.scheduled_objects() == {1}
    finally:
        s.close()
