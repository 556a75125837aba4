#!/usr/bin/env bash
# The main job, end to end on a fresh machine: install, generate a video of moving shapes,
# export a bundle (no checkpoint can be downloaded here: random SAM2 + random CLIP, so the masks
# show the pipeline, not accuracy), then track it with the torch-free runtime. The same steps
# as commands: fastsam2-export ... ; fastsam2-run ... (called through $PY -m here so that a
# virtual environment's python works without its bin/ on PATH).
#   bash scripts/demo.sh [OUT]            OUT defaults to demo_out/
#   CHECKPOINT=sam2.1_hiera_tiny.pt bash scripts/demo.sh   to use the official weights
#   PRECISION=auto bash scripts/demo.sh   lets the cpu target's int8/bf16 agreement gate pick per
#                                         graph (tens of minutes at 1024 px on 2 cores; the demo
#                                         defaults to fp32 so that it ends in a few minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-demo_out}
IMAGE_SIZE=${IMAGE_SIZE:-1024}
FRAMES=${FRAMES:-16}
bash scripts/install.sh
PY=${PYTHON:-python3}
rm -rf "$OUT/video"
POINT=$($PY -m fastsam2.calibration.synthetic "$OUT/video" --frames "$FRAMES" --size 480x640 --mp4 \
        | sed -n 's/^object 1: point \([0-9]*,[0-9]*\).*/\1/p')
CKPT_ARGS=()
if [ -n "${CHECKPOINT:-}" ]; then CKPT_ARGS=(--checkpoint "$CHECKPOINT"); fi
$PY -m fastsam2.export.cli --config sam2.1_hiera_t "${CKPT_ARGS[@]}" --target cpu --keep 0.5 \
    --prompts "red ball,cyclist" --text-pretrained random --image-size "$IMAGE_SIZE" \
    --precision "${PRECISION:-fp32}" --out "$OUT/bundle" --force
$PY -m fastsam2.runtime.run_cli "$OUT/video/video.mp4" --bundle "$OUT/bundle" --prompt "red ball" --point "$POINT" \
    --keep 0.5 --backend ort-cpu --out "$OUT/results"
echo "masks: $OUT/results/masks/  overlay: $OUT/results/overlay.mp4  report: $OUT/results/results.json"
