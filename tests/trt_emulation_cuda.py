"""The emulated CUDA device behind tests/trt_emulation.py: Polygraphy's CUDA wrapper (malloc,
free, memcpy, streams) and libcudart's device queries, strict where a GPU is.

Device memory is blocks of its own, uninitialised (0xFF: NaN floats, -1 indices) until written.
A copy must go the way its kind says, between a host pointer and a device block large enough.
Work on a stream (copies, engine executions) runs only when the stream is synchronised or a
synchronous call (cudaMemcpy, cudaFree) drains it: a device-to-host copy leaves 0xFF in the host
array and delivers its bytes at synchronize. Host-to-device copies read the host array when
they are queued (pageable memory is staged then). Stricter than CUDA: work queued behind output
copies never synchronised, or memory freed while they are pending, is an error (fastsam2 reads
its outputs after every run, and a late copy would land in host memory that may be gone).
"""

from __future__ import annotations

import bisect
import collections
import ctypes

POISON = 0xFF  # bytes of memory nothing wrote yet: NaN as float32, -1 as an index


class EmulatedCudaError(RuntimeError):
    """A CUDA call that would have returned an error status."""


class _Cudart:
    """libcudart's device queries (what `trt_backend._gpu_from_cudart` calls), for the emulated GPU."""

    def __init__(self, device):
        self._device = device

    def cudaGetDeviceCount(self, count):  # noqa: N802 (CUDA's names)
        count._obj.value = 1
        return 0

    def cudaDeviceGetAttribute(self, value, attr, device):  # noqa: N802
        major, minor = self._device.gpu["compute_capability"].split(".")
        value._obj.value = int({75: major, 76: minor}[attr])
        return 0

    def cudaGetDeviceProperties_v2(self, prop, device):  # noqa: N802
        name = self._device.gpu["gpu_name"].encode()[:255]
        ctypes.memmove(prop, name, len(name))
        return 0


class EmulatedDevice:
    """Polygraphy's CUDA wrapper (malloc/free/memcpy/streams) over an emulated device."""

    def __init__(self, gpu):
        self.gpu = dict(gpu)
        self.handle = _Cudart(self)
        self._blocks, self._starts = {}, []  # start address -> ctypes buffer; sorted starts
        self._streams, self._next_stream = {}, 0x5000
        self.stats = collections.Counter()

    @property
    def dla_cores(self) -> int:
        return int(self.gpu.get("dla_cores", 0))

    def malloc(self, nbytes):
        buf = ctypes.create_string_buffer(max(int(nbytes), 1))
        ctypes.memset(buf, POISON, len(buf))  # cudaMalloc hands out whatever was there
        start = ctypes.addressof(buf)
        self._blocks[start] = buf
        bisect.insort(self._starts, start)
        return start

    def free(self, ptr):
        ptr = int(ptr or 0)
        if not ptr:
            return
        if ptr not in self._blocks:
            raise EmulatedCudaError(f"cudaFree({ptr:#x}): not the start of a device allocation")
        self._drain_all("cudaFree")  # cudaFree waits for the device
        del self._blocks[ptr]
        self._starts.remove(ptr)

    def block(self, ptr, nbytes):
        """The address range [ptr, ptr + nbytes) inside one device block, or None."""
        i = bisect.bisect_right(self._starts, int(ptr)) - 1
        if i < 0:
            return None
        start = self._starts[i]
        return (start, int(ptr) - start) if int(ptr) - start + nbytes <= len(self._blocks[start]) else None

    def memcpy(self, dst, src, nbytes, kind, stream_ptr=None):
        kind, dst, src, nbytes = getattr(kind, "value", kind), int(dst), int(src), int(nbytes)
        names = {1: "HostToDevice", 2: "DeviceToHost"}
        if kind not in names:
            raise EmulatedCudaError(f"cudaMemcpy kind {kind}: fastsam2 copies between host and device only")
        dev, host = (dst, src) if kind == 1 else (src, dst)
        if self.block(dev, nbytes) is None or self.block(host, 1) is not None:
            raise EmulatedCudaError(
                f"cudaMemcpy{'Async' if stream_ptr is not None else ''} {names[kind]} of {nbytes} bytes "
                f"from {src:#x} to {dst:#x}: {'destination' if kind == 1 else 'source'} is not device "
                f"memory that large, or the {'source' if kind == 1 else 'destination'} is (cudaErrorInvalidValue)")
        self.stats[names[kind]] += 1
        if kind == 1:  # pageable host memory is staged when the call is made
            data = ctypes.string_at(src, nbytes)
            op = ("input copy", lambda: ctypes.memmove(dst, data, nbytes))
        else:
            op = ("output copy", lambda: ctypes.memmove(dst, src, nbytes))
        if stream_ptr is None:
            self._drain_all("a synchronous cudaMemcpy")  # the legacy default stream waits for all
            op[1]()
            return
        queue = self._queue(stream_ptr)
        if kind == 1:
            self._refuse_behind_outputs(stream_ptr, "a host-to-device copy")
        else:
            ctypes.memset(dst, POISON, nbytes)  # what the host reads before synchronize
        queue.append(op)

    def enqueue(self, stream_ptr, what, fn):
        self._queue(stream_ptr)
        self._refuse_behind_outputs(stream_ptr, what)
        self._streams[int(stream_ptr)].append((what, fn))

    def create_stream(self):
        self._next_stream += 0x10
        self._streams[self._next_stream] = []
        return self._next_stream

    def stream_synchronize(self, ptr):
        self.stats["synchronize"] += 1
        self._run(self._queue(ptr))

    def destroy_stream(self, ptr):
        self._drain(int(ptr), "cudaStreamDestroy")
        self._streams.pop(int(ptr))

    def pending(self) -> int:
        return sum(len(q) for q in self._streams.values())

    def _queue(self, ptr):
        if ptr is None or int(ptr) not in self._streams:
            raise EmulatedCudaError(f"stream {ptr!r} is not a live stream (cudaErrorInvalidResourceHandle)")
        return self._streams[int(ptr)]

    def _refuse_behind_outputs(self, ptr, what):
        if any(kind == "output copy" for kind, _ in self._streams[int(ptr)]):
            self._streams[int(ptr)].clear()  # never deliver into host arrays that may be gone
            raise EmulatedCudaError(f"{what} queued on stream {int(ptr):#x} behind device-to-host copies "
                                    "that were never synchronised (stream.synchronize() missing)")

    def _drain(self, ptr, why):
        if any(kind == "output copy" for kind, _ in self._streams.get(ptr, ())):
            self._streams[ptr].clear()
            raise EmulatedCudaError(f"{why} while device-to-host copies on stream {ptr:#x} were never "
                                    "synchronised (stream.synchronize() missing)")
        self._run(self._streams.get(ptr, []))

    def _drain_all(self, why):
        for ptr in list(self._streams):
            self._drain(ptr, why)

    @staticmethod
    def _run(queue):
        while queue:
            queue.pop(0)[1]()
