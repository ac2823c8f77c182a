"""The lock of an object-store prefix: a conditional create of its ``.lock`` object, renewed as a
lease (see :mod:`enigma.storage.locks`, whose module text says how it is judged)."""

from __future__ import annotations

import json
import sys
import time

from ..errors import InputError
from .locks import (
    Heartbeat,
    LeaseLost,
    _parse,
    _term_of,
    alive_here,
    dead_here,
    describe,
    holder_record,
    lease_term,
    renewed,
    watch_lease,
)

# What a conditional write's refusal is called by the stores that have them.
PRECONDITION = ("PreconditionFailed", "412", "ConditionalRequestConflict")
# What a store that does not take a condition answers instead of applying it.
NO_CONDITIONS = ("NotImplemented", "501", "InvalidArgument")
NO_SUCH_ETAG = '"00000000000000000000000000000000"'  # matches no object's ETag
# (endpoint, bucket) whose If-Match this process has probed and found honoured
_HONOURED: set[tuple[str, str]] = set()


def store_errors(shown: str):
    """A context that turns what a user fixes (no credentials, no bucket, no access, no endpoint,
    a boto3 without conditional writes) into one line naming the storage path; any other error
    keeps its traceback."""
    import contextlib

    import botocore.exceptions as be

    @contextlib.contextmanager
    def context():
        try:
            yield
        except be.NoCredentialsError:
            raise InputError(f"no credentials for {shown}: set AWS_ACCESS_KEY_ID and "
                             "AWS_SECRET_ACCESS_KEY (or an AWS profile)") from None  # fmt: skip
        except (be.EndpointConnectionError, be.ConnectTimeoutError) as err:
            raise InputError(f"{shown}: the store cannot be reached ({err}); check the endpoint "
                             "(AWS_ENDPOINT_URL or endpoint_override=)") from None  # fmt: skip
        except be.ParamValidationError as err:
            raise InputError(f"{shown}: this boto3 cannot send conditional writes ({err}); "
                             "pip install 'boto3>=1.36'") from None  # fmt: skip
        except be.ClientError as err:
            code = err.response.get("Error", {}).get("Code")
            if code in ("NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "403",
                        "SignatureDoesNotMatch", "AllAccessDisabled"):  # fmt: skip
                raise InputError(f"{shown}: the store refused ({code}: "
                                 f"{err.response.get('Error', {}).get('Message', '')}); check "
                                 "the bucket's name and the credentials") from None  # fmt: skip
            raise

    return context()


