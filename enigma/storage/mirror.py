"""A model named by a storage URI, as a local directory that every process on a node shares.

``from_pretrained``, the tokenizer, PEFT and lm-evaluation-harness read local files, so a model
at ``s3://…`` or ``gs://…`` (what ``--storage-path`` exports) is mirrored into a cache on this
node first: ``$ENIGMA_CACHE/models/KEY`` (default ``~/.cache/enigma``). ``KEY`` is the model's
content: the checksums its export recorded (``checksums.json``, written by every export) with
the sizes the store lists, or, for a directory without them, each file's name, size and
modification time. A new export is a new key, and so is a file replaced behind the export's
back (whose copy then fails its check). A key is fetched once per node, however many ranks,
replicas or evaluation tasks ask at once: the fetch happens under a lock of the key, into a
directory of its own that is checked (every size, and every checksum when recorded) and synced
before it takes the key's name. A fetch killed midway leaves only that directory, which the
next fetch of that key removes.

Reading never writes to the store: an export swapped in by steps (see
:meth:`enigma.storage.store.Storage.replace_model`) is read from ``model/`` when it carries its
marker, else from the whole copy beside it (``.model.next/``), which the next export completes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

from ..errors import InputError
from .atomic import CHECKSUMS, file_sha256, fsync_dir, fsync_tree
from .store import MARKERS, Storage, is_uri


def cache_root() -> Path:
    base = os.environ.get("ENIGMA_CACHE")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "enigma"


def local_model(path: str, flag: str = "--model") -> str:
    """``path`` itself when it is local; for a storage URI, the local mirror of the model there
    (fetched when this node has no verified copy of that content). A URI that holds no model is
    one line naming it."""
    if not is_uri(path):
        return path
    given = Storage.at(path, flag)
    root, _, name = given.root.rpartition("/")
    if not name or "://" not in root:
        raise InputError(f"{flag} {path}: name the model's directory, e.g. s3://bucket/run/model")
    storage = Storage(root, given.query)
    listing = _listing(storage, name, flag)
    if not any(m in listing for m in MARKERS):
        beside = _listing(storage, f".{name}.next", flag)
        if any(m in beside for m in MARKERS):  # a swap under way, or killed: the whole copy
            return str(_mirror(storage, f".{name}.next", beside))
        if name != "model" and _has_model(storage, name):  # an `enigma train` output directory
            return local_model(storage.uri(name, "model"), flag)
        raise InputError(
            f"{flag} {storage.uri(name)} holds no saved model (no config.json or "
            "adapter_config.json in it); name the directory an export wrote"
        )
    inside = _subdirectories(storage, name)
    if inside:  # the mirror fetches a model's files, not folders: it would be incomplete
        raise InputError(
            f"{flag} {storage.uri(name)} holds subdirectories ({', '.join(inside[:3])}), which "
            "the mirror does not fetch; name a directory that `save_pretrained` wrote"
        )
    return str(_mirror(storage, name, listing))


def local_file(path: str, flag: str) -> str:
    """``path`` itself when it is local; for a storage URI, this node's mirror of that one file
    (keyed by its URI, size and modification time; fetched once, like a model)."""
    import pyarrow.fs as pafs

    if not is_uri(path):
        return path
    given = Storage.at(path, flag)
    root, _, name = given.root.rpartition("/")
    if not name or "://" not in root or root.endswith(":/"):
        raise InputError(f"{flag} {path}: name a file in the bucket, e.g. s3://bucket/rows.jsonl")
    storage = Storage(root, given.query)
    fs, where = given.filesystem()
    try:
        info = fs.get_file_info(where)
    except OSError as err:  # no bucket, no credentials, no route
        raise InputError(f"{flag} {path} cannot be read from here ({err}); check the bucket and "
                         "the AWS_* variables (endpoint and credentials)") from None  # fmt: skip
    if info.type == pafs.FileType.Directory:
        raise InputError(f"{flag} {path} is a directory, not a file (a prepared data directory "
                         "has a manifest.json; an unfinished prepare none)")  # fmt: skip
    if info.type != pafs.FileType.File:
        raise InputError(f"{flag} {path} does not exist")
    listing = {name: (info.size, info.mtime_ns or 0)}
    return str(_mirror(storage, "", listing, source=path) / name)


def _subdirectories(storage: Storage, name: str) -> list[str]:
    import pyarrow.fs as pafs

    fs, where = storage.filesystem(name)
    infos = fs.get_file_info(pafs.FileSelector(where, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def local_tokenizer(data: str) -> str | None:
    """The tokenizer that the prepared data directory ``data`` (a URI) holds, mirrored like a
    model; None when it holds none."""
    storage = Storage.at(data, "--data")
    listing = _listing(storage, "tokenizer", "--data")
    return str(_mirror(storage, "tokenizer", listing)) if "tokenizer.json" in listing else None


def _listing(storage: Storage, name: str, flag: str) -> dict[str, tuple[int, int]]:
    """``{file name: (size, mtime_ns)}`` of the files directly under ``root/name``."""
    import pyarrow.fs as pafs

    fs, where = storage.filesystem(name)
    try:
        infos = fs.get_file_info(pafs.FileSelector(where, allow_not_found=True))
    except OSError as err:  # no bucket, no credentials, no route
        raise InputError(
            f"{flag} {storage.uri(name)} cannot be read from here ({err}); check the bucket "
            "and the AWS_* variables (endpoint and credentials)"
        ) from None
    return {i.base_name: (i.size, i.mtime_ns or 0) for i in infos if i.type == pafs.FileType.File}


def _has_model(storage: Storage, name: str) -> bool:
    import pyarrow.fs as pafs

    fs, where = storage.filesystem(name, "model", "config.json")
    return fs.get_file_info(where).type == pafs.FileType.File


def _recorded(storage: Storage, name: str, listing: dict) -> dict | None:
    """The checksums the export recorded (None: an export from before they were); ones that do
    not parse, or do not name exactly the files there, are a damaged model."""
    if CHECKSUMS not in listing:
        return None
    fs, where = storage.filesystem(name, CHECKSUMS)
    with fs.open_input_stream(where) as f:
        try:
            sums = json.loads(f.read())
        except (json.JSONDecodeError, UnicodeDecodeError):
            sums = None
    if not isinstance(sums, dict) or set(sums) != set(listing) - {CHECKSUMS}:
        raise InputError(
            f"{storage.uri(name)} does not hold the files its {CHECKSUMS} records; export it "
            "again, or retry if an export was writing it"
        )
    return sums


def _mirror(storage: Storage, name: str, listing: dict, source: str = "") -> Path:
    """``source``: the URI of the one file mirrored (part of the key, and what notes name)."""
    sums = _recorded(storage, name, listing)
    if sums:
        content = {"recorded": sums, "listed": {f: v[0] for f, v in listing.items()}}
    else:
        content = {f: list(v) for f, v in listing.items()}
    if source:
        content = {"content": content, "from": source.partition("?")[0]}
    key = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:32]
    models = cache_root() / "models"
    target = models / key
    if target.is_dir():  # only a checked copy takes the key's name
        return target
    models.mkdir(parents=True, exist_ok=True)
    with open(models / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits here, then finds the copy
        if target.is_dir():
            return target
        for stale in models.glob(f".{key}.partial-*"):  # fetches killed midway
            shutil.rmtree(stale, ignore_errors=True)
        start = time.perf_counter()
        partial = models / f".{key}.partial-{os.getpid()}"
        partial.mkdir()
        try:
            problem = _fetch(storage, name, listing, partial) or _check(partial, listing, sums)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        if problem:
            shutil.rmtree(partial, ignore_errors=True)
            raise InputError(
                f"{source or storage.uri(name)} changed or is damaged ({problem}); "
                + ("retry" if source else "export it again, or retry if an export was writing it")
            )
        fsync_tree(partial)  # on disk before its name says it is checked
        os.replace(partial, target)
        fsync_dir(models)
    size = sum(v[0] for v in listing.values())
    print(f"note: {source or storage.uri(name)} fetched into {target} ({len(listing)} files, "
          f"{size / 2**20:.1f} MiB, {time.perf_counter() - start:.1f} s)", file=sys.stderr,
          flush=True)  # fmt: skip
    return target


def _fetch(storage: Storage, name: str, listing: dict, local: Path) -> str | None:
    """Copy the listed files into ``local``; what went missing meanwhile, or None."""
    fs, where = storage.filesystem(name)
    for f in listing:
        try:
            with fs.open_input_stream(f"{where}/{f}") as src, open(local / f, "wb") as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
        except FileNotFoundError:  # replaced or removed by an export since the listing
            return f"{f} went while it was fetched"
    return None


def _check(local: Path, listing: dict, sums: dict | None) -> str | None:
    """What differs between the fetched copy and what was listed (and recorded), or None."""
    for f, (size, _) in listing.items():
        got = (local / f).stat().st_size
        if got != size:
            return f"{f}: {got:,} bytes fetched, {size:,} listed"
        if sums and f != CHECKSUMS:
            if got != sums[f]["size"] or file_sha256(local / f) != sums[f]["sha256"]:
                return f"{f} does not match its recorded checksum"
    return None
