"""The process behind tests/stream_server.py's serve_stream: it reads a clip and sends it on
127.0.0.1 as the kind asks (H.264 in MPEG-TS over HTTP, TCP or UDP; multipart JPEG over HTTP),
paced at fps or as the parent's gate says, and prints "READY PORT FRAMES" once it listens.
See stream_server.py for what each option means to a test.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from stream_server import KINDS, stamp  # this folder is on sys.path: the script's own

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
