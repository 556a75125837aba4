"""Start a real `tritonserver` on a model repository: the one nvidia-pytriton's wheel ships
(Triton 2.51 with the python backend), or one named by FASTSAM2_TRITONSERVER.

What the wheel's server needs to run outside PyTriton (measured here):
- a backend folder holding libtriton_python.so and the stub built for the running Python
  (the wheel keeps one stub per Python version apart): made per server in a temporary folder;
- LD_LIBRARY_PATH with the interpreter's libpython folder (the stub otherwise links the
  system's libpython) and the wheel's nvidia_pytriton.libs;
- PATH starting with the interpreter's bin folder: the stub's embedded Python takes its prefix,
  and so its site-packages (a virtualenv's too), from the first `python3` on PATH;
- numpy < 2 in that environment: the stub is built against numpy 1.x, and under numpy 2 it hands
  the model tensors with wrong strides (a UINT8 "fail" arrives as "ffff"). `pip install
  fastsam2[serve]` resolves numpy<2 (nvidia-pytriton requires it); FASTSAM2_SERVE_PYTHON names
  another interpreter (e.g. a venv with numpy<2) whose environment the model runs in.
"""

from __future__ import annotations

import collections
import errno
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

from .protocol import MODEL, ServerError

ADMIN_HEADER = "fastsam2-admin"
RESTRICTED_HTTP = "inference,shared-memory,model-repository,trace,logging"
RESTRICTED_GRPC = "shared-memory,model-repository,trace,logging"
INSTALL_HINT = "install the server side: pip install 'fastsam2[serve]'"
EXIT_TIMEOUT_S = 10  # Triton waits this long for requests in flight when told to stop
STUB_GRACE_S = 2  # a stub left after its server exited gets this long to exit by itself (its health
# loop notices a dead server within ~0.3 s)


def _probe(python: str) -> dict:
    code = ("import json, sys, sysconfig\n"
            "try:\n import numpy; np_version = numpy.__version__\n"
            "except ImportError: np_version = None\n"
            "print(json.dumps({'libdir': sysconfig.get_config_var('LIBDIR'), "
            "'version': '%d.%d' % sys.version_info[:2], 'numpy': np_version}))")
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as e:
        raise ServerError(f"cannot run the model's Python {python!r}: {e}") from None


def _numpy_major(probe: dict) -> int | None:
    v = probe.get("numpy")
    return None if v is None else int(str(v).split(".")[0])


def serve_venvs() -> list:
    """Where a `.venv-serve` (scripts/install.sh's venv with numpy<2) may be: beside this
    checkout, then in the current folder."""
    found = []
    for root in (Path(__file__).resolve().parent.parent, Path.cwd()):
        py = root / ".venv-serve" / "bin" / "python"
        if py.is_file() and os.access(py, os.X_OK) and py not in found:
            found.append(py)
    return found


