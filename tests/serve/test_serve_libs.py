"""serve/ on the libraries issue 21 names: config.pbtxt composed as tritonclient's ModelConfig
message (the same configs Triton got from the hand-written text, and every dynamic symbol a -1
dim), the remote session refusing what the local session refuses through the same checks,
process scans through psutil and the --max-sessions count under filelock."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fastsam2.runtime.contract import GRAPH_ORDER, GRAPHS, geometry

# what serve/repository.py wrote with f-strings before it composed ModelConfig messages (its output
# at 256 px, text width 512, for the contract before the objects axis B: B was 1 then)
OLD_TRACKER = r'''name: "fastsam2_tracker"
backend: "python"
max_batch_size: 0
input [
  { name: "FRAME" data_type: TYPE_UINT8 dims: [ -1 ] },
  { name: "COMMANDS" data_type: TYPE_STRING dims: [ 1 ] }
]
output [
  { name: "LOGITS" data_type: TYPE_FP32 dims: [ -1, -1, -1 ] },
  { name: "RESULT" data_type: TYPE_STRING dims: [ 1 ] }
]
sequence_batching {
  max_sequence_idle_microseconds: 307500000
  oldest { max_candidate_sequences: 10 max_queue_delay_microseconds: 0 }
  control_input [
    { name: "START" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] },
    { name: "END" control [ { kind: CONTROL_SEQUENCE_END int32_false_true: [ 0, 1 ] } ] },
    { name: "CORRID" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 } ] }
  ]
}
instance_group [ { count: 2 kind: KIND_CPU } ]
parameters { key: "bundle" value { string_value: "bundle" } }
parameters { key: "note" value { string_value: "say \"hi\"\\ \n" } }
parameters { key: "info" value { string_value: "{\"a\": [1]}" } }
'''
TRACKER_PARAMS = {"bundle": "bundle", "note": 'say "hi"\\ \n', "info": '{"a": [1]}'}
ACCEL = 'optimization { execution_accelerators { gpu_execution_accelerator : [ { name : "tensorrt" } ] } }'
OLD_GRAPHS = {  # graph: ((platform, kind, count, accelerator), config.pbtxt)
    "image_encoder": (("tensorrt_plan", "KIND_GPU", 1, ""), '''name: "image_encoder" platform: "tensorrt_plan" max_batch_size: 0
input [ { name: "image" data_type: TYPE_FP32 dims: [ 1, 3, 256, 256 ] } ]
output [
  { name: "feat" data_type: TYPE_FP32 dims: [ 1, 256, 16, 16 ] },
  { name: "high_res_0" data_type: TYPE_FP32 dims: [ 1, 32, 64, 64 ] },
  { name: "high_res_1" data_type: TYPE_FP32 dims: [ 1, 64, 32, 32 ] }
]
instance_group [ { count: 1 kind: KIND_GPU } ]'''),
    "router": (("onnxruntime_onnx", "KIND_CPU", 2, ""), '''name: "router" platform: "onnxruntime_onnx" max_batch_size: 0
input [
  { name: "feat" data_type: TYPE_FP32 dims: [ 1, 256, 16, 16 ] },
  { name: "text_emb" data_type: TYPE_FP32 dims: [ 1, 512 ] },
  { name: "prev_mask_logits" data_type: TYPE_FP32 dims: [ 1, 1, 64, 64 ] }
]
output [
  { name: "scores" data_type: TYPE_FP32 dims: [ 1, 256 ] },
  { name: "relevance" data_type: TYPE_FP32 dims: [ 1, 256 ] }
]
instance_group [ { count: 2 kind: KIND_CPU } ]'''),
    "memory_attention": (("onnxruntime_onnx", "KIND_GPU", 3, "tensorrt"), '''name: "memory_attention" platform: "onnxruntime_onnx" max_batch_size: 0
input [
  { name: "curr" data_type: TYPE_FP32 dims: [ -1, 256 ] },
  { name: "curr_pos" data_type: TYPE_FP32 dims: [ -1, 256 ] },
  { name: "curr_idx" data_type: TYPE_INT64 dims: [ -1 ] },
  { name: "memory" data_type: TYPE_FP32 dims: [ -1, 64 ] },
  { name: "memory_pos" data_type: TYPE_FP32 dims: [ -1, 64 ] },
  { name: "memory_idx" data_type: TYPE_INT64 dims: [ -1 ] }
]
output [ { name: "conditioned" data_type: TYPE_FP32 dims: [ -1, 256 ] } ]
instance_group [ { count: 3 kind: KIND_GPU } ]
''' + ACCEL),
    "memory_encoder": (("onnxruntime_onnx", "KIND_GPU", 1, ""), '''name: "memory_encoder" platform: "onnxruntime_onnx" max_batch_size: 0
input [
  { name: "feat" data_type: TYPE_FP32 dims: [ 1, 256, 16, 16 ] },
  { name: "mask_logits" data_type: TYPE_FP32 dims: [ 1, 1, 64, 64 ] },
  { name: "object_score" data_type: TYPE_FP32 dims: [ 1, 1 ] },
  { name: "binarize" data_type: TYPE_FP32 dims: [ 1 ] }
]
output [ { name: "maskmem" data_type: TYPE_FP32 dims: [ 1, 64, 16, 16 ] } ]
instance_group [ { count: 1 kind: KIND_GPU } ]'''),
    "mask_decoder": (("onnxruntime_onnx", "KIND_GPU", 2, "tensorrt"), '''name: "mask_decoder" platform: "onnxruntime_onnx" max_batch_size: 0
input [
  { name: "feat" data_type: TYPE_FP32 dims: [ 1, 256, 16, 16 ] },
  { name: "high_res_0" data_type: TYPE_FP32 dims: [ 1, 32, 64, 64 ] },
  { name: "high_res_1" data_type: TYPE_FP32 dims: [ 1, 64, 32, 32 ] },
  { name: "point_coords" data_type: TYPE_FP32 dims: [ 1, -1, 2 ] },
  { name: "point_labels" data_type: TYPE_FP32 dims: [ 1, -1 ] },
  { name: "mask_input" data_type: TYPE_FP32 dims: [ 1, 1, 64, 64 ] },
  { name: "has_mask_input" data_type: TYPE_FP32 dims: [ 1 ] }
]
output [
  { name: "masks" data_type: TYPE_FP32 dims: [ 1, 4, 64, 64 ] },
  { name: "iou" data_type: TYPE_FP32 dims: [ 1, 4 ] },
  { name: "obj_ptrs" data_type: TYPE_FP32 dims: [ 1, 4, 256 ] },
  { name: "object_score" data_type: TYPE_FP32 dims: [ 1, 1 ] }
]
instance_group [ { count: 2 kind: KIND_GPU } ]
''' + ACCEL),
}


def _parse(text: str):
    pytest.importorskip("tritonclient.grpc")
    from fastsam2.serve.repository import _model_config

    mc, text_format = _model_config()
    return text_format.Parse(text, mc.ModelConfig())


def _with_symbol_as(spec, symbol: str, value: int):
    """`spec` with `symbol` fixed at `value` (as the contract had it before the symbol)."""
    def fix(tensors):
        return tuple(dataclasses.replace(t, shape=tuple(value if d == symbol else d for d in t.shape))
                     for t in tensors)

    return dataclasses.replace(spec, inputs=fix(spec.inputs), outputs=fix(spec.outputs),
                               dynamic=tuple(d for d in spec.dynamic if d != symbol))


def test_configs_match_the_hand_written_ones():
    """Every model the repository writes parses to the message the f-string text parsed to."""
    from fastsam2.serve.repository import graph_config, tracker_config

    new = tracker_config(instances=2, max_sessions=5, idle_timeout=7.5, params=TRACKER_PARAMS)
    assert _parse(new) == _parse(OLD_TRACKER)
    assert set(OLD_GRAPHS) == set(GRAPH_ORDER)
    dims = geometry(256, 512)
    for g, ((platform, kind, count, accel), old) in OLD_GRAPHS.items():
        new = graph_config(_with_symbol_as(GRAPHS[g], "B", 1), platform, kind, count, dims, accel)
        assert _parse(new) == _parse(old), g


def test_every_dynamic_symbol_is_minus_one_and_triton_does_not_batch():
    """The contract's dynamic symbols (N, M, Ms, P, and B: one stream's objects per call) are -1
    dims; max_batch_size stays 0 even where the first input's first axis is "B" (the hand-written
    writer took that for a cross-stream batch axis: max_batch_size 8, B dropped from the dims)."""
    from fastsam2.serve.repository import graph_config

    dims = geometry(256, 512)
    enc = GRAPHS["image_encoder"]
    batched_enc = dataclasses.replace(enc, inputs=(dataclasses.replace(enc.inputs[0], shape=("B", 3, "S", "S")),),
                                      dynamic=("B",))
    for spec in [GRAPHS[g] for g in GRAPH_ORDER] + [batched_enc]:
        c = _parse(graph_config(spec, "onnxruntime_onnx", "KIND_GPU", 1, dims))
        assert c.max_batch_size == 0 and not c.HasField("dynamic_batching"), spec.name
        for got, want in zip(list(c.input) + list(c.output), spec.inputs + spec.outputs):
            assert got.name == want.name
            assert list(got.dims) == [-1 if d in spec.dynamic else (dims[d] if isinstance(d, str) else d)
                                      for d in want.shape], (spec.name, got.name)
    assert list(_parse(graph_config(batched_enc, "onnxruntime_onnx", "KIND_GPU", 1, dims)).input[0].dims) \
        == [-1, 3, 256, 256]


class _Offline:
    """RemoteSession's transport answered here: open, and pushes that track nothing."""

    def __call__(self, cmd, *, frame=None, start=False, end=False, timeout=None, what=""):
        if cmd["op"] == "open":
            return {"backend": "fake", "token": "t", "tokens": 256, "max_cond_frames": 1}, None
        return {"frame": self.frame, "objects": [], "latency_ms": {}}, np.zeros((0, 64, 64), np.float32)


