"""The bundle's output folder: what an export may replace, the hidden temp folder it writes into
beside it, and the swap at the end.

`--force` replaces a fastsam2 bundle (a folder whose manifest.json is fastsam2's, holding no file
its seal does not list) or an empty folder, and nothing else: a user's files are never deleted.
The bundle is written into `.<out>.XXXX` beside `out` and moved into place at the end; any
exception, Ctrl-C and SIGTERM (raised as exceptions by the CLI edge) included, removes it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from pathlib import Path

from fastsam2.runtime.bundle_files import SEAL_KEY, sealed_names
from fastsam2.runtime.errors import BundleError, OutputError
from fastsam2.runtime.json_checks import parse_json
from fastsam2.runtime.manifest_schema import MAX_MANIFEST_BYTES
from fastsam2.runtime.outputs import ensure_writable_dir

MANIFEST = "manifest.json"
# the keys every manifest fastsam2-export wrote holds, whatever its version
_BUNDLE_KEYS = frozenset({"format", "fastsam2_version", "graphs"})
_HELD = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _absolute(out) -> Path:
    # lexical: "b/.." is the folder it names, and its name is never "" or ".."
    return Path(os.path.abspath(out))


def what_is_there(folder: Path) -> str:
    """"empty", "bundle", or why the existing folder is neither (for the refusal)."""
    try:
        with os.scandir(folder) as it:
            if next(it, None) is None:
                return "empty"
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    mpath = folder / MANIFEST
    if mpath.is_symlink() or not mpath.is_file():
        return "is not a fastsam2 bundle (no manifest.json)"
    try:
        with open(mpath, "rb") as f:
            manifest = parse_json(f.read(MAX_MANIFEST_BYTES + 1), str(mpath), MAX_MANIFEST_BYTES)
    except (OSError, BundleError):
        manifest = None
    if not isinstance(manifest, dict) or not _BUNDLE_KEYS <= manifest.keys():
        return "is not a fastsam2 bundle (its manifest.json is not fastsam2's)"
    seal = manifest.get(SEAL_KEY)
    listed = seal.get("files") if isinstance(seal, dict) else None
    if isinstance(listed, dict):  # older bundles have no seal: the manifest alone says whose it is
        extra = [n for n in sealed_names(folder) if n not in listed]
        if extra:
            return f"holds {extra[0]}, which is not a file of its bundle"
    return "bundle"


def refusal(out, force: bool) -> str | None:
    """Why the export may not write `out` (None: it may): something that is not a folder, the
    current folder, an existing folder without --force, or one that is neither a bundle nor empty."""
    path = _absolute(out)
    if path.is_symlink():
        return f"output {out} is a symbolic link; pass the folder it points to"
    if not path.exists():
        return None
    if not path.is_dir():
        return f"output {out} exists and is not a folder"
    cwd = Path.cwd().resolve()
    if path.resolve() == cwd or path.resolve() in cwd.parents:
        return f"output folder {out} holds the current folder; pass a new folder, e.g. --out bundle"
    what = what_is_there(path)
    if what in ("bundle", "empty"):
        return None if force else f"output folder {out} exists; pass --force to replace it"
    return (f"output folder {out} exists and {what}: --force replaces only a fastsam2 bundle or an "
            "empty folder; pass another --out")


def prepare_out_dir(out, force: bool) -> None:
    """Refuse what the export may not write (see `refusal`) and an unwritable parent: before any
    model is loaded."""
    why = refusal(out, force)
    if why:
        raise OutputError(why)
    ensure_writable_dir(_absolute(out).parent)


@contextlib.contextmanager
def _signals_held():
    """Ctrl-C and SIGTERM wait until the block is over: a folder made is then a folder its
    cleanup knows, and a swap is never left half done."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def staged_bundle(out, force: bool):
    """The temp folder to write the bundle into; when the block ends normally it replaces `out`
    (checked again: only a bundle or an empty folder is replaced), on any exception it is removed."""
    path = _absolute(out)
    tmp = None
    try:
        with _signals_held():
            try:
                tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
                tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; a bundle is shared like any folder
            except OSError as e:
                raise OutputError(f"cannot write to {path.parent}: {e.strerror}") from None
        yield tmp
        swap_in(tmp, out, force)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_in(tmp: Path, out, force: bool) -> None:
    """Move the finished bundle `tmp` to `out`. What is at `out` by now is checked again (minutes
    have passed): a bundle or an empty folder is moved aside, replaced, then removed; anything
    else is refused and kept."""
    why = refusal(out, force)
    if why:
        raise OutputError(why)
    path = _absolute(out)
    with _signals_held():
        aside = None
        try:
            if path.exists():
                aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
                os.replace(path, aside)  # onto the empty folder mkdtemp made
            os.replace(tmp, path)
        except OSError as e:
            if aside is not None:
                with contextlib.suppress(OSError):
                    if path.exists():
                        aside.rmdir()  # the move aside failed: its empty folder goes
                    else:
                        os.replace(aside, path)  # the earlier bundle goes back where it was
            raise OutputError(f"cannot move the bundle into {out}: {e.strerror}") from None
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