class Installation:
    """Where the server binary, its backends and libraries are, and the model's Python."""

    def __init__(self, python: str | None = None):
        self.python = python or os.environ.get("FASTSAM2_SERVE_PYTHON") or sys.executable
        self.chosen = bool(python or os.environ.get("FASTSAM2_SERVE_PYTHON"))
        own = os.environ.get("FASTSAM2_TRITONSERVER")
        if own:
            self.binary = Path(own)
            self.root = self.binary.parent.parent  # <root>/bin/tritonserver, <root>/backends
            self.libs = None
        else:
            spec = importlib.util.find_spec("pytriton")
            if spec is None or not spec.submodule_search_locations:
                raise ServerError(f"no Triton server found: {INSTALL_HINT} (or set FASTSAM2_TRITONSERVER)")
            pkg = Path(list(spec.submodule_search_locations)[0])
            self.root = pkg / "tritonserver"
            self.binary = self.root / "bin" / "tritonserver"
            self.libs = pkg.parent / "nvidia_pytriton.libs"
        if not self.binary.is_file():
            raise ServerError(f"{self.binary} is missing: {INSTALL_HINT}")
        self.probe = _probe(self.python)
        if not self.chosen and self.libs is not None and (_numpy_major(self.probe) or 0) >= 2:
            for venv in serve_venvs():  # the development install keeps numpy 2 here
                probe = _probe(str(venv))
                if _numpy_major(probe) == 1 and probe["version"] == self.probe["version"]:
                    self.python, self.probe = str(venv), probe
                    break

    def check(self) -> None:
        """Refuse an environment the python backend cannot run the tracker in."""
        v = self.probe["numpy"]
        if v is None:
            raise ServerError(f"the model's Python {self.python} has no numpy: {INSTALL_HINT}")
        if self.libs is not None and int(v.split(".")[0]) >= 2:
            raise ServerError(f"the model's Python {self.python} has numpy {v}, but the python backend "
                              f"in nvidia-pytriton's wheel is built against numpy 1.x (tensors arrive "
                              f"corrupted) and no .venv-serve with numpy<2 was found: set "
                              f"FASTSAM2_SERVE_PYTHON to a Python with numpy<2 and fastsam2[runtime] "
                              f"(bash scripts/install.sh makes .venv-serve), or install numpy<2 there "
                              f"({INSTALL_HINT} resolves it)")
        if self.libs is not None and not self.stub().is_file():
            raise ServerError(f"nvidia-pytriton ships no python backend stub for Python "
                              f"{self.probe['version']} ({self.stub().parent.parent} has "
                              f"{', '.join(sorted(p.name for p in self.stub().parent.parent.iterdir() if p.is_dir()))})")

    def stub(self) -> Path:
        return self.root / "python_backend_stubs" / self.probe["version"] / "triton_python_backend_stub"

    def backend_dir(self, into: Path) -> Path:
        """The backends folder: the wheel's python backend with the stub for this Python."""
        if self.libs is None:
            return self.root / "backends"
        py = into / "backends" / "python"
        py.mkdir(parents=True, exist_ok=True)
        src = self.root / "backends" / "python"
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            shutil.copy2(src / name, py / name)
        shutil.copy2(self.stub(), py / "triton_python_backend_stub")
        return into / "backends"

    def env(self) -> dict:
        env = dict(os.environ)
        libs = [self.probe["libdir"]] + ([str(self.libs)] if self.libs else [])
        if env.get("LD_LIBRARY_PATH"):
            libs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = ":".join(p for p in libs if p)
        env["PATH"] = str(Path(self.python).parent) + os.pathsep + env.get("PATH", "")
        return env


