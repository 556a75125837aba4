#!/usr/bin/env bash
# Install (scripts/install.sh) and run the test suite: what CI runs. The full-size (1024 px)
# tests are marked `slow` and left out here (CI's budget is 12 minutes on 2 cores; they take
# ~2.6 min more); run them with `bash scripts/test.sh -m slow`, or everything with `-m ""`.
# Two pytest-xdist workers where the machine has two CPUs or more, each pinned to its own
# share of them (tests/conftest.py; a file's tests stay on one worker): FASTSAM2_TEST_WORKERS
# sets another count, 0 runs in this process.
# Arguments go to pytest after the defaults, so a later -m or -n replaces them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=${PYTHON:-python3}
export FASTSAM2_SERVE_PYTHON=${FASTSAM2_SERVE_PYTHON:-$PWD/.venv-serve/bin/python}
cpus=$(nproc)  # the CPUs this process may use
workers=${FASTSAM2_TEST_WORKERS:-$(( cpus < 2 ? 0 : 2 ))}
xdist=()
[ "$workers" -gt 0 ] && xdist=(-n "$workers" --dist loadgroup)
$PY -m pytest -q -m "not slow" "${xdist[@]}" "$@"
