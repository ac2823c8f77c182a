"""Tokenizer, corpus preparation by Ray tasks, the manifest, the verified reader, bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest

from enigma.cli import main
from enigma.data import load_tokenizer, vocab_hash
from enigma.data.prepare import Packer, prepare
from enigma.data.shards import MANIFEST, read_blocks, read_manifest
from enigma.data.sources import DataError, Source
from enigma.data.tokenizer import VOCAB_SIZE, read_vocab, shipped_vocab_path


@pytest.fixture(scope="module")
def sanguo(ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "sanguo"
    manifest = prepare(Source.parse("sanguo"), out, seq_len=128, progress=False)
    return out, manifest


def test_tokenizer_offline_has_bert_base_chinese_ids(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = load_tokenizer(quiet=True)
    assert "cn-clip" in tok.enigma_source
    assert len(tok) == VOCAB_SIZE
    assert (tok.cls_token_id, tok.sep_token_id, tok.unk_token_id, tok.pad_token_id) == (
        101,
        102,
        100,
        0,
    )
    assert tok.convert_tokens_to_ids(["曹", "操", "的", "我", "是"]) == [
        3293,
        3082,
        4638,
        2769,
        3221,
    ]
    assert tok("曹操", add_special_tokens=False).input_ids == [3293, 3082]


def test_the_tokenizer_is_a_causal_lms_and_stays_one_when_saved(tmp_path):
    """[SEP] separates the corpus' documents: it is the tokenizer's bos and eos, and nothing is
    added around a text by default (BERT's [CLS] text [SEP] would end every context a harness
    scores); AutoTokenizer, as lm-evaluation-harness loads it, reads the same back."""
    from transformers import AutoTokenizer

    tok = load_tokenizer(quiet=True)
    assert (tok.bos_token_id, tok.eos_token_id) == (102, 102)
    assert tok("曹操").input_ids == [3293, 3082]
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert (again.bos_token_id, again.eos_token_id, again.pad_token_id) == (102, 102, 0)
    assert again("曹操").input_ids == [3293, 3082]
    text = again.decode(again("话说 Hello, world", add_special_tokens=False).input_ids)
    assert text == tok.decode(tok("话说 Hello, world", add_special_tokens=False).input_ids)


def test_vocab_is_read_by_newlines_only():
    """Two tokens are U+2028; splitlines() would shift every later id."""
    path = shipped_vocab_path()
    vocab = read_vocab(path)
    assert len(vocab) == VOCAB_SIZE and vocab["[SEP]"] == 102
    assert len(path.read_text(encoding="utf-8").splitlines()) != VOCAB_SIZE


def test_worker_tokenizer_gives_bert_tokenizer_ids():
    """Workers tokenize with the Rust backend alone; its ids must be BertTokenizerFast's."""
    from enigma.data.prepare import tokenize, worker_tokenizer
    from enigma.data.sources import normalize

    tok = load_tokenizer(quiet=True)
    texts = ["话说天下大势，分久必合。", "“曹操”曰：Hello 123…", "玄德" * 300]
    kept = [normalize(t) for t in texts]
    values, lengths = tokenize(worker_tokenizer(tok.backend_tokenizer.to_str()), kept)
    ids = [a.tolist() for a in np.split(values, np.cumsum(lengths)[:-1])]
    assert ids == tok(kept, add_special_tokens=False)["input_ids"]


def test_packer_keeps_every_token_and_separates_documents(tmp_path):
    import pyarrow as pa

    from enigma.data.shards import ShardWriter

    writer = ShardWriter(tmp_path, "train", 4, shard_blocks=2)
    packer = Packer(writer, 4, sep_id=9)
    packer.add(pa.array([[1, 2, 3], [4, 5]], type=pa.list_(pa.int32())))
    packer.add(pa.array([[6, 7, 8, 1, 2]], type=pa.list_(pa.int32())))
    summary = packer.summary()
    written = np.concatenate([np.asarray(b) for b in writer.pending] or [np.zeros((0, 4))])
    assert summary["blocks"] == 3 and summary["dropped_tokens"] == 1
    assert summary["tokens"] + summary["separators"] == 3 * 4 + 1
    assert len(summary["shards"]) == 2 and written.size == 0