def _die_with_parent() -> None:
    """In the child: SIGTERM when the launcher dies (its own session keeps Ctrl-C away from it,
    so the launcher decides when it stops; this covers the launcher being killed)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _group_members(pgid: int) -> list:
    """Live (not zombie) processes of process group `pgid`."""
    pids = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                pids.append(proc.pid)
        except (psutil.Error, OSError):  # it exited while we looked
            continue
    return pids


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _kill_leftovers(pgid: int, grace: float = STUB_GRACE_S) -> list:
    """After tritonserver exited: SIGKILL what is left of its process group, i.e. python-backend
    stubs that did not exit with it; returns their pids. A stub notices a dead server and exits
    by itself, but one whose model was executing when the server was killed can hang in its own
    shutdown (seen here: 12 threads in futex waits, SIGTERM ignored, its memory held). The server
    ran in a session of its own (start_new_session), so its group holds only it and its stubs."""
    deadline = time.monotonic() + grace
    while (left := _group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


class TritonServer:
    """One tritonserver process on `repo`, bound to `address`. Use as a context manager or
    call start() / stop(); `log` receives the server's output lines (default: kept only)."""

    def __init__(self, repo, *, address: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 8001,
                 metrics_port: int = 8002, log=None, python: str | None = None,
                 install: Installation | None = None):
        self.repo = Path(repo).resolve()
        self.address = address
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.log = log
        self.install = install or Installation(python)
        self._key = secrets.token_hex(16)
        self.proc = None
        self._stubs: list = []  # the model processes running when the server became ready
        self.killed_stubs: list = []  # stubs left behind by a dead server, SIGKILLed by stop()
        self.tail = collections.deque(maxlen=400)
        self._tmp = None

    @property
    def local_host(self) -> str:
        return "127.0.0.1" if self.address in ("0.0.0.0", "") else ("::1" if self.address == "::" else self.address)

    @property
    def grpc_url(self) -> str:
        return f"{self.local_host}:{self.grpc_port}"

    def command(self, backend_dir) -> list:
        a = self.address
        return [str(self.install.binary), f"--model-repository={self.repo}", f"--backend-directory={backend_dir}",
                f"--http-address={a}", f"--grpc-address={a}", f"--metrics-address={a}",
                f"--http-port={self.http_port}", f"--grpc-port={self.grpc_port}",
                f"--metrics-port={self.metrics_port}", "--allow-metrics=true", "--allow-gpu-metrics=false",
                f"--exit-timeout-secs={EXIT_TIMEOUT_S}", "--strict-readiness=true",
                # clients infer over gRPC; Triton 2.51's HTTP front end allocates a declared input
                # size before checking it (a JSON request declaring [2**62] aborts the server), so
                # HTTP keeps health, metadata and statistics for balancers and the rest needs a
                # key only this launcher knows; neither protocol lets a client load models,
                # register shared memory, trace or log
                f"--http-restricted-api={RESTRICTED_HTTP}:{ADMIN_HEADER}={self._key}",
                f"--grpc-restricted-protocol={RESTRICTED_GRPC}:{ADMIN_HEADER}={self._key}"]

    def check_ports(self) -> None:
        """Each port must be free on the address now: otherwise another process would answer
        the readiness probe and the launcher would say "serving" for a server that is not ours."""
        for name, port in (("--http-port", self.http_port), ("--grpc-port", self.grpc_port),
                           ("--metrics-port", self.metrics_port)):
            family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as s:
                # as a server binds: a listener is refused, connections in TIME_WAIT are not
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((self.address, port))
                except OSError as e:
                    why = "is in use" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e.strerror})"
                    raise ServerError(f"{name} {port} on {self.address} {why}: stop what holds it or "
                                      f"choose another port") from None

    def stubs(self) -> list:
        """The live model processes (python-backend stubs) of this server."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        return [p for p in _group_members(self.proc.pid) if p != self.proc.pid]

    def check_health(self) -> None:
        """Raise ServerError when the node cannot serve: tritonserver exited, a model process
        that was running at start died (Triton does not restart it, and keeps answering
        /v2/health/ready with 200), or the tracker model is not ready."""
        if self.proc.poll() is not None:
            self._reader.join(timeout=5)
            raise ServerError(f"tritonserver stopped by itself (exit code {self.proc.returncode}): {self.last_error()}")
        dead = [p for p in self._stubs if not _alive(p)]
        if dead:
            raise ServerError(f"the tracker's model process (pid {dead[0]}) died ({self.last_error()}); "
                              f"every stream on it is lost, so the node stops rather than answer ready")
        url = f"http://{self.local_host}:{self.http_port}/v2/models/{MODEL}/ready"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                ok = r.status == 200
        except urllib.error.HTTPError:
            ok = False
        except OSError:  # busy, or a slow answer: the process checks above decide
            ok = True
        if not ok:
            raise ServerError(f"Triton no longer calls the {MODEL!r} model ready: {self.last_error()}")

    def serve_forever(self, period: float = 0.5) -> None:
        """Block while the node is healthy; raise ServerError when it is not."""
        while True:
            self.check_health()
            time.sleep(period)

    def start(self, timeout: float = 180.0) -> "TritonServer":
        self.install.check()
        self.check_ports()
        self._tmp = Path(tempfile.mkdtemp(prefix="fastsam2-triton-"))
        cmd = self.command(self.install.backend_dir(self._tmp))
        self.proc = subprocess.Popen(cmd, env=self.install.env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            self.wait_ready(timeout)
            self._stubs = self.stubs()
            if self.proc.poll() is not None:  # ready was answered by another process
                raise ServerError(f"tritonserver exited with code {self.proc.returncode}: {self.last_error()}")
        except BaseException:
            self.stop()
            raise
        return self

    def _read(self):
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.tail.append(line)
            if self.log is not None:
                self.log(line)

    def wait_ready(self, timeout: float) -> None:
        url = f"http://{self.local_host}:{self.http_port}/v2/health/ready"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._reader.join(timeout=5)
                raise ServerError(f"tritonserver exited with code {self.proc.returncode} before it was ready: "
                                  + self.last_error())
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.25)
        raise ServerError(f"tritonserver was not ready after {timeout:g} s: " + self.last_error())

    def last_error(self) -> str:
        lines = [ln for ln in self.tail if ln.startswith("E") or "error" in ln.lower()]
        return (lines[-1] if lines else (self.tail[-1] if self.tail else "no output")).strip()[:500]

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def stop(self, timeout: float = EXIT_TIMEOUT_S + 10) -> int | None:
        """SIGTERM (Triton unloads the models, waits for requests in flight), then SIGKILL."""
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(10)
            code = self.proc.returncode
            self.killed_stubs = _kill_leftovers(self.proc.pid)
            self._reader.join(timeout=5)
            # the tracker instances' session count (serve/sessions.py: Slots; named by our pid)
            shutil.rmtree(Path(tempfile.gettempdir()) / f"fastsam2-serve-{self.proc.pid}", ignore_errors=True)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        return code

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