def _remote_session(options: dict):
    from types import SimpleNamespace

    from fastsam2.serve.client import RemoteSession

    call = _Offline()
    call.frame = 0
    model = SimpleNamespace(url="offline", settings={"image_size": 256}, info={},
                            text_embeddings={"cyclist": None, "red ball": None})
    session = RemoteSession.__new__(RemoteSession)
    session._call = call
    RemoteSession.__init__(session, model, options)
    return session


BAD_PROMPTS = [
    dict(obj_id=0, points=[(5, 5)]),
    dict(obj_id=1, frame=1.5, points=[(5, 5)]),
    dict(obj_id=1, frame=-1, points=[(5, 5)]),
    dict(obj_id=1, points="5,5"),
    dict(obj_id=1, points=[(5, 5, 5)]),
    dict(obj_id=1, points=[(float("nan"), 5)]),
    dict(obj_id=1, points=[(5, 5)] * 70),
    dict(obj_id=1, box=(10, 10, 5, 5)),
    dict(obj_id=1, points=[(500, 5)]),
    dict(obj_id=1, text="a dog"),
    dict(obj_id=1, text=3),
    dict(obj_id=1),
    dict(obj_id=1, mask=np.ones((10, 10), bool)),
    dict(obj_id=1, mask=np.ones((48, 64), bool), points=[(5, 5)]),
]