class ObjectLock:
    """The lock of an object-store prefix: the object ``lock_uri`` (see the module); ``shown``
    is what messages say is in use."""

    def __init__(self, lock_uri: str, what: str, shown: str | None = None):
        import threading

        from .objects import split_object_uri

        self.lock_uri, self.what = lock_uri, what
        self.shown = shown or lock_uri.split("?", 1)[0].rsplit("/", 1)[0]
        self.path = lock_uri.split("?", 1)[0]  # the object itself, for messages
        self.scheme, self.bucket, self.key, self.options = split_object_uri(lock_uri)
        self.etag: str | None = None
        self.record: dict | None = None
        self.sent = 0.0  # when the write that took the lock was sent (time.monotonic())
        self.lapsed = False  # taken over from a holder whose lease lapsed, who may live on
        self.heart: Heartbeat | None = None
        self.lost = False  # the lease was taken over: nothing of it is ours to delete
        self.mutex = threading.Lock()  # a renewal and the release never interleave

    @property
    def held(self) -> bool:
        return self.etag is not None

    def acquire(self) -> ObjectLock:
        if self.scheme != "s3":
            return self._acquire_unconditional()
        from .objects import s3_client

        client = s3_client(self.options, lease_term())
        self.record = holder_record(self.what)
        body = json.dumps(self.record).encode()
        with store_errors(self.shown):
            self._probe_conditions(client)
            done = self._create(client, body)
        self.etag = done["ETag"]
        self.heart = Heartbeat(lambda: self._renew(client), lease_term(), self.shown,
                               lost=self._lost, since=self.sent)  # fmt: skip
        self.heart.start()
        return self

    def _create(self, client, body: bytes, tries: int = 5) -> dict:
        """The conditional create; taken over (or adopted) when the object is there."""
        for _ in range(tries):
            try:
                self.sent = time.monotonic()
                return client.put_object(Bucket=self.bucket, Key=self.key, Body=body,
                                         IfNoneMatch="*")  # fmt: skip
            except client.exceptions.ClientError as err:
                code = err.response.get("Error", {}).get("Code")
                if code not in PRECONDITION:
                    self._refused_conditions(err, code)
                    raise
            done = self._take_over(client, body)
            if done is not None:
                return done
        raise InputError(f"{self.shown}: its lock keeps changing hands; try again")

    def _probe_conditions(self, client) -> None:
        """If-Match on PUT and DELETE, tried once per process and bucket on an object of our own
        with an ETag no object has: a store that applies either anyway (some S3-compatible
        stores do; AWS has honoured it on DELETE only since 2025) would let a late renewal or a
        release overwrite or delete another run's lock, so it is refused in one line."""
        import uuid

        where = (client.meta.endpoint_url, self.bucket)
        if where in _HONOURED:
            return
        key = f"{self.key}.probe-{uuid.uuid4().hex[:12]}"
        client.put_object(Bucket=self.bucket, Key=key, Body=b"probe")
        ignored = []
        try:
            for verb, call in (("PUT", client.put_object), ("DELETE", client.delete_object)):
                extra = {"Body": b"changed"} if verb == "PUT" else {}
                try:
                    call(Bucket=self.bucket, Key=key, IfMatch=NO_SUCH_ETAG, **extra)
                    ignored.append(verb)
                except client.exceptions.ClientError as err:
                    code = err.response.get("Error", {}).get("Code")
                    if code in NO_CONDITIONS:
                        ignored.append(f"{verb} ({code})")
                    elif code not in PRECONDITION:
                        raise
        finally:
            client.delete_object(Bucket=self.bucket, Key=key)
        if ignored:
            raise InputError(
                f"the store behind {self.shown} does not honour If-Match on "
                f"{' or '.join(ignored)}, without which a late renewal or a release could "
                "overwrite or delete another run's lock; use a store that has it (AWS S3, MinIO, "
                "Ceph RGW 18+) or a local or NFS storage path"
            )
        _HONOURED.add(where)

    def _refused_conditions(self, err, code) -> None:
        """A store without conditional writes: one line naming it (other errors keep theirs)."""
        text = str(err)
        if code in NO_CONDITIONS or "If-None-Match" in text:
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

    def _take_over(self, client, body: bytes) -> dict | None:
        """The lock object is there: ours (a retried create that had gone through), a dead or
        lapsed holder's (taken over), or a live one's (refused). None: it went meanwhile."""
        record, etag = self._current(client)
        if etag is None:
            return None  # released meanwhile: create it again
        if record is not None and record.get("token") == self.record["token"]:
            return {"ETag": etag}  # our own create, retried by the client after it succeeded
        if dead_here(record):
            reason = f"left by pid {record['pid']} (gone)"
        elif alive_here(record):
            raise InputError(f"{self.shown} is in use by {describe(record)}; wait for it to end "
                             "or choose another storage path")  # fmt: skip
        else:
            term = _term_of(record)
            seen = watch_lease(lambda: self._current(client)[1], term)
            if seen == "released":
                return None
            if seen == "renewed":
                raise InputError(
                    f"{self.shown} is in use by {describe(record)}, which keeps renewing its "
                    f"lease; if you know that run is gone, `enigma unlock {self.shown}`"
                )
            reason = f"from {describe(record)}: its lease was not renewed for {term:g} s"
            self.lapsed = True  # its holder may live on: a new generation (fence)
        try:  # of two takers-over, the one whose If-Match still holds wins
            self.sent = time.monotonic()
            done = client.put_object(Bucket=self.bucket, Key=self.key, Body=body, IfMatch=etag)
        except client.exceptions.ClientError as err:
            if err.response.get("Error", {}).get("Code") not in (*PRECONDITION, "NoSuchKey"):
                raise
            raise InputError(f"{self.shown} was taken over by another run just now") from None
        print(f"note: taking over the lock of {self.shown} {reason}", flush=True)
        return done

    def _renew(self, client) -> None:
        with self.mutex:
            if self.etag is None:
                return
            record = renewed(self.record)
            body = json.dumps(record).encode()
            try:
                done = client.put_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag,
                                         Body=body)  # fmt: skip
            except client.exceptions.ClientError as err:
                code = err.response.get("Error", {}).get("Code")
                if code not in (*PRECONDITION, "NoSuchKey"):
                    raise
                found, etag = self._current(client)
                if found is None:
                    raise LeaseLost(f"{self.path} was removed") from None
                if found.get("token") != record["token"]:
                    raise LeaseLost(f"taken over by {describe(found)}") from None
                done = {"ETag": etag}  # our renewal went through; the client's retry did not
                record = found
            self.record, self.etag = record, done["ETag"]

    def _lost(self, err: LeaseLost) -> None:
        from .locks import stop_the_holder

        self.lost = True
        stop_the_holder(self.shown, err)

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
            term = _term_of(record)
            if not (dead_here(record) or watch_lease(read, term) != "renewed"):
                raise InputError(f"{self.shown} is in use by {describe(record)}; if you know "
                                 f"that run is gone, `enigma unlock {self.shown}`")  # fmt: skip
            print(f"note: taking over the lock of {self.shown} from {describe(record)}",
                  flush=True)  # fmt: skip
            self.lapsed = not dead_here(record)
        self.record = holder_record(self.what)

        def write() -> None:
            with fs.open_output_stream(path) as f:
                f.write(json.dumps(self.record).encode())

        self.sent = time.monotonic()
        write()
        if _parse(read() or b"") != self.record:
            raise InputError(f"{self.shown} was locked by another run just now")
        self.etag = "unconditional"

        def renew() -> None:
            self.record = renewed(self.record)
            write()

        self.heart = Heartbeat(renew, lease_term(), self.shown, since=self.sent)
        self.heart.start()
        return self

    def release(self) -> None:
        """Delete the lock, ours only; a failure is said (naming the object to delete by hand),
        never raised over the error that ended the block."""
        if self.etag is None:
            return
        if self.heart is not None:
            self.heart.stop()
        with self.mutex:
            etag, self.etag = self.etag, None
        if self.lost:
            return  # taken over: the lock is the new holder's
        try:
            if self.scheme != "s3":
                import pyarrow.fs as pafs

                fs, path = pafs.FileSystem.from_uri(self.lock_uri)
                fs.delete_file(path)
                return
            from .objects import s3_client

            client = s3_client(self.options, lease_term())
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