def test_sanguo_blocks_are_real_text(sanguo):
    out, manifest = sanguo
    tok = load_tokenizer(str(out / "tokenizer"), quiet=True)
    train = read_blocks(out, "train")
    assert train.shape == (manifest["splits"]["train"]["blocks"], 128)
    assert train.dtype == np.int32 and train.min() >= 0 and train.max() < VOCAB_SIZE
    text = "".join(tok.decode(train[:200].reshape(-1)).split())
    assert "曹操" in text and "玄德" in text


def test_manifest_counts_are_consistent(sanguo):
    out, manifest = sanguo
    assert manifest["tokenizer"]["vocab_hash"] == vocab_hash(load_tokenizer(quiet=True))
    assert sum(s["documents"] for s in manifest["splits"].values()) == 120
    for split, s in manifest["splits"].items():
        assert s["tokens"] + s["separators"] == s["blocks"] * 128 + s["dropped_tokens"]
        assert s["dropped_tokens"] < 128 * manifest["units"]  # a unit's last partial block
        assert sum(shard["blocks"] for shard in s["shards"]) == s["blocks"]
        assert len(read_blocks(out, split)) == s["blocks"]


def test_no_document_is_in_two_splits(sanguo):
    """Cut each split's packed stream at [SEP] and compare the documents recovered."""
    out, manifest = sanguo
    docs = {}
    for split in manifest["splits"]:
        stream = read_blocks(out, split).reshape(-1)
        cuts = np.flatnonzero(stream == 102)
        pieces = np.split(stream, cuts + 1)[:-1]  # the last piece is a cut-off tail
        docs[split] = {p[:40].tobytes() for p in pieces if len(p) > 41}
        assert len(docs[split]) >= manifest["splits"][split]["documents"] - manifest["units"]
    assert docs["train"].isdisjoint(docs["val"])
    assert docs["train"].isdisjoint(docs["test"]) and docs["val"].isdisjoint(docs["test"])


def test_rerun_is_up_to_date_and_another_recipe_needs_force(sanguo, capsys):
    out, manifest = sanguo
    again = prepare(Source.parse("sanguo"), out, seq_len=128, progress=False)
    assert again == manifest and "up to date" in capsys.readouterr().out
    with pytest.raises(DataError, match="--force"):
        prepare(Source.parse("sanguo"), out, seq_len=64, progress=False)


def _numbered_shards(tmp_path, sizes=(7, 13, 5, 20, 1, 8)) -> tuple[dict, ...]:
    """Shards whose block k holds the id k in every place, of the given block counts."""
    from enigma.data.shards import write_columns

    shards, first = [], 0
    for i, rows in enumerate(sizes):
        ids = np.arange(first, first + rows, dtype=np.uint16)[:, None].repeat(4, axis=1)
        entry = write_columns(tmp_path / f"train-{i:05d}.parquet", {"input_ids": ids})
        shards.append({**entry, "path": str(tmp_path / entry["file"])})
        first += rows
    return tuple(shards)


