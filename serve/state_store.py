"""Where a served stream's memory lives between frames, so that any node can take a stream over.

A store holds, per stream, one base snapshot and the chain of per-frame increments written after
it (`Session.snapshot()` / the session's increments: opaque bytes here). After each frame the
tracker model appends that frame's increment; every `rebase_every` increments it writes a new
base instead, which drops the chain. A node asked for a stream it does not hold loads the base
and the chain and restores the session from them. Entries expire after the idle timeout.

    redis://HOST:PORT/DB    a real Redis server: keys fastsam2:<stream>:base / :chain (a list),
                            written in one MULTI/EXEC transaction with their expiry
    file:///DIR             a shared volume: DIR/<stream>/base and numbered increment files,
                            each written to a temp name and renamed (readers never see half)

A stream name is the client's stream key (its Triton correlation id); it is hashed into file
and key names, so no client string reaches a path or a key pattern as such.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

from fastsam2.runtime.errors import InputError

STORE_ENV = "FASTSAM2_STATE_STORE"  # how fastsam2-serve hands the URL to the tracker model
MAX_ENTRY_BYTES = 256 << 20  # one base or increment; a 1024-px keep-1.0 bank is ~10 MB
_ENTRY = re.compile(r"^(?:(?P<base>base)\.(?P<gen>\d{12})|(?P<igen>\d{12})\.(?P<n>\d{12})\.inc)$")


def _gen(m) -> int:
    return int(m.group("gen") or m.group("igen"))


def stream_key(stream) -> str:
    """A fixed-length name for a stream id (int or str): safe as a file name and a Redis key."""
    return hashlib.sha256(str(stream).encode()).hexdigest()[:32]


class StateStore:
    """put_base / append / load / drop, for one kind of storage."""

    url = ""

    def put_base(self, stream, data: bytes) -> None:
        raise NotImplementedError

    def append(self, stream, data: bytes) -> int:
        """Adds one increment after the current base; returns the chain's length."""
        raise NotImplementedError

    def load(self, stream) -> tuple | None:
        """(base, [increments in order]) or None when the store holds nothing for the stream."""
        raise NotImplementedError

    def drop(self, stream) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _check_size(data: bytes) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError("state entries are bytes")
    if len(data) > MAX_ENTRY_BYTES:
        raise InputError(f"a state entry of {len(data)} bytes is over the store's {MAX_ENTRY_BYTES} bytes")
    return bytes(data)


class RedisStore(StateStore):
    def __init__(self, url: str, ttl: float, client=None):
        import redis  # the [serve] extra; imported here so the runtime never needs it

        self.url, self.ttl = url, max(1, int(round(ttl)))
        self.r = client or redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        self.r.ping()  # fail at start, with the URL, not at the first frame

    def _keys(self, stream) -> tuple:
        k = stream_key(stream)
        return f"fastsam2:{k}:base", f"fastsam2:{k}:chain"

    def put_base(self, stream, data: bytes) -> None:
        base, chain = self._keys(stream)
        with self.r.pipeline(transaction=True) as p:
            p.set(base, _check_size(data), ex=self.ttl)
            p.delete(chain)
            p.execute()

    def append(self, stream, data: bytes) -> int:
        base, chain = self._keys(stream)
        with self.r.pipeline(transaction=True) as p:
            p.rpush(chain, _check_size(data))
            p.expire(chain, self.ttl)
            p.expire(base, self.ttl)
            n, _, _ = p.execute()
        return int(n)

    def load(self, stream):
        base, chain = self._keys(stream)
        with self.r.pipeline(transaction=True) as p:
            p.get(base)
            p.lrange(chain, 0, -1)
            b, c = p.execute()
        return None if b is None else (bytes(b), [bytes(x) for x in c])

    def drop(self, stream) -> None:
        self.r.delete(*self._keys(stream))

    def close(self) -> None:
        self.r.close()


class FileStore(StateStore):
    """One folder per stream: base.<gen> and <gen>.<n>.inc files. A new base takes the next
    generation and only then are the older generations removed, so a reader always finds one
    whole base with the increments written after it (it takes the newest generation)."""

    def __init__(self, url: str, ttl: float, root: Path | None = None):
        self.url, self.ttl = url, float(ttl)
        self.root = Path(root if root is not None else unquote(urlparse(url).path))
        if not self.root.is_dir():
            raise InputError(f"state store {url}: {self.root} is not a folder")

    def _dir(self, stream) -> Path:
        return self.root / stream_key(stream)

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @staticmethod
    def _entries(d: Path) -> tuple:
        """(newest generation or None, {gen: [increment paths in order]})."""
        gens, chains = [], {}
        for p in d.iterdir():
            m = _ENTRY.match(p.name)
            if m and m.group("base"):
                gens.append(_gen(m))
            elif m:
                chains.setdefault(_gen(m), []).append(p)
        for c in chains.values():
            c.sort()
        return (max(gens) if gens else None), chains

    def put_base(self, stream, data: bytes) -> None:
        d = self._dir(stream)
        d.mkdir(exist_ok=True)
        gen, chains = self._entries(d)
        new = 0 if gen is None else gen + 1
        self._write(d / f"base.{new:012d}", _check_size(data))
        for p in d.iterdir():  # the older generations, now that the new base is whole
            m = _ENTRY.match(p.name)
            if m and _gen(m) < new:
                p.unlink(missing_ok=True)
        self._expire()

    def append(self, stream, data: bytes) -> int:
        d = self._dir(stream)
        gen, chains = self._entries(d) if d.is_dir() else (None, {})
        if gen is None:
            raise InputError("an increment needs a base snapshot first")
        chain = chains.get(gen, [])
        n = int(_ENTRY.match(chain[-1].name).group("n")) + 1 if chain else 0
        self._write(d / f"{gen:012d}.{n:012d}.inc", _check_size(data))
        os.utime(d)
        return len(chain) + 1

    def load(self, stream):
        d = self._dir(stream)
        try:
            if time.time() - d.stat().st_mtime > self.ttl:
                return None
            gen, chains = self._entries(d)
            if gen is None:
                return None
            base = (d / f"base.{gen:012d}").read_bytes()
            return base, [p.read_bytes() for p in chains.get(gen, [])]
        except FileNotFoundError:  # removed meanwhile (expired, dropped, or a newer base)
            return None

    def drop(self, stream) -> None:
        shutil.rmtree(self._dir(stream), ignore_errors=True)

    def _expire(self) -> None:
        """Streams idle past the TTL are removed (Redis expires keys itself)."""
        now = time.time()
        for d in self.root.iterdir():
            if d.is_dir() and re.fullmatch(r"[0-9a-f]{32}", d.name):
                try:
                    if now - d.stat().st_mtime > self.ttl:
                        shutil.rmtree(d, ignore_errors=True)
                except FileNotFoundError:
                    pass


def open_store(url: str, ttl: float) -> StateStore:
    """`redis://HOST:PORT/DB` or `file:///DIR`; InputError for anything else."""
    scheme = urlparse(url or "").scheme
    if scheme in ("redis", "rediss", "unix"):
        try:
            return RedisStore(url, ttl)
        except ImportError:
            raise InputError('--state-store redis:// needs the redis client: pip install "fastsam2[serve]"') from None
        except InputError:
            raise
        except Exception as e:  # redis.ConnectionError and friends: one line with the URL
            raise InputError(f"state store {url} does not answer: {e}") from None
    if scheme == "file":
        return FileStore(url, ttl)
    raise InputError(f"--state-store must be redis://HOST:PORT/DB or file:///DIR, got {url!r}")
