#!/usr/bin/env bash
# Install (scripts/install.sh) and run the test suite: what CI runs. The full-size (1024 px)
# tests are marked `slow` and left out here (CI's budget is 12 minutes on 2 cores; they take
# ~2.6 min more); run them with `bash scripts/test.sh -m slow`, or everything with `-m ""`.
# Arguments go to pytest after the default, so a later -m replaces it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=${PYTHON:-python3}
export FASTSAM2_SERVE_PYTHON=${FASTSAM2_SERVE_PYTHON:-$PWD/.venv-serve/bin/python}
$PY -m pytest -q -m "not slow" "$@"
