#!/usr/bin/env bash
# Install fastsam2 with everything the export side, the runtime, the Triton server and the tests
# need, on a fresh machine (CPU is enough). Idempotent, and quick on a re-run: each step first
# checks whether what it installs is there (pip's own no-op check costs ~5 s a call).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# has DIST[==VERSION]...: every distribution installed (at that exact version, where given)
has() {
  $PY - "$@" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
for spec in sys.argv[1:]:
    name, _, want = spec.partition("==")
    try:
        got = version(name)
    except PackageNotFoundError:
        sys.exit(1)
    if want and got != want:
        sys.exit(1)
EOF
}
# torch first, pinned: sam2's setup.py imports it, and an unpinned resolve pulls another build
has torch==2.14.1 torchvision==0.29.1 || $PY -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
# sam2 from PyPI is a source package; SAM2_BUILD_CUDA=0 skips its CUDA extension (only used for
# hole filling, which SAM2 then skips with a warning), no build isolation so it sees our torch
if ! $PY -c "import sam2" 2>/dev/null; then
  $PY -m pip install -q "setuptools>=68" wheel
  SAM2_BUILD_CUDA=0 $PY -m pip install -q --no-build-isolation "sam2==1.1.0"
fi
# fastsam2 itself (editable) with its extras, and tritonclient for fastsam2-serve, in one resolve.
# The stamp names what this step installed from; it is redone when pyproject.toml or this script
# changes, or the package no longer imports from here.
stamp=".install-stamp"
key="$($PY -c 'import sys; print(sys.executable)') $(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$key" ] || \
   [ "$($PY -c 'import fastsam2.export, os; print(os.path.dirname(fastsam2.export.__file__))' 2>/dev/null)" != "$PWD/export" ]; then
  # no build isolation when setuptools is new enough (half the time of building in a fresh env)
  iso=--no-build-isolation
  $PY -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 68)" 2>/dev/null || iso=
  rm -f "$stamp"
  $PY -m pip install -q $iso -e ".[export,runtime,openvino,dev]" "tritonclient[grpc]>=2.40"
  echo "$key" > "$stamp"
fi
# fastsam2-serve: the tritonserver binary ships in nvidia-pytriton's wheel (without its
# dependencies, which would pin this environment to numpy<2). Its python-backend stub is built
# against numpy 1.x, so the server's models run in .venv-serve: this environment's packages with
# numpy<2 on top (the launcher takes it from FASTSAM2_SERVE_PYTHON).
has nvidia-pytriton || $PY -m pip install -q --no-deps "nvidia-pytriton>=0.5"
if [ ! -x .venv-serve/bin/python ]; then
  $PY -m venv --system-site-packages .venv-serve
fi
.venv-serve/bin/python -c "import numpy, sys; sys.exit(int(numpy.__version__.split('.')[0]) >= 2)" 2>/dev/null \
  || .venv-serve/bin/python -m pip install -q "numpy<2"
