"""``enigma data prepare``: text -> tokenized, packed, split parquet shards on Ray Data.

Tokenization runs in parallel in ``map_batches``. Packing is a streaming pass in the driver over the
tokenized documents in a fixed order: each split has a carry buffer, documents join it with [SEP]
after each, and full ``seq_len`` blocks go to the shard writer. So the only tokens dropped are the
final partial block of each split. Documents go to train/val/test by a hash of their text, which
keeps each document in exactly one split and the assignment independent of order and workers.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..storage.locks import DirectoryLock
from .shards import (
    FORMAT_VERSION,
    MANIFEST,
    SPLITS,
    ShardWriter,
    ids_dtype,
    publish,
    staging_directory,
)
from .sources import DataError, Source
from .tokenizer import load_tokenizer, vocab_hash

MIN_SEQ_LEN = 8
PIPELINE_BUFFER = 128 * 2**20  # bytes of tokenized batches in flight
OBJECT_STORE = 2 * PIPELINE_BUFFER
TOKENIZE_CHUNK = 128  # documents per tokenizer call
_TOKENIZERS: dict = {}
# bert-base-chinese has no curly quotes, dashes or ellipsis: unmapped, 三国演义's dialogue quotes
# alone make 3.6% of its tokens [UNK]. Their ASCII forms are in the vocabulary.
NORMALIZE = str.maketrans({"“": '"', "”": '"', "‘": "'", "’": "'", "—": "-", "…": "..."})
NORMALIZATION = "curly quotes, em dash and ellipsis to ASCII"


def assign_split(text: str, val_fraction: float, test_fraction: float) -> str:
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    if u < val_fraction:
        return "val"
    if u < val_fraction + test_fraction:
        return "test"
    return "train"


def _tokenize(batch: pa.Table, tokenizer_dir: str, val: float, test: float) -> pa.Table:
    """Ray Data ``map_batches`` body: one tokenizer per worker process, loaded once.

    Workers use the saved tokenizer's Rust backend directly (the same normalizer, pre-tokenizer
    and vocabulary as ``BertTokenizerFast``, so the same ids) and never import transformers."""
    if tokenizer_dir not in _TOKENIZERS:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
        tok.no_truncation()  # documents are packed later, never truncated
        tok.no_padding()
        _TOKENIZERS[tokenizer_dir] = tok
    tok = _TOKENIZERS[tokenizer_dir]
    texts = [t.strip().translate(NORMALIZE) for t in batch.column("text").to_pylist()]
    texts = [t for t in texts if t]
    # A few hundred documents per call, each turned into arrow at once: Python id lists cost
    # ~40 bytes per token, so a whole block at once would need hundreds of MB.
    chunks = [
        pa.array(
            [
                e.ids
                for e in tok.encode_batch(texts[i : i + TOKENIZE_CHUNK], add_special_tokens=False)
            ],
            type=pa.list_(pa.int32()),
        )
        for i in range(0, len(texts), TOKENIZE_CHUNK)
    ]
    ids = pa.chunked_array(chunks, type=pa.list_(pa.int32())).combine_chunks()
    return pa.table(
        {
            "ids": ids,
            "split": pa.array([assign_split(t, val, test) for t in texts], type=pa.string()),
            "bytes": pa.array([len(t.encode("utf-8")) for t in texts], type=pa.int64()),
        }
    )


class Packer:
    """Concatenates documents (each followed by [SEP]) and cuts full ``seq_len`` blocks."""

    def __init__(self, writer: ShardWriter, seq_len: int, sep_id: int):
        self.writer, self.seq_len, self.sep_id = writer, seq_len, sep_id
        self.carry = np.zeros(0, np.int32)
        self.documents = self.tokens = self.blocks = 0

    def add(self, docs: pa.ListArray) -> None:
        if len(docs) == 0:
            return
        offsets = docs.offsets.to_numpy()
        values = docs.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
        ends = offsets[1:] - offsets[0]
        stream = np.concatenate([self.carry, np.insert(values, ends, self.sep_id)])
        full = len(stream) // self.seq_len
        self.writer.add(stream[: full * self.seq_len].reshape(full, self.seq_len))
        self.carry = stream[full * self.seq_len :]
        self.documents += len(docs)
        self.tokens += len(values)
        self.blocks += full

    def summary(self) -> dict:
        return {
            "documents": self.documents,
            "tokens": self.tokens,
            "separators": self.documents,
            "blocks": self.blocks,
            "dropped_tokens": int(len(self.carry)),
            "shards": self.writer.close(),
        }


def recipe(source: Source, tokenizer, seq_len: int, val: float, test: float) -> dict:
    return {
        "format": FORMAT_VERSION,
        "source": source.describe(),
        "source_fingerprint": source.fingerprint(),
        "tokenizer": {
            "name": tokenizer.enigma_source,
            "vocab_hash": vocab_hash(tokenizer),
            "vocab_size": len(tokenizer),
        },
        "seq_len": seq_len,
        "normalization": NORMALIZATION,
        "val_fraction": val,
        "test_fraction": test,
    }


def _same_recipe(manifest: dict, wanted: dict) -> bool:
    keys = ("format", "source", "source_fingerprint", "seq_len", "normalization")
    keys += ("val_fraction", "test_fraction")
    same = all(manifest.get(k) == wanted[k] for k in keys)
    return same and manifest["tokenizer"]["vocab_hash"] == wanted["tokenizer"]["vocab_hash"]


def validate(seq_len: int, val: float, test: float) -> None:
    if seq_len < MIN_SEQ_LEN:
        raise DataError(f"--seq-len {seq_len} is below {MIN_SEQ_LEN}; use e.g. --seq-len 128")
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise DataError(
            f"--val-fraction {val} and --test-fraction {test} must be in [0, 1) and leave "
            "room for train"
        )


def prepare(
    source: Source,
    out: str | Path,
    seq_len: int = 128,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    tokenizer_name: str | None = None,
    force: bool = False,
    shard_blocks: int = 8192,
    progress: bool = True,
) -> dict:
    """Build ``out`` (atomically) and return its manifest; a matching manifest is left alone.
    One prepare at a time per ``out``: a second is refused, naming the first. ``out`` may be a
    storage URI: built on this machine, then put there with its manifest last
    (:func:`_put_in_storage`)."""

    validate(seq_len, val_fraction, test_fraction)
    source.files()  # a missing path fails here, before Ray starts
    if source.blank():  # and so does a corpus of blank files (other sources: after reading)
        raise DataError(f"corpus {source.describe()} is empty: no non-blank documents")
    args = (seq_len, val_fraction, test_fraction, tokenizer_name, force, shard_blocks, progress)
    if "://" in str(out):
        return _prepare_to_storage(source, str(out), *args)
    out = Path(out)
    with DirectoryLock(out.parent / f".{out.name}.lock", "enigma data prepare", out):
        return _prepare_locked(source, out, *args)


def _prepare_to_storage(source, out: str, *args) -> dict:
    import tempfile

    from ..storage.store import Storage

    storage = Storage.at(out, "--out")
    force = args[4]  # (seq_len, val, test, tokenizer, force, shard_blocks, progress)
    try:  # refused before anything is written there (the probe below writes)
        foreign = _not_prepared_data(storage)
    except OSError:
        foreign = []  # unreachable: the probe says so in one line
    if foreign and not force:
        raise DataError(
            f"--out {out} holds files a prepare did not write ({', '.join(foreign[:3])}); "
            "name an empty prefix, or --force to replace everything under it"
        )
    storage.check("--out")  # reachable and writable, before Ray starts
    with storage.lock("enigma data prepare"), tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "data"
        manifest = _prepare_locked(source, local, *args, target=out)
        if local.is_dir():  # else: up to date where it is
            _put_in_storage(local, storage)
            print(f"put {out} (the manifest last)")
        return manifest


def _not_prepared_data(storage) -> list[str]:
    """Files under ``storage``'s root that no prepare writes (shards, manifest, tokenizer, its
    lock): what replacing the directory would destroy."""
    import pyarrow.fs as pafs

    fs, root = storage.filesystem()
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    names = [i.path[len(root) + 1 :] for i in infos if i.is_file]
    ours = lambda n: n in (MANIFEST, ".lock") or n.startswith("tokenizer/") or (
        "/" not in n and n.endswith(".parquet"))  # fmt: skip
    return [n for n in names if not ours(n)]


def _put_in_storage(local: Path, storage) -> None:
    """The prepared ``local`` directory at ``storage``'s root: first the old manifest goes (no
    reader trusts the directory from then on), then the old files (the lock's object kept), then
    the new files, the manifest last."""
    import pyarrow.fs as pafs

    fs, root = storage.filesystem()
    if fs.get_file_info(f"{root}/{MANIFEST}").is_file:
        fs.delete_file(f"{root}/{MANIFEST}")
    old = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    for info in old:
        if info.is_file and info.path != f"{root}/.lock":
            fs.delete_file(info.path)
    files = sorted(f for f in local.rglob("*") if f.is_file())
    for f in sorted(files, key=lambda f: f.name == MANIFEST):
        with open(f, "rb") as src, fs.open_output_stream(f"{root}/{f.relative_to(local)}") as dst:
            shutil.copyfileobj(src, dst, 8 << 20)


def _prepare_locked(source, out, seq_len, val_fraction, test_fraction, tokenizer_name, force,
                    shard_blocks, progress, target: str | None = None) -> dict:  # fmt: skip
    """``target``: where the data goes when not ``out`` (a URI): its manifest is checked."""
    from ..cluster.ray_setup import init_ray
    from .shards import has_manifest, read_manifest

    tokenizer = load_tokenizer(tokenizer_name)
    wanted = recipe(source, tokenizer, seq_len, val_fraction, test_fraction)
    where = target or out
    if has_manifest(where) and not force:
        existing = read_manifest(where)
        if _same_recipe(existing, wanted):
            print(f"{where} is up to date ({source.describe()}, seq_len={seq_len}); --force "
                  "rebuilds")  # fmt: skip
            return existing
        raise DataError(
            f"{where} holds data prepared with another recipe (source {existing.get('source')}, "
            f"seq_len={existing.get('seq_len')}); pass --force to rebuild it"
        )

    # A local cluster started for this run gets a small object store: its shared pages are
    # resident in every process that maps them, and the pipeline never needs more.
    init_ray(object_store_memory=OBJECT_STORE)
    import ray

    options = ray.data.DataContext.get_current().execution_options
    options.preserve_order = True
    # Bound what the streaming executor may buffer: peak memory then stays flat in corpus size.
    options.resource_limits = ray.data.ExecutionResources(object_store_memory=PIPELINE_BUFFER)
    staging = staging_directory(out)
    try:
        return _build(source, out, staging, tokenizer, wanted, shard_blocks, progress, where)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # no half-built directory survives
        raise


def _build(source, out, staging, tokenizer, wanted, shard_blocks, progress, shown) -> dict:
    from tqdm import tqdm

    seq_len = wanted["seq_len"]
    val_fraction, test_fraction = wanted["val_fraction"], wanted["test_fraction"]
    tokenizer.save_pretrained(staging / "tokenizer")
    tokenized = source.dataset().map_batches(
        _tokenize,
        batch_format="pyarrow",
        batch_size=source.tokenize_batch_size,
        fn_kwargs={
            "tokenizer_dir": str(staging / "tokenizer"),
            "val": val_fraction,
            "test": test_fraction,
        },
    )
    dtype = ids_dtype(len(tokenizer))
    packers = {
        s: Packer(ShardWriter(staging, s, seq_len, shard_blocks, dtype), seq_len,
                  tokenizer.sep_token_id)
        for s in SPLITS
    }  # fmt: skip
    total_bytes = source.total_bytes()
    bar = tqdm(
        total=total_bytes or None,
        unit="B",
        unit_scale=True,
        disable=not progress,
        desc=f"prepare {source.describe()}",
    )
    start, seen = time.perf_counter(), 0
    for batch in tokenized.iter_batches(
        batch_format="pyarrow", batch_size=None, prefetch_batches=0
    ):
        for split in SPLITS:
            rows = batch.filter(pc.equal(batch.column("split"), split))
            packers[split].add(rows.column("ids").combine_chunks())
        step = int(pc.sum(batch.column("bytes")).as_py() or 0)
        seen += step
        bar.update(step)
        bar.set_postfix(docs=sum(p.documents for p in packers.values()))
    bar.update(max(0, (total_bytes or 0) - bar.n))
    bar.close()
    seconds = time.perf_counter() - start
    splits = {s: p.summary() for s, p in packers.items()}
    if sum(s["documents"] for s in splits.values()) == 0:
        raise DataError(f"corpus {source.describe()} is empty: no non-blank documents")
    manifest = {
        **wanted,
        "ids_dtype": np.dtype(dtype).name,
        "splits": splits,
        "input_bytes": seen,
        "seconds": round(seconds, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    publish(staging, out, manifest)
    show_splits(splits, seq_len)
    print(f"wrote {shown} ({seen / 1e6:.1f} MB of text in {seconds:.1f} s)")
    return manifest


def show_splits(splits: dict, seq_len: int) -> None:
    for split, s in splits.items():
        print(
            f"  {split:<5} {s['documents']:>9,} docs {s['tokens']:>12,} tokens "
            f"{s['blocks']:>9,} blocks of {seq_len} in {len(s['shards'])} shards"
        )
