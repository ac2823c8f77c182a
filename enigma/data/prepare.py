"""``enigma data prepare``: text -> tokenized, packed, split parquet shards, each shard written
by the Ray task that made it.

The corpus is cut into units (:meth:`Source.units`: byte ranges, row groups, dataset shards). A
first pass of tasks hashes each unit's documents (:func:`~enigma.data.sources.dedup_key`); from
those 8 bytes a document the driver keeps each document's first occurrence in corpus order (and
the first ``--max-docs``). A second pass of tasks reads its unit again, tokenizes, sends each
document to train/val/test by a hash of its text (so a document and its copies are in one split,
whatever the order and the workers), packs each split's documents (each followed by [SEP]) into
``seq_len`` blocks and writes them straight to the destination, a directory or a storage URI,
with the sha256 of the bytes it wrote, then a record of the unit under ``.prepare/``. The driver
sees records, never tokens, and writes the manifest from them last: the only thing a reader
trusts. The tokens dropped are each unit's final partial block of each split.

A prepare that dies leaves no manifest; the next one with the same recipe (``.prepare/plan.json``)
keeps the units that have a record and whose shards are there at their recorded sizes, and
writes the others again under the same names: nothing twice, and shards byte for byte those of
an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from contextlib import closing
from itertools import chain
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..storage.locks import DirectoryLock
from ..storage.store import Storage
from .shards import FORMAT_VERSION, MANIFEST, SPLITS, ShardWriter, ids_dtype
from .sources import NORMALIZATION, DataError, Source, dedup_key, documents
from .tokenizer import load_tokenizer, vocab_hash

MIN_SEQ_LEN = 8
OBJECT_STORE = 256 * 2**20  # a local cluster's store: records, hashes and the tokenizer pass it
TOKENIZE_CHUNK = 256  # documents per tokenizer call
WORK = ".prepare"  # the plan and each finished unit's record, while a prepare is under way
_TOKENIZERS: dict = {}


def assign_split(text: str, val_fraction: float, test_fraction: float) -> str:
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    if u < val_fraction:
        return "val"
    if u < val_fraction + test_fraction:
        return "test"
    return "train"


def worker_tokenizer(tokenizer_json: str):
    """The saved tokenizer's Rust backend (the same normalizer, pre-tokenizer and vocabulary as
    ``BertTokenizerFast``, so the same ids), built once per worker process; transformers is never
    imported there."""
    key = hashlib.sha256(tokenizer_json.encode()).hexdigest()
    if key not in _TOKENIZERS:
        import os

        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # a task has one CPU
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(tokenizer_json)
        tok.no_truncation()  # documents are packed later, never truncated
        tok.no_padding()
        _TOKENIZERS[key] = tok
    return _TOKENIZERS[key]


def tokenize(tok, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Every text's ids end to end (int32), and each text's count. ``encode_batch_fast`` where
    the tokenizers release has it: the same ids without the character offsets, which nothing
    here reads. Flattened by numpy: arrow from nested Python lists would cost a sixth of the
    tokenizer's own time; this costs a fiftieth."""
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    encodings = encode(texts, add_special_tokens=False)
    lengths = np.fromiter((len(e) for e in encodings), np.int64, len(encodings))
    values = np.fromiter(chain.from_iterable(e.ids for e in encodings), np.int32, lengths.sum())
    return values, lengths


class Packer:
    """Concatenates documents (each followed by [SEP]) and cuts full ``seq_len`` blocks."""

    def __init__(self, writer: ShardWriter, seq_len: int, sep_id: int):
        self.writer, self.seq_len, self.sep_id = writer, seq_len, sep_id
        self.carry = np.zeros(0, np.int32)
        self.documents = self.tokens = self.blocks = 0

    def add(self, docs: pa.ListArray) -> None:
        values = docs.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
        self.add_ids(values, np.diff(docs.offsets.to_numpy()))

    def add_ids(self, values: np.ndarray, lengths: np.ndarray) -> None:
        """Documents given as their ids end to end and each one's count."""
        if len(lengths) == 0:
            return
        stream = np.concatenate([self.carry, np.insert(values, np.cumsum(lengths), self.sep_id)])
        full = len(stream) // self.seq_len
        self.writer.add(stream[: full * self.seq_len].reshape(full, self.seq_len))
        self.carry = stream[full * self.seq_len :]
        self.documents += len(lengths)
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


