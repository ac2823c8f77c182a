"""One writer at a time: locks that name their holder, and leases their holder keeps renewing.

Every lock is a record (holder's host, boot id, PID namespace, pid, command, start) that its
holder rewrites every ``term / 6`` seconds while it lives (a heartbeat: ``beat`` counts up), as
etcd's and the DynamoDB lock client's leases work. A lock whose record has not changed for a
whole term is a lease its holder let lapse: anyone may take it over, saying whose it was. The
taker watches the record itself for that term rather than trusting another host's clock.

**Local and NFS paths** (:class:`DirectoryLock`): an ``flock`` on the lock file. On one kernel
the kernel's lock is the truth (it lives exactly as long as the holding process, in any PID
namespace): a file whose lock is free was left by a dead process and is taken over. A file
written under another boot id on a *local* disk was left before a reboot, which ended its
holder: taken over. A file from another host on a shared file system (NFS, whose lock manager
frees a dead client's locks after its own lease) is judged by its lease: taken over when not
renewed for a term, refused while renewed. The holder removes the file before letting go of the
kernel lock; a process that locked the file in between finds that its file is no longer the one
at the path, and tries again.

**Object stores** (:mod:`enigma.storage.object_lock`, ``s3://`` and ``gs://``): a conditional
create of the ``.lock`` object (S3 ``If-None-Match: *``, GCS ``ifGenerationMatch=0``), so of two
drivers exactly one creates it; renewals, take-overs and the release are conditional on the
version seen (the ETag, ``If-Match``; the generation), so of two takers-over one wins, and a
holder that finds its lease taken says so. A dead process on this host and PID
namespace is known dead at once; any other holder is judged by its lease. A store that refuses
conditional writes, or applies a PUT or DELETE whose If-Match does not hold (probed once per
bucket), is one line naming it. Any other scheme has no compare-and-set here: refused.

**A holder that cannot renew stops.** The lease is the holder's only until two thirds of a term
after the last renewal that went through was sent: renewals that fail (503, expired credentials,
``ESTALE``) or never return (a stalled store, a hung NFS server; each renewal runs in a thread of
its own, and an S3 call gives up after a twelfth of the term) end the process then, in one line
(:func:`stop_the_holder`, exit :data:`LEASE_EXIT`), with a third of the term to spare before a
taker-over, who waits a whole term after the record's last change, can start. A holder that finds
its lease taken over ends the same way. Ending the process is what stops its writes: a Ray
driver's workers end with their driver. On a local disk the kernel's lock is the truth and
nobody else can take it over, so its lease does not expire.

``enigma unlock`` (:mod:`enigma.storage.unlock`) removes a lock whose holder the operator knows
is gone, and refuses one that is still being renewed.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from ..errors import InputError

# File systems only this host mounts: a lock file there written under another boot id was left
# before a reboot. Any other (NFS, CIFS, Lustre, FUSE, one not listed) is judged by its lease.
LOCAL_FILE_SYSTEMS = ("ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "bcachefs", "tmpfs",
                      "ramfs", "overlay", "jfs", "reiserfs", "nilfs2")  # fmt: skip


def lease_term() -> float:
    """The lease's term in seconds (``ENIGMA_LEASE_S``, 30): a record unchanged this long is a
    lapsed lease."""
    value = os.environ.get("ENIGMA_LEASE_S", "30")
    try:
        term = float(value)
    except ValueError:
        term = float("nan")
    if not term > 0 or term == float("inf"):
        raise InputError(f"ENIGMA_LEASE_S={value!r} is not a lease term: give a number of "
                         "seconds above 0, e.g. ENIGMA_LEASE_S=30")  # fmt: skip
    return term


class LeaseLost(Exception):
    """The lease was taken over (or its lock removed) while its holder lived: it must stop."""


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


def _started(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (``/proc/PID/stat``'s 22nd
    field): with the pid, it names one process, whatever reuses the pid later."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the command, in parentheses, may hold spaces
    return int(fields[19])


def holder_record(what: str) -> dict:
    """Who holds a lock: written into it, read back by whoever is refused. ``token`` tells this
    holding from any other, even by the same process."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {
        "what": what,
        "host": socket.gethostname(),
        "boot_id": _boot_id(),
        "pid_ns": _pid_namespace(),
        "pid": os.getpid(),
        "started": _started(os.getpid()),
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:500],
        "since": now,
        "term_s": lease_term(),
        "token": uuid.uuid4().hex,
        "beat": 0,
        "renewed": now,
    }


