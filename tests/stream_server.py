"""A live video stream on 127.0.0.1 for tests: what a camera or an IP camera would send.

    from stream_server import serve_stream

    with serve_stream("http", fps=24, frames=48, loop=True) as served:
        track(served.url, ...)          # http://127.0.0.1:PORT/live.ts
        served.video.first_frame_points  # ground truth of the streamed clip (SyntheticVideo)

The stream comes from a subprocess (tests/stream_sender.py; PyAV only: no ffmpeg binary is
installed here) that paces frames at real time, so a reader sees what it would see from a real source: frames arrive
every 1/fps s whether or not it keeps up. Kinds:

- "http": H.264 in MPEG-TS over HTTP (an HTTP camera / a relay).
- "mjpeg": multipart JPEG over HTTP (multipart/x-mixed-replace), what most IP cameras serve.
- "tcp": H.264 in MPEG-TS over a raw TCP connection (tcp://127.0.0.1:PORT).
- "udp": H.264 in MPEG-TS in UDP datagrams sent to udp://127.0.0.1:PORT, which the reader binds.

Each TCP/HTTP connection gets its own encoder and starts at frame 0 with a keyframe, so a reader
that connects any time after the server is up starts cleanly and its frame index equals the
server's frame counter. UDP has no connection: the sender starts when the server is up and a
reader joins mid-stream at the next keyframe (one per second).

loop=False ends each connection's stream after one pass (the reader's iteration then ends
normally); a test whose consumer is slow (a tracker) or stops by itself (--max-frames) should
use loop=True so the stream is still there when it asks. A UDP stream never ends for the
reader: a finished sender reads as a silent stream.

The server binds 127.0.0.1 port 0 and reports the port it got, so there is no race for a free
port (UDP is the exception: the reader binds, so the port is picked free here and passed on).
Leaving the `with` block always stops the process (SIGTERM, then SIGKILL), bounded in time.

gate=True makes the test the clock instead of the wall: the server sends nothing until told.
served.release(n) lets every connection send its frames up to n (exclusive) at once, unpaced;
served.play() paces the rest at fps from then on; served.wait_sent(n) waits until some
connection (the UDP sender) has handed frame n-1 to the network. Tests that assert what a
reader drops or where it joins use this instead of sleeping.

stamp=True writes the server's frame counter into the top STAMP_ROWS rows as STAMP_BITS black
and white blocks; read_stamp(rgb) reads it back after lossy coding, so a test can check which
frames it got. stall_after=N sends N frames and then goes quiet with the connection left open
(a stream that stops delivering).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np

STAMP_BITS = 16
STAMP_ROWS = 16
START_TIMEOUT_S = 60.0  # generous: the test machine's 2 cores are shared with other work
STOP_TIMEOUT_S = 5.0
KINDS = ("http", "mjpeg", "tcp", "udp")


# ----------------------------------------------------------------------------- frame stamps


def stamp(rgb: np.ndarray, counter: int) -> np.ndarray:
    """rgb with counter (mod 2**STAMP_BITS) written as blocks over the top rows, MSB first."""
    out = rgb.copy()
    w = out.shape[1] // STAMP_BITS
    for b in range(STAMP_BITS):
        bit = (counter >> (STAMP_BITS - 1 - b)) & 1
        out[:STAMP_ROWS, b * w:(b + 1) * w] = 255 if bit else 0
    return out


def read_stamp(rgb: np.ndarray) -> int:
    """The counter stamp() wrote, read from block centres (robust to H.264/JPEG coding)."""
    w = rgb.shape[1] // STAMP_BITS
    value = 0
    for b in range(STAMP_BITS):
        block = rgb[STAMP_ROWS // 4:3 * STAMP_ROWS // 4, b * w + w // 4:b * w + 3 * w // 4]
        value = (value << 1) | int(block.mean() > 127)
    return value


# ----------------------------------------------------------------------------- the parent side


@dataclasses.dataclass
class ServedStream:
    url: str
    kind: str
    fps: float
    frames: int  # frames in one pass of the clip
    loop: bool
    video: object = None  # the SyntheticVideo streamed (ground truth), None for source=
    gate: "_Gate | None" = None  # gate=True: the test says when frames go out

    def release(self, n: int) -> None:
        """gate=True: let frames < n go out now (unpaced)."""
        self.gate.send(f"{int(n)}")

    def play(self) -> None:
        """gate=True: from now on frames go out at fps, without a limit."""
        self.gate.send("play")

    def wait_sent(self, n: int, timeout: float = START_TIMEOUT_S) -> None:
        """gate=True: wait until frames < n were handed to the network; a hang guard, not a
        timing assumption (RuntimeError after `timeout`)."""
        self.gate.wait_sent(n, timeout)

    def __str__(self) -> str:
        return self.url


class _Gate:
    """The parent's end of a gated server: commands on its stdin, SENT reports from its stdout."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.sent, self.cond = proc, 0, threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(b"SENT "):
                with self.cond:
                    self.sent = max(self.sent, int(line.split()[1]))
                    self.cond.notify_all()

    def send(self, command: str) -> None:
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()

    def wait_sent(self, n: int, timeout: float) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.sent >= n, timeout):
                raise RuntimeError(f"stream server sent {self.sent} frames, not {n}, within {timeout} s")


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_stream(
    kind: str = "http",
    fps: float = 24.0,
    frames: int = 48,
    source: str | os.PathLike | None = None,
    size: tuple[int, int] = (240, 320),
    loop: bool = False,
    stall_after: int | None = None,
    stamp: bool = False,
    seed: int = 0,
    objects: int = 1,
    gate: bool = False,
) -> Iterator[ServedStream]:
    """Serve a stream on 127.0.0.1 while the block runs; yields a ServedStream (.url, .video).

    The clip is `source` (a frames folder or a video file) or else a synthetic video of
    `frames` frames of size (H, W) made with fastsam2.calibration.synthetic.make_video (moving
    shapes with ground truth: served.video). loop=False sends the clip once and then closes
    the connection (the stream ends); loop=True repeats it until the block ends. gate=True:
    frames go out when the test says (ServedStream.release / play; see the module docstring).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    with tempfile.TemporaryDirectory(prefix="stream_server_") as tmp:
        video = None
        if source is None:
            from fastsam2.calibration.synthetic import make_video

            video = make_video(Path(tmp) / "clip", num_frames=frames, size=size, seed=seed,
                               objects=objects, fmt="png")
            source = video.frames_dir_or_file
        cmd = [sys.executable, str(Path(__file__).resolve().with_name("stream_sender.py")), "--kind", kind,
               "--fps", str(fps), "--source", str(source)]
        if loop:
            cmd.append("--loop")
        if stamp:
            cmd.append("--stamp")
        if stall_after is not None:
            cmd += ["--stall-after", str(int(stall_after))]
        if gate:
            cmd.append("--gate")
        if kind == "udp":
            cmd += ["--port", str(_free_udp_port())]
        log_path = Path(tmp) / "server.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log,
                                    stdin=subprocess.PIPE if gate else subprocess.DEVNULL)
        try:
            port, count = wait_ready(proc, log_path, "stream server")
            path = {"http": "/live.ts", "mjpeg": "/live.mjpg"}.get(kind, "")
            yield ServedStream(f"{kind if kind in ('tcp', 'udp') else 'http'}://127.0.0.1:{port}{path}",
                               kind, float(fps), count, loop, video, _Gate(proc) if gate else None)
        finally:
            stop_process(proc)


def wait_ready(proc: subprocess.Popen, log_path: Path, what: str) -> tuple[int, int]:
    """(port, frames) from the server's "READY PORT FRAMES" line; RuntimeError with its log
    when it exits or says nothing within START_TIMEOUT_S."""
    deadline = time.monotonic() + START_TIMEOUT_S
    line = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            line = proc.stdout.readline()
            break
        if proc.poll() is not None:
            break
    if not line.startswith(b"READY "):
        stop_process(proc)
        raise RuntimeError(f"{what} did not start: {log_path.read_text(errors='replace')[-2000:]}")
    _, port, count = line.split()
    return int(port), int(count)


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL: bounded in time; closes its pipes."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()


# ----------------------------------------------------------------------------- hang guards


def bounded(fn, seconds: float):
    """fn() on a thread; its result, its exception, or a test failure if it outlives `seconds`
    (live sources can hang where a test cannot interrupt them)."""
    import pytest

    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # handed back to the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        pytest.fail(f"did not finish within {seconds} s")
    if "error" in out:
        raise out["error"]
    return out["value"]


def wait_until(condition, seconds: float) -> None:
    """A bounded wait for something another thread does (a hang guard, not a timing bet)."""
    import pytest

    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not reached within {seconds} s")
        time.sleep(0.01)
