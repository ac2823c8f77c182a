"""Object-store URIs (``s3://bucket/key?option=value``, ``gs://bucket/key``) and single objects
read and written on a condition, for what pyarrow cannot do there: the compare-and-set that a
lease (:class:`enigma.storage.object_lock.ObjectLock`) and a run's fence
(:mod:`enigma.storage.fence`) stand on. S3 through boto3 (ETags, ``If-None-Match`` /
``If-Match``), GCS through google-cloud-storage (generations, ``ifGenerationMatch``)."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

from ..errors import InputError

# What a conditional write's refusal is called by the stores that have them.
PRECONDITION = ("PreconditionFailed", "412", "ConditionalRequestConflict")
# What a store that does not take a condition answers instead of applying it.
NO_CONDITIONS = ("NotImplemented", "501", "InvalidArgument")


class Conflict(Exception):
    """A conditional write or delete whose condition did not hold, or whose object is gone."""


class NoConditions(Exception):
    """The store refused a condition it does not implement."""


def split_object_uri(uri: str) -> tuple[str, str, str, dict]:
    """``s3://bucket/key?opt=v`` -> ``("s3", "bucket", "key", {"opt": "v"})``."""
    parts = urlsplit(uri)
    return parts.scheme, parts.netloc, parts.path.lstrip("/"), dict(parse_qsl(parts.query))


def s3_client(options: dict, term_s: float | None = None):
    """A boto3 S3 client that reaches the endpoint pyarrow reaches for the same URI: the URI's
    ``endpoint_override``/``scheme``/``region`` options, else the standard AWS_* variables.

    ``term_s``: a lease's term, which bounds every call: botocore's defaults (60 s to connect,
    60 s to read, 5 attempts) could hold one renewal for minutes against a 30 s term; here a call
    gives up after two attempts of ``term_s / 12`` to connect and to read each."""
    import boto3
    from botocore.config import Config

    kwargs = {}
    if term_s is not None:
        wait = max(0.2, term_s / 12)
        retries = {"total_max_attempts": 2, "mode": "standard"}
        kwargs["config"] = Config(connect_timeout=wait, read_timeout=wait, retries=retries)
    if options.get("endpoint_override"):
        kwargs["endpoint_url"] = (
            f"{options.get('scheme', 'https')}://{options['endpoint_override']}"
        )
    if options.get("region"):
        kwargs["region_name"] = options["region"]
    return boto3.client("s3", **kwargs)


def conditional_object(uri: str, term_s: float | None = None):
    """The object ``uri`` as an :class:`S3Object` or a :class:`GcsObject`; any other scheme
    has no compare-and-set here: refused in one line."""
    scheme = urlsplit(uri).scheme
    if scheme == "s3":
        return S3Object(uri, term_s)
    if scheme == "gs":
        return GcsObject(uri, term_s)
    raise InputError(f"{uri.split('?', 1)[0]}: {scheme}:// has no conditional writes here, "
                     "without which two drivers could both take its lock; use s3://, gs:// or a "
                     "local or NFS path")  # fmt: skip


class S3Object:
    """One S3 object; versions are ETags."""

    def __init__(self, uri: str, term_s: float | None = None):
        _, self.bucket, self.key, options = split_object_uri(uri)
        self.client = s3_client(options, term_s)

    def _code(self, err) -> str | None:
        return err.response.get("Error", {}).get("Code")

    def read(self) -> tuple[bytes | None, str | None]:
        try:
            found = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.NoSuchKey:
            return None, None
        return found["Body"].read(), found["ETag"]

    def _put(self, body: bytes, **condition) -> str:
        try:
            done = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body,
                                          **condition)  # fmt: skip
        except self.client.exceptions.ClientError as err:
            if self._code(err) in (*PRECONDITION, "NoSuchKey"):
                raise Conflict(self._code(err)) from None
            if self._code(err) in NO_CONDITIONS or "If-None-Match" in str(err):
                raise NoConditions(self._code(err)) from None
            raise
        return done["ETag"]

    def create(self, body: bytes) -> str:
        return self._put(body, IfNoneMatch="*")

    def replace(self, body: bytes, version: str) -> str:
        return self._put(body, IfMatch=version)

    def delete(self, version: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=version)
        except self.client.exceptions.ClientError as err:
            if self._code(err) in (*PRECONDITION, "NoSuchKey"):
                raise Conflict(self._code(err)) from None
            raise


class GcsObject:
    """One Cloud Storage object; versions are its generations. Credentials as google's client
    finds them (the pod's identity, ``GOOGLE_APPLICATION_CREDENTIALS``); ``gs://anonymous@…``
    and the URI's ``endpoint_override``/``scheme``, as pyarrow reads them; the
    ``STORAGE_EMULATOR_HOST`` of an emulator."""

    def __init__(self, uri: str, term_s: float | None = None):
        try:
            from google.api_core.retry import Retry
            from google.cloud import storage
        except ImportError:
            raise InputError(
                "a gs:// lock needs google-cloud-storage, whose generation preconditions it "
                "stands on: pip install google-cloud-storage"
            ) from None
        _, netloc, self.key, options = split_object_uri(uri)
        anonymous, _, bucket = netloc.rpartition("@")
        kwargs = {}
        if options.get("endpoint_override"):
            endpoint = f"{options.get('scheme', 'https')}://{options['endpoint_override']}"
            kwargs["client_options"] = {"api_endpoint": endpoint}
        if anonymous == "anonymous":
            from google.auth.credentials import AnonymousCredentials

            kwargs.update(credentials=AnonymousCredentials(), project="anonymous")
        self.bucket = storage.Client(**kwargs).bucket(bucket)
        # like the S3 client: a call bounded well inside a lease's term
        wait = max(0.2, term_s / 12) if term_s else 60.0
        self.calls = {"timeout": (wait, wait),
                      "retry": Retry(timeout=2 * wait, initial=0.1, maximum=wait)}  # fmt: skip

    def read(self) -> tuple[bytes | None, str | None]:
        from google.api_core import exceptions

        blob = self.bucket.blob(self.key)
        try:
            data = blob.download_as_bytes(**self.calls)
        except exceptions.NotFound:
            return None, None
        return data, str(blob.generation)

    def _put(self, body: bytes, generation: int) -> str:
        from google.api_core import exceptions

        blob = self.bucket.blob(self.key)
        try:
            blob.upload_from_string(body, if_generation_match=generation, **self.calls)
        except exceptions.PreconditionFailed as err:
            raise Conflict(str(err.code)) from None
        except exceptions.NotFound as err:
            if generation == 0:
                raise  # a create finds no bucket: the caller's to say
            raise Conflict(str(err.code)) from None  # replaced, and the object is gone
        return str(blob.generation)

    def create(self, body: bytes) -> str:
        return self._put(body, 0)  # generation 0: only if there is none

    def replace(self, body: bytes, version: str) -> str:
        return self._put(body, int(version))

    def delete(self, version: str) -> None:
        from google.api_core import exceptions

        try:
            self.bucket.blob(self.key).delete(if_generation_match=int(version), **self.calls)
        except (exceptions.PreconditionFailed, exceptions.NotFound) as err:
            raise Conflict(str(err.code)) from None
