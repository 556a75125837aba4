"""A live video stream on 127.0.0.1 for tests: what a camera or an IP camera would send.

    from stream_server import serve_stream

    with serve_stream("http", fps=24, frames=48, loop=True) as served:
        track(served.url, ...)          # http://127.0.0.1:PORT/live.ts
        served.video.first_frame_points  # ground truth of the streamed clip (SyntheticVideo)

The stream comes from a subprocess (PyAV only: no ffmpeg binary is installed here) that paces
frames at real time, so a reader sees what it would see from a real source: frames arrive
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

import argparse
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
        cmd = [sys.executable, str(Path(__file__).resolve()), "--kind", kind, "--fps", str(fps),
               "--source", str(source)]
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
            port, count = _wait_ready(proc, log_path)
            path = {"http": "/live.ts", "mjpeg": "/live.mjpg"}.get(kind, "")
            yield ServedStream(f"{kind if kind in ('tcp', 'udp') else 'http'}://127.0.0.1:{port}{path}",
                               kind, float(fps), count, loop, video, _Gate(proc) if gate else None)
        finally:
            _stop(proc)


def _wait_ready(proc: subprocess.Popen, log_path: Path) -> tuple[int, int]:
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
        _stop(proc)
        raise RuntimeError(f"stream server did not start: {log_path.read_text(errors='replace')[-2000:]}")
    _, port, count = line.split()
    return int(port), int(count)


def _stop(proc: subprocess.Popen) -> None:
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


# ----------------------------------------------------------------------------- the server side


def _load_clip(source: Path) -> list[np.ndarray]:
    if source.is_dir():
        from PIL import Image

        files = sorted(p for p in source.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        return [np.asarray(Image.open(p).convert("RGB")) for p in files]
    import av

    with av.open(str(source)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


class _Pacer:
    """Frame i is due at start + (i - index0)/fps: a real-time source, not one that waits for
    readers."""

    def __init__(self, fps: float, index0: int = 0):
        self.fps, self.start, self.index0 = fps, time.monotonic(), index0

    def wait(self, i: int) -> None:
        delay = self.start + (i - self.index0) / self.fps - time.monotonic()
        if delay > 0:
            time.sleep(delay)


class _ServerGate:
    """--gate: frames < allowed go out unpaced; after "play", all of them, paced from then."""

    def __init__(self, fps: float):
        self.fps, self.allowed, self.playing, self.cond = fps, 0, False, threading.Condition()
        self.out_lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in sys.stdin:
            with self.cond:
                if line.strip() == "play":
                    self.playing = True
                else:
                    self.allowed = max(self.allowed, int(line))
                self.cond.notify_all()

    def wait(self, i: int) -> _Pacer | None:
        """Block until frame i may go; the pacer to use from there (None: unpaced)."""
        with self.cond:
            self.cond.wait_for(lambda: i < self.allowed or self.playing)
            return None if i < self.allowed else _Pacer(self.fps, index0=i)

    def sent(self, n: int) -> None:
        with self.out_lock:
            print(f"SENT {n}", flush=True)


GATE: _ServerGate | None = None  # --gate


def _frames(clip, args) -> Iterator[tuple[int, np.ndarray]]:
    """(counter, rgb) in sending order, paced (or as --gate says); ends after one pass unless
    --loop."""
    pacer, i = (None if args.gate else _Pacer(args.fps)), 0
    while True:
        for rgb in clip:
            if args.stall_after is not None and i >= args.stall_after:
                while True:  # quiet, with the connection left open, until we are stopped
                    time.sleep(3600)
            if args.gate and pacer is None:
                pacer = GATE.wait(i)  # None while the frames go out as released, unpaced
            if pacer is not None:
                pacer.wait(i)
            yield i, (stamp(rgb, i) if args.stamp else rgb)
            i += 1
            if args.gate:
                GATE.sent(i)  # the consumer of this generator has sent frame i - 1
        if not args.loop:
            return


class _SocketFile:
    """The write end PyAV muxes into: a connected socket, HTTP chunks or UDP datagrams."""

    def __init__(self, send):
        self.send = send

    def write(self, data) -> int:
        if len(data):  # an empty HTTP chunk would end the response
            self.send(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass


def _udp_sender(port: int):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    buf = bytearray()

    def send(data: bytes) -> None:
        buf.extend(data)
        while len(buf) >= 1316:  # 7 x 188-byte TS packets: the usual UDP payload
            try:
                sock.sendto(bytes(buf[:1316]), ("127.0.0.1", port))
            except OSError:
                pass  # nobody listening yet: a real sender does not care either
            del buf[:1316]

    return send


def _encode_ts(out: _SocketFile, clip, args) -> None:
    import av

    h, w = clip[0].shape[:2]
    # flush_packets: every packet leaves at once, so a frame is on the wire when it is due.
    with av.open(out, "w", format="mpegts", options={"flush_packets": "1"}, buffer_size=4096) as c:
        s = c.add_stream("libx264", rate=int(round(args.fps)))
        s.width, s.height, s.pix_fmt = w & ~1, h & ~1, "yuv420p"
        # zerolatency: no B-frames or lookahead, a frame is encoded as soon as it is given;
        # a keyframe every second so a UDP reader that joins mid-stream soon starts decoding.
        # scenecut=0: keyframes exactly every gop frames, so where a UDP reader starts is known.
        s.codec_context.options = {"preset": "ultrafast", "tune": "zerolatency", "crf": "18",
                                   "x264-params": "scenecut=0"}
        s.codec_context.gop_size = max(1, int(round(args.fps)))
        for i, rgb in _frames(clip, args):
            f = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb[: h & ~1, : w & ~1]), format="rgb24")
            f.pts = i
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)


def _send_mjpeg(conn: socket.socket, clip, args) -> None:
    import io

    from PIL import Image

    send = _chunked(conn, "multipart/x-mixed-replace; boundary=frame")
    for _, rgb in _frames(clip, args):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
        jpeg = buf.getvalue()
        send(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpeg)
             + jpeg + b"\r\n")
    send(b"")


def _chunked(conn: socket.socket, content_type: str):
    """Start an HTTP/1.1 chunked response; send(data) sends a chunk, send(b"") ends it.

    Without a length or the final empty chunk, FFmpeg's http reader takes the server closing
    the connection for a broken stream ("Stream ends prematurely"), so a server that means the
    stream is over says so this way."""
    conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n"
                 f"Cache-Control: no-cache\r\nConnection: close\r\n\r\n".encode())

    def send(data: bytes) -> None:
        conn.sendall(b"%x\r\n%s\r\n" % (len(data), data))

    return send


def _read_request(conn: socket.socket) -> None:
    conn.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data and len(data) < 65536:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    conn.settimeout(None)


def _serve_connection(conn: socket.socket, clip, args) -> None:
    try:
        with conn:
            if args.kind in ("http", "mjpeg"):
                _read_request(conn)
            if args.kind == "mjpeg":
                _send_mjpeg(conn, clip, args)
                return
            if args.kind == "http":
                send = _chunked(conn, "video/mp2t")
                _encode_ts(_SocketFile(send), clip, args)
                send(b"")
            else:
                _encode_ts(_SocketFile(conn.sendall), clip, args)
    except (OSError, ValueError):
        pass  # the reader went away (or its socket broke): that connection is over


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="serve a paced test stream on 127.0.0.1")
    ap.add_argument("--kind", choices=KINDS, required=True)
    ap.add_argument("--fps", type=float, default=24.0)
    ap.add_argument("--source", type=Path, required=True)
    ap.add_argument("--loop", action="store_true")
    ap.add_argument("--stamp", action="store_true")
    ap.add_argument("--stall-after", type=int, default=None)
    ap.add_argument("--port", type=int, default=0, help="udp: the port the reader binds")
    ap.add_argument("--gate", action="store_true", help="send frames as stdin says (see _ServerGate)")
    args = ap.parse_args(argv)
    global GATE
    GATE = _ServerGate(args.fps) if args.gate else None
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    clip = _load_clip(args.source)
    if not clip:
        print(f"no frames in {args.source}", file=sys.stderr)
        return 1
    if args.kind == "udp":
        print(f"READY {args.port} {len(clip)}", flush=True)
        _encode_ts(_SocketFile(_udp_sender(args.port)), clip, args)
        time.sleep(3600)  # the stream is over; stay up until stopped, like a quiet sender
        return 0
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    print(f"READY {srv.getsockname()[1]} {len(clip)}", flush=True)
    while True:
        conn, _ = srv.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_serve_connection, args=(conn, clip, args), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
