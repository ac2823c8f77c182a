"""``enigma data prepare`` and ``enigma data stats``."""

from __future__ import annotations

import argparse


def add_prepare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--source",
        default="sanguo",
        help="sanguo, wiki-zh, hf:NAME[:CONFIG[:SPLIT]] (a hub dataset or a local directory of "
        "its files), text:PATH, jsonl:PATH, parquet:PATH",
    )
    p.add_argument("--out", required=True,
                   help="directory to write (atomically), or a storage URI")  # fmt: skip
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--test-fraction", type=float, default=0.05)
    p.add_argument("--text-column", default="text", help="for parquet and hf sources")
    p.add_argument("--max-docs", type=int, default=None)
    p.add_argument("--unit-mb", type=float, default=None,
                   help="text one task reads (4; small files are joined up to it)")  # fmt: skip
    p.add_argument("--tokenizer", default=None, help="a local tokenizer directory")
    p.add_argument("--shard-blocks", type=int, default=8192, help="blocks per parquet shard")
    p.add_argument("--force", action="store_true", help="rebuild even when up to date")
    p.add_argument("--no-dedup", dest="dedup", action="store_false",
                   help="keep documents that repeat an earlier one (normalized)")  # fmt: skip


def prepare(args: argparse.Namespace) -> dict:
    from .prepare import prepare as run_prepare
    from .sources import Source

    source = Source.parse(args.source, args.text_column, args.max_docs, args.unit_mb)
    return run_prepare(
        source,
        args.out,
        seq_len=args.seq_len,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        tokenizer_name=args.tokenizer,
        force=args.force,
        shard_blocks=args.shard_blocks,
        dedup=args.dedup,
    )


def add_stats_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", help="a prepared directory, or its storage URI")
    p.add_argument("--top", type=int, default=20)


def stats(args: argparse.Namespace) -> dict:
    from .stats import stats as run_stats

    return run_stats(args.directory, args.top)