@pytest.mark.parametrize("pushed", [False, True])
def test_the_remote_session_refuses_what_the_local_one_refuses(bundle_dir, pushed):
    """Same checks, same words: each bad prompt, before and after the first frame (64x48)."""
    from fastsam2.runtime.errors import InputError
    from fastsam2.runtime.session import Session

    frame = np.zeros((48, 64, 3), np.uint8)
    local = Session.open(bundle_dir, backend="ort-cpu", frame_size=(64, 48), warn=lambda m: None)
    remote = _remote_session({"frame_size": [64, 48]})
    if pushed:
        local.push(frame)
        remote.push(frame)
    for bad in BAD_PROMPTS:
        args = dict(bad)
        obj = args.pop("obj_id")
        with pytest.raises(InputError) as want:
            local.add_prompt(obj, **args)
        with pytest.raises(InputError) as got:
            remote.add_prompt(obj, **args)
        assert str(got.value) == str(want.value), bad
    for bad in ([[1, 2], [3]], np.zeros((4, 4), np.uint8)):
        with pytest.raises(InputError) as want:
            local.push(bad)
        with pytest.raises(InputError) as got:
            remote.push(bad)
        assert str(got.value) == str(want.value)
    with pytest.raises(InputError) as want:
        local.remove(1, frame="2")
    with pytest.raises(InputError) as got:
        remote.remove(1, frame="2")
    assert str(got.value) == str(want.value)
    for bad_time in ("abc", float("nan")):  # the remote one said float("abc"): a ValueError
        with pytest.raises(InputError) as want:
            local.push(frame, timestamp=bad_time)
        with pytest.raises(InputError) as got:
            remote.push(frame, timestamp=bad_time)
        assert str(got.value) == str(want.value)
    if pushed:  # a removal on the frame just pushed has passed, in both
        with pytest.raises(InputError) as want:
            local.remove(1, frame=0)
        with pytest.raises(InputError) as got:
            remote.remove(1, frame=0)
        assert str(got.value) == str(want.value)
    local.close()


