"""Tokenized parquet shards and their manifest: write atomically, read back verified.

A prepared directory holds ``{split}-{index:05d}.parquet`` files, each one fixed-size-list column
``input_ids`` of ``seq_len`` ids per row (uint16 where the vocabulary fits, as the manifest's
``ids_dtype`` says, else int32), and ``manifest.json``: the recipe
(source, tokenizer, seq_len, split fractions), per-split counts and every shard's size and
sha256. The
manifest is written last, inside a temporary directory that is renamed into place, so a
directory with a manifest is always complete.

A reader names the directory by a local path or a storage URI (``s3://…?endpoint_override=…``,
``gs://…``). Before a run, the driver checks each shard's presence and size against the manifest
(one listing); each shard's checksum is checked by whatever reads it, on its own node, as it
reads it: the driver never reads the corpus. What a training rank reads each epoch, and in what
order: :mod:`enigma.data.epochs`.

uint16 does not shrink the files: parquet has no 16-bit physical type, and its dictionary
encoding already packs a 21,128-id vocabulary into about 14 bits an id (三国演义 at seq 128:
890,175 bytes of uint16 shards, 890,280 of int32). It halves what moves after the read, up to
the training step, which widens the ids (:func:`enigma.train.worker.model_inputs`).
:func:`read_blocks` gives int32.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .sources import DataError

MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1


class ShardWriter:
    """Collects packed blocks of one split and writes a shard every ``shard_blocks`` rows to
    ``destination`` (a directory, or a :class:`~enigma.storage.store.Storage` of a path or a URI),
    each whole (:meth:`Storage.write_bytes`), its sha256 computed from the bytes written.
    ``unit``: the prepare unit writing (its number goes in the names, so no two units' names meet
    and a unit written again replaces its own shards)."""

    def __init__(self, destination, split: str, seq_len: int, shard_blocks: int,
                 dtype=np.int32, unit: int | None = None):  # fmt: skip
        from ..storage.store import Storage

        if not isinstance(destination, Storage):
            destination = Storage(str(Path(destination).absolute()))
        self.destination, self.split, self.dtype, self.unit = destination, split, dtype, unit
        self.seq_len, self.shard_blocks = seq_len, shard_blocks
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0
        self.shards: list[dict] = []

    def add(self, blocks: np.ndarray) -> None:
        if len(blocks):
            self.pending.append(blocks)
            self.pending_rows += len(blocks)
        while self.pending_rows >= self.shard_blocks:
            self._flush(self.shard_blocks)

    def close(self) -> list[dict]:
        if self.pending_rows:
            self._flush(self.pending_rows)
        return self.shards

    def _flush(self, rows: int) -> None:
        stacked = np.concatenate(self.pending)
        out, rest = stacked[:rows], stacked[rows:]
        self.pending, self.pending_rows = ([rest] if len(rest) else []), len(rest)
        unit = "" if self.unit is None else f"{self.unit:05d}-"
        name = f"{self.split}-{unit}{len(self.shards):05d}.parquet"
        data = columns_bytes({"input_ids": out.astype(self.dtype, copy=False)})
        self.destination.write_bytes(data, name)
        self.shards.append({"file": name, "blocks": rows, "bytes": len(data),
                            "sha256": hashlib.sha256(data).hexdigest()})  # fmt: skip


def columns_bytes(columns: dict[str, np.ndarray]) -> bytes:
    """A parquet file of fixed-size-list int columns, each ``(rows, seq_len)``."""
    table = {}
    for name, values in columns.items():
        flat = pa.array(values.reshape(-1))
        table[name] = pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
    sink = pa.BufferOutputStream()
    # zstd over parquet's dictionary pages: 1.30 bytes an id where snappy gives 1.49, at the
    # same read speed (8,192 blocks of 256 uint16 ids of 三国演义 text)
    pq.write_table(pa.table(table), sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def write_columns(path: Path, columns: dict[str, np.ndarray]) -> dict:
    """One shard of fixed-size-list int columns, each ``(rows, seq_len)``; its manifest entry."""
    path.write_bytes(data := columns_bytes(columns))
    rows = len(next(iter(columns.values())))
    return {"file": path.name, "blocks": rows, "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}  # fmt: skip


def _where(directory: str | os.PathLike):
    """``(pyarrow file system, path)`` of a data directory named by a path or a URI."""
    import pyarrow.fs as pafs

    from ..storage.store import Storage

    directory = str(directory)
    if "://" not in directory:
        return pafs.LocalFileSystem(), str(Path(directory).absolute())
    try:
        return pafs.FileSystem.from_uri(Storage.at(directory, "--data").uri())
    except pa.ArrowInvalid as err:  # an unknown scheme or option, a malformed URI
        raise DataError(f"data {directory}: {err}") from None


def _member(directory: str | os.PathLike, name: str) -> str:
    """``name`` inside the data directory, as a path or a URI (its query kept last)."""
    from ..storage.store import Storage

    directory = str(directory)
    if "://" not in directory:
        return str(Path(directory) / name)
    return Storage.at(directory, "--data").uri(name)


def has_manifest(directory: str | os.PathLike) -> bool:
    fs, root = _where(directory)
    try:
        return fs.get_file_info(f"{root}/{MANIFEST}").is_file
    except OSError:
        return False  # unreadable: read_manifest says why


def read_manifest(directory: str | os.PathLike) -> dict:
    import pyarrow.fs as pafs

    fs, root = _where(directory)
    try:
        kind = fs.get_file_info(root).type
        text = None
        if kind == pafs.FileType.Directory and fs.get_file_info(f"{root}/{MANIFEST}").is_file:
            with fs.open_input_stream(f"{root}/{MANIFEST}") as f:
                text = f.read().decode("utf-8", errors="replace")
    except OSError as err:  # no bucket, no credentials, no route
        raise DataError(f"data {directory} cannot be read from here ({err}); check the bucket "
                        "and the AWS_* variables (endpoint and credentials)") from None  # fmt: skip
    if kind != pafs.FileType.Directory:
        raise DataError(
            f"data directory {directory} does not exist; create it with "
            f"`enigma data prepare --out {directory}`"
        )
    if text is None:
        raise DataError(
            f"{directory} has no {MANIFEST} (an unfinished prepare?); rebuild it with "
            f"`enigma data prepare --out {directory} --force`"
        )
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{_member(directory, MANIFEST)} is not valid JSON ({err}); rebuild with "
                        "--force") from err  # fmt: skip


def check_compatible(manifest: dict, seq_len: int | None, vocab_hash: str | None, where: str):
    """The data must match the model: same seq_len, same tokenizer (by vocab hash)."""
    if seq_len is not None and manifest["seq_len"] != seq_len:
        raise DataError(
            f"{where} was prepared with seq_len={manifest['seq_len']} but training expects "
            f"seq_len={seq_len}; prepare again with --seq-len {seq_len} or change seq_len"
        )
    tokenizer = manifest["tokenizer"]
    if vocab_hash is not None and tokenizer["vocab_hash"] != vocab_hash:
        raise DataError(
            f"{where} was tokenized with another vocabulary ({tokenizer['name']}, "
            f"{tokenizer['vocab_size']} tokens) than the model's; prepare it again"
        )


def shard_paths(
    directory: str | os.PathLike,
    split: str,
    seq_len: int | None = None,
    vocab_hash: str | None = None,
    verify: bool = True,
) -> tuple[dict, list[dict]]:
    """The manifest and one split's shards, each ``{"path", "bytes", "sha256", "blocks"}`` (a
    path or a URI), every one present at its recorded size (one listing; older manifests record
    no size).
    Their contents are checked by :func:`read_shard` as they are read (``verify=False``: not)."""
    import pyarrow.fs as pafs

    manifest = read_manifest(directory)
    if split not in manifest["splits"]:
        raise DataError(f"split {split!r} is not in {directory}; it has {list(manifest['splits'])}")
    check_compatible(manifest, seq_len, vocab_hash, str(directory))
    fs, root = _where(directory)
    sizes = {i.base_name: i.size for i in fs.get_file_info(pafs.FileSelector(root))}
    refs = []
    for shard in manifest["splits"][split]["shards"]:
        path, size = _member(directory, shard["file"]), shard.get("bytes")
        if shard["file"] not in sizes:
            raise DataError(f"shard {path} is missing; rebuild with `enigma data prepare --force`")
        if size is not None and sizes[shard["file"]] != size:
            raise _wrong_size(path, sizes[shard["file"]], size)
        refs.append({"path": path, "bytes": size, "sha256": shard["sha256"] if verify else None,
                     "blocks": shard.get("blocks")})  # fmt: skip
    return manifest, refs


def read_shard(ref: dict, widen: bool = True) -> pa.Table:
    """One shard (``{"path", "bytes", "sha256"}``, a path or a URI), its size and checksum
    checked against the manifest's as it is read, where it is read; ``widen``: its ids as
    int32 whatever it stores."""
    fs, path = _where(ref["path"]) if "://" in ref["path"] else (None, ref["path"])
    if fs is None:
        data = Path(path).read_bytes()
    else:
        with fs.open_input_stream(path) as f:
            data = f.read()
    if ref.get("bytes") is not None and len(data) != ref["bytes"]:
        raise _wrong_size(ref["path"], len(data), ref["bytes"])
    if ref.get("sha256") and hashlib.sha256(data).hexdigest() != ref["sha256"]:
        raise DataError(
            f"shard {ref['path']} is corrupt (sha256 mismatch); rebuild with "
            "`enigma data prepare --force`"
        )
    table = pq.read_table(pa.BufferReader(data))
    return as_int32(table) if widen else table


def ids_dtype(vocab_size: int):
    """The narrowest id type shards store for a vocabulary: half the bytes for most."""
    return np.uint16 if vocab_size <= 2**16 else np.int32


def as_int32(table: pa.Table) -> pa.Table:
    """Every fixed-size-list column of ids as int32, whatever the shard stores."""
    for i, field in enumerate(table.schema):
        kind = field.type
        if pa.types.is_fixed_size_list(kind) and kind.value_type != pa.int32():
            wanted = pa.list_(pa.int32(), kind.list_size)
            table = table.set_column(i, field.name, table.column(i).cast(wanted))
    return table


def _wrong_size(path: str, got: int, recorded: int) -> DataError:
    return DataError(f"shard {path} holds {got:,} bytes and the manifest says {recorded:,}; "
                     "rebuild with `enigma data prepare --force`")  # fmt: skip


def read_blocks(directory: str | os.PathLike, split: str, verify: bool = True) -> np.ndarray:
    """All blocks of a split as an ``(N, seq_len)`` int32 array, without Ray."""
    manifest, refs = shard_paths(directory, split, verify=verify)
    arrays = [read_shard(r).column("input_ids").combine_chunks().flatten().to_numpy() for r in refs]
    flat = np.concatenate(arrays) if arrays else np.zeros(0, np.int32)
    return flat.reshape(-1, manifest["seq_len"])


def staging_directory(out: Path) -> Path:
    """A fresh sibling of ``out`` to build in; leftovers of interrupted runs are removed (the
    caller holds ``out``'s lock, so none of them belongs to a live run)."""
    from ..storage.atomic import remove_leftovers, staging_dir

    remove_leftovers(out, "tmp")
    return staging_dir(out, "tmp")


def publish(staging: Path, out: Path, manifest: dict) -> None:
    """Write the manifest last, then swap the staging directory into place atomically."""
    from ..storage.atomic import replace_dir

    tmp = staging / (MANIFEST + ".part")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    os.replace(tmp, staging / MANIFEST)
    replace_dir(staging, out)
