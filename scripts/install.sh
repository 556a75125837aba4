#!/usr/bin/env bash
# Install fastsam2 with everything the export side, the runtime, the Triton server and the tests
# need, on a fresh machine (CPU is enough). Idempotent, and quick on a re-run: each step first
# checks whether what it installs is there (pip's own no-op check costs ~5 s a call, apt's more).
# Each step that installs something says so on stderr, one line; a re-run says nothing is to do.
# FASTSAM2_SKIP_APT=1 leaves the system packages alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
started=$SECONDS
did=0
say() { echo "install.sh: $*" >&2; did=1; }
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
# pip, less its resolver's "ERROR: ... nvidia-pytriton X requires Y, which is not installed":
# nvidia-pytriton is installed without its dependencies on purpose (see the serve step), so that
# line is expected and says nothing wrong; nor does pip's advice against root in a CI container.
# Every other line and the exit status pass through.
pip_() {
  local log rc=0
  log=$(mktemp)
  "$@" 2> "$log" || rc=$?
  grep -v -E -e "^ERROR: pip's dependency resolver does not currently take into account" \
             -e "^nvidia-pytriton [^ ]+ (requires|has requirement) " \
             -e "^WARNING: Running pip as the 'root' user" "$log" >&2 || true
  rm -f "$log"
  return "$rc"
}

# System packages the tests use: an RTSP server (GStreamer's rtsp-server through PyGObject),
# ffmpeg, redis and haproxy. dpkg-query first (a few ms); apt only for what is missing, with one
# `apt-get update` before it. Without apt, or without root, one line says what to install.
SYSTEM_PACKAGES=(redis-server haproxy ffmpeg python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-rtsp
                 gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly)
if [ "${FASTSAM2_SKIP_APT:-0}" != 1 ]; then
  if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
    say "no apt here: install these system packages (or their equivalents) for the tests: ${SYSTEM_PACKAGES[*]}"
  else
    installed=$(dpkg-query -W -f='${Package} ${db:Status-Abbrev}\n' "${SYSTEM_PACKAGES[@]}" 2>/dev/null \
                | awk '$2 == "ii" {print $1}' || true)
    missing=()
    for p in "${SYSTEM_PACKAGES[@]}"; do
      grep -qx -- "$p" <<< "$installed" || missing+=("$p")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
      sudo=()
      if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo=(sudo -n); fi
      fi
      if [ "$(id -u)" != 0 ] && [ "${#sudo[@]}" -eq 0 ]; then
        say "not root and no sudo: the tests need these system packages; as root run:" \
            "apt-get update && apt-get install -y ${missing[*]}"
      else
        say "system packages (apt): ${missing[*]}"
        log=$(mktemp)
        if ! { "${sudo[@]}" apt-get update -q && \
               "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
                 "${missing[@]}"; } > "$log" 2>&1; then
          tail -n 5 "$log" >&2
          say "warning: apt-get could not install ${missing[*]} (above): the tests that use them will fail"
        fi
        rm -f "$log"
      fi
    fi
  fi
fi

# torch first, pinned: sam2's setup.py imports it, and an unpinned resolve pulls another build
if ! has torch==2.14.1 torchvision==0.29.1; then
  say "torch 2.14.1 + torchvision 0.29.1 (pip, a few minutes on a fresh machine)"
  pip_ $PY -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
fi
# sam2 from PyPI is a source package; SAM2_BUILD_CUDA=0 skips its CUDA extension (only used for
# hole filling, which SAM2 then skips with a warning), no build isolation so it sees our torch
if ! $PY -c "import sam2" 2>/dev/null; then
  say "sam2 1.1.0 (pip, built from source without its CUDA extension)"
  pip_ $PY -m pip install -q "setuptools>=68" wheel
  SAM2_BUILD_CUDA=0 pip_ $PY -m pip install -q --no-build-isolation "sam2==1.1.0"
fi
# fastsam2 itself (editable) with its extras, and tritonclient for fastsam2-serve, in one resolve.
# The stamp names what this step installed from (the python, pyproject.toml and these
# requirements); the step is redone when one changes, or the package no longer imports from here.
FASTSAM2_REQS=(-e ".[export,runtime,openvino,dev]" "tritonclient[grpc]>=2.40")
stamp=".install-stamp"
key="$($PY -c 'import sys; print(sys.executable)') $({ cat pyproject.toml; printf '%s\n' "${FASTSAM2_REQS[@]}"; } | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$key" ] || \
   [ "$($PY -c 'import fastsam2.export, os; print(os.path.dirname(fastsam2.export.__file__))' 2>/dev/null)" != "$PWD/export" ]; then
  say "fastsam2 (editable, extras export,runtime,openvino,dev) + tritonclient (pip)"
  # no build isolation when setuptools is new enough (half the time of building in a fresh env)
  iso=()
  $PY -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 68)" 2>/dev/null \
    && iso=(--no-build-isolation)
  rm -f "$stamp"
  pip_ $PY -m pip install -q "${iso[@]}" "${FASTSAM2_REQS[@]}"
  echo "$key" > "$stamp"
fi
# fastsam2-serve: the tritonserver binary ships in nvidia-pytriton's wheel (without its
# dependencies, which would pin this environment to numpy<2). Its python-backend stub is built
# against numpy 1.x, so the server's models run in .venv-serve: this environment's packages with
# numpy<2 on top (the launcher takes it from FASTSAM2_SERVE_PYTHON).
if ! has nvidia-pytriton; then
  say "nvidia-pytriton's tritonserver (pip --no-deps: its own dependencies would pin numpy<2 here)"
  pip_ $PY -m pip install -q --no-deps "nvidia-pytriton>=0.5"
fi
if [ ! -x .venv-serve/bin/python ]; then
  say ".venv-serve: a venv on this environment's packages for the Triton server's models"
  $PY -m venv --system-site-packages .venv-serve
fi
if ! .venv-serve/bin/python -c "import numpy, sys; sys.exit(int(numpy.__version__.split('.')[0]) >= 2)" 2>/dev/null; then
  say "numpy<2 in .venv-serve (the Triton python backend's stub is built against numpy 1.x)"
  pip_ .venv-serve/bin/python -m pip install -q "numpy<2"
fi
if [ "$did" = 0 ]; then
  echo "install.sh: everything is installed already" >&2
else
  echo "install.sh: done in $((SECONDS - started)) s" >&2
fi