def test_each_epoch_has_its_own_seeded_order_and_a_resume_reads_the_rest_of_it(
    tmp_path, monkeypatch
):
    """Every block once an epoch, split between two ranks' spans; another order each epoch and
    for another seed, the same for the same seed (windows mixing neighbouring shards included);
    a rank resumed at any micro-batch gets exactly the rest of its span, opening only the shards
    that hold it."""
    import enigma.data.epochs as epochs

    shards = _numbered_shards(tmp_path)
    total = sum(s["blocks"] for s in shards)
    blocks = lambda order, epoch, start, stop, skip=0: [  # noqa: E731
        int(b["input_ids"][i, 0]) for b in order.batches(epoch, start, stop, 3, skip)
        for i in range(3)
    ]  # fmt: skip
    written = blocks(epochs.EpochOrder(shards), 0, 0, 54)
    assert written == list(range(54))
    for window in (0, 8):
        order = epochs.EpochOrder(shards, seed=7, window=window, window_seed=7)
        ranks = [blocks(order, epoch, r * 27, (r + 1) * 27) for epoch in (0, 1) for r in (0, 1)]
        assert sorted(ranks[0] + ranks[1]) == sorted(ranks[2] + ranks[3]) == list(range(54))
        assert ranks[0] + ranks[1] != ranks[2] + ranks[3] != written
        again = epochs.EpochOrder(shards, seed=7, window=window, window_seed=7)
        assert blocks(again, 1, 27, 54) == ranks[3]
        assert blocks(epochs.EpochOrder(shards, seed=8, window=window), 1, 27, 54) != ranks[3]
        for skip in range(9):
            assert blocks(order, 1, 27, 54, skip) == ranks[3][3 * skip :], (window, skip)
    before = blocks(epochs.EpochOrder(shards, seed=7), 0, 0, total)
    real, opened = epochs.read_columns, []
    monkeypatch.setattr(epochs, "read_columns", lambda ref: opened.append(ref["file"]) or real(ref))
    rest = blocks(epochs.EpochOrder(shards, seed=7), 0, 0, total, skip=10)
    assert rest == before[30:] and len(rest) == 24
    ends = np.cumsum([s["blocks"] for s in shards])
    holding = {shards[int(np.searchsorted(ends, b, side="right"))]["file"] for b in rest}
    assert sorted(opened) == sorted(holding) and len(holding) < len(shards)


def test_data_prepared_before_deduplication_is_used_with_no_dedup(sanguo, tmp_path, capsys):
    """A manifest without ``dedup`` (prepared before it existed) is data deduplicated by none:
    up to date for --no-dedup; otherwise refused naming dedup, --force and --no-dedup."""
    import shutil

    out, _ = sanguo
    old = tmp_path / "old"
    shutil.copytree(out, old)
    manifest = read_manifest(old)
    for key in ("dedup", "duplicates", "units"):
        manifest.pop(key)
    (old / MANIFEST).write_text(json.dumps(manifest))
    again = prepare(Source.parse("sanguo"), old, seq_len=128, progress=False, dedup=False)
    assert "up to date" in capsys.readouterr().out and "dedup" not in again
    with pytest.raises(DataError, match=r"\(dedup differ.*--force.*--no-dedup to use it as it is"):
        prepare(Source.parse("sanguo"), old, seq_len=128, progress=False)


def test_a_split_is_checked_against_the_model_and_read_in_micro_batches(sanguo):
    from enigma.data.epochs import EpochOrder
    from enigma.data.shards import shard_paths

    out, manifest = sanguo
    _, shards = shard_paths(out, "val", seq_len=128)
    order = EpochOrder(tuple(shards))
    assert order.blocks == manifest["splits"]["val"]["blocks"]
    batch = next(order.batches(0, 0, order.blocks, 8))
    assert tuple(batch["input_ids"].shape) == (8, 128)
    with pytest.raises(DataError, match="seq_len=128 but training expects seq_len=256"):
        shard_paths(out, "val", seq_len=256)
    with pytest.raises(DataError, match="another vocabulary"):
        shard_paths(out, "val", vocab_hash="0" * 64)


def test_text_jsonl_parquet_sources(ray_cluster, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = ["滚滚长江东逝水，浪花淘尽英雄。" * 5 + str(i) for i in range(40)]
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_text("\n".join(lines[:20]) + "\n\n")
    (tmp_path / "t" / "b.txt").write_text("\n".join(lines[20:]))
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in lines))
    pq.write_table(pa.table({"body": lines}), tmp_path / "d.parquet")
    specs = [f"text:{tmp_path}/t", f"text:{tmp_path}/t/*.txt", f"jsonl:{tmp_path}/c.jsonl"]
    for i, spec in enumerate(specs):
        m = prepare(Source.parse(spec), tmp_path / f"o{i}", seq_len=16, progress=False)
        assert sum(s["documents"] for s in m["splits"].values()) == 40
    m = prepare(
        Source.parse(f"parquet:{tmp_path}/d.parquet", text_column="body"),
        tmp_path / "o9",
        seq_len=16,
        progress=False,
    )
    assert sum(s["documents"] for s in m["splits"].values()) == 40


