"""Per-graph error of ONNX Runtime (CPU, fp32) against the PyTorch module each graph was traced
from, on the inputs the parity tests use (fastsam2.export.onnx_export.example_feeds) and the test
model's weights (tests/sam2_test_model.py).
The contract's fp32 tolerances (runtime/contract.py) are set from these figures (~10x).

    python bench/graph_errors.py [--image-size 256] [--out bench/results/graph_errors_256.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from bundles import ensure_bundle

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    out = args.out or ROOT / "bench" / "results" / f"graph_errors_{args.image_size}.json"
    # the test model's definition only (not the tests' fixtures): these figures bound the parity
    # tests' errors, so they are measured on the weights those tests use
    sys.path.insert(0, str(ROOT / "tests"))
    import torch

    from fastsam2.export.model import PrunedSAM2
    from fastsam2.export.onnx_export import example_feeds
    from fastsam2.runtime.backends import OrtSession
    from fastsam2.runtime.contract import GRAPHS, keep_to_k
    from sam2_test_model import load_test_model, save_checkpoint

    torch.set_num_threads(2)
    loaded = load_test_model(args.image_size)
    pruned = PrunedSAM2(loaded)
    report = {"image_size": args.image_size, "model": "tests/sam2_test_model.py", "graphs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        # exported from the same weights (a checkpoint of the test model), graphs fp32
        bundle = ensure_bundle(ROOT / "bench" / "out" / f"graph_errors_bundle_{args.image_size}", args.image_size,
                               prompts="cyclist,red ball", checkpoint=save_checkpoint(loaded, Path(tmp) / "test_model.pt"),
                               threads=2, log=lambda m: None)
        T = pruned.geometry["T"]
        cases = [(n, {"points": p, "seed": s}) for n in ("image_encoder", "router", "memory_encoder", "mask_decoder")
                 for s, p in ((1, 1), (2, 3))]
        cases += [("memory_attention", {"n": keep_to_k(keep, T), "ms": T + (f - 1) * keep_to_k(keep, T),
                                        "ptrs": min(16, 2 * f), "seed": f})
                  for keep in (1.0, 0.5, 0.3) for f in (1, 4, 7)]
        sessions = {}
        for name, kw in cases:
            files = [f"{name}.onnx"] + (["memory_attention_ort.onnx"] if name == "memory_attention" else [])
            feeds = example_feeds(name, pruned.geometry, **kw)
            spec = GRAPHS[name]
            with torch.inference_mode():
                ref = pruned.graphs[name](*[torch.from_numpy(feeds[n]) for n in spec.input_names])
            ref = (ref,) if isinstance(ref, torch.Tensor) else ref
            for f in files:
                sess = sessions.setdefault(f, OrtSession(bundle / f, ["CPUExecutionProvider"]))
                got = sess.run(feeds)
                for o, r in zip(spec.output_names, ref):
                    r = r.detach().numpy()
                    err = float(np.abs(got[o] - r).max())
                    rec = report["graphs"].setdefault(name, {}).setdefault(o, {"max_abs_err": 0.0, "peak": 0.0})
                    rec["max_abs_err"] = max(rec["max_abs_err"], err)
                    rec["peak"] = max(rec["peak"], float(np.abs(r).max()))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    for g, outs in report["graphs"].items():
        for o, r in outs.items():
            print(f"{g}.{o}: max-abs {r['max_abs_err']:.2e} (peak {r['peak']:.3g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
