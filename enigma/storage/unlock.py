"""``enigma unlock RUN``: remove the lock of a run whose holder the operator knows is gone.

``RUN`` is an output directory (its ``.lock``), a lock file, or a storage URI (its ``.lock``
object). The lock's lease is watched for one term first: a lock its holder keeps renewing (or, on
this host, whose holder's kernel lock is held) is refused, naming the holder. A lapsed lease
would be taken over by the next run anyway; this is for the operator who wants it gone now.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import os
from pathlib import Path

from ..errors import InputError
from .locks import _parse, _term_of, alive_here, describe, watch_lease


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "target", metavar="RUN", help="an output directory, a lock file, or a storage URI"
    )


def unlock_local(path: Path) -> tuple[dict | None, bool]:
    """Remove the lock file ``path`` unless a live holder has it; returns its record, and
    whether its holder released it meanwhile."""
    if not path.is_file():
        raise InputError(f"{path} does not exist: nothing to unlock")
    if not path.name.endswith(".lock"):
        raise InputError(
            f"{path} is not a lock (`.lock` in an output directory, or "
            "`.NAME.lock` beside a model); name the directory or its lock"
        )
    fd = os.open(path, os.O_RDWR)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                raise
            record = _parse(os.pread(fd, 1 << 16, 0).rstrip(b" "))
            raise InputError(f"{path} is held by {describe(record)}, alive on this host; stop "
                             "it rather than unlock it") from None  # fmt: skip

        def read():
            try:
                return _parse(path.read_bytes().rstrip(b" "))
            except FileNotFoundError:
                return None

        record = read()
        _refuse_other_files(record, path.read_bytes(), str(path))
        released = _refuse_if_renewed(read, record, str(path))
        if not released:
            path.unlink(missing_ok=True)
        return record, released
    finally:
        os.close(fd)


def unlock_object(uri: str, shown: str) -> tuple[dict | None, bool]:
    """Delete the lock object ``uri`` unless its lease is being renewed (a delete conditional on
    the version watched); returns its record, and whether its holder released it meanwhile."""
    from .object_lock import store_errors
    from .objects import Conflict, conditional_object

    with store_errors(shown):
        found = conditional_object(uri)
        data, version = found.read()
        if version is None:
            raise InputError(f"{uri.split('?', 1)[0]} does not exist: nothing to unlock")
        record = _parse(data)
        _refuse_other_files(record, data, shown)
        released = _refuse_if_renewed(lambda: found.read()[1], record, shown)
        if not released:
            try:
                found.delete(version)
            except Conflict:
                raise InputError(f"{shown}: its lock changed hands while it was watched; left "
                                 "as it is") from None  # fmt: skip
    return record, released


def _refuse_other_files(record: dict | None, raw: bytes, shown: str) -> None:
    """Only a lock's record is ever deleted: one that names its holder (what, and its pid or
    token), or an empty file (a lock created and never written). Anything else named like a
    lock is refused, untouched."""
    holder = record is not None and "what" in record and ("pid" in record or "token" in record)
    if (record is None and raw.strip()) or (record is not None and not holder):
        raise InputError(f"{shown} does not hold a lock's record (no holder named in it); left "
                         "as it is")  # fmt: skip


def _refuse_if_renewed(read, record: dict | None, shown: str) -> bool:
    """Refuse a lock whose holder lives; True when its holder released it while watched."""
    if alive_here(record):
        raise InputError(f"{shown} is held by {describe(record)}, alive on this host; stop it "
                         "rather than unlock it")  # fmt: skip
    term = _term_of(record)
    print(f"watching the lease of {shown} for {term:g} s ...", flush=True)
    seen = watch_lease(read, term)
    if seen == "renewed":
        raise InputError(f"{shown} is held by {describe(record)}, which keeps renewing its lease; "
                         "stop that run rather than unlock it")  # fmt: skip
    return seen == "released"


def run(args: argparse.Namespace) -> dict | None:
    from .store import Storage, is_uri

    if is_uri(args.target):
        storage = Storage.of(args.target, ".")
        record, released = unlock_object(storage.uri(".lock"), storage.uri())
        shown = storage.uri()
    else:
        path = Path(args.target)
        path = path / ".lock" if path.is_dir() else path
        record, released = unlock_local(path)
        shown = str(path)
    if released:
        print(f"the lock {shown} was released by its holder, {describe(record)}", flush=True)
    else:
        print(f"removed the lock {shown}, left by {describe(record)}", flush=True)
    return record
