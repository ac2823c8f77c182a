"""The lock of an object-store prefix: a conditional create of its ``.lock`` object, renewed as a
lease (see :mod:`enigma.storage.locks`, whose module text says how it is judged)."""

from __future__ import annotations

import json
import sys

from ..errors import InputError
from .locks import (
    TERM_S,
    Heartbeat,
    _parse,
    alive_here,
    dead_here,
    describe,
    holder_record,
    lapsed,
    renewed,
)


class ObjectLock:
    """The lock of an object-store prefix: the object ``lock_uri`` (see the module); ``shown``
    is what messages say is in use."""

    def __init__(self, lock_uri: str, what: str, shown: str | None = None):
        from .objects import split_object_uri

        self.lock_uri, self.what = lock_uri, what
        self.shown = shown or lock_uri.split("?", 1)[0].rsplit("/", 1)[0]
        self.path = lock_uri.split("?", 1)[0]  # the object itself, for messages
        self.scheme, self.bucket, self.key, self.options = split_object_uri(lock_uri)
        self.etag: str | None = None
        self.record: dict | None = None
        self.heart: Heartbeat | None = None

    @property
    def held(self) -> bool:
        return self.etag is not None

    def acquire(self) -> ObjectLock:
        if self.scheme != "s3":
            return self._acquire_unconditional()
        from .objects import s3_client

        client = s3_client(self.options)
        self.record = holder_record(self.what)
        body = json.dumps(self.record).encode()
        try:
            done = client.put_object(Bucket=self.bucket, Key=self.key, Body=body, IfNoneMatch="*")
        except client.exceptions.ClientError as err:
            code = err.response.get("Error", {}).get("Code")
            if code not in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                self._refused_conditions(err, code)
                raise
            done = self._take_over(client, body)
        self.etag = done["ETag"]
        self.heart = Heartbeat(lambda: self._renew(client), TERM_S, self.shown)
        self.heart.start()
        return self

    def _refused_conditions(self, err, code) -> None:
        """A store without conditional writes: one line naming it (other errors keep theirs)."""
        text = str(err)
        if code in ("NotImplemented", "501", "InvalidArgument") or "If-None-Match" in text:
            raise InputError(
                f"the store behind {self.shown} refuses conditional writes (If-None-Match: "
                f"{code}), without which two drivers could both take its lock; use a store "
                "that has them (AWS S3, MinIO, Ceph RGW 18+) or a local or NFS storage path"
            ) from None

    def _current(self, client) -> tuple[dict | None, str | None]:
        try:
            found = client.get_object(Bucket=self.bucket, Key=self.key)
        except client.exceptions.NoSuchKey:
            return None, None
        return _parse(found["Body"].read()), found["ETag"]

    def _take_over(self, client, body: bytes) -> dict:
        record, etag = self._current(client)
        if etag is None:  # released meanwhile: create it as a first holder would
            return client.put_object(Bucket=self.bucket, Key=self.key, Body=body, IfNoneMatch="*")
        if dead_here(record):
            reason = f"left by pid {record['pid']} (gone)"
        elif alive_here(record):
            raise InputError(f"{self.shown} is in use by {describe(record)}; wait for it to end "
                             "or choose another storage path")  # fmt: skip
        else:
            term = float((record or {}).get("term_s", TERM_S))
            if not lapsed(lambda: self._current(client)[1], record, term):
                raise InputError(
                    f"{self.shown} is in use by {describe(record)}, which keeps renewing its "
                    f"lease; if you know that run is gone, `enigma unlock {self.shown}`"
                )
            reason = f"from {describe(record)}: its lease was not renewed for {term:g} s"
        print(f"note: taking over the lock of {self.shown} {reason}", flush=True)
        try:  # of two takers-over, the one whose If-Match still holds wins
            return client.put_object(Bucket=self.bucket, Key=self.key, Body=body, IfMatch=etag)
        except client.exceptions.ClientError:
            raise InputError(f"{self.shown} was taken over by another run just now") from None

    def _renew(self, client) -> None:
        record = renewed(self.record)
        done = client.put_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag,
                                 Body=json.dumps(record).encode())  # fmt: skip
        self.record, self.etag = record, done["ETag"]

    def _acquire_unconditional(self) -> ObjectLock:
        """Check, write, read back: the best a store without conditional writes allows here."""
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(self.lock_uri)

        def read() -> bytes | None:
            if fs.get_file_info(path).type == pafs.FileType.NotFound:
                return None
            with fs.open_input_stream(path) as f:
                return f.read()

        found = read()
        if found is not None:
            record = _parse(found)
            term = float((record or {}).get("term_s", TERM_S))
            if not (dead_here(record) or lapsed(read, record, term)):
                raise InputError(f"{self.shown} is in use by {describe(record)}; if you know "
                                 f"that run is gone, `enigma unlock {self.shown}`")  # fmt: skip
            print(f"note: taking over the lock of {self.shown} from {describe(record)}",
                  flush=True)  # fmt: skip
        self.record = holder_record(self.what)

        def write() -> None:
            with fs.open_output_stream(path) as f:
                f.write(json.dumps(self.record).encode())

        write()
        if _parse(read() or b"") != self.record:
            raise InputError(f"{self.shown} was locked by another run just now")
        self.etag = "unconditional"

        def renew() -> None:
            self.record = renewed(self.record)
            write()

        self.heart = Heartbeat(renew, TERM_S, self.shown)
        self.heart.start()
        return self

    def release(self) -> None:
        """Delete the lock, ours only; a failure is said (naming the object to delete by hand),
        never raised over the error that ended the block."""
        if self.etag is None:
            return
        if self.heart is not None:
            self.heart.stop()
        etag, self.etag = self.etag, None
        try:
            if self.scheme != "s3":
                import pyarrow.fs as pafs

                fs, path = pafs.FileSystem.from_uri(self.lock_uri)
                fs.delete_file(path)
                return
            from .objects import s3_client

            client = s3_client(self.options)
            # only our own lock: a run that took it over (our lease lapsed) keeps its own
            client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=etag)
        except Exception as err:
            print(f"note: the lock {self.path} was not removed ({type(err).__name__}: {err}); "
                  f"if it is ours, `enigma unlock {self.shown}`", file=sys.stderr,
                  flush=True)  # fmt: skip

    def __enter__(self) -> ObjectLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