def renewed(record: dict) -> dict:
    """The record of a heartbeat: the same holder, one beat on."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {**record, "beat": int(record.get("beat", 0)) + 1, "renewed": now}


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


def _alive(pid: int, started: int | None = None) -> bool:
    """Whether process ``pid`` lives and, when its start time was recorded, is that process
    (not a later one given the same pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return started is None or _started(pid) in (None, started)


def _here(record: dict | None) -> bool:
    """Whether ``record``'s holder is a process this one can see (this kernel, this PID
    namespace)."""
    return bool(record and same_kernel(record) and record.get("pid_ns") == _pid_namespace()
                and isinstance(record.get("pid"), int))  # fmt: skip


def dead_here(record: dict | None) -> bool:
    """A holder known dead without waiting: a process of ours that no longer exists."""
    return _here(record) and not _alive(record["pid"], record.get("started"))


def alive_here(record: dict | None) -> bool:
    """A holder known alive without waiting: a process of ours that exists."""
    return _here(record) and _alive(record["pid"], record.get("started"))


def _mounts() -> str | None:
    try:
        return Path("/proc/mounts").read_text()
    except OSError:
        return None


def shared_file_system(path: Path) -> bool:
    """Whether ``path`` may lie on a file system other hosts mount too: any but the local
    kinds this knows (:data:`LOCAL_FILE_SYSTEMS`)."""
    mounts = _mounts()
    if mounts is None:
        return True  # unknown: judge it as shared, the careful way
    return mount_kind(str(path.resolve()), mounts) not in LOCAL_FILE_SYSTEMS


def flock_stays_on_this_host(path: Path) -> str | None:
    """The mount option that makes ``flock`` on an NFS share lock this host only (``nolock``,
    ``local_lock=flock`` or ``=all``), or None: with it, two hosts starting at once could both
    take the lock."""
    mounts = _mounts()
    if mounts is None:
        return None
    kind, options = mount_of(str(path.resolve()), mounts)
    if not kind.startswith("nfs"):
        return None
    for option in ("nolock", "local_lock=flock", "local_lock=all"):
        if option in options:
            return option
    return None


def mount_kind(target: str, mounts: str) -> str:
    """The file system type of the longest mount point holding ``target``, from the text of
    ``/proc/mounts``; "" when none does."""
    return mount_of(target, mounts)[0]


def mount_of(target: str, mounts: str) -> tuple[str, set[str]]:
    """The file system type and mount options of the longest mount point holding ``target``,
    from the text of ``/proc/mounts`` (which writes a space in a mount point as ``\\040``, a
    tab ``\\011``, a backslash ``\\134``); ``("", set())`` when none does."""
    best, found = "", ("", set())
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
        if target.startswith(point.rstrip("/") + "/") and len(point) >= len(best):
            best, found = point, (fields[2], set(fields[3].split(",")))
    return found


def watch_lease(read, term_s: float, poll_s: float | None = None) -> str:
    """Watch a lease for a whole term: ``read()`` gives its record (or a version of it such as
    an ETag; None once the lock is gone). ``"renewed"`` when it changes, ``"released"`` when it
    goes, ``"lapsed"`` when it stays as it was. Watched here, not judged by the holder's clock,
    which may differ from ours."""
    poll_s = poll_s or max(0.05, term_s / 12)
    first, deadline = read(), time.monotonic() + term_s
    if first is None:
        return "released"
    while time.monotonic() < deadline:
        time.sleep(poll_s)
        now = read()
        if now is None:
            return "released"
        if now != first:
            return "renewed"
    return "lapsed"


# The exit status of a holder stopped because its lease is lost or expired (EX_TEMPFAIL: the
# run can be resumed once the store answers again).
LEASE_EXIT = 75
# A lease is the holder's until this share of its term has passed since the last renewal that
# went through was sent; the rest is time to stop writing before a taker-over, which waits a
# whole term after the record last changed, can start.
EXPIRY = 2 / 3


class LeaseExpired(LeaseLost):
    """No renewal went through for :data:`EXPIRY` of the term (the store errs, stalls or cannot
    be reached): the lease may be taken over soon, so its holder must stop now."""


def stop_the_holder(what: str, err: LeaseLost) -> None:
    """A holder whose lease is lost, or may be taken over any moment, must not write on: said in
    one line, then the process ends at once (no clean-up that could write; a Ray driver's workers
    end with it, since Ray ends a job's workers with its driver)."""
    if isinstance(err, LeaseExpired):
        line = (f"error: the lease of {what} expired ({err}): stopping before another run may "
                "take it over; resume the run once the store answers again")  # fmt: skip
    else:
        line = (f"error: the lock of {what} is no longer ours ({err}): stopping, since another "
                "run now writes there (a pause longer than the lease's term, ENIGMA_LEASE_S, "
                "does this)")  # fmt: skip
    print(line, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(LEASE_EXIT)


class Heartbeat(threading.Thread):
    """Calls ``renew()`` every ``term_s / 6`` seconds until stopped, each call in a thread of its
    own so that one stuck in a stalled store or a hung NFS server cannot hold the clock.

    ``since``: when the write that took the lease was sent (``time.monotonic()``). With
    ``expires``, the lease is the holder's until :data:`EXPIRY` of the term after the last
    renewal that went through was *sent* (its write landed later, and a taker-over watches a
    whole term after that): past it, whatever the reason (errors, timeouts, a call that never
    returns), ``lost(LeaseExpired)`` is called. A renewal that finds the lease taken over
    (:class:`LeaseLost`) calls ``lost(err)`` at once. A failed renewal is said once a term."""

    def __init__(self, renew, term_s: float, what: str, lost=None, since: float | None = None,
                 expires: bool = True):  # fmt: skip
        super().__init__(daemon=True, name=f"lease {what}")
        self.renew, self.term, self.every, self.what = renew, term_s, term_s / 6, what
        self.lost = lost or (lambda err: stop_the_holder(what, err))
        self.good = time.monotonic() if since is None else since
        self.expires = expires
        self.stopped = threading.Event()

    def run(self) -> None:
        error, said, sent = None, float("-inf"), self.good
        while not self.stopped.wait(self._pause(sent)):
            if self.left() is not None and self.left() <= 0:  # the process was paused or starved
                why = f"last error: {error}" if error else "no renewal could be sent in time"
                return self._lose(self._expired(why))
            call = _Call(self.renew)
            sent = call.sent
            if not call.done.wait(self.left()):
                return self._lose(self._expired("a renewal has not returned"))
            if call.error is None:
                self.good, error = call.sent, None
            elif isinstance(call.error, LeaseLost):
                return self._lose(call.error)
            else:  # the holder goes on while its lease lasts
                error = call.error
                if time.monotonic() - said > self.term:
                    print(f"warning: the lease of {self.what} was not renewed ({error})",
                          file=sys.stderr, flush=True)  # fmt: skip
                    said = time.monotonic()
        return None

    def _pause(self, sent: float) -> float:
        """Until the next renewal, a beat after the last was *sent* (so slow renewals that go
        through still come every beat), and never past the expiry."""
        pause = max(0.0, sent + self.every - time.monotonic())
        left = self.left()
        return pause if left is None else max(0.0, min(pause, left))

    def left(self) -> float | None:
        """Seconds until the lease expires here; None when it does not."""
        return self.good + EXPIRY * self.term - time.monotonic() if self.expires else None

    def _expired(self, why: str) -> LeaseExpired:
        waited = time.monotonic() - self.good
        return LeaseExpired(f"not renewed for {waited:.1f} s of its {self.term:g} s term; {why}")

    def _lose(self, err: LeaseLost) -> None:
        if not self.stopped.is_set():
            self.lost(err)

    def stop(self) -> None:
        self.stopped.set()


class _Call:
    """One renewal running in a daemon thread: when it was sent, whether and how it ended."""

    def __init__(self, renew):
        self.sent, self.error = time.monotonic(), None
        self.done = threading.Event()
        threading.Thread(target=self._run, args=(renew,), daemon=True, name="lease renewal").start()

    def _run(self, renew) -> None:
        try:
            renew()
        except Exception as err:
            self.error = err
        finally:
            self.done.set()


def _term_of(record: dict | None) -> float:
    """The term its holder's lease was written with (ours for a record without one)."""
    try:
        term = float((record or {}).get("term_s") or lease_term())
    except (TypeError, ValueError):
        term = lease_term()
    return term if term > 0 else lease_term()


class DirectoryLock:
    """``with DirectoryLock(path, "enigma train"):`` holds the lock file ``path`` while the block
    runs. ``target`` (default: the file's directory) is what messages say is in use. ``wait_s``:
    how long to wait for a holder that is alive to finish before refusing (0: refuse at once)."""

    def __init__(self, path, what: str, target=None, wait_s: float = 0.0):
        self.path, self.what = Path(path), what
        self.target = Path(target) if target is not None else self.path.parent
        self.wait_s = wait_s
        self.fd: int | None = None
        self.record: dict | None = None
        self.heart: Heartbeat | None = None
        self.sent = 0.0  # when our record was written (time.monotonic())
        self.lapsed = False  # taken over from a holder whose lease lapsed, who may live on
        self.mutex = threading.Lock()  # a renewal and the release never interleave

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self) -> DirectoryLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if option := flock_stays_on_this_host(self.path.parent):
            raise InputError(
                f"{self.target} is on an NFS share mounted with {option}: its locks cover this "
                "host only, so a run on another host could take the same directory at once; "
                "remount it without that option, or use an s3:// or gs:// storage path"
            )
        deadline = time.monotonic() + self.wait_s
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if self._lock(fd, deadline) and self._claim(fd, deadline):
                    self.fd = fd
                    # on a local disk the kernel's lock is the truth and nobody else takes it
                    # over: only a share's lease can expire
                    self.heart = Heartbeat(self._renew, lease_term(), str(self.target),
                                           since=self.sent,
                                           expires=shared_file_system(self.path))  # fmt: skip
                    self.heart.start()
                    return self
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # our file was released and removed (or taken over) meanwhile

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

    def _claim(self, fd: int, deadline: float) -> bool:
        """With the kernel lock held: False when ``fd`` is no longer the file at the path (its
        holder removed it on release); else judge what the file says, write our record and say
        what we took over."""
        if not self._still_ours(fd):
            return False
        previous = self._read(fd)
        if previous and not same_kernel(previous):
            if not shared_file_system(self.path):
                reason = "before this host's last boot, which ended it"
            elif (seen := watch_lease(self._read_fresh, _term_of(previous))) == "lapsed":
                reason = f"its lease was not renewed for {_term_of(previous):g} s"
                self.lapsed = True  # its holder may live on: a new generation (fence)
            elif seen == "released" or time.monotonic() < deadline:
                return False  # a live holder on another host: try again until the deadline
            else:
                raise InputError(f"{self.target} is in use by {describe(previous)}, on another "
                                 "host that keeps renewing its lease; wait for it to end or "
                                 "choose another directory")  # fmt: skip
            if not self._still_ours(fd):
                return False
            print(f"note: taking over the lock of {self.target} from {describe(previous)}: "
                  f"{reason}", flush=True)  # fmt: skip
        elif previous and previous.get("pid") != os.getpid():
            print(f"note: taking over the lock of {self.target} left by pid {previous.get('pid')} "
                  "(gone)", flush=True)  # fmt: skip
        self.record = holder_record(self.what)
        self.sent = time.monotonic()
        self._write(fd, self.record)
        return True

    def _still_ours(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    @staticmethod
    def _write(fd: int, record: dict) -> None:
        data = json.dumps(record).encode()
        os.pwrite(fd, data.ljust(max(len(data), os.fstat(fd).st_size)), 0)  # no read sees it empty
        os.ftruncate(fd, len(data))
        os.fsync(fd)

    def _renew(self) -> None:
        with self.mutex:
            fd = self.fd
            if fd is None or self.record is None:
                return
            if not self._still_ours(fd):
                raise LeaseLost(f"{self.path} was removed or replaced")
            found = self._read_fresh()
            if found is None:
                return  # caught mid-write (or unreadable): judged at the next beat
            if found.get("token") != self.record["token"]:
                raise LeaseLost(f"taken over by {describe(found)}")
            self.record = renewed(self.record)
            self._write(fd, self.record)

    @staticmethod
    def _read(fd: int) -> dict | None:
        return _parse(os.pread(fd, 1 << 16, 0).rstrip(b" "))

    def _read_fresh(self) -> dict | None:
        """The record as a new open reads it (NFS revalidates at open: an open descriptor may
        keep showing a cached copy while another host renews it)."""
        try:
            return _parse(self.path.read_bytes().rstrip(b" "))
        except FileNotFoundError:
            return None

    def release(self) -> None:
        """Remove the file, then let go of the kernel lock (in that order: see the module)."""
        if self.fd is None:
            return
        if self.heart is not None:
            self.heart.stop()
        # A renewal stuck in a hung NFS call holds the mutex: leave the file then (a run taking
        # it over judges it by its lease) rather than hang here.
        if not self.mutex.acquire(timeout=lease_term()):
            print(f"note: the lock {self.path} was left in place: a renewal of it has not "
                  "returned (a hung file system?)", file=sys.stderr, flush=True)  # fmt: skip
            return
        try:
            fd, self.fd = self.fd, None
            try:
                found = self._read_fresh()
                mine = found is None or found.get("token") == (self.record or {}).get("token")
                if self._still_ours(fd) and mine:  # a run that took the lock over keeps it
                    self.path.unlink()
            except FileNotFoundError:
                pass
            finally:
                os.close(fd)
        finally:
            self.mutex.release()

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
