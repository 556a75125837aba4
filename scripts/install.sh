#!/usr/bin/env bash
# Install fastsam2 with everything the export side, the runtime, the Triton server and the tests
# need, on a fresh machine (CPU is enough). Idempotent: already-satisfied packages are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch first, pinned: sam2's setup.py imports it, and an unpinned resolve pulls another build
$PY -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
# sam2 from PyPI is a source package; SAM2_BUILD_CUDA=0 skips its CUDA extension (only used for
# hole filling, which SAM2 then skips with a warning), no build isolation so it sees our torch
if ! $PY -c "import sam2" 2>/dev/null; then
  $PY -m pip install -q setuptools wheel
  SAM2_BUILD_CUDA=0 $PY -m pip install -q --no-build-isolation "sam2==1.1.0"
fi
$PY -m pip install -q -e ".[export,runtime,openvino,dev]"
# fastsam2-serve: tritonclient here; the tritonserver binary ships in nvidia-pytriton's wheel
# (without its dependencies, which would pin this environment to numpy<2). Its python-backend
# stub is built against numpy 1.x, so the server's models run in .venv-serve: this environment's
# packages with numpy<2 on top (the launcher takes it from FASTSAM2_SERVE_PYTHON).
$PY -m pip install -q "tritonclient[grpc]>=2.40"
$PY -m pip install -q --no-deps "nvidia-pytriton>=0.5"
if [ ! -x .venv-serve/bin/python ]; then
  $PY -m venv --system-site-packages .venv-serve
fi
.venv-serve/bin/python -m pip install -q "numpy<2"
