"""Durable replacement of a whole directory (an exported model, a prepared dataset).

The new directory is built in a unique sibling, every file and the directory itself are fsynced,
and then it takes the old one's place:

- Where the file system can exchange two names (``renameat2(RENAME_EXCHANGE)``: ext4, xfs, btrfs,
  tmpfs), one call swaps them, so a complete directory exists under the name at every instant,
  whatever kills the process; the old contents are removed afterwards.
- Where it cannot (NFS, overlayfs, CIFS, FUSE refuse the exchange), the old directory is renamed
  aside to ``.NAME.old-PID``, then the new one into place. Between the two renames the name is
  missing for a moment. A process killed there leaves the previous complete copy aside, and the
  next writer of the directory (:func:`recover`, called under its lock before any clean-up) puts
  it back before removing leftovers, so a complete copy is never deleted.

Callers hold the directory's lock (:mod:`enigma.storage.locks`) around a replacement.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2

# Each file of an export, its size and SHA-256: what a node's mirror of a model at a URI keys
# and checks its copy by (:mod:`enigma.storage.mirror`).
CHECKSUMS = "checksums.json"


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every directory (bottom-up), then ``root``."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically; False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    renameat2.argtypes += [ctypes.c_uint]
    done = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return done == 0


def lock_path(out: Path) -> Path:
    """The lock file of the directory ``out``: beside it, so it survives ``out``'s replacement."""
    return out.parent / f".{out.name}.lock"


def model_lock(out: Path, what: str, wait_s: float = 0.0):
    """The lock every writer of the directory ``out`` holds (``wait_s``: how long to wait for a
    holder on this host to finish)."""
    from .locks import DirectoryLock

    return DirectoryLock(lock_path(out), what, target=out, wait_s=wait_s)


def staging_dir(out: Path, label: str = "staging") -> Path:
    """A fresh, unique sibling of ``out`` (same filesystem, so the swap is a rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.{label}-"))


def _siblings(out: Path, label: str, suffix: str) -> list[Path]:
    """``out``'s own ``.NAME.LABEL-SUFFIX`` siblings, ``out``'s name matched literally: a glob
    built from it would read ``m[0-9]`` as a pattern, and ``.best.old-*`` would also match what
    a replacement of ``best.old-2024`` set aside (``.best.old-2024.old-PID``)."""
    own = re.compile(rf"\.{re.escape(out.name)}\.{re.escape(label)}-{suffix}")
    if not out.parent.is_dir():
        return []
    return [p for p in out.parent.iterdir() if own.fullmatch(p.name)]


def _set_aside(out: Path) -> list[Path]:
    return sorted(_siblings(out, "old", r"\d+"), key=lambda p: p.stat().st_mtime)


def recover(out: Path) -> bool:
    """When ``out`` is missing but a previous complete copy was set aside (a replacement killed
    between its two renames), put the copy back; True when it did. Call under the lock."""
    aside = _set_aside(out)
    if out.exists() or not aside:
        return False
    os.replace(aside[-1], out)
    fsync_dir(out.parent)
    print(f"note: {out} was restored from the copy a killed replacement set aside", flush=True)
    return True


def readable(out: Path, wait_s: float = 60.0) -> None:
    """A reader's side of :func:`recover`: when ``out`` is missing and a complete copy was set
    aside (a replacement killed between its renames), put it back, under the directory's lock.
    Costs nothing when ``out`` is there."""
    if out.exists() or not _set_aside(out):
        return
    with model_lock(out, "a reader putting back a copy set aside", wait_s):
        recover(out)


def replace_with(out: Path, fill, what: str = "an export", wait_s: float | None = 0) -> None:
    """Build ``out`` anew: ``fill(staging)`` writes a unique staging directory, which then takes
    ``out``'s place whole (:func:`replace_dir`), under the directory's lock, waited for up to
    ``wait_s`` seconds (None: the caller holds it). Leftovers of killed replacements are dealt
    with first (:func:`remove_leftovers`); a failure removes its own staging directory."""
    import contextlib

    with model_lock(out, what, wait_s) if wait_s is not None else contextlib.nullcontext():
        remove_leftovers(out)
        staging = staging_dir(out)
        try:
            fill(staging)
            write_checksums(staging)  # what a node's mirror of the model keys and checks by
            replace_dir(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def remove_leftovers(out: Path, label: str = "staging") -> None:
    """What killed replacements of ``out`` left: first a complete copy set aside is put back
    (:func:`recover`), then staging directories and copies set aside are removed. Call under the
    lock of ``out``."""
    recover(out)
    # mkdtemp's suffix: eight of [a-z0-9_]
    for stale in [*_siblings(out, label, "[a-z0-9_]{8}"), *_set_aside(out)]:
        shutil.rmtree(stale, ignore_errors=True)


def replace_dir(staging: Path, out: Path) -> None:
    """Make the complete, fsynced ``staging`` the directory ``out``; ``staging`` is gone after."""
    fsync_tree(staging)
    if not out.exists():
        os.replace(staging, out)
    elif exchange(staging, out):
        shutil.rmtree(staging)  # now holds the old contents
    else:
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        fsync_dir(out.parent)  # the copy aside is durable before the name is reused
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(out.parent)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(directory: Path) -> None:
    """Record each file's size and SHA-256 in ``directory/checksums.json`` (an export's last
    step before it is put in place): what a mirror keys and checks its copy by."""
    files = sorted(f for f in directory.iterdir() if f.is_file() and f.name != CHECKSUMS)
    sums = {f.name: {"size": f.stat().st_size, "sha256": file_sha256(f)} for f in files}
    (directory / CHECKSUMS).write_text(json.dumps(sums, indent=1, sort_keys=True) + "\n")