@pytest.mark.parametrize("size", [1, 7, 64, 10_000])
def test_text_ranges_give_every_line_once(tmp_path, size):
    """A large file is read in byte ranges; every line, multi-byte ones included, exactly once."""
    from enigma.data.sources import read_text_range, text_ranges

    lines = [f"第{i}回 " + "宴桃园豪杰三结义" * (i % 5) for i in range(60)]
    path = tmp_path / "big.txt"
    path.write_text("\n".join(lines[:30]) + "\n\n  \n" + "\n".join(lines[30:]))
    got = []
    for r in text_ranges([str(path)], size=size):
        got += read_text_range(r["path"], r["start"], r["end"])
    assert got == [line.strip() for line in lines]


def _row_groups(path, groups: list[list[str]]) -> None:
    """A parquet file of one ``text`` row group per list: a prepare's units."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pq.ParquetWriter(path, pa.schema([("text", pa.string())])) as writer:
        for rows in groups:
            writer.write_table(pa.table({"text": rows}))


def test_a_killed_prepare_leaves_no_manifest_and_resumes_to_the_same_shards(ray_cluster, tmp_path):
    """SIGKILL the driver while one big unit is still being tokenized and others are written: no
    manifest anywhere; the rerun keeps the finished units and writes the rest, and its shards
    are byte for byte an uninterrupted run's (so none twice, none missing)."""
    import os
    import signal
    import time

    import ray

    big = [f"{i} " + "话说天下大势，分久必合，合久必分。" * 100 for i in range(400)]
    small = [[f"第{g}卷{i} 滚滚长江东逝水。" * 8 for i in range(60)] for g in range(6)]
    _row_groups(tmp_path / "c.parquet", [big, *small])
    source = Source.parse(f"parquet:{tmp_path}/c.parquet", unit_mb=0.001)  # a group a unit
    whole = prepare(source, tmp_path / "whole", seq_len=32, progress=False)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "enigma.cli", "data", "prepare", "--seq-len", "32",
           f"--source=parquet:{tmp_path}/c.parquet", "--out", str(tmp_path / "cut"),
           "--unit-mb", "0.001"]  # fmt: skip
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    records = tmp_path / ".cut.prepare" / ".prepare"
    deadline = time.monotonic() + 120
    while len(list(records.glob("unit-*.json"))) < 2 and child.poll() is None:
        assert time.monotonic() < deadline, "no unit finished in 2 minutes"
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    finished = len(list(records.glob("unit-*.json")))
    assert 2 <= finished < 7, "killed while the big unit was still running"
    assert not (tmp_path / "cut").exists()
    assert not list((tmp_path / ".cut.prepare").rglob(MANIFEST + "*"))
    with pytest.raises(DataError, match="does not exist"):
        read_manifest(tmp_path / "cut")
    resumed = prepare(source, tmp_path / "cut", seq_len=32, progress=False)
    shards = lambda m: [(s["file"], s["sha256"]) for x in m["splits"].values() for s in x["shards"]]
    assert shards(resumed) == shards(whole) and resumed["splits"] == whole["splits"]
    assert not (tmp_path / ".cut.prepare").exists()


