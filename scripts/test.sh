#!/usr/bin/env bash
# Install (scripts/install.sh) and run the whole test suite, slow full-size tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=${PYTHON:-python3}
export FASTSAM2_SERVE_PYTHON=${FASTSAM2_SERVE_PYTHON:-$PWD/.venv-serve/bin/python}
$PY -m pytest -q "$@"
