"""``enigma finetune`` (and ``ray_jobs/finetune.py``): instruction fine-tuning on the pretraining
system.

The rows (:mod:`enigma.data.conversations`) are tokenized with the base model's tokenizer and the
chat template into ``OUTPUT/data``, a prepared directory like ``enigma data prepare``'s, whose
rows carry labels (the assistant's tokens) and an attention mask (one conversation per row,
right-padded, so no example attends to another and each starts at position 0: the machine's
positions and ALiBi start at its first token). Then the ordinary run follows: Ray Train workers,
DeepSpeed ZeRO from the same JSON, checkpoints, resume, the lock, TensorBoard, early stopping,
fault tolerance, ``--storage-path``.

LoRA goes through PEFT, on the attention projections and the MLP by default (``lora_targets``
also takes ``head``, ``embedding`` and ``coupling``, the machine's coupling nets); the rest, the
machine among it, is frozen. ``--full`` trains every weight. A new best val loss exports
``OUTPUT/adapter`` (PEFT's format: ``PeftModel.from_pretrained(base, OUTPUT/adapter)``) and
``OUTPUT/model``, the adapter merged, which loads with torch and transformers alone; its
tokenizer carries the template.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError
from .config import base_model_dir

# Training keys a fine-tuning run starts from, before --set: a smaller learning rate, shorter
# runs and more frequent evaluations than pretraining's.
DEFAULTS = ["lr=2e-4", "warmup_ratio=0.03", "max_epochs=3", "micro_batch=8", "grad_accum=1",
            "eval_steps=100", "save_steps=500", "eval_batches=20", "sample_tokens=0"]  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="a saved model or an `enigma train` output dir, or a URI")  # fmt: skip
    p.add_argument("--data", required=True,
                   help="rows to learn from: FILE.jsonl or FILE.parquet, or its URI")  # fmt: skip
    p.add_argument("--val", default=None, help="held-out rows (default: 5 %% of --data)")
    p.add_argument("--output-dir", required=True, help="OUT: adapter/, model/, checkpoints")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--full", action="store_true", help="train every weight, no LoRA")
    group.add_argument("--lora-r", type=int, default=None, help="LoRA rank (16)")
    p.add_argument("--lora-alpha", type=int, default=None, help="LoRA alpha (32)")
    p.add_argument("--lora-dropout", type=float, default=None, help="LoRA dropout (0.05)")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--gpus-per-worker", type=int, default=None)
    p.add_argument("--ds-config", default=None, help="DeepSpeed JSON (ds_configs/zero2.json)")
    p.add_argument("--storage-path", default=None, help="as for `enigma train`")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", dest="json_out", default=None, help="also write the summary here")


def base_model(given: str) -> str:
    """What the run records and every worker reads: a storage URI as given (each node mirrors
    it), a local model resolved to its directory."""
    if "://" in given:
        base_model_dir(given)  # there, a model, no credentials: checked before any worker
        return given
    return str(base_model_dir(given))


def _rows(path: str) -> str:
    """A rows file as the run records it: absolute, or its storage URI (mirrored where the
    rows are tokenized)."""
    return path if "://" in path else str(Path(path).resolve())


def config_from_args(args: argparse.Namespace):
    from .config import build_config

    lora_flags = {"--lora-alpha": args.lora_alpha, "--lora-dropout": args.lora_dropout}
    given = [flag for flag, value in lora_flags.items() if value is not None]
    if args.full and given:
        raise InputError(f"--full trains every weight, no LoRA: drop {' and '.join(given)}")
    out = Path(args.output_dir).resolve()
    cfg = build_config(
        None, None, [*DEFAULTS, *args.sets],
        base_model=base_model(args.model), conversations=_rows(args.data),
        val_data=_rows(args.val) if args.val else None, full=args.full or None,
        lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        workers=args.workers, gpus_per_worker=args.gpus_per_worker, ds_config=args.ds_config,
        storage_path=args.storage_path, max_steps=args.max_steps, output_dir=str(out),
        data=str(out / "data"),
    )  # fmt: skip
    if not cfg.full:
        from .tuning import lora_config

        lora_config(cfg)  # unknown targets: named now
    return cfg


def run(args: argparse.Namespace) -> dict:
    import time

    from .driver import save_summary, train

    cfg = config_from_args(args)
    start = time.perf_counter()
    summary = train(cfg, command=args.command_line)
    if args.json_out:
        save_summary(cfg, summary, time.perf_counter() - start, args)
    return summary


def main(argv: list[str] | None = None) -> int:
    """Entry point shared by ``enigma finetune`` and ``ray_jobs/finetune.py``."""
    import sys

    from ..cli import main as cli_main

    return cli_main(["finetune", *(sys.argv[1:] if argv is None else argv)])
