"""An RTSP server on 127.0.0.1 for tests: what an IP camera serves (H.264 over RTP, RTSP
control), GStreamer's rtsp-server run by the SYSTEM Python (python3-gi).

    from rtsp_server import serve_rtsp

    with serve_rtsp(frames=48, loop=True) as served:
        track(served.url, ...)           # rtsp://127.0.0.1:PORT/stream
        served.video.first_frame_points  # ground truth of the clip (SyntheticVideo)
        served.kill()                    # the camera goes away mid-stream (SIGKILL)

The test's own Python (the venv) renders the clip (fastsam2.calibration.synthetic.make_video)
and writes it as raw RGB frames; this file, run by /usr/bin/python3 (which has the GStreamer
bindings but none of the venv's packages, not even numpy), serves them:
appsrc -> videoconvert -> x264enc (zerolatency, a keyframe per second) -> rtph264pay. Every
client gets its own pipeline that starts at frame 0 with a keyframe, so a reader's frame index
equals the server's frame counter, as with tests/stream_server.py. Frames are paced at `fps`.

stamp=True writes the frame counter into the top rows (stream_server.stamp's layout, so
stream_server.read_stamp reads it back); stall_after=N sends N frames and then nothing, with
the session left open; loop=False ends the stream after one pass (end-of-stream: RTCP BYE).

System packages (Debian/Ubuntu): python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-rtsp
gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly (x264enc).
gstreamer_missing() says what is absent; the tests skip on it only outside CI.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

SYSTEM_PYTHON = os.environ.get("FASTSAM2_GST_PYTHON", "/usr/bin/python3")
START_TIMEOUT_S = 60.0  # generous: the test machine's 2 cores are shared with other work
STOP_TIMEOUT_S = 5.0
STAMP_BITS = 16  # as stream_server.stamp
STAMP_ROWS = 16
_PROBE = ("import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0'); "
          "from gi.repository import Gst, GstRtspServer; Gst.init(None); "
          "missing = [e for e in ('appsrc', 'videoconvert', 'x264enc', 'rtph264pay') "
          "if Gst.ElementFactory.find(e) is None]; print(' '.join(missing))")


def gstreamer_missing() -> str | None:
    """Why the RTSP server cannot run here (a line), or None when it can."""
    if not os.path.exists(SYSTEM_PYTHON):
        return f"no system Python at {SYSTEM_PYTHON}"
    try:
        res = subprocess.run([SYSTEM_PYTHON, "-c", _PROBE], capture_output=True, text=True,
                             timeout=START_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{SYSTEM_PYTHON} does not run: {e}"
    if res.returncode != 0:
        return f"GStreamer's RTSP server is not importable: {res.stderr.strip().splitlines()[-1:]}"
    if res.stdout.strip():
        return f"GStreamer elements missing: {res.stdout.strip()}"
    return None


# ----------------------------------------------------------------------------- the parent side


@dataclasses.dataclass
class ServedRtsp:
    url: str
    fps: float
    frames: int  # frames in one pass of the clip
    loop: bool
    video: object  # the SyntheticVideo served (ground truth)
    proc: subprocess.Popen

    def kill(self) -> None:
        """The camera goes away: the server dies at once (no TEARDOWN, no RTCP BYE)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT_S)

    def __str__(self) -> str:
        return self.url


@contextlib.contextmanager
def serve_rtsp(fps: float = 24.0, frames: int = 48, size: tuple[int, int] = (240, 320),
               loop: bool = False, stall_after: int | None = None, stamp: bool = False,
               seed: int = 0, objects: int = 1) -> Iterator[ServedRtsp]:
    """Serve a synthetic clip (size (H, W), even) over RTSP while the block runs."""
    import numpy as np

    from fastsam2.calibration.synthetic import make_video
    # the parent side only: the server side runs where the venv's packages are not
    from stream_server import stop_process, wait_ready

    with tempfile.TemporaryDirectory(prefix="rtsp_server_") as tmp:
        video = make_video(Path(tmp) / "clip", num_frames=frames, size=size, seed=seed,
                           objects=objects, fmt="png")
        raw = Path(tmp) / "clip.rgb"
        from PIL import Image

        with open(raw, "wb") as f:
            for p in sorted(Path(video.frames_dir_or_file).iterdir()):
                f.write(np.asarray(Image.open(p).convert("RGB"), dtype=np.uint8).tobytes())
        h, w = size
        cmd = [SYSTEM_PYTHON, str(Path(__file__).resolve()), "--raw", str(raw), "--width", str(w),
               "--height", str(h), "--fps", str(fps)]
        cmd += ["--loop"] if loop else []
        cmd += ["--stamp"] if stamp else []
        cmd += ["--stall-after", str(int(stall_after))] if stall_after is not None else []
        log_path = Path(tmp) / "server.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
        try:
            port, _ = wait_ready(proc, log_path, "RTSP server")
            yield ServedRtsp(f"rtsp://127.0.0.1:{port}/stream", float(fps), frames, loop, video, proc)
        finally:
            stop_process(proc)


