"""Object-store URIs (``s3://bucket/key?option=value``) and a client for what pyarrow cannot
do there: conditional writes (:class:`enigma.storage.locks.ObjectLock`)."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit


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