def recipe(source: Source, tokenizer, seq_len: int, val: float, test: float,
           dedup: bool = True) -> dict:  # fmt: skip
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
        "dedup": "exact, of normalized documents" if dedup else "none",
        "val_fraction": val,
        "test_fraction": test,
    }


RECIPE_KEYS = ("format", "source", "source_fingerprint", "seq_len", "normalization",
               "val_fraction", "test_fraction", "dedup")  # fmt: skip


# What a manifest written before a key existed was prepared with.
RECIPE_BEFORE = {"dedup": "none"}


def _same_recipe(manifest: dict, wanted: dict) -> bool:
    same = all(manifest.get(k, RECIPE_BEFORE.get(k)) == wanted[k] for k in RECIPE_KEYS)
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
    dedup: bool = True,
) -> dict:
    """Build ``out`` and return its manifest; a matching manifest is left alone. One prepare at
    a time per ``out``: a second is refused, naming the first. ``out`` may be a storage URI: the
    tasks write there, the manifest last. A local ``out`` is built in ``.NAME.prepare`` beside it
    (where a killed prepare resumes) and then takes its place whole."""

    validate(seq_len, val_fraction, test_fraction)
    source.files()  # a missing path fails here, before Ray starts
    if source.blank():  # and so does a corpus of blank files (other sources: after reading)
        raise DataError(f"corpus {source.describe()} is empty: no non-blank documents")
    settings = {"seq_len": seq_len, "val": val_fraction, "test": test_fraction, "force": force,
                "shard_blocks": shard_blocks, "progress": progress, "dedup": dedup}  # fmt: skip
    if "://" in str(out):
        storage = Storage.at(str(out), "--out")
        _refuse_foreign(storage, force)
        storage.check("--out")  # reachable and writable, before Ray starts
        with storage.lock("enigma data prepare"):
            return _prepare_locked(source, storage, storage, tokenizer_name, settings)[0]
    from ..storage.atomic import remove_leftovers, replace_dir

    out = Path(out).absolute()
    with DirectoryLock(out.parent / f".{out.name}.lock", "enigma data prepare", out):
        remove_leftovers(out, "tmp")  # what a prepare before resumable ones left
        work = out.parent / f".{out.name}.prepare"
        manifest, built = _prepare_locked(source, Storage(str(out)), Storage(str(work)),
                                          tokenizer_name, settings)  # fmt: skip
        if built:
            shutil.rmtree(work / WORK)
            replace_dir(work, out)
        return manifest


def _refuse_foreign(storage: Storage, force: bool) -> None:
    """A prefix holding files no prepare writes is refused before anything is written there
    (the writability probe writes), unless ``--force``."""
    import pyarrow.fs as pafs

    try:
        fs, root = storage.filesystem()
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except OSError:
        return  # unreachable: the probe says so in one line
    names = [i.path[len(root) + 1 :] for i in infos if i.is_file]
    ours = lambda n: n in (MANIFEST, ".lock") or n.startswith(("tokenizer/", f"{WORK}/")) or (
        "/" not in n and n.endswith(".parquet"))  # fmt: skip
    foreign = [n for n in names if not ours(n)]
    if foreign and not force:
        raise DataError(
            f"--out {storage.uri()} holds files a prepare did not write "
            f"({', '.join(foreign[:3])}); name an empty prefix, or --force to replace everything "
            "under it"
        )


