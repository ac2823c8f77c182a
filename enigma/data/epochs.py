"""What each rank reads in each epoch, straight from the shards, in a seeded order that a resume
reproduces block for block.

An epoch is the split's shards in an order drawn from ``(seed, epoch)``, each shard's blocks in
an order drawn from ``(seed, epoch, shard)``. Rank r of W trains on the r-th of W equal, contiguous
spans of that sequence, so it opens about 1/W of the shards (where the data is, not all of it
fetched by every rank), and each epoch another 1/W. Within its span a rank mixes neighbouring
shards' blocks in windows of ``window`` blocks, each window in an order of its own.

Everything is a function of ``(seed, epoch, position)``: a run resumed at micro-batch k of an
epoch starts at the shard that holds it and yields what the uninterrupted run would have, with
no block repeated or skipped and nothing read to be thrown away beyond one window. (A streaming
split hands blocks to whichever rank asks first, so no resume could reproduce it.)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .sources import DataError

Columns = dict[str, np.ndarray]  # name -> (rows, seq_len), one row a block


@dataclass(frozen=True)
class EpochOrder:
    """One split's shards (``{"path", "bytes", "sha256", "blocks"}``, as
    :func:`~enigma.data.shards.shard_paths` gives them) and how an epoch orders them."""

    shards: tuple[dict, ...]
    seed: int | None = None  # shards and their blocks in a seeded order; None: as written
    window: int = 0  # blocks mixed together within a rank's span; 0 or 1: none
    window_seed: int = 0

    def __post_init__(self):
        missing = [s["path"] for s in self.shards if s.get("blocks") is None]
        if missing:
            raise DataError(
                f"the manifest gives no block count for shard {missing[0]}; "
                "prepare the data again with `enigma data prepare --force`"
            )
        # numpy takes no negative seed
        object.__setattr__(self, "seed", None if self.seed is None else self.seed % 2**63)
        object.__setattr__(self, "window_seed", self.window_seed % 2**63)

    @property
    def blocks(self) -> int:
        return sum(s["blocks"] for s in self.shards)

    def shard_order(self, epoch: int) -> np.ndarray:
        if self.seed is None:
            return np.arange(len(self.shards))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))

    def span(self, epoch: int, start: int, stop: int) -> Iterator[Columns]:
        """Blocks ``[start, stop)`` of the epoch's sequence, a chunk per shard touched; the next
        shard is read (and its checksum checked) while this one is used."""
        order = self.shard_order(epoch)
        counts = np.array([self.shards[i]["blocks"] for i in order], dtype=np.int64)
        ends = np.cumsum(counts)
        first = int(np.searchsorted(ends, start, side="right"))
        last = int(np.searchsorted(ends - counts, stop, side="left"))  # shards starting before
        wanted = [int(i) for i in order[first:last]]
        begins = (ends - counts)[first:last]
        read = _read_ahead(self.shards, wanted)
        for shard, begin, columns in zip(wanted, begins, read, strict=True):
            rows = self.shards[shard]["blocks"]
            lo, hi = max(start - begin, 0), min(stop - begin, rows)
            taken = self._rows(epoch, shard, rows)[lo:hi]
            yield {name: values[taken] for name, values in columns.items()}

    def _rows(self, epoch: int, shard: int, rows: int) -> np.ndarray:
        if self.seed is None:
            return np.arange(rows)
        return np.random.default_rng([self.seed, epoch, shard]).permutation(rows)

    def blocks_of(self, epoch: int, start: int, stop: int, skip: int = 0) -> Iterator[Columns]:
        """Blocks ``[start, stop)`` windows-mixed, the first ``skip`` of them left out."""
        window = self.window if self.window > 1 else 0
        first = start + (skip // window * window if window else skip)
        drop = start + skip - first
        stream = self.span(epoch, first, stop)
        if window:
            stream = self._mixed(epoch, first, exact(stream, window))
        for chunk in stream:
            if drop:
                cut = min(drop, _rows(chunk))
                chunk, drop = {k: v[cut:] for k, v in chunk.items()}, drop - cut
            if _rows(chunk):
                yield chunk

    def _mixed(self, epoch: int, first: int, windows: Iterable[Columns]) -> Iterator[Columns]:
        for i, chunk in enumerate(windows):
            at = first + i * self.window  # where the window starts in the epoch
            order = np.random.default_rng([self.window_seed, epoch, at]).permutation(_rows(chunk))
            yield {k: v[order] for k, v in chunk.items()}

    def batches(self, epoch: int, start: int, stop: int, size: int, skip: int = 0):
        """Micro-batches of ``size`` blocks (torch tensors in the shard's dtype) from blocks
        ``[start, stop)``, the first ``skip`` micro-batches left out; a short last one dropped."""
        import torch

        for chunk in exact(self.blocks_of(epoch, start, stop, skip * size), size):
            if _rows(chunk) == size:
                yield {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in chunk.items()}


def _rows(columns: Columns) -> int:
    return len(next(iter(columns.values())))


def exact(chunks: Iterable[Columns], size: int) -> Iterator[Columns]:
    """The same rows in chunks of exactly ``size`` (the last may be shorter); views where a
    chunk holds them whole, a copy only where one spans two."""
    pending: list[Columns] = []
    held = 0
    for chunk in chunks:
        rows, at = _rows(chunk), 0
        if held:
            at = min(size - held, rows)
            pending.append(_slice(chunk, 0, at))
            held += at
            if held < size:
                continue
            yield _join(pending)
            pending, held = [], 0
        while rows - at >= size:
            yield _slice(chunk, at, at + size)
            at += size
        if at < rows:
            pending, held = [_slice(chunk, at, rows)], rows - at
    if held:
        yield _join(pending)


def _slice(columns: Columns, start: int, stop: int) -> Columns:
    return {k: v[start:stop] for k, v in columns.items()}


def _join(chunks: list[Columns]) -> Columns:
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def _read_ahead(shards: tuple[dict, ...], wanted: list[int]) -> Iterator[Columns]:
    """The wanted shards' columns in order, the next one read in a thread meanwhile."""
    if not wanted:
        return
    with ThreadPoolExecutor(1, thread_name_prefix="enigma-shard-read") as pool:
        pending = pool.submit(read_columns, shards[wanted[0]])
        for following in [*wanted[1:], None]:
            ahead = None if following is None else pool.submit(read_columns, shards[following])
            yield pending.result()
            pending = ahead


def read_columns(ref: dict) -> Columns:
    """One shard's fixed-size-list columns as ``(rows, seq_len)`` arrays in the stored dtype,
    its size and checksum checked as it is read."""
    from .shards import read_shard

    table = read_shard(ref, widen=False)
    columns = {}
    for name in table.column_names:
        values = table.column(name).combine_chunks()
        width = values.type.list_size
        columns[name] = values.flatten().to_numpy().reshape(-1, width)
    return columns
