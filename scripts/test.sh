#!/usr/bin/env bash
# Install (scripts/install.sh) and run the whole test suite, slow full-size tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=${PYTHON:-python3}
$PY -m pytest -q "$@"
