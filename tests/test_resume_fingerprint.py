"""Which resumes the checkpoint's fingerprint accepts: a key the checkpoint predates, taken as its
default, and a knob that changes no weight go on, saying so; a width or a machine's part that
differs, or a new key set away from its default, is refused in one line naming it."""

from enigma.train.config import build_config
from enigma.train.resume import DATA_ORDER_KEYS, compare, fingerprint


def stamp(*sets, **fields):
    cfg = build_config("tiny", sets=list(sets), **fields)
    return fingerprint(cfg.model_config(), {"splits": 1}, 2, dict.fromkeys(DATA_ORDER_KEYS, 0))


def test_a_checkpoint_from_before_a_new_key_resumes_and_a_changed_width_is_refused():
    old = stamp()
    for new in ("attention_kernel", "coupling_hidden", "rotor_matmul"):  # keys added since
        del old["model"][new]
    refused, accepted = compare(old, stamp())
    assert refused is None
    assert any("coupling_hidden (new since the checkpoint) 0, its default" in a for a in accepted)
    refused, _ = compare(old, stamp("coupling_hidden=64"))
    assert "coupling_hidden is new since the checkpoint, which ran as its default 0" in refused
    refused, _ = compare(stamp(), stamp("d=64", "num_heads=2"))
    assert refused.startswith("its model differs (d 128 -> 64")
    refused, _ = compare(stamp(), stamp("machine_seed=3"))
    assert "machine_seed 0 -> 3" in refused, "another plugboard: the weights mean something else"


def test_a_knob_that_changes_no_weight_is_accepted_and_said():
    refused, accepted = compare(stamp(), stamp("attention_kernel=sdpa", "rotor_matmul=bf16"))
    assert refused is None
    assert "attention_kernel 'auto' -> 'sdpa'" in accepted and len(accepted) == 2
    saved_before_bos_moved = stamp()
    saved_before_bos_moved["model"]["bos_token_id"] = 101
    assert compare(saved_before_bos_moved, stamp())[0] is None


def _manifest(source: str, mtime: int, sha: str) -> dict:
    return {
        "format": 1,
        "source": source,
        "source_fingerprint": f"{source}|{mtime}",
        "tokenizer": {"name": "cn-clip", "vocab_hash": "v" * 64, "vocab_size": 21128},
        "seq_len": 64,
        "dedup": "exact, of normalized documents",
        "val_fraction": 0.05,
        "test_fraction": 0.05,
        "created": str(mtime),
        "seconds": 1.0,
        "splits": {
            "train": {
                "documents": 9,
                "tokens": 900,
                "separators": 9,
                "blocks": 14,
                "dropped_tokens": 5,
                "shards": [{"file": "a", "sha256": sha}],
            }
        },
    }


def test_the_same_corpus_prepared_on_another_machine_is_the_same_data():
    """The data's identity is its recipe and counts: another path, mtime or shard bytes (another
    parquet writer) is the same data; another count is not; a checkpoint whose fingerprint
    hashed the whole manifest still resumes on that manifest."""
    cfg = build_config("tiny")
    order = {k: getattr(cfg, k) for k in DATA_ORDER_KEYS}
    here = _manifest("text:/home/a/corpus.txt", 1, "x")
    there = _manifest("text:/mnt/b/corpus.txt", 2, "y")
    made = lambda m: fingerprint(cfg.model_config(), m, 2, order)  # noqa: E731
    assert compare(made(here), made(there))[0] is None
    more = _manifest("text:/home/a/corpus.txt", 1, "x")
    more["splits"]["train"]["blocks"] = 15
    assert "other data" in compare(made(here), made(more))[0]
    before = made(here)
    before["data"] = before.pop("data_before")  # what an older version saved
    assert compare(before, made(here))[0] is None


def test_a_checkpoint_from_before_the_seeded_shard_order_is_refused_naming_the_knob():
    """It read the shards in the written order: resuming with the seeded order would repeat
    and skip blocks, so the resume is refused naming the setting that restores that order."""
    cfg = build_config("tiny")
    order = {k: getattr(cfg, k) for k in DATA_ORDER_KEYS}
    now = fingerprint(cfg.model_config(), {"splits": 1}, 2, order)
    old = fingerprint(cfg.model_config(), {"splits": 1}, 2, order)
    del old["data_order"]["shuffle_shards"]
    refused, _ = compare(old, now)
    assert "shuffle_shards False -> True" in refused and "--set shuffle_shards=False" in refused
    same = {**order, "shuffle_shards": False}
    assert compare(old, fingerprint(cfg.model_config(), {"splits": 1}, 2, same))[0] is None