def _prepare_locked(source, out: Storage, work: Storage, tokenizer_name, settings):
    """``(manifest, whether built)``. ``out``: where the data is read from; ``work``: where it
    is built (the same prefix for a URI; a sibling directory for a local path)."""
    from .shards import has_manifest, read_manifest

    tokenizer = load_tokenizer(tokenizer_name)
    wanted = recipe(source, tokenizer, settings["seq_len"], settings["val"], settings["test"],
                    settings["dedup"])  # fmt: skip
    shown = out.uri()
    manifest = has_manifest(shown) and read_manifest(shown)
    if manifest and not settings["force"]:
        if _same_recipe(manifest, wanted):
            print(f"{shown} is up to date ({source.describe()}, seq_len={wanted['seq_len']}); "
                  "--force rebuilds")  # fmt: skip
            return manifest, False
        differ = [k for k in RECIPE_KEYS if manifest.get(k, RECIPE_BEFORE.get(k)) != wanted[k]]
        if manifest["tokenizer"]["vocab_hash"] != wanted["tokenizer"]["vocab_hash"]:
            differ.append("tokenizer")
        raise DataError(
            f"{shown} holds data prepared with another recipe ({', '.join(differ)} differ: "
            f"source {manifest.get('source')}, seq_len={manifest.get('seq_len')}, dedup "
            f"{manifest.get('dedup', 'none')}); pass --force to rebuild it"
            + (", or --no-dedup to use it as it is" if differ == ["dedup"] else "")
        )
    units = source.units()
    plan = _plan_id(wanted, units, settings["shard_blocks"])
    # A local out is built beside itself, so its manifest says nothing about the work there; a
    # URI's manifest is in the work's prefix: one that exists (a --force rebuild) goes first.
    stale = _read_json(work, WORK, "plan.json", default={}).get("plan") != plan
    if stale or (manifest and work.remote):
        _start_afresh(work, tokenizer, plan)
    from ..cluster.ray_setup import init_ray

    # A local cluster started for this run gets a small object store: only records, document
    # hashes and the tokenizer pass through it.
    init_ray(object_store_memory=OBJECT_STORE)
    start = time.perf_counter()
    keep = _keep_plan(source, units, settings)
    records = _run_units(source, units, keep, work, tokenizer, wanted, plan, settings)
    manifest = _manifest(wanted, records, np.dtype(ids_dtype(len(tokenizer))).name, start)
    if sum(s["documents"] for s in manifest["splits"].values()) == 0:
        raise DataError(f"corpus {source.describe()} is empty: no non-blank documents")
    work.write_text(json.dumps(manifest, indent=2, ensure_ascii=False), MANIFEST)  # last
    if work.remote:
        work.delete(WORK)
    show_splits(manifest["splits"], wanted["seq_len"])
    print(
        f"wrote {shown} ({manifest['input_bytes'] / 1e6:.1f} MB of text in "
        f"{manifest['seconds']:.1f} s; {manifest['duplicates']:,} duplicate documents left out)"
    )
    return manifest, True