def test_exact_duplicates_are_left_out_across_units_and_counted(ray_cluster, tmp_path, capsys):
    """Copies (after normalization, whitespace runs as one) in the same unit and in later units
    are left out, the first occurrence kept; ``data stats`` says how many; --no-dedup keeps all."""
    docs = [f"第{i}回 话说天下大势，分久必合。" for i in range(30)]
    copies = [docs[3], "  " + docs[4].replace(" ", " \t  "), docs[5].replace("。", "…")]
    docs[5] = docs[5].replace("。", "...")  # the same after normalization
    _row_groups(tmp_path / "d.parquet", [docs[:20] + [docs[0]], docs[20:] + copies])
    source = Source.parse(f"parquet:{tmp_path}/d.parquet", unit_mb=0.0001)  # a group a unit
    m = prepare(source, tmp_path / "dedup", seq_len=16, progress=False)
    assert m["duplicates"] == 4 and m["units"] == 2
    assert sum(s["documents"] for s in m["splits"].values()) == 30
    assert main(["data", "stats", str(tmp_path / "dedup")]) == 0
    assert "4 documents left out" in capsys.readouterr().out
    kept = prepare(source, tmp_path / "all", seq_len=16, progress=False, dedup=False)
    assert kept["duplicates"] == 0 and sum(s["documents"] for s in kept["splits"].values()) == 34
    capped = Source.parse(f"parquet:{tmp_path}/d.parquet", max_docs=25, unit_mb=0.0001)
    m = prepare(capped, tmp_path / "capped", seq_len=16, progress=False)
    assert sum(s["documents"] for s in m["splits"].values()) == 25 and m["duplicates"] == 1


def test_small_files_share_a_unit_and_max_docs_reads_no_further(ray_cluster, tmp_path):
    """Thirty small files make one unit (not thirty, each dropping its last partial blocks);
    --max-docs stops hashing once it has enough: a later unit that would fail is never read."""
    files = tmp_path / "small"
    files.mkdir()
    for i in range(30):
        (files / f"{i:02d}.txt").write_text(f"第{i}回 话说天下大势，分久必合，合久必分。\n")
    m = prepare(Source.parse(f"text:{files}"), tmp_path / "one", seq_len=8, progress=False)
    assert m["units"] == 1 and sum(s["documents"] for s in m["splits"].values()) == 30
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "a.jsonl").write_text("".join(json.dumps({"text": f"{i}号"}) + "\n"
                                                    for i in range(10)))  # fmt: skip
    (tmp_path / "j" / "b.jsonl").write_text("not json\n" * 10)
    source = Source.parse(f"jsonl:{tmp_path}/j", max_docs=5, unit_mb=0.0001)
    m = prepare(source, tmp_path / "five", seq_len=8, progress=False)
    assert sum(s["documents"] for s in m["splits"].values()) == 5
    with pytest.raises(DataError, match="a line is not JSON"):
        prepare(Source.parse(f"jsonl:{tmp_path}/j", unit_mb=0.0001), tmp_path / "all",
                seq_len=8, progress=False)  # fmt: skip


def test_hf_source_streams_a_local_dataset_one_unit_per_shard(ray_cluster, tmp_path):
    """``hf:PATH`` streams a dataset's files (here two parquet files saved by ``datasets``), one
    task per dataset shard, with its text column named by --text-column."""
    import datasets

    rows = [f"第{i}回 宴桃园豪杰三结义，斩黄巾英雄首立功。" for i in range(50)]
    folder = tmp_path / "saved"
    folder.mkdir()
    for k in range(2):
        part = datasets.Dataset.from_dict({"content": rows[k::2], "id": list(range(25))})
        part.to_parquet(str(folder / f"train-{k:05d}.parquet"))
    with pytest.raises(DataError, match="no 'text' column"):
        prepare(Source.parse(f"hf:{folder}"), tmp_path / "no", seq_len=16, progress=False)
    source = Source.parse(f"hf:{folder}:default:train", text_column="content")
    m = prepare(source, tmp_path / "hf", seq_len=16, progress=False)
    assert m["units"] == 2 and sum(s["documents"] for s in m["splits"].values()) == 50
    assert Source.parse("wiki-zh").describe() == "hf:wikimedia/wikipedia:20231101.zh:train"


