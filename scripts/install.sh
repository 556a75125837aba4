#!/usr/bin/env bash
# Install fastsam2 with everything the export side, the runtime and the tests need, on a fresh
# machine (CPU is enough). Idempotent: already-satisfied packages are skipped.
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
$PY -m pip install -q -e ".[export,runtime,dev]"
