"""GPU detection (`trt_backend.current_gpu`) as it runs on a machine, without monkeypatching:
child processes get a fake libcudart (built here with gcc: the CUDA runtime's device queries,
answered from environment variables) first on LD_LIBRARY_PATH, and a fake `nvidia-smi` first on
PATH. libcudart decides where it finds a device (Jetson's nvidia-smi cannot say the compute
capability); nvidia-smi decides where libcudart finds none or cannot run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

FAKE_CUDART = r"""
#include <stdlib.h>
#include <string.h>
static const char *env(const char *k, const char *d) { const char *v = getenv(k); return v ? v : d; }
int cudaGetDeviceCount(int *n) {
    *n = atoi(env("FAKE_CUDA_COUNT", "1"));
    return atoi(env("FAKE_CUDA_STATUS", "0"));  /* 35: driver too old, 100: no device */
}
int cudaDeviceGetAttribute(int *value, int attr, int device) {
    const char *cc = env("FAKE_CUDA_CC", "8.9");
    if (device != 0) return 101;  /* cudaErrorInvalidDevice */
    if (attr == 75) *value = atoi(cc);  /* cudaDevAttrComputeCapabilityMajor */
    else if (attr == 76) *value = atoi(strchr(cc, '.') + 1);  /* ...Minor */
    else return 1;
    return 0;
}
static int props(char *prop, int device) {
    if (device != 0) return 101;
    memset(prop, 0, 1008);  /* the struct's size in CUDA 12; the name is its first 256 bytes */
    strncpy(prop, env("FAKE_CUDA_NAME", "NVIDIA Fake GPU"), 255);
    return 0;
}
int cudaGetDeviceProperties(char *prop, int device) { return props(prop, device); }
#ifndef CUDA11
int cudaGetDeviceProperties_v2(char *prop, int device) { return props(prop, device); }
#endif
"""

FAKE_SMI = """#!/bin/sh
# nvidia-smi as fastsam2 calls it; anything else is a bug in the caller
if [ "$1" != "--query-gpu=name,compute_cap" ] || [ "$2" != "--format=csv,noheader" ] || [ $# -ne 2 ]; then
    echo "fake nvidia-smi: unexpected arguments: $*" >&2; exit 64
fi
printf '%b' "$FAKE_SMI_OUT"
exit "${FAKE_SMI_RC:-0}"
"""

DETECT = """
import json, os, sys
if sys.argv[2] == "no-polygraphy":
    sys.modules["polygraphy"] = None  # a runtime-only install: libcudart found by name
from fastsam2.runtime.trt_backend import current_gpu
out = []
for case in json.loads(sys.argv[1]):
    os.environ.update(case)  # the fake libcudart reads these at each call
    out.append(current_gpu())
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def fakes(tmp_path_factory):
    """{"cuda12": lib dir, "cuda11": lib dir (no _v2 query), "bin": nvidia-smi dir, "empty": dir}."""
    root = tmp_path_factory.mktemp("fake_cuda")
    (root / "bin").mkdir()
    (root / "empty").mkdir()
    smi = root / "bin" / "nvidia-smi"
    smi.write_text(FAKE_SMI)
    smi.chmod(0o755)
    dirs = {"bin": root / "bin", "empty": root / "empty"}
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc:
        (root / "cudart.c").write_text(FAKE_CUDART)
        for tag, flags in (("cuda12", []), ("cuda11", ["-DCUDA11"])):
            d = root / tag
            d.mkdir()
            subprocess.run([gcc, "-shared", "-fPIC", *flags, "-o", str(d / "libcudart.so"), str(root / "cudart.c")],
                           check=True, capture_output=True, timeout=120)
            # every name the runtime (and Polygraphy) may look for resolves here first
            for alias in ("libcudart.so.11.0", "libcudart.so.12", "libcudart.so.13"):
                (d / alias).symlink_to("libcudart.so")
            dirs[tag] = d
    return dirs


def detect(fakes, cases, lib=None, smi=True, polygraphy=True):
    """current_gpu() in a child process for each case (environment for the fakes)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_")}
    env["PATH"] = str(fakes["bin" if smi else "empty"])
    if lib:
        if lib not in fakes:
            pytest.skip("no C compiler here to build the fake libcudart")
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(fakes[lib]), env.get("LD_LIBRARY_PATH")]))
    mode = "polygraphy" if polygraphy else "no-polygraphy"
    r = subprocess.run([sys.executable, "-c", DETECT, json.dumps(cases), mode], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


SMI_A100 = {"FAKE_SMI_OUT": "NVIDIA A100-SXM4-80GB, 8.0\\n", "FAKE_SMI_RC": "0"}
A100 = {"gpu_name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}


@pytest.mark.parametrize("lib, polygraphy", [("cuda12", True), ("cuda12", False), ("cuda11", True)])
def test_libcudart_decides_where_it_finds_a_device(fakes, lib, polygraphy):
    gpu = {"FAKE_CUDA_NAME": "NVIDIA RTX 6000 Ada Generation", "FAKE_CUDA_CC": "8.9", "FAKE_CUDA_COUNT": "1",
           "FAKE_CUDA_STATUS": "0"}
    orin = {**gpu, "FAKE_CUDA_NAME": "Orin (nvgpu)", "FAKE_CUDA_CC": "8.7"}
    # nvidia-smi would say otherwise (or, on Jetson, nothing): libcudart is asked first
    got = detect(fakes, [{**gpu, **SMI_A100}, {**orin, "FAKE_SMI_OUT": "", "FAKE_SMI_RC": "2"}], lib=lib,
                 polygraphy=polygraphy)
    assert got == [{"gpu_name": "NVIDIA RTX 6000 Ada Generation", "compute_capability": "8.9"},
                   {"gpu_name": "Orin (nvgpu)", "compute_capability": "8.7"}]


def test_nvidia_smi_decides_where_libcudart_finds_no_device(fakes):
    no_driver = {"FAKE_CUDA_STATUS": "35", "FAKE_CUDA_COUNT": "0"}  # cudaErrorInsufficientDriver
    no_device = {"FAKE_CUDA_STATUS": "0", "FAKE_CUDA_COUNT": "0"}
    two = {"FAKE_SMI_OUT": "NVIDIA H100 80GB HBM3, 9.0\\nNVIDIA L4, 8.9\\n", "FAKE_SMI_RC": "0"}
    failed = {"FAKE_SMI_OUT": "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\\n",
              "FAKE_SMI_RC": "9"}
    jetson = {"FAKE_SMI_OUT": 'Field "compute_cap" is not a valid field to query.\\n', "FAKE_SMI_RC": "0"}
    got = detect(fakes, [{**no_driver, **SMI_A100}, {**no_device, **two}, {**no_driver, **failed},
                         {**no_device, **jetson}, {**no_device, "FAKE_SMI_OUT": "", "FAKE_SMI_RC": "0"}],
                 lib="cuda12")
    # the first GPU of several (CUDA device 0); a failing or unhelpful nvidia-smi means none
    assert got == [A100, {"gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}, None, None, None]
    assert detect(fakes, [no_driver], lib="cuda12", smi=False) == [None]  # no nvidia-smi at all


def test_this_machines_cuda_runtime_without_a_gpu(fakes):
    """No fake libcudart: whatever CUDA runtime this machine has (none, or one without a driver
    or device as in CI) finds no GPU, and the fake nvidia-smi's answer stands."""
    if detect(fakes, [{}], smi=False) != [None]:
        pytest.skip("this machine has a GPU")
    assert detect(fakes, [SMI_A100]) == [A100]
