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
#   IMAGE_SIZE=256 FRAMES=3 bash scripts/demo.sh   a small, quick one (tests/test_readme.py)
#   FASTSAM2_SKIP_INSTALL=1 ...            skips scripts/install.sh (an installed environment)
# Re-runnable: a second run reuses OUT/bundle when this demo exported it with the same settings
# and fastsam2 version and it is intact (the export is most of the time), and replaces its own
# earlier outputs in OUT/results (fastsam2-run --force: files it did not write are kept).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-demo_out}
IMAGE_SIZE=${IMAGE_SIZE:-1024}
FRAMES=${FRAMES:-16}
[ "${FASTSAM2_SKIP_INSTALL:-0}" = 1 ] || bash scripts/install.sh
PY=${PYTHON:-python3}
# The generated video (seed 0) shows a textured blue disc (object 1, the one clicked) and a
# blue disc distractor: the text prompt names what is drawn (calibration/synthetic.py).
PROMPT="blue disc"
# OUT/video is the demo's own (video.mp4 + masks/): regenerated, never another folder removed
if [ -e "$OUT/video" ]; then
  for f in "$OUT/video"/* "$OUT/video"/.[!.]*; do
    [ -e "$f" ] || continue
    case "${f##*/}" in video.mp4|masks) ;; *)
      echo "error: $OUT/video holds $f, which the demo did not write: pick another OUT" >&2; exit 2;;
    esac
  done
  rm -rf "$OUT/video"
fi
POINT=$($PY -m fastsam2.calibration.synthetic "$OUT/video" --frames "$FRAMES" --size 640x480 --mp4 \
        | sed -n 's/^object 1: point \([0-9]*,[0-9]*\).*/\1/p')
CKPT_ARGS=()
if [ -n "${CHECKPOINT:-}" ]; then CKPT_ARGS=(--checkpoint "$CHECKPOINT"); fi
EXPORT_ARGS=(--config sam2.1_hiera_t "${CKPT_ARGS[@]}" --target cpu --keep 0.5 --prompts "$PROMPT"
             --text-pretrained random --image-size "$IMAGE_SIZE" --precision "${PRECISION:-fp32}")
# What the bundle was made from: these arguments, the checkpoint file (name, size, time) and
# fastsam2's version; OUT/.demo-bundle holds that key and the sha256 of the manifest it produced.
# (Not the export code itself: after changing it, delete OUT/bundle to export again.)
key=$({ printf '%s\n' "${EXPORT_ARGS[@]}"
        [ -n "${CHECKPOINT:-}" ] && stat -L -c '%n %s %Y' "$CHECKPOINT" 2>/dev/null
        $PY -c "from importlib.metadata import version; print(version('fastsam2'))" || true; } | sha256sum | cut -c1-32)
stamp="$OUT/.demo-bundle"
manifest_sha() { sha256sum "$OUT/bundle/manifest.json" 2>/dev/null | cut -c1-64; }
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key $(manifest_sha)" ] && \
   $PY -c "import sys; from fastsam2.runtime.bundle import load_bundle; load_bundle(sys.argv[1])" \
       "$OUT/bundle" 2>/dev/null; then
  echo "demo: reusing $OUT/bundle (same settings, intact; delete it to export again)" >&2
else
  rm -f "$stamp"
  $PY -m fastsam2.export.cli "${EXPORT_ARGS[@]}" --out "$OUT/bundle" --force
  echo "$key $(manifest_sha)" > "$stamp"
fi
$PY -m fastsam2.runtime.run_cli "$OUT/video/video.mp4" --bundle "$OUT/bundle" --prompt "$PROMPT" --point "$POINT" \
    --keep 0.5 --backend ort-cpu --out "$OUT/results" --force
echo "masks: $OUT/results/masks/  overlay: $OUT/results/overlay.mp4  report: $OUT/results/results.json"
