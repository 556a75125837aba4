#!/usr/bin/env bash
# The runtime on Python 3.10 (JetPack 6's system Python): a runtime-only install (numpy,
# onnxruntime, PyAV, no torch) in a fresh 3.10 venv tracks a bundle exported by this
# environment and writes the same masks, byte for byte, as this environment does.
# CI runs it after the tests (.ci/run). Needs python3.10 on PATH (pyenv has it in our image).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
find_py310() {  # on PATH, or an installed pyenv version (whose shim needs it selected)
  for c in "${PY310:-}" "$(command -v python3.10 || true)" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.10*/bin/python3.10; do
    if [ -n "$c" ] && [ -x "$c" ] && "$c" -c "import sys; assert sys.version_info[:2] == (3, 10)" 2>/dev/null; then
      echo "$c"; return
    fi
  done
}
PY310=$(find_py310)
if [ -z "$PY310" ]; then
  echo "check_runtime_py310: no Python 3.10 here; the runtime was NOT checked on 3.10" >&2
  exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
POINT=$($PY -m fastsam2.calibration.synthetic "$tmp/video" --frames 6 --size 160x120 \
        | sed -n 's/^object 1: point \([0-9]*,[0-9]*\).*/\1/p')
$PY -m fastsam2.export.cli --target cpu --keep 0.5 --prompts cyclist --text-pretrained random \
    --image-size 256 --precision fp32 --out "$tmp/bundle" > /dev/null 2>&1
ARGS=("$tmp/video/frames" --bundle "$tmp/bundle" --point "$POINT" --keep 0.5 --backend ort-cpu --quiet --no-overlay)
$PY -m fastsam2.runtime.run_cli "${ARGS[@]}" --out "$tmp/here" > /dev/null
"$PY310" -m venv "$tmp/venv310"
"$tmp/venv310/bin/python" -m pip install -q --disable-pip-version-check ".[runtime]"
# torch must not be importable there, and must not be needed
"$tmp/venv310/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)"
"$tmp/venv310/bin/fastsam2-run" "${ARGS[@]}" --out "$tmp/py310" > /dev/null
n=0
for f in "$tmp/here/masks/"*.png; do
  cmp -s "$f" "$tmp/py310/masks/$(basename "$f")" || { echo "check_runtime_py310: $(basename "$f") differs on 3.10" >&2; exit 1; }
  n=$((n + 1))
done
[ "$n" -eq 6 ] || { echo "check_runtime_py310: expected 6 masks, got $n" >&2; exit 1; }
echo "check_runtime_py310: Python $("$PY310" -c 'import platform; print(platform.python_version())'), runtime-only install, $n masks identical"
