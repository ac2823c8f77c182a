"""The lock of an object-store prefix: a conditional create of its ``.lock`` object, renewed as a
lease by writes conditional on the version seen (S3 ETags, GCS generations; see
:mod:`enigma.storage.locks`, whose module text says how it is judged)."""

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
from .objects import NO_CONDITIONS, PRECONDITION, Conflict, NoConditions

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
        except NoConditions as err:
            raise InputError(
                f"the store behind {shown} refuses conditional writes ({err}), without which "
                "two drivers could both take its lock; use a store that has them (AWS S3, GCS, "
                "MinIO, Ceph RGW 18+) or a local or NFS storage path"
            ) from None
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
        except Exception as err:
            if type(err).__module__.startswith(("google.auth", "google.api_core")):
                _google_errors(err, shown)
            raise

    return context()


def _google_errors(err: Exception, shown: str) -> None:
    """What a user fixes about Cloud Storage, in one line; anything else is left to raise."""
    from google.api_core import exceptions
    from google.auth.exceptions import DefaultCredentialsError

    if isinstance(err, DefaultCredentialsError):
        raise InputError(f"no credentials for {shown}: set GOOGLE_APPLICATION_CREDENTIALS (or "
                         "run where the node's identity has access)") from None  # fmt: skip
    if isinstance(err, exceptions.NotFound | exceptions.Forbidden | exceptions.Unauthorized):
        raise InputError(f"{shown}: the store refused ({err.code}: {err.message}); check the "
                         "bucket's name and the credentials") from None  # fmt: skip


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
        self.object = None  # an S3Object or a GcsObject, once acquiring
        self.etag: str | None = None  # the version of our record (an ETag, a generation)
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
        from .objects import conditional_object

        self.object = conditional_object(self.lock_uri, lease_term())
        self.record = holder_record(self.what)
        body = json.dumps(self.record).encode()
        with store_errors(self.shown):
            if self.scheme == "s3":  # GCS's preconditions are its API's own, never dropped
                self._probe_conditions(self.object.client)
            self.etag = self._create(body)
        self.heart = Heartbeat(self._renew, lease_term(), self.shown, lost=self._lost,
                               since=self.sent)  # fmt: skip
        self.heart.start()
        return self

    def _create(self, body: bytes, tries: int = 5) -> str:
        """The conditional create; taken over (or adopted) when the object is there."""
        for _ in range(tries):
            try:
                self.sent = time.monotonic()
                return self.object.create(body)
            except Conflict:
                pass
            done = self._take_over(body)
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

    def _current(self) -> tuple[dict | None, str | None]:
        data, version = self.object.read()
        return (None if data is None else _parse(data)), version

    def _take_over(self, body: bytes) -> str | None:
        """The lock object is there: ours (a retried create that had gone through), a dead or
        lapsed holder's (taken over), or a live one's (refused). None: it went meanwhile."""
        record, version = self._current()
        if version is None:
            return None  # released meanwhile: create it again
        if record is not None and record.get("token") == self.record["token"]:
            return version  # our own create, retried by the client after it succeeded
        if dead_here(record):
            reason = f"left by pid {record['pid']} (gone)"
        elif alive_here(record):
            raise InputError(f"{self.shown} is in use by {describe(record)}; wait for it to end "
                             "or choose another storage path")  # fmt: skip
        else:
            term = _term_of(record)
            seen = watch_lease(lambda: self._current()[1], term)
            if seen == "released":
                return None
            if seen == "renewed":
                raise InputError(
                    f"{self.shown} is in use by {describe(record)}, which keeps renewing its "
                    f"lease; if you know that run is gone, `enigma unlock {self.shown}`"
                )
            reason = f"from {describe(record)}: its lease was not renewed for {term:g} s"
            self.lapsed = True  # its holder may live on: a new generation (fence)
        try:  # of two takers-over, the one whose condition still holds wins
            self.sent = time.monotonic()
            done = self.object.replace(body, version)
        except Conflict:
            raise InputError(f"{self.shown} was taken over by another run just now") from None
        print(f"note: taking over the lock of {self.shown} {reason}", flush=True)
        return done

    def _renew(self) -> None:
        with self.mutex:
            if self.etag is None:
                return
            record = renewed(self.record)
            try:
                done = self.object.replace(json.dumps(record).encode(), self.etag)
            except Conflict:
                found, version = self._current()
                if found is None:
                    raise LeaseLost(f"{self.path} was removed") from None
                if found.get("token") != record["token"]:
                    raise LeaseLost(f"taken over by {describe(found)}") from None
                done, record = version, found  # our renewal went through; the retry did not
            self.record, self.etag = record, done

    def _lost(self, err: LeaseLost) -> None:
        from .locks import stop_the_holder

        self.lost = True
        stop_the_holder(self.shown, err)

    def release(self) -> None:
        """Delete the lock, ours only (conditional on our version); a failure is said (naming
        the object to delete by hand), never raised over the error that ended the block."""
        if self.etag is None:
            return
        if self.heart is not None:
            self.heart.stop()
        with self.mutex:
            version, self.etag = self.etag, None
        if self.lost:
            return  # taken over: the lock is the new holder's
        try:
            self.object.delete(version)
        except Conflict:
            pass  # not ours any more: a run that took it over (our lease lapsed) keeps its own
        except Exception as err:
            print(f"note: the lock {self.path} was not removed ({type(err).__name__}: {err}); "
                  f"if it is ours, `enigma unlock {self.shown}`", file=sys.stderr,
                  flush=True)  # fmt: skip

    def __enter__(self) -> ObjectLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
