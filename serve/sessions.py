"""The tracker model's sessions: {correlation id: Session}, the --max-sessions limit shared by
all instances of the model, and the idle timeout that frees a stream that went away.

The table decides when a stream is idle, not Triton: Triton's sequence batcher counts a sequence
idle from its last request's arrival, so a frame queued behind other streams' frames counts
(measured: two streams on one busy instance, frames of ~3 s, a 3 s timeout freed a live one; a
slow client's 12 s frame dropped the others). Here idle time is counted only while the instance
is not executing, so waiting behind someone else's frame never counts; the repository gives
Triton a timeout far above ours as a backstop, and a session freed here is handed to `on_free`
(the tracker model then ends the Triton sequence itself, freeing its slot). Each session has a
token its opener got: later requests must carry it, and a START on a live id is refused.

The limit is per server, while each model instance is its own process: the instances count
sessions in one folder (a file per live session, created under a file lock), so N instances never
hold more than --max-sessions together.

Plain Python (no Triton import): the unit tests drive it directly.
"""

from __future__ import annotations

import contextlib
import ctypes
import hmac
import os
import secrets
import threading
import time
from pathlib import Path

from filelock import FileLock

from fastsam2.runtime.errors import InputError

from .protocol import ServerError, SessionLimitError


def _malloc_trim() -> None:
    """Hand freed heap pages back to the OS (glibc), so the server's RSS shows a freed bank."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Slots:
    """Live sessions of every instance of one server, counted in a shared folder."""

    def __init__(self, folder, instance: str, limit: int | None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.instance = instance
        self.limit = limit
        # one lock for every instance's process (an flock: each waits for the one counting)
        self._lock = FileLock(self.folder / ".lock", mode=0o600)
        # a restarted instance (Triton restarts a crashed stub) starts with none of its own
        for f in self.folder.glob(f"{instance}.*"):
            f.unlink(missing_ok=True)

    def acquire(self, corrid) -> None:
        with self._lock:
            live = [f for f in os.listdir(self.folder) if not f.startswith(".")]
            if self.limit is not None and len(live) >= self.limit:
                raise SessionLimitError(f"the server holds {len(live)} sessions, its --max-sessions "
                                        f"limit; try again when a stream ends")
            (self.folder / f"{self.instance}.{corrid}").touch()

    def release(self, corrid) -> None:
        (self.folder / f"{self.instance}.{corrid}").unlink(missing_ok=True)

    def count(self) -> int:
        return sum(1 for f in os.listdir(self.folder) if not f.startswith("."))


def backstop_s(idle_timeout: float) -> float:
    """Wall-clock seconds after which a stream is freed even on an instance that never stops
    executing (the idle clock stands still then); Triton's own sequence timeout is the same."""
    return max(10 * idle_timeout, idle_timeout + 300)


class SessionTable:
    """Sessions of one model instance, by correlation id. Every method holds `lock`."""

    def __init__(self, opener, slots: Slots, idle_timeout: float, clock=time.monotonic, on_free=None):
        self.opener = opener  # options dict -> Session
        self.on_free = on_free  # corrid -> None: a session freed for idleness (end Triton's sequence too)
        self.tokens: dict = {}  # corrid -> the token its opener got
        self.slots = slots
        self.idle_timeout = float(idle_timeout)
        self.clock = clock
        self.lock = threading.RLock()
        self.sessions: dict = {}
        self.last_seen: dict = {}  # on the idle clock
        self.last_wall: dict = {}  # on the clock itself
        self.freed_idle = 0
        self._busy_total = 0.0
        self._busy_since = None

    def idle_clock(self) -> float:
        """Seconds elapsed while the instance was not executing requests."""
        now = self.clock()
        busy = self._busy_total + (now - self._busy_since if self._busy_since is not None else 0.0)
        return now - busy

    @contextlib.contextmanager
    def busy(self):
        """Around an execute() call: its time does not count as anyone's idle time."""
        with self.lock:
            self._busy_since = self.clock()
            try:
                yield
            finally:
                self._busy_total += self.clock() - self._busy_since
                self._busy_since = None

    def open(self, corrid, options: dict) -> tuple:
        """A new session for `corrid` -> (session, token); every later request of the stream
        must carry the token, so a second client on the same id cannot read or end it."""
        with self.lock:
            if corrid in self.sessions:
                e = InputError(f"stream {corrid} is live on this server: a START on it is refused (its "
                               f"opener holds it until END or the idle timeout); open another id")
                e.live = True
                raise e
            self.slots.acquire(corrid)
            try:
                session = self.opener(options)
            except BaseException:
                self.slots.release(corrid)
                raise
            self.sessions[corrid] = session
            self.tokens[corrid] = token = secrets.token_hex(16)
            self.last_seen[corrid], self.last_wall[corrid] = self.idle_clock(), self.clock()
            return session, token

    def adopt(self, corrid, session, token: str) -> None:
        """A session restored from the state store, under the token its opener holds."""
        with self.lock:
            if corrid in self.sessions:
                e = InputError(f"stream {corrid} is live on this server: a START on it is refused")
                e.live = True
                raise e
            self.slots.acquire(corrid)
            self.sessions[corrid], self.tokens[corrid] = session, token
            self.last_seen[corrid], self.last_wall[corrid] = self.idle_clock(), self.clock()

    def get(self, corrid, token):
        with self.lock:
            session = self.sessions.get(corrid)
            if session is None:
                raise ServerError(f"stream {corrid} has no session on this server: it was idle longer "
                                  f"than the server's idle timeout ({self.idle_timeout:g} s) or the "
                                  f"server restarted; start the stream again")
            if not self._owner(corrid, token):
                raise InputError(f"stream {corrid}: the request's token is not its opener's (each "
                                 f"stream is bound to the client that opened it)")
            self.last_seen[corrid], self.last_wall[corrid] = self.idle_clock(), self.clock()
            return session

    def _owner(self, corrid, token) -> bool:
        held = self.tokens.get(corrid)
        return isinstance(token, str) and held is not None and hmac.compare_digest(held, token)

    def close(self, corrid, token=None) -> bool:
        """Free `corrid`'s session; with a token, only if it is the opener's."""
        with self.lock:
            if token is not None and not self._owner(corrid, token):
                return False
            session = self.sessions.pop(corrid, None)
            self.last_seen.pop(corrid, None)
            self.last_wall.pop(corrid, None)
            self.tokens.pop(corrid, None)
            self.slots.release(corrid)
            if session is None:
                return False
            session.close()
        _malloc_trim()
        return True

    def reap(self) -> int:
        """Free the sessions idle longer than the timeout; returns how many."""
        with self.lock:
            now = self.idle_clock()
            wall, backstop = self.clock(), backstop_s(self.idle_timeout)
            idle = [c for c, t in self.last_seen.items()
                    if now - t > self.idle_timeout or wall - self.last_wall[c] > backstop]
            for c in idle:
                self.close(c)
                if self.on_free is not None:
                    self.on_free(c)
            self.freed_idle += len(idle)
        return len(idle)

    def close_all(self) -> None:
        with self.lock:
            for c in list(self.sessions):
                self.close(c)

    def memory_bytes(self) -> int:
        with self.lock:
            return sum(s.memory_bytes() for s in self.sessions.values())

    def __len__(self) -> int:
        return len(self.sessions)
