"""Tokenized parquet shards and their manifest: write atomically, read back verified.

A prepared directory holds ``{split}-{index:05d}.parquet`` files, each one fixed-size-list column
``input_ids`` of ``seq_len`` int32 ids per row, and ``manifest.json``: the recipe (source,
tokenizer, seq_len, split fractions), per-split counts and every shard's sha256. The manifest is
written last, inside a temporary directory that is renamed into place, so a directory with a
manifest is always complete.
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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ShardWriter:
    """Collects packed blocks of one split and writes a shard every ``shard_blocks`` rows."""

    def __init__(self, directory: Path, split: str, seq_len: int, shard_blocks: int):
        self.directory, self.split = directory, split
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
        name = f"{self.split}-{len(self.shards):05d}.parquet"
        ids = out.astype(np.int32, copy=False)
        self.shards.append(write_columns(self.directory / name, {"input_ids": ids}))


def write_columns(path: Path, columns: dict[str, np.ndarray]) -> dict:
    """One shard of fixed-size-list int columns, each ``(rows, seq_len)``; its manifest entry."""
    table = {}
    for name, values in columns.items():
        flat = pa.array(values.reshape(-1))
        table[name] = pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
    pq.write_table(pa.table(table), path)
    rows = len(next(iter(columns.values())))
    return {"file": path.name, "blocks": rows, "sha256": sha256_file(path)}


def read_manifest(directory: str | os.PathLike) -> dict:
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise DataError(
            f"data directory {directory} does not exist; create it with "
            f"`enigma data prepare --out {directory}`"
        )
    if not path.is_file():
        raise DataError(
            f"{directory} has no {MANIFEST} (an unfinished prepare?); rebuild it with "
            f"`enigma data prepare --out {directory} --force`"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({err}); rebuild with --force") from err


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
) -> tuple[dict, list[str]]:
    """The manifest and the verified shard files of one split."""
    manifest = read_manifest(directory)
    if split not in manifest["splits"]:
        raise DataError(f"split {split!r} is not in {directory}; it has {list(manifest['splits'])}")
    check_compatible(manifest, seq_len, vocab_hash, str(directory))
    paths = []
    for shard in manifest["splits"][split]["shards"]:
        path = Path(directory) / shard["file"]
        if not path.is_file():
            raise DataError(f"shard {path} is missing; rebuild with `enigma data prepare --force`")
        if verify and sha256_file(path) != shard["sha256"]:
            raise DataError(
                f"shard {path} is corrupt (sha256 mismatch); rebuild with "
                "`enigma data prepare --force`"
            )
        paths.append(str(path))
    return manifest, paths


def load_split(
    directory: str | os.PathLike,
    split: str,
    seq_len: int | None = None,
    vocab_hash: str | None = None,
    verify: bool = True,
):
    """A ``ray.data.Dataset`` of the split's rows (``input_ids``; fine-tuning data also has
    ``labels`` and ``attention_mask``), for ``get_dataset_shard`` streaming.

    The dataset is the list of shard paths, each read by a zero-CPU task: training workers usually
    hold every CPU, and ``read_parquet``'s file-listing task, which always asks for a whole CPU,
    would wait for one for ever."""
    import ray

    _, paths = shard_paths(directory, split, seq_len, vocab_hash, verify)
    if not paths:
        raise DataError(f"split {split!r} of {directory} has no blocks; use a larger corpus")
    files = ray.data.from_items([{"path": p} for p in paths])
    return files.map_batches(_read_shard, batch_size=1, batch_format="pyarrow", num_cpus=0)


def _read_shard(batch: pa.Table) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in batch.column("path").to_pylist()])


def read_blocks(directory: str | os.PathLike, split: str, verify: bool = True) -> np.ndarray:
    """All blocks of a split as an ``(N, seq_len)`` int32 array, without Ray."""
    manifest, paths = shard_paths(directory, split, verify=verify)
    arrays = [
        pq.read_table(p).column("input_ids").combine_chunks().flatten().to_numpy() for p in paths
    ]
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
