"""``enigma data stats DIR``: what a prepared directory holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .shards import read_blocks, read_manifest
from .tokenizer import load_tokenizer


def stats(directory: str, top: int = 20) -> dict:
    manifest = read_manifest(directory)
    if "://" in directory:
        from ..storage.mirror import local_tokenizer

        saved = local_tokenizer(directory)
    else:
        saved = (
            str(Path(directory) / "tokenizer") if (Path(directory) / "tokenizer").is_dir() else None
        )
    tokenizer = load_tokenizer(saved, quiet=True)
    vocab = manifest["tokenizer"]["vocab_size"]
    counts = np.zeros(vocab, np.int64)
    print(f"{directory}: source {manifest['source']}, seq_len {manifest['seq_len']}")
    print(f"  tokenizer {manifest['tokenizer']['name']} ({vocab} tokens)")
    if "duplicates" in manifest:  # older manifests: not deduplicated
        print(f"  deduplication {manifest['dedup']}: {manifest['duplicates']:,} documents left "
              f"out; {manifest['units']:,} units")  # fmt: skip
    print(f"  {'split':<6}{'documents':>11}{'tokens':>14}{'blocks':>10}{'shards':>8}")
    for split, s in manifest["splits"].items():
        print(
            f"  {split:<6}{s['documents']:>11,}{s['tokens']:>14,}{s['blocks']:>10,}"
            f"{len(s['shards']):>8}"
        )
        blocks = read_blocks(directory, split)
        counts += np.bincount(blocks.reshape(-1), minlength=vocab)
    total = int(counts.sum())
    sep, unk = tokenizer.sep_token_id, tokenizer.unk_token_id
    text_tokens = total - int(counts[sep])
    result = {
        "duplicates": manifest.get("duplicates"),
        "distinct_tokens": int((counts > 0).sum()),
        "coverage": float((counts > 0).mean()),
        "unk_share": float(counts[unk] / max(text_tokens, 1)),
        "top": [],
    }
    print(
        f"  vocabulary coverage {result['distinct_tokens']:,}/{vocab} "
        f"({100 * result['coverage']:.1f}%), [UNK] {100 * result['unk_share']:.3f}% of text tokens"
    )
    ranked = [i for i in np.argsort(-counts) if i != sep][:top]
    result["top"] = [(tokenizer.convert_ids_to_tokens(int(i)), int(counts[i])) for i in ranked]
    print("  most frequent: " + "  ".join(f"{t} {c:,}" for t, c in result["top"]))
    return result
