# Hand-written lock, not filelock: 3.x (JetPack 6's Python 3.10) truncates the lock file on every try (the holder's pid named below is lost), 4.x leaves .fastsam2.lock in the output folder (4.3.2: +17 ms import, 1.9 MB, ~20 lines saved)
"""One output folder = one run.

RunFolder holds a lock on the folder for the run's duration (a second run on it is refused),
refuses an earlier run's outputs without force and removes them as a unit with it (only the
names fastsam2 writes, never other files), removes the hidden temp files a killed run left,
and creates sub-folders (masks/) on their first file, so an early error leaves no empty one.

With `record=True` (fastsam2-run) a name is not enough: the folder keeps a hidden record
(RECORD_NAME) of the files the last run wrote, with their size and modification time, and only
those count as an earlier run's outputs. A file of an output's name the record does not hold
(the user's own results.json, or ours changed since) is refused, even with force, naming it.

A run stopped by a signal cleans up like one that failed: see fastsam2.runtime.cli_edge.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import tempfile
from pathlib import Path

from fastsam2.runtime.errors import OutputError
from fastsam2.runtime.resume import CHECKPOINT_NAME, file_stamp, owned_files

try:
    import fcntl
except ImportError:  # not POSIX: no lock, the rest still holds
    fcntl = None

LOCK_NAME = ".fastsam2.lock"
RECORD_NAME = ".fastsam2-run.json"  # the files the last run wrote: {"files": {relpath: [size, mtime_ns]}}
RECORD_SCHEMA = 1
MAX_RECORD = 256 << 20  # bytes read of a record (~45 per file: millions of masks); larger is not ours
# what fastsam2-run writes: {name: None for a file, or the pattern of the files in a folder}
RUN_OUTPUTS = {"masks": r"\d+\.png", "overlay.mp4": None, "results.json": None, CHECKPOINT_NAME: None}


class RunFolder:
    """`with RunFolder(out, force=...) as run:` ... `run.mask_path(i)`, `run.file("results.json")`."""

    def __init__(self, path, force: bool = False, outputs: dict = RUN_OUTPUTS, record: bool = False,
                 resume: bool = False):
        if isinstance(path, str) and not path.strip():
            raise OutputError("the output folder name is empty")
        self.path = Path(path)
        self.force = force
        self.outputs = dict(outputs)
        self.record = record  # ownership by the folder's record of the last run, not by name
        self.resume = resume  # the earlier run's outputs stay: runtime/resume.py goes on with them
        self.replaced: list = []  # the earlier run's outputs that force removed
        self._fd = None
        self._created = False
        self._made = set()  # sub-folders this run created

    # -- the run's names --------------------------------------------------------------------
    def file(self, name: str) -> Path:
        return self.path / name

    def subfolder(self, name: str) -> Path:
        """path/name, created on the first call (so an early error leaves no empty folder)."""
        d = self.path / name
        if name not in self._made:
            try:
                d.mkdir(exist_ok=True)
            except OSError as e:
                raise OutputError(f"cannot create {d}: {e.strerror or e}") from None
            self._made.add(name)
        return d

    def mask_path(self, i: int) -> Path:
        return self.subfolder("masks") / f"{i:05d}.png"

    # -- lifetime ---------------------------------------------------------------------------
    def __enter__(self):
        if self.path.exists() and not self.path.is_dir():
            raise OutputError(f"{self.path} exists and is not a folder")
        self._created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create {self.path}: {e.strerror or e}") from None
        if not os.access(self.path, os.W_OK):
            raise OutputError(f"cannot write to {self.path}")
        self._lock()
        try:
            self._remove_temps()
            if self.record:
                self._check_recorded()
            earlier = self.earlier_outputs()
            if earlier and not self.force and not self.resume:
                listed = ", ".join(n + ("/" if self.outputs[n] else "") for n in earlier)
                also = " (or --resume to go on from its checkpoint)" if CHECKPOINT_NAME in earlier else ""
                raise OutputError(f"{self.path} holds an earlier run's outputs ({listed}); pass --force to "
                                  f"replace them{also}, or choose another output folder")
            if not self.resume:
                for name in earlier:
                    self._remove_output(name)
                if self.record:
                    with contextlib.suppress(FileNotFoundError):
                        (self.path / RECORD_NAME).unlink()  # its files are gone
                self.replaced = earlier
        except BaseException:
            self._unlock()
            self._remove_if_unused()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self.record:  # however the run ended, what it wrote is its own
                try:
                    self._write_record()
                except OutputError:
                    if exc_type is None:
                        raise  # else the run's own error says more; unrecorded files are only refused later
        finally:
            self._unlock()
            if exc_type is not None:
                self._remove_if_unused()

    # -- what is ours -----------------------------------------------------------------------
    def _ours(self, name: str, pattern) -> bool:
        return bool(re.fullmatch(pattern, name)) if pattern else False

    def _is_temp(self, entry: str, names) -> bool:
        # outputs.py's temp names: ".<final name>.<mkstemp letters><suffix>"
        return entry.startswith(".") and any(entry.startswith(f".{n}.") for n in names)

    def earlier_outputs(self) -> list:
        """The outputs (names) of which a file is here."""
        return list(dict.fromkeys(f.split("/", 1)[0] for f in self.present()))

    # -- the record of what the last run wrote ---------------------------------------------------
    def present(self) -> list:
        """The files here with an output's name, as paths relative to the folder."""
        found = []
        for name, pattern in self.outputs.items():
            p = self.path / name
            if pattern is None:
                if p.is_file() or p.is_symlink():
                    found.append(name)
            elif p.is_dir() and not p.is_symlink():
                found += [f"{name}/{e}" for e in sorted(os.listdir(p))
                          if self._ours(e, pattern) and not (p / e).is_dir()]
        return found

    def _check_recorded(self) -> None:
        """Refuse (force or not) a file of an output's name that the last run did not write."""
        recorded = self._read_record()
        if CHECKPOINT_NAME in self.outputs:  # a run killed before its record: its checkpoint vouches
            recorded.update(owned_files(self.path))
        foreign, changed = [], []
        for rel in self.present():
            if rel not in recorded:
                foreign.append(rel)
            elif recorded[rel] != file_stamp(self.path / rel):
                changed.append(rel)
        bad = foreign or changed
        if bad:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            why = (f"was not written by fastsam2 (the folder's record of its last run, {RECORD_NAME}, does not "
                   "list it)" if foreign else "has changed since fastsam2 wrote it")
            raise OutputError(f"{self.path / bad[0]}{more} {why}; fastsam2 replaces only its own outputs: move "
                              "it, or choose another output folder")

    def _read_record(self) -> dict:
        """{relpath: [size, mtime_ns]} of the last run; {} where there is no readable record."""
        p = self.path / RECORD_NAME
        try:
            if not stat.S_ISREG(os.lstat(p).st_mode):
                return {}  # a FIFO would block the read, a link points elsewhere: not ours
            with open(p, "rb") as f:
                data = f.read(MAX_RECORD + 1)
            rec = json.loads(data) if len(data) <= MAX_RECORD else None
        except (OSError, ValueError, RecursionError):
            return {}
        files = rec.get("files") if isinstance(rec, dict) and rec.get("schema") == RECORD_SCHEMA else None
        if not isinstance(files, dict):
            return {}
        return {k: v for k, v in files.items()
                if isinstance(v, list) and len(v) == 2 and all(type(x) is int for x in v)}

    def _write_record(self) -> None:
        """Every file of an output's name is this run's (the others were refused or removed at
        the start, under the lock): record them, atomically; no file, no record."""
        files = {rel: st for rel in self.present() if (st := file_stamp(self.path / rel)) is not None}
        p = self.path / RECORD_NAME
        if not files:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
            return
        text = json.dumps({"schema": RECORD_SCHEMA, "written_by": "fastsam2", "files": files},
                          separators=(",", ":"))
        # written here, not with outputs.atomic_write_bytes: outputs imports this module
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{RECORD_NAME}.", suffix=".tmp", dir=self.path)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, p)
        except OSError as e:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise OutputError(f"cannot write {p}: {e.strerror or e}") from None

    def _remove_output(self, name: str) -> None:
        p, pattern = self.path / name, self.outputs[name]
        try:
            if pattern is None:
                p.unlink()
                return
            for e in os.listdir(p):
                if self._ours(e, pattern) and not (p / e).is_dir():
                    (p / e).unlink()
            with contextlib.suppress(OSError):
                p.rmdir()  # only when nothing of the user's is left in it
        except FileNotFoundError:
            pass
        except OSError as e:
            raise OutputError(f"cannot remove the earlier {p}: {e.strerror or e}") from None

    def _remove_temps(self) -> None:
        """Hidden temp files of a run that was killed (SIGKILL, power loss): never outputs,
        and nobody else writes them while we hold the lock."""
        folders = [(self.path, [n for n, pat in self.outputs.items() if pat is None]
                    + ([RECORD_NAME] if self.record else []))]
        for name, pattern in self.outputs.items():
            d = self.path / name
            if pattern is not None and d.is_dir() and not d.is_symlink():
                folders.append((d, None))
        for d, names in folders:
            for e in os.listdir(d):
                if names is not None:
                    ours = self._is_temp(e, names)
                else:  # inside an output folder: ".<file the pattern matches>.<letters><suffix>"
                    pattern = self.outputs[d.name]
                    ours = e.startswith(".") and any(self._ours(e[1:i], pattern)
                                                     for i in range(2, len(e)) if e[i] == ".")
                if ours and (d / e).is_file():
                    with contextlib.suppress(FileNotFoundError):
                        (d / e).unlink()

    def _remove_if_unused(self) -> None:
        for name in sorted(self._made):
            with contextlib.suppress(OSError):
                (self.path / name).rmdir()  # only if empty: finished masks stay
        if self._created:
            with contextlib.suppress(OSError):
                self.path.rmdir()

    # -- the lock -----------------------------------------------------------------------------
    def _lock(self) -> None:
        if fcntl is None:
            return
        lock = self.path / LOCK_NAME
        for _ in range(20):
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            except OSError as e:
                raise OutputError(f"cannot lock {self.path}: {e.strerror or e}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode("ascii", "replace").strip()
                os.close(fd)
                who = f" (pid {holder})" if holder.isdigit() else ""
                raise OutputError(f"{self.path} is in use by another fastsam2 run{who}; wait for it to "
                                  "finish or choose another output folder") from None
            except OSError:
                os.close(fd)  # a filesystem without locks (some network mounts): run unlocked
                with contextlib.suppress(OSError):
                    lock.unlink()
                return
            # a run that finishes unlinks the lock file: make sure ours is still the named one
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(lock))
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self._fd = fd
                return
            os.close(fd)
        raise OutputError(f"cannot lock {self.path}: the lock file keeps changing")

    def _unlock(self) -> None:
        if self._fd is None:
            return
        # unlink before close: whoever waits re-checks that its lock is on the named file
        with contextlib.suppress(OSError):
            os.unlink(self.path / LOCK_NAME)
        os.close(self._fd)
        self._fd = None
