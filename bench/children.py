"""The child processes of bench/bench.py: each runs one configuration (`bench.py --one NAME`)
so that its peak RSS belongs to it alone. The fastsam2 child never imports torch."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

OFFICIAL_HOOKS = {  # SAM2Base method -> the graph that holds the same work
    "forward_image": "image_encoder",
    "_prepare_memory_conditioned_features": "memory_attention",
    "_forward_sam_heads": "mask_decoder",
    "_encode_new_memory": "memory_encoder",
}


def peak_rss_mb() -> float:
    from fastsam2.runtime import host

    return host.peak_rss_mb()


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def save_masks(path: Path, masks: list) -> None:
    a = np.stack(masks).astype(bool)
    np.savez_compressed(path, bits=np.packbits(a, axis=-1), shape=np.array(a.shape))



def child_official(spec: dict) -> dict:
    import warnings

    import torch

    torch.set_num_threads(spec["threads"])
    warnings.filterwarnings("ignore")
    from fastsam2.export.sam2_loader import load_sam2

    pred = load_sam2(spec["config"], None, image_size=spec["image_size"], seed=spec["seed"], warn=False).model
    rss_model = peak_rss_mb()
    stage = {}

    def hook(method, name):
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return method(*a, **kw)
            finally:
                stage[name] = stage.get(name, 0.0) + (time.perf_counter() - t0) * 1e3
        return timed

    for meth, name in OFFICIAL_HOOKS.items():
        setattr(pred, meth, hook(getattr(pred, meth), name))
    load1 = os.getloadavg()[0]
    t0 = time.perf_counter()
    state = pred.init_state(spec["frames"])
    init_s = time.perf_counter() - t0
    rss_init = peak_rss_mb()
    t0 = time.perf_counter()
    pred.add_new_points_or_box(state, frame_idx=0, obj_id=1, points=np.array([spec["point"]], np.float32),
                               labels=np.array([1], np.int32))
    prompt_ms = (time.perf_counter() - t0) * 1e3
    prompt_stages = dict(stage)
    stage.clear()
    frames, masks = [], []
    with torch.inference_mode():
        last = time.perf_counter()
        for fi, _, m in pred.propagate_in_video(state):
            now = time.perf_counter()
            frames.append({"frame": int(fi), "frame_ms": round((now - last) * 1e3, 2),
                           "latency_ms": {k: round(v, 2) for k, v in stage.items()}})
            stage.clear()
            masks.append((m[0, 0] > 0).numpy().copy())
            last = time.perf_counter()
    rss = peak_rss_mb()
    out = state["output_dict_per_obj"][0]
    stored = sum(v.get("maskmem_features") is not None for d in ("cond_frame_outputs", "non_cond_frame_outputs")
                 for v in out[d].values())
    T = (spec["image_size"] // 16) ** 2
    save_masks(Path(spec["masks"]), masks)
    return {"frames": frames, "init_state_s": round(init_s, 2), "prompt_frame_ms": round(prompt_ms, 1),
            "prompt_frame_stages_ms": {k: round(v, 1) for k, v in prompt_stages.items()},
            "peak_rss_mb": rss, "rss_after_model_mb": rss_model, "rss_after_init_state_mb": rss_init,
            "bank": {"frames_with_memory": int(stored), "stored_tokens": int(stored * T),
                     "note": "SAM2VideoPredictor keeps every frame's memory in its state; it reads 7"},
            "loadavg_1min": [round(load1, 2), round(os.getloadavg()[0], 2)],
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def child_fastsam2(spec: dict) -> dict:
    from fastsam2.runtime.outputs import read_palette_png
    from fastsam2.runtime.track import PromptSpec, track

    out = Path(spec["run_dir"])
    shutil.rmtree(out, ignore_errors=True)
    load1 = os.getloadavg()[0]
    res = track(spec["frames"], spec["bundle"], PromptSpec(points=[tuple(spec["point"])]), out,
                keep=spec["keep"], backend="ort-cpu", overlay=False, threads=spec["threads"],
                warn=lambda m: None)
    rss = peak_rss_mb()
    load2 = os.getloadavg()[0]
    n = len(res["frames"])
    save_masks(Path(spec["masks"]), [read_palette_png(out / "masks" / f"{i:05d}.png") > 0 for i in range(n)])
    import onnxruntime

    # What MemoryBank holds at the end: the conditioning frame's T tokens + the kept tokens of
    # the last num_maskmem - 1 tracked frames (it reads them all, plus the pointers).
    tracked = [f["kept_tokens"] for f in res["frames"][1:]]
    nm = json.loads((Path(spec["bundle"]) / "manifest.json").read_text())["model"]["num_maskmem"]
    stored = res["tokens"] + sum(tracked[-(nm - 1):])
    return {"frames": [{"frame": f["frame"], "frame_ms": f["frame_ms"], "latency_ms": f["latency_ms"],
                        "kept_tokens": f["kept_tokens"]} for f in res["frames"]],
            "keep": res["keep"], "k": res["k"], "tokens": res["tokens"], "totals": res["totals"],
            "peak_rss_mb": rss, "bank": {"stored_tokens": int(stored)},
            "loadavg_1min": [round(load1, 2), round(load2, 2)],
            "onnxruntime": onnxruntime.__version__, "torch_loaded": "torch" in sys.modules}


CHILDREN = {"official": child_official, "fastsam2": child_fastsam2}