def test_process_group_members_and_leftovers():
    """psutil's scan: a group's live members (a zombie is not one); after the leader dies, what
    is left of the group is SIGKILLed and named."""
    from fastsam2.serve.server import _alive, _group_members, _kill_leftovers

    code = ("import subprocess, sys, time\n"
            "z = subprocess.Popen(['true']); s = subprocess.Popen(['sleep', '60'])\n"
            "time.sleep(0.5); print(z.pid, s.pid, flush=True); time.sleep(60)")
    leader = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        zombie, sleeper = map(int, leader.stdout.readline().split())
        assert sorted(_group_members(leader.pid)) == sorted([leader.pid, sleeper])
        assert _alive(sleeper) and not _alive(zombie)
        leader.kill()
        leader.wait(10)
        assert _kill_leftovers(leader.pid, grace=0) == [sleeper]
        deadline = time.monotonic() + 10
        while _alive(sleeper) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(sleeper)
    finally:
        if leader.poll() is None:
            leader.kill()
            leader.wait(10)
        try:
            os.killpg(leader.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _take_slot(folder, instance, limit, barrier, out):
    from fastsam2.serve.protocol import SessionLimitError
    from fastsam2.serve.sessions import Slots

    slots = Slots(folder, instance, limit)
    barrier.wait()
    try:
        slots.acquire(1)
        out.put("held")
    except SessionLimitError:
        out.put("refused")


def test_max_sessions_holds_across_processes(tmp_path):
    """Instances are processes: six opening at once against --max-sessions 3 under the file lock."""
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(6), ctx.Queue()
    procs = [ctx.Process(target=_take_slot, args=(tmp_path, f"i{n}", 3, barrier, out)) for n in range(6)]
    for p in procs:
        p.start()
    try:
        answers = sorted(out.get(timeout=60) for _ in procs)
    finally:
        for p in procs:
            p.join(30)
    assert answers == ["held"] * 3 + ["refused"] * 3
    assert len([f for f in tmp_path.iterdir() if not f.name.startswith(".")]) == 3