def _plan_id(wanted: dict, units: list[dict], shard_blocks: int) -> str:
    text = json.dumps([wanted, units, shard_blocks], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _read_json(storage: Storage, *parts: str, default=None):
    try:
        text = storage.read_text(*parts)
        return json.loads(text) if text is not None else default
    except (OSError, ValueError):
        return default


def _start_afresh(work: Storage, tokenizer, plan: str) -> None:
    """Empty ``work`` (its manifest first: no reader trusts it from then on; the lock's object
    kept) and write the plan and the tokenizer."""
    import tempfile

    import pyarrow.fs as pafs

    fs, root = work.filesystem()
    if fs.get_file_info(f"{root}/{MANIFEST}").is_file:
        fs.delete_file(f"{root}/{MANIFEST}")
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    for info in infos:
        if info.is_file and info.path != f"{root}/.lock":
            fs.delete_file(info.path)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for f in sorted(Path(tmp).iterdir()):
            work.write_bytes(f.read_bytes(), "tokenizer", f.name)
    work.write_text(json.dumps({"plan": plan}), WORK, "plan.json")


def _keep_plan(source, units: list[dict], settings) -> list[dict]:
    """For each unit, ``{"drop": positions, "first": n}``: its documents past the first ``n``
    and at ``drop`` are left out (copies of earlier ones; past ``--max-docs``). With
    ``--max-docs``, units are hashed in order until that many documents are kept: the units
    after are never read (``first`` 0)."""
    if not settings["dedup"] and not source.max_docs:
        return [{"drop": None, "first": None} for _ in units]
    hashes, seen, kept = [], set(), 0
    with closing(_in_window([(_hash_unit, (u,)) for u in units], "hash", settings)) as window:
        for h in window:
            hashes.append(h)
            if source.max_docs:  # bounded by the cap: a Python set is small enough
                kept += len(h) if not settings["dedup"] else len(set(h.tolist()) - seen)
                seen.update(h.tolist() if settings["dedup"] else ())
                if kept >= source.max_docs:
                    break  # closing the window cancels its tasks still in flight
    keys = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    copy = np.zeros(len(keys), bool)  # not the first occurrence of its key in corpus order
    if settings["dedup"]:
        copy[:] = True
        copy[np.unique(keys, return_index=True)[1]] = False
    # --max-docs: the first N documents kept; a unit stops at its last one
    last = np.cumsum(~copy) <= source.max_docs if source.max_docs else np.ones(len(keys), bool)
    plans, at = [], 0
    for h in hashes:
        end = at + len(h)
        first = int(last[at:end].sum()) if source.max_docs else None
        drop = np.flatnonzero(copy[at:end][:first])
        plans.append({"drop": drop.astype(np.int64), "first": first})
        at = end
    unread = {"drop": np.zeros(0, np.int64), "first": 0}
    return plans + [unread] * (len(units) - len(plans))


def _hash_unit(unit: dict) -> np.ndarray:
    return np.fromiter((dedup_key(t) for t in documents(unit)), np.uint64)


def _in_window(calls: list, label: str, settings, sizes: list | None = None):
    """Run ``(function, args)`` calls as Ray tasks, at most two a CPU in flight, and yield their
    results in the calls' order; a task's bad-input error is raised as it is."""
    import ray
    from tqdm import tqdm

    window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    remote = {}
    total = sum(s or 0 for s in sizes) if sizes else None
    bar = tqdm(total=total or len(calls), unit="B" if total else "unit", unit_scale=bool(total),
               disable=not settings["progress"], desc=label)  # fmt: skip
    pending, done, upto = {}, {}, 0
    try:
        for i, (fn, args) in enumerate(calls):
            task = remote.setdefault(fn, ray.remote(num_cpus=1, max_retries=3)(fn))
            pending[task.remote(*args)] = i
            while len(pending) >= window or (i == len(calls) - 1 and pending):
                ready, _ = ray.wait(list(pending), num_returns=1)
                j = pending.pop(ready[0])
                done[j] = ready[0]  # its error, if any, raised in its turn: a caller that
                bar.update((sizes[j] or 0) if total else 1)  # stops before it never sees it
                while upto in done:
                    yield _result(done.pop(upto))
                    upto += 1
    finally:
        bar.close()
        for ref in pending:
            ray.cancel(ref)


def _result(ref):
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        from ..errors import InputError

        if isinstance(err.cause, InputError):
            raise err.cause from None
        raise


def _run_units(source, units, keep, work: Storage, tokenizer, wanted, plan, settings) -> list:
    """Each unit's record: read from ``work`` where a previous prepare of this plan finished it
    (its shards there at their sizes), else made by a task that writes it."""
    import ray

    present, written = _sizes(work), _sizes(work, WORK)
    records, calls, sizes = {}, [], []
    for i in range(len(units)):
        name = f"unit-{i:05d}.json"
        record = _read_json(work, WORK, name) if name in written else None
        if record and record.get("plan") == plan and _complete(record, present):
            records[i] = record
    if records:
        print(f"resuming: {len(records)} of {len(units)} units already written")
    tok = ray.put(tokenizer.backend_tokenizer.to_str())
    job = {"seq_len": wanted["seq_len"], "val": wanted["val_fraction"], "plan": plan,
           "test": wanted["test_fraction"], "sep": tokenizer.sep_token_id,
           "dtype": np.dtype(ids_dtype(len(tokenizer))).name,
           "shard_blocks": settings["shard_blocks"]}  # fmt: skip
    for i in range(len(units)):
        if keep[i]["first"] == 0 and i not in records:  # past --max-docs: nothing to write
            records[i] = _empty_record(plan)
    todo = [i for i in range(len(units)) if i not in records]
    for i in todo:
        calls.append((_prepare_unit, (i, units[i], keep[i], tok, job, work)))
        sizes.append(units[i]["bytes"])
    for i, record in zip(todo, _in_window(calls, f"prepare {source.describe()}", settings, sizes),
                         strict=True):  # fmt: skip
        records[i] = record
    return [records[i] for i in range(len(units))]


def _empty_record(plan: str) -> dict:
    empty = {"documents": 0, "tokens": 0, "separators": 0, "blocks": 0, "dropped_tokens": 0,
             "shards": []}  # fmt: skip
    return {"plan": plan, "input_bytes": 0, "duplicates": 0,
            "splits": {s: dict(empty) for s in SPLITS}}  # fmt: skip


def _sizes(work: Storage, *parts: str) -> dict:
    """Each file directly under ``work/parts``, and its size (one listing)."""
    import pyarrow.fs as pafs

    fs, root = work.filesystem(*parts)
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    return {i.base_name: i.size for i in infos if i.is_file}


def _complete(record: dict, present: dict) -> bool:
    shards = [s for split in record["splits"].values() for s in split["shards"]]
    return all(present.get(s["file"]) == s["bytes"] for s in shards)


def _prepare_unit(index: int, unit: dict, keep: dict, tokenizer_json: str, job: dict,
                  work: Storage) -> dict:  # fmt: skip
    """A Ray task: one unit's documents tokenized, split, packed and written as shards to
    ``work``, then its record; returns the record."""
    tok = worker_tokenizer(tokenizer_json)
    packers = {
        s: Packer(ShardWriter(work, s, job["seq_len"], job["shard_blocks"], np.dtype(job["dtype"]),
                              unit=index), job["seq_len"], job["sep"])
        for s in SPLITS
    }  # fmt: skip
    drop = set(keep["drop"].tolist()) if keep["drop"] is not None else set()
    first, text_bytes, chunk = keep["first"], 0, []
    for position, text in enumerate(documents(unit)):
        if first is not None and position >= first:
            break
        if position in drop:
            continue
        chunk.append(text)
        text_bytes += len(text.encode("utf-8"))
        if len(chunk) == TOKENIZE_CHUNK:
            _pack(tok, chunk, packers, job)
            chunk = []
    _pack(tok, chunk, packers, job)
    record = {"plan": job["plan"], "input_bytes": text_bytes, "duplicates": len(drop),
              "splits": {s: p.summary() for s, p in packers.items()}}  # fmt: skip
    work.write_text(json.dumps(record), WORK, f"unit-{index:05d}.json")
    return record


def _pack(tok, texts: list[str], packers: dict, job: dict) -> None:
    if not texts:
        return
    values, lengths = tokenize(tok, texts)
    index = {s: i for i, s in enumerate(SPLITS)}
    where = np.fromiter((index[assign_split(t, job["val"], job["test"])] for t in texts), np.int8,
                        len(texts))  # fmt: skip
    for split, packer in packers.items():
        mine = where == index[split]
        if mine.all():
            packer.add_ids(values, lengths)
        elif mine.any():
            packer.add_ids(values[np.repeat(mine, lengths)], lengths[mine])


def _manifest(wanted: dict, records: list[dict], dtype: str, start: float) -> dict:
    splits = {}
    for split in SPLITS:
        parts = [r["splits"][split] for r in records]
        total = {k: sum(p[k] for p in parts) for k in
                 ("documents", "tokens", "separators", "blocks", "dropped_tokens")}  # fmt: skip
        splits[split] = {**total, "shards": [s for p in parts for s in p["shards"]]}
    return {
        **wanted,
        "ids_dtype": dtype,
        "units": len(records),
        "duplicates": sum(r["duplicates"] for r in records),
        "splits": splits,
        "input_bytes": sum(r["input_bytes"] for r in records),
        "seconds": round(time.perf_counter() - start, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def show_splits(splits: dict, seq_len: int) -> None:
    for split, s in splits.items():
        print(
            f"  {split:<5} {s['documents']:>9,} docs {s['tokens']:>12,} tokens "
            f"{s['blocks']:>9,} blocks of {seq_len} in {len(s['shards'])} shards"
        )
