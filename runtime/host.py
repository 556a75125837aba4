"""Facts about the machine this process runs on: CPU flags and model, usable CPUs, memory.

One source per fact, so that tests patch one function (`host.cpu_has_bf16`, ...) and the suite
passes on any CPU. Callers go through the module (`host.cpu_has_bf16()`), never a copied name.
Hand-written rather than psutil: two /proc reads do it, and the device runtime's dependency
budget is numpy + onnxruntime + av + pillow + click.
"""

from __future__ import annotations

import functools
import os
import platform
import resource
from pathlib import Path

# flags that give bf16 arithmetic (x86: AVX512_BF16, AMX; aarch64: the BF16 extension) and
# u8 x s8 dot products without overflow (VNNI, AVX-VNNI, AMX int8)
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple:
    """(model name, frozenset of flags) from /proc/cpuinfo; ("", {}) where there is none."""
    model, flags = "", set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("flags", "Features"):
            flags.update(value.split())
        elif key == "model name" and not model:
            model = value.strip()
    return model, frozenset(flags)


def cpu_flags() -> frozenset:
    return _cpuinfo()[1]


def cpu_has_bf16() -> bool:
    """bf16 arithmetic in this CPU: AVX512_BF16 or AMX-BF16 (x86), the BF16 extension (aarch64)."""
    return bool(cpu_flags() & BF16_FLAGS)


def cpu_has_vnni() -> bool:
    """u8 x s8 dot products without overflow (VNNI); without it MLAS's AVX2 kernels saturate on
    full-range int8 weights, so int8 weights are 7-bit there (reduce_range)."""
    return bool(cpu_flags() & VNNI_FLAGS)


def cpu_features() -> list:
    """The flags that decide CPU precisions, as benchmarks and reports record them."""
    return sorted(cpu_flags() & (BF16_FLAGS | VNNI_FLAGS | {"avx2", "avx512f", "amx_tile"}))


def cpu_model() -> str:
    return _cpuinfo()[0] or platform.processor() or platform.machine()


def usable_cpus() -> int:
    """The CPUs this process may run on (a container quota or affinity can be below cpu_count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_mb() -> float:
    """Resident set size now (VmRSS), in MB; 0.0 where /proc has none."""
    kb = _status_kb("VmRSS")
    return round(kb / 1024, 1) if kb is not None else 0.0


def peak_rss_mb() -> float:
    """Peak resident set size: VmHWM where /proc has it, else ru_maxrss (kB on Linux)."""
    hwm = _status_kb("VmHWM")
    if hwm is None:
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if platform.system() == "Darwin":  # bytes there
            hwm //= 1024
    return round(hwm / 1024, 1)


def reset_peak_rss() -> bool:
    """Linux resets VmHWM to the current RSS when "5" is written to clear_refs (since 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def ram_gb() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None
