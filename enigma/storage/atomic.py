"""Durable, atomic replacement of a whole directory (an exported model, a prepared dataset).

The new directory is built in a unique sibling, every file and the directory itself are fsynced,
and then it takes the old one's place. On Linux the two are exchanged with one
``renameat2(RENAME_EXCHANGE)``, so a complete directory exists under the name at every instant,
whatever kills the process; the old contents are removed afterwards. Where the exchange is not
available, the old directory is renamed aside first and removed only once the new one is in
place.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
from pathlib import Path

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


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


def staging_dir(out: Path, label: str = "staging") -> Path:
    """A fresh, unique sibling of ``out`` (same filesystem, so the swap is a rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.{label}-"))


def remove_leftovers(out: Path, label: str = "staging") -> None:
    """Staging directories of ``out`` left by killed processes (call while holding its lock)."""
    for stale in out.parent.glob(f".{out.name}.{label}-*"):
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
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(out.parent)
