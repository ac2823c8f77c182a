"""One writer at a time: locks that name their holder.

**Local and NFS paths** (:class:`DirectoryLock`): an ``flock`` on a lock file, which the kernel
holds for as long as the holding process lives, so on one host there is no staleness to judge:
a lock file whose process died is free, and the next run takes it over with a note. Processes in
other PID namespaces (containers sharing the host's kernel and the directory) hold the same kernel
lock, so none sees another's live lock as stale. The file records the holder (host, boot id,
pid, command, start) for the message a second writer gets. The holder removes the file before
letting go of the lock; a process that locked the file in between finds that its file is no longer
the one at the path, and tries again.

On NFS, ``flock`` is served by the server's lock manager (NFSv4, or NLM on v3) and released when
the client's lease runs out. A free lock whose file names *another* host means either that host
died holding it or its lock never reached this host (a mount without locking): the run cannot
tell which, so it is refused, and the message names the file to delete.

**Object stores** (:class:`ObjectLock`, ``s3://``): a conditional create (``If-None-Match: *``)
of the ``.lock`` object, so of two drivers exactly one creates it. Nothing ties it to a process's
life: a lock left by a killed driver is taken over only when it names a dead process on this
host and PID namespace (replaced with ``If-Match`` on its ETag, so of two takers-over one wins);
otherwise the message names the object to delete. ``gs://`` has no conditional create through
pyarrow: its lock is checked, written and read back, which two drivers starting in the same
second can both pass.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from ..errors import InputError


def _boot_id() -> str:
    """The running kernel's boot id: same id, same kernel, so its locks are authoritative."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def holder_record(what: str) -> dict:
    """Who holds a lock: written into it, read back by whoever is refused."""
    return {
        "what": what,
        "host": socket.gethostname(),
        "boot_id": _boot_id(),
        "pid_ns": _pid_namespace(),
        "pid": os.getpid(),
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:500],
        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def same_kernel(record: dict) -> bool:
    """Whether ``record`` was written on this host since its last boot (records without a boot
    id, from older versions, are judged by the host name)."""
    if record.get("boot_id"):
        return record["boot_id"] == _boot_id()
    return record.get("host") == socket.gethostname()


def describe(record: dict | None) -> str:
    if not record:
        return "a process that has not written its name yet"
    return f"{record.get('what', 'a process')} (pid {record.get('pid')} on {record.get('host')}, " \
        f"since {record.get('since')})"  # fmt: skip


def _parse(text: str | bytes) -> dict | None:
    try:
        record = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


