"""A lease holder that writes, for the lease tests: ``python lease_probe.py STORAGE FAULT AFTER_S``.

Takes the lock of ``STORAGE`` (a directory or an ``s3://`` URI) and writes an entry every 50 ms
beside it, printing ``wrote N T`` (T: ``time.monotonic()``, which all processes of a host share)
until the process ends. ``AFTER_S`` seconds after taking the lock it breaks its own renewals as
a store or a share can, and prints ``fault T``:

- ``503``: every write of the lock object is answered 503 SlowDown (S3);
- ``stall``: every write of the lock object hangs, as a stalled store's or a hung NFS call does;
- ``estale``: the lock file's ``fstat`` fails with ESTALE, as an NFS handle gone stale does (the
  directory is judged a share, as NFS would be);
- ``none``: nothing breaks (the test takes the lease over instead).
"""

import errno
import os
import sys
import time

from enigma.storage import locks
from enigma.storage.store import Storage

storage, fault, after = sys.argv[1], sys.argv[2], float(sys.argv[3])
broken = False


def on_lock_write(request, **_):
    """Renewals of the lock object, once broken: answered 503, or never answered."""
    if not broken or not request.url.split("?", 1)[0].endswith("/.lock"):
        return None
    if fault == "stall":
        time.sleep(3600)
    from botocore.awsrequest import AWSResponse

    body = b"<Error><Code>SlowDown</Code><Message>Reduce your request rate.</Message></Error>"
    return AWSResponse(request.url, 503, {}, _Raw(body))


class _Raw:
    def __init__(self, body: bytes):
        self.body = body

    def stream(self, **_):
        yield self.body

    def read(self, *_):
        body, self.body = self.body, b""
        return body


if "://" in storage:
    from enigma.storage import objects

    made = objects.s3_client

    def s3_client(options, term_s=None):
        client = made(options, term_s)
        client.meta.events.register("before-send.s3.PutObject", on_lock_write)
        return client

    objects.s3_client = s3_client
else:
    real_fstat = os.fstat
    lock_path = os.path.realpath(os.path.join(storage, ".lock"))

    def fstat(fd):
        if broken and os.path.realpath(f"/proc/self/fd/{fd}") == lock_path:
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))
        return real_fstat(fd)

    os.fstat = fstat
    locks.shared_file_system = lambda path: True  # as on NFS

target = Storage.of(storage, storage if "://" not in storage else "/tmp")
with target.lock("enigma train"):
    taken = time.monotonic()
    print(f"held {taken}", flush=True)
    n = 0
    while True:
        if not broken and time.monotonic() - taken > after and fault != "none":
            broken = True
            print(f"fault {time.monotonic()}", flush=True)
        target.write_bytes(str(n).encode(), f"entry-{n:05d}")
        print(f"wrote {n} {time.monotonic()}", flush=True)
        n += 1
        time.sleep(0.05)