# ----------------------------------------------------------------------------- the server side
# (runs under the system Python: standard library and gi only)


def _stamp(frame: bytearray, width: int, counter: int) -> None:
    block = width // STAMP_BITS
    for b in range(STAMP_BITS):
        value = b"\xff" if (counter >> (STAMP_BITS - 1 - b)) & 1 else b"\x00"
        for row in range(STAMP_ROWS):
            start = (row * width + b * block) * 3
            frame[start:start + block * 3] = value * (block * 3)


def _serve(args) -> int:
    import threading

    import gi

    gi.require_version("Gst", "1.0")
    gi.require_version("GstRtspServer", "1.0")
    from gi.repository import GLib, Gst, GstRtspServer

    Gst.init(None)
    size = args.width * args.height * 3
    data = Path(args.raw).read_bytes()
    clip = [data[i:i + size] for i in range(0, len(data) - size + 1, size)]
    fps_n = int(round(args.fps))
    # do-timestamp: each buffer carries the running time it was pushed at, as a camera's do
    launch = (f"( appsrc name=src is-live=true format=time do-timestamp=true "
              f"caps=video/x-raw,format=RGB,width={args.width},height={args.height},framerate={fps_n}/1 "
              f"! videoconvert ! video/x-raw,format=I420 "
              f"! x264enc tune=zerolatency speed-preset=ultrafast key-int-max={fps_n} "
              f"! rtph264pay name=pay0 pt=96 config-interval=1 )")

    def feed(appsrc, stop: threading.Event) -> None:
        """One client's frames, paced at fps from its first request for data."""
        start, i = time.monotonic(), 0
        while not stop.is_set():
            if args.stall_after is not None and i >= args.stall_after:
                stop.wait()  # quiet, with the session left open
                return
            if i >= len(clip) and not args.loop:
                appsrc.emit("end-of-stream")
                return
            delay = start + i / fps_n - time.monotonic()
            if delay > 0 and stop.wait(delay):
                return
            frame = bytearray(clip[i % len(clip)])
            if args.stamp:
                _stamp(frame, args.width, i)
            if appsrc.emit("push-buffer", Gst.Buffer.new_wrapped(bytes(frame))) != Gst.FlowReturn.OK:
                return  # the client went away
            i += 1

    def configure(_factory, media) -> None:
        appsrc = media.get_element().get_by_name_recurse_up("src")
        stop, started = threading.Event(), []
        media.connect("unprepared", lambda *_: stop.set())

        # From the first request for data (the DESCRIBE needs the encoder's first frame for
        # its SDP): the frames made before the client's PLAY reach it in one burst, then paced.
        def start(*_):
            if not started:
                started.append(threading.Thread(target=feed, args=(appsrc, stop), daemon=True))
                started[0].start()

        appsrc.connect("need-data", start)

    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service("0")  # a free port, reported below: no race for it
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(launch)
    factory.set_shared(False)  # each client its own pipeline, from frame 0
    factory.connect("media-configure", configure)
    server.get_mount_points().add_factory("/stream", factory)
    if server.attach(None) == 0:
        print("cannot attach the RTSP server", file=sys.stderr)
        return 1
    print(f"READY {server.get_bound_port()} {len(clip)}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    GLib.MainLoop().run()
    return 0


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="serve raw RGB frames over RTSP on 127.0.0.1")
    ap.add_argument("--raw", required=True)
    ap.add_argument("--width", type=int, required=True)
    ap.add_argument("--height", type=int, required=True)
    ap.add_argument("--fps", type=float, default=24.0)
    ap.add_argument("--loop", action="store_true")
    ap.add_argument("--stamp", action="store_true")
    ap.add_argument("--stall-after", type=int, default=None)
    return _serve(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