class DirectoryLock:
    """``with DirectoryLock(path, "enigma train"):`` holds the lock file ``path`` while the block
    runs. ``target`` (default: the file's directory) is what messages say is in use. ``wait_s``:
    how long to wait for a holder on this host to finish before refusing (0: refuse at once)."""

    def __init__(self, path, what: str, target=None, wait_s: float = 0.0):
        self.path, self.what = Path(path), what
        self.target = Path(target) if target is not None else self.path.parent
        self.wait_s = wait_s
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self) -> DirectoryLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.wait_s
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if self._lock(fd, deadline) and self._claim(fd):
                    self.fd = fd
                    return self
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # our file was released and removed meanwhile: lock the new one

    def _lock(self, fd: int, deadline: float) -> bool:
        """Take the kernel lock on ``fd``, waiting until ``deadline``; refuse when held."""
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                    raise
            if time.monotonic() >= deadline:
                raise InputError(
                    f"{self.target} is in use by {describe(self._read(fd))}; wait for it to end "
                    "or choose another directory"
                )
            time.sleep(0.2)

    def _claim(self, fd: int) -> bool:
        """With the kernel lock held: False when ``fd`` is no longer the file at the path (its
        holder removed it on release); else write our record and say what we took over."""
        try:
            if os.stat(self.path).st_ino != os.fstat(fd).st_ino:
                return False
        except FileNotFoundError:
            return False
        previous = self._read(fd)
        if previous and not same_kernel(previous):
            raise InputError(
                f"{self.target} is locked by {describe(previous)}, another host, whose lock this "
                f"host cannot check; if that run is gone, delete {self.path} and run again"
            )
        if previous and previous.get("pid") != os.getpid():
            print(f"note: taking over the lock of {self.target} left by pid {previous.get('pid')} "
                  "(gone)", flush=True)  # fmt: skip
        data = json.dumps(holder_record(self.what)).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        return True

    @staticmethod
    def _read(fd: int) -> dict | None:
        return _parse(os.pread(fd, 1 << 16, 0))

    def release(self) -> None:
        """Remove the file, then let go of the kernel lock (in that order: see the module)."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                self.path.unlink()
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ObjectLock:
    """The lock of an object-store prefix: the object ``URI/.lock`` (see the module)."""

    def __init__(self, uri: str, what: str):
        from .objects import split_object_uri

        self.uri, self.what = uri.rstrip("/"), what
        self.lock_uri = f"{self.uri}/.lock"
        self.scheme, self.bucket, self.key, self.options = split_object_uri(self.lock_uri)
        self.etag: str | None = None

    @property
    def held(self) -> bool:
        return self.etag is not None

    def acquire(self) -> ObjectLock:
        if self.scheme != "s3":
            return self._acquire_unconditional()
        from .objects import s3_client

        client = s3_client(self.options)
        body = json.dumps(holder_record(self.what)).encode()
        errors = client.exceptions
        try:
            done = client.put_object(Bucket=self.bucket, Key=self.key, Body=body, IfNoneMatch="*")
        except errors.ClientError as err:
            if err.response.get("Error", {}).get("Code") not in ("PreconditionFailed", "412"):
                raise
            done = self._take_over(client, body)
        self.etag = done["ETag"]
        return self

    def _take_over(self, client, body: bytes) -> dict:
        found = client.get_object(Bucket=self.bucket, Key=self.key)
        record = _parse(found["Body"].read())
        mine = record and same_kernel(record) and record.get("pid_ns") == _pid_namespace()
        if not (mine and isinstance(record.get("pid"), int) and not _alive(record["pid"])):
            raise InputError(
                f"{self.uri} is in use by {describe(record)}; if that run is gone, delete "
                f"{self.lock_uri} and run again"
            )
        print(f"note: taking over the lock of {self.uri} left by pid {record['pid']} (gone)",
              flush=True)  # fmt: skip
        try:  # of two takers-over, the one whose If-Match still holds wins
            return client.put_object(
                Bucket=self.bucket, Key=self.key, Body=body, IfMatch=found["ETag"]
            )
        except client.exceptions.ClientError:
            raise InputError(f"{self.uri} was taken over by another run just now") from None

    def _acquire_unconditional(self) -> ObjectLock:
        """Check, write, read back: the best a store without conditional writes allows here."""
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(self.lock_uri)
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            with fs.open_input_stream(path) as f:
                record = _parse(f.read())
            raise InputError(
                f"{self.uri} is in use by {describe(record)}; if that run is gone, delete "
                f"{self.lock_uri} and run again"
            )
        body = json.dumps(holder_record(self.what)).encode()
        with fs.open_output_stream(path) as f:
            f.write(body)
        with fs.open_input_stream(path) as f:
            if f.read() != body:
                raise InputError(f"{self.uri} was locked by another run just now")
        self.etag = "unconditional"
        return self

    def release(self) -> None:
        if self.etag is None:
            return
        etag, self.etag = self.etag, None
        if self.scheme != "s3":
            import pyarrow.fs as pafs

            fs, path = pafs.FileSystem.from_uri(self.lock_uri)
            fs.delete_file(path)
            return
        from .objects import s3_client

        client = s3_client(self.options)
        try:  # only our own lock: a run that took it over (ours was gone) keeps its own
            client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=etag)
        except client.exceptions.ClientError as err:
            print(f"note: the lock {self.lock_uri} was not ours to remove ({err})", flush=True)

    def __enter__(self) -> ObjectLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
