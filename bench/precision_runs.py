"""What bench/precision.py steps in lockstep: the official SAM2VideoPredictor and fastsam2
sessions (backend x precision x keep x objects, per-object or batched), and which of them this
machine, this fastsam2 and --configs let run."""

from __future__ import annotations

import inspect
import time

import numpy as np

from children import OFFICIAL_HOOKS


class Official:
    """SAM2VideoPredictor stepped one frame at a time (propagate_in_video is a generator)."""

    def __init__(self, args, frames_dir, points: dict):
        import torch

        from fastsam2.export.sam2_loader import load_sam2

        torch.set_num_threads(args.threads)
        self.pred = load_sam2("sam2.1_hiera_t", None, image_size=args.image_size, seed=0, warn=False).model
        self.stage = {}
        for meth, name in OFFICIAL_HOOKS.items():
            setattr(self.pred, meth, self._hook(getattr(self.pred, meth), name))
        self.state = self.pred.init_state(str(frames_dir))
        for o, xy in points.items():
            self.pred.add_new_points_or_box(self.state, frame_idx=0, obj_id=o, points=np.array([xy], np.float32),
                                            labels=np.array([1], np.int32))
        self._ctx = torch.inference_mode()
        self._ctx.__enter__()
        self.gen = self.pred.propagate_in_video(self.state)

    def _hook(self, method, name):
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return method(*a, **kw)
            finally:
                self.stage[name] = self.stage.get(name, 0.0) + (time.perf_counter() - t0) * 1e3
        return timed

    def step(self, i, rgb):
        self.stage = {}
        _, _, m = next(self.gen)
        return (m[:, 0] > 0).numpy().copy(), dict(self.stage)


class Ours:
    """One fastsam2 streaming session: a backend's graph sessions at one precision and keep,
    every object clicked on frame 0; `batched`: the objects of a frame run as the batch of each
    graph call (Session.open(batch_objects=True), where this fastsam2 has it)."""

    def __init__(self, bundle, sessions, keep, points: dict, num_frames, batched: bool = False):
        from fastsam2.runtime.session import Session

        # per-object rows say so where the choice exists: its default may differ by backend
        extra = {"batch_objects": batched} if batch_objects_supported() else {}
        self.s = Session.open(bundle, keep=keep, graphs=("bench", sessions), num_frames=num_frames, **extra)
        for o, xy in points.items():
            self.s.add_prompt(o, points=[tuple(xy)])

    def step(self, i, rgb):
        r = self.s.push(rgb)
        return np.stack([r.objects[o].mask for o in sorted(r.objects)]), dict(r.latency_ms)


def batch_objects_supported() -> bool:
    """Whether this fastsam2's Session.open takes batch_objects (the batched-objects path)."""
    from fastsam2.runtime.session import Session

    return "batch_objects" in inspect.signature(Session.open).parameters


def why_not_batched(manifest: dict) -> str | None:
    """Why rows with batch_objects=True cannot run here (None: they can). Session.open runs a
    bundle without the objects batch axis one object at a time, with only a warning: such rows
    would be per-object rows under another name."""
    if not batch_objects_supported():
        return "this fastsam2's Session.open has no batch_objects parameter (objects of a frame run one graph call each)"
    from fastsam2.runtime.batched import bundle_batchable

    if not bundle_batchable(manifest):
        return "this bundle's graphs have no objects batch axis (exported by an older fastsam2): export it again"
    return None


def config_name(backend: str, precision: str, keep: float, objects: int, batched: bool, several: bool) -> str:
    """backend:precision:keepK[:objN][:batched]; objN only where the run has several object
    counts (a one-count run keeps the names it always had)."""
    return f"{backend}:{precision}:keep{keep:g}" + (f":obj{objects}" if several else "") + (":batched" if batched else "")


def parse_prefixes(text: str | None) -> list | None:
    """--configs: comma list of config-name prefixes, each a list of ':' fields (None: all)."""
    if not text:
        return None
    return [p.strip().split(":") for p in text.split(",") if p.strip()]


def _fields_match(fields: list, prefix: list) -> bool:
    return len(fields) >= len(prefix) and all(p in ("*", f) for f, p in zip(fields, prefix))


def selected(name: str, prefixes: list | None) -> bool:
    """Field by field: `ort-cpu` selects ort-cpu:fp32:keep1 but not ort-cpu+openvino:picked:keep1;
    `ort-cpu:fp32:keep1` selects that keep at every object count, batched or not; `*` is any
    field (`*:picked`: the bundle's picks on whatever backend `auto` chose)."""
    if prefixes is None:
        return True
    fields = name.split(":")
    return any(_fields_match(fields, p) for p in prefixes)


def parse_objects(text: str) -> list:
    """--objects: one count (8) or a comma list (1,2,4,8), each >= 1; returned sorted, unique."""
    try:
        counts = sorted({int(x) for x in str(text).split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--objects takes counts like 8 or 1,2,4,8, got {text!r}") from None
    if not counts or counts[0] < 1:
        raise ValueError(f"--objects takes counts >= 1, got {text!r}")
    return counts


def configs(bundle, args, prefixes, log) -> tuple:
    """({(backend, precision): (sessions, graph precisions, warnings)} for every pair this machine
    can run and --configs asks for, {row: why it is not run})."""
    from fastsam2.runtime.backends import available_backends, create_sessions, open_backend
    from fastsam2.runtime.errors import FastSam2Error
    from fastsam2.runtime.openvino_backend import device_has_bf16

    def wanted(backend, p):
        return prefixes is None or any(_fields_match([backend, p], f[:2]) for f in prefixes)

    have, out, skipped = available_backends(), {}, {}
    variants = {g: set(v.get("variants") or {}) for g, v in bundle.manifest["graphs"].items()}
    for backend in args.backends.split(","):
        if backend not in have:
            skipped[backend] = "not installed"
            continue
        for p in ("fp32", "int8", "bf16"):
            if not wanted(backend, p):
                continue
            if p != "fp32" and not any(p in v for v in variants.values()):
                if p == "bf16":
                    skipped[f"{backend}:bf16"] = ("this CPU has no bf16 (OpenVINO reports no BF16)"
                                                  if not device_has_bf16("CPU") else "no bf16 variant in the bundle")
                continue
            said = []
            try:
                s = create_sessions(bundle, backend, args.threads, precision=p, warn=said.append)
            except FastSam2Error as e:  # e.g. bf16 variants that only OpenVINO runs
                skipped[f"{backend}:{p}"] = str(e)
                continue
            got = {g: x.precision for g, x in s.items()}
            if p != "fp32" and all(v == "fp32" for v in got.values()):
                skipped[f"{backend}:{p}"] = "; ".join(said) or "no graph runs in it"
                continue
            out[(backend, p)] = (s, got, said)
            log(f"{backend} {p}: {got}" + (f" ({'; '.join(said)})" if said else ""))
    # what a user of the defaults gets: `auto` with the bundle's picks (graphs on the backend
    # that runs their precision, e.g. a bf16 encoder on OpenVINO and the rest on ONNX Runtime);
    # its name is known once opened: opened where a prefix may name it (a backend alone, or picked)
    if prefixes is None or any(len(f) < 2 or f[1] in ("picked", "*") for f in prefixes):
        said = []
        name, s = open_backend("auto", bundle, args.threads, warn=said.append)
        if wanted(name, "picked"):
            out[(name, "picked")] = (s, {g: x.precision for g, x in s.items()}, said)
            log(f"auto -> {name} with the bundle's picks: {out[(name, 'picked')][1]}")
    return out, skipped
