"""One writer per output directory: a lock file naming its holder (host, pid, command).

A second ``enigma train`` or ``enigma data prepare`` into a directory that another process is
writing is refused with one line naming the holder. A lock whose process is gone (killed, or the
machine restarted) is stale and taken over, with a note. The lock is created with ``O_EXCL``, so
of two processes starting at once exactly one gets it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from ..errors import InputError


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


class DirectoryLock:
    """``with DirectoryLock(path, "enigma train"):`` holds ``path`` (a lock file) while the block
    runs; the file is removed on exit, whatever the exit."""

    def __init__(self, path: str | Path, what: str, target: str | Path | None = None):
        self.path, self.what = Path(path), what
        self.target = Path(target) if target is not None else self.path.parent
        self.held = False

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError):
            return {}  # being written, or damaged: treat as held by an unknown process

    def _create(self) -> bool:
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:500],
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record))
        return True

    def acquire(self) -> DirectoryLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                self.held = True
                return self
            holder = self._holder()
            if holder is None:
                continue  # released in between: try again
            here = holder.get("host") == socket.gethostname()
            pid = holder.get("pid")
            if here and isinstance(pid, int) and not _alive(pid):
                print(f"note: taking over the stale lock of {self.target} (pid {pid} is gone)")
                self.path.unlink(missing_ok=True)
                continue
            raise InputError(
                f"{self.target} is in use by {self.what} (pid {pid} on {holder.get('host')}, "
                f"since {holder.get('since')}); wait for it to end or choose another directory"
            )
        raise InputError(f"could not lock {self.target}: {self.path} keeps changing")

    def release(self) -> None:
        if self.held:
            self.held = False
            holder = self._holder()
            if holder and holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
