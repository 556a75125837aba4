"""What is live, and how FFmpeg should open it (fastsam2.runtime.live reads it).

live_target(path): a URL with a scheme (rtsp, rtsps, http, https, udp, tcp, rtp, rtmp, rtmps,
srt, ...: whatever this FFmpeg build reads; this PyAV wheel has no srt) is a stream; a V4L2
camera (/dev/videoN, any character device such as /dev/v4l/by-id/..., or a bare number N for
/dev/videoN as OpenCV users type it) is a camera; anything else (a file, a folder, file://) is
None. Credentials in a URL are hidden in everything shown (LiveTarget.display).

ffmpeg_options: RTSP is read over TCP (rtsp_transport=tcp): no packet loss and it passes NAT;
a camera also needs no UDP ports open. Cameras are asked for `fps` frames/s when it is given.
FFmpeg reads PROBE_SECONDS of a stream before the first frame is out.
"""

from __future__ import annotations

import os
import re
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from .errors import SourceError

PROBE_SECONDS = 0.5  # analyzeduration for streams: how much stream FFmpeg reads to learn its format
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


@dataclass(frozen=True)
class LiveTarget:
    kind: str  # "camera" | "stream"
    url: str  # what FFmpeg opens
    format: str | None  # the demuxer to force ("v4l2" for cameras); None: FFmpeg probes
    display: str  # for messages and results: the URL without credentials
    name: str  # short name for outputs

    @property
    def scheme(self) -> str:
        m = _URL.match(self.url)
        return m.group(1).lower() if m else ""


def _hide_credentials(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=f"***@{host}"))


def live_target(path) -> LiveTarget | None:
    """The camera or stream `path` names, or None for a file or folder (or a missing path)."""
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    text = str(path)
    m = _URL.match(text)
    if m:
        scheme = m.group(1).lower()
        if scheme == "file":
            return None  # open_frames reads file:// URLs as paths
        parts = urlsplit(text)
        stem = Path(parts.path).stem
        return LiveTarget("stream", text, None, _hide_credentials(text),
                          stem or parts.hostname or scheme)
    if text.isdigit() and not Path(text).exists():
        text = f"/dev/video{int(text)}"
    p = Path(text)
    try:
        is_char_device = stat.S_ISCHR(p.stat().st_mode)
    except OSError:
        is_char_device = False
    if is_char_device or text.startswith("/dev/video"):
        return LiveTarget("camera", text, "v4l2", text, p.name)
    return None


def ffmpeg_options(target: LiveTarget, fps: float | None, read_timeout: float) -> dict:
    us = str(int(read_timeout * 1e6))
    if target.kind == "camera":
        return {"framerate": f"{fps:g}"} if fps else {}
    opts = {"analyzeduration": str(int(PROBE_SECONDS * 1e6)), "rw_timeout": us}
    scheme = target.scheme
    if scheme in ("rtsp", "rtsps"):
        opts.update(rtsp_transport="tcp", timeout=us)
    elif scheme == "udp":
        # A slow moment must not end the stream: an overrun loses packets (decode errors,
        # skipped), it is not fatal.
        opts.update(overrun_nonfatal="1", timeout=us)
    return opts


def check_host(target: LiveTarget) -> None:
    """An unknown host name gives a clear line (FFmpeg, silenced, would only say EIO)."""
    host = urlsplit(target.url).hostname if target.kind == "stream" else None
    # Behind a proxy only the proxy may know the name; FFmpeg's http reader uses http_proxy.
    if not host or any(os.environ.get(k) for k in ("http_proxy", "HTTP_PROXY")):
        return
    try:
        socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError) as e:
        why = getattr(e, "strerror", None) or str(e)
        raise SourceError(f"cannot open stream {target.display}: unknown host {host} ({why})") from None