def test_corrupt_shard_is_detected(sanguo, tmp_path):
    """A shard cut short is refused before a run starts (its size against the manifest's); one
    of the right size but other bytes, by whatever reads it, as it reads it."""
    import shutil

    from enigma.data.shards import read_blocks, shard_paths

    out, _ = sanguo
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    entry = read_manifest(copy)["splits"]["test"]["shards"][0]
    shard = copy / entry["file"]
    data = bytearray(shard.read_bytes())
    assert entry["bytes"] == len(data)
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(data)
    with pytest.raises(DataError, match="corrupt"):
        read_blocks(copy, "test")
    shard.write_bytes(data[:-10])
    with pytest.raises(DataError, match=f"holds {len(data) - 10:,} bytes and the manifest says"):
        shard_paths(copy, "test")


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "enigma.cli", *argv], capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--source", "text:/no/such/corpus"], "does not exist"),
        (["--source", "books"], "unknown source"),
        (["--seq-len", "4"], "below 8"),
        (["--source", "text:EMPTY"], "is empty"),
    ],
)
def test_bad_prepare_input_is_one_line(tmp_path, argv, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("\n\n  \n")
    argv = [a.replace("EMPTY", str(empty)) for a in argv]
    result = _cli("data", "prepare", "--out", str(tmp_path / "out"), *argv)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / MANIFEST).exists()


def test_stats_reports_coverage(sanguo, capsys):
    out, _ = sanguo
    assert main(["data", "stats", str(out)]) == 0
    text = capsys.readouterr().out
    assert "vocabulary coverage" in text and "[UNK]" in text and "曰" in text
    assert main(["data", "stats", str(out / "nowhere")]) == 2


def test_uint16_shards_give_the_same_batches_as_int32_in_half_the_ids(
    ray_cluster, tmp_path, monkeypatch
):
    """The vocabulary (21,128 ids) fits in uint16: shards store it, the manifest says so, a
    training rank's batches carry it at half the bytes, and the ids are those of int32 shards
    of the same corpus (read_blocks gives them as int32)."""
    import pyarrow.parquet as pq

    import enigma.data.prepare as prepare_module
    from enigma.data.epochs import EpochOrder
    from enigma.data.shards import shard_paths

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"第{i}回 话说天下大势，分久必合，合久必分。\n" for i in range(400)))
    source = Source.parse(f"text:{corpus}")
    narrow = prepare(source, tmp_path / "uint16", seq_len=16, progress=False)
    monkeypatch.setattr(prepare_module, "ids_dtype", lambda vocab: np.int32)
    wide = prepare(source, tmp_path / "int32", seq_len=16, progress=False)
    assert (narrow["ids_dtype"], wide["ids_dtype"]) == ("uint16", "int32")
    first = narrow["splits"]["train"]["shards"][0]["file"]
    stored = pq.read_schema(tmp_path / "uint16" / first).field("input_ids").type.value_type
    assert str(stored) == "uint16"
    for split in ("train", "val", "test"):
        a, b = read_blocks(tmp_path / "uint16", split), read_blocks(tmp_path / "int32", split)
        assert a.dtype == b.dtype == np.int32 and (a == b).all()
    # What a training rank gets, in a seeded order (model_inputs widens it on the device).
    orders = [EpochOrder(tuple(shard_paths(tmp_path / d, "train")[1]), seed=3, window=8)
              for d in ("uint16", "int32")]  # fmt: skip
    batches = [list(order.batches(1, 0, order.blocks, 4)) for order in orders]
    assert str(batches[0][0]["input_ids"].dtype) == "torch.uint16"
    assert str(batches[1][0]["input_ids"].dtype) == "torch.int32"
    assert all(a["input_ids"].shape == (4, 16) for a in batches[0])
    assert all((a["input_ids"].long() == b["input_ids"].long()).all()
               for a, b in zip(*batches, strict=True))  # fmt: skip
    held = [sum(b["input_ids"].nbytes for b in side) for side in batches]
    assert held[0] * 2 == held[1], held
