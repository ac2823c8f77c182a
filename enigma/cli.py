"""The ``enigma`` command line.

Only the chosen subcommand's module is imported, so ``enigma data prepare`` runs without torch.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading
from importlib import import_module

from .errors import InputError

# (path, help, module, add-arguments function, run function)
COMMANDS = [
    (("model", "info"), "parameter count per part", "models.cli", "add_info_arguments", "info"),
    (
        ("generate",),
        "stream a continuation of a prompt from a saved model",
        "inference.generate",
        "add_generate_arguments",
        "generate",
    ),
    (
        ("chat",),
        "a conversation in the terminal with a saved model, streamed",
        "inference.chat",
        "add_arguments",
        "run",
    ),
    (
        ("eval",),
        "evaluate saved models: lm-evaluation-harness tasks, or perplexity beyond training length",
        "evaluation.cli",
        "add_arguments",
        "run",
    ),
    (
        ("serve",),
        "an OpenAI-compatible HTTP endpoint for a saved model, on Ray Serve",
        "serve.cli",
        "add_arguments",
        "run",
    ),
    (
        ("train",),
        "pretrain EnigmaLM with Ray Train + DeepSpeed ZeRO",
        "train.driver",
        "add_arguments",
        "run",
    ),
    (
        ("finetune",),
        "fine-tune a model on instruction or chat rows (LoRA or full) with Ray Train + DeepSpeed",
        "train.finetune",
        "add_arguments",
        "run",
    ),
    (
        ("unlock",),
        "remove the lock of a run whose holder is gone (refused while its lease is renewed)",
        "storage.unlock",
        "add_arguments",
        "run",
    ),
    (
        ("export",),
        "re-export a run's best model or a kept checkpoint, loadable with trust_remote_code",
        "train.export",
        "add_arguments",
        "run",
    ),
    (
        ("tune",),
        "Ray Tune sweep (grid, random or Optuna; ASHA; results table, best.json)",
        "train.sweep",
        "add_arguments",
        "run",
    ),
    (
        ("report",),
        "gather benchmark JSON files into docs/results.md with plots",
        "benchmarks.report",
        "add_arguments",
        "run",
    ),
    (
        ("data", "prepare"),
        "tokenize, deduplicate, pack and split a corpus into parquet shards, a Ray task a unit",
        "data.cli",
        "add_prepare_arguments",
        "prepare",
    ),
    (
        ("data", "stats"),
        "documents, tokens, blocks, coverage and frequent tokens of a prepared directory",
        "data.cli",
        "add_stats_arguments",
        "stats",
    ),
    (
        ("bench", "core"),
        "machine fwd+bwd tokens/s vs an MLP stack of equal FLOPs",
        "benchmarks.core",
        "add_arguments",
        "run",
    ),
    (
        ("bench", "memory"),
        "peak RSS by depth: the machine, and EnigmaLM plain / checkpointed / reversible layers",
        "benchmarks.memory",
        "add_arguments",
        "run",
    ),
    (
        ("bench", "rebuild"),
        "reversible backward vs stored activations: reconstruction and gradients by depth, dtype",
        "benchmarks.rebuild",
        "add_arguments",
        "run",
    ),
    (
        ("bench", "lm"),
        "EnigmaLM vs the plain Transformer, training tokens/s",
        "benchmarks.lm",
        "add_arguments",
        "run",
    ),
    (
        ("bench", "flow"),
        "EnigmaFlow vs zuko RealNVP on load_digits, test bits/dim",
        "benchmarks.flow",
        "add_arguments",
        "run",
    ),
    (
        ("bench", "train-overhead"),
        "Ray Train + DeepSpeed (1 worker) vs a plain PyTorch loop, tokens/s",
        "benchmarks.train_overhead",
        "add_arguments",
        "run",
    ),
    (
        ("bench", "faults"),
        "a training run with seeded worker kills, a driver SIGTERM and a corrupt checkpoint",
        "benchmarks.faults",
        "add_arguments",
        "run",
    ),
    (
        ("bench", "copy"),
        "copy-memory task: EnigmaLM vs plain Transformer vs LSTM, recall accuracy",
        "benchmarks.copy",
        "add_arguments",
        "run",
    ),
    (
        ("bench", "enwik8"),
        "byte-level LM bits/char: EnigmaLM vs plain Transformer vs gzip/bz2/xz",
        "benchmarks.enwik8",
        "add_arguments",
        "run",
    ),
    (
        ("bench", "data-scale"),
        "enigma data prepare on a large generated corpus: MB/s and peak RSS",
        "benchmarks.data_scale",
        "add_arguments",
        "run",
    ),
    (
        ("bench", "finetune"),
        "fine-tuning EnigmaLM and the plain Transformer on held-out tasks: LoRA and full, 3 seeds",
        "benchmarks.finetune",
        "add_arguments",
        "run",
    ),
    (
        ("bench", "eval"),
        "EnigmaLM vs the plain Transformer, 3 seeds: perplexity in and out of domain, 1x-8x length",
        "benchmarks.eval",
        "add_arguments",
        "run",
    ),
    (
        ("bench", "serve"),
        "the OpenAI endpoint under load at 1, 4, 16 streams: EnigmaLM vs the plain Transformer",
        "benchmarks.serve",
        "add_arguments",
        "run",
    ),
    (
        ("bench", "roofline"),
        "a training step's ops, bytes and FLOPs, counted under FakeTensorMode: plain vs EnigmaLM",
        "benchmarks.roofline",
        "add_arguments",
        "run",
    ),
    (
        ("bench", "gpu"),
        "one CUDA GPU without Ray: EnigmaLM vs plain tokens/s and MFU, DeepSpeed ZeRO checks",
        "benchmarks.gpu",
        "add_arguments",
        "run",
    ),
]
GROUPS = {"model": "inspect models", "data": "tokenized shards", "bench": "benchmarks"}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="enigma", description="Enigma: an invertible machine, its LM and its flow."
    )
    top = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    words = [a for a in argv if not a.startswith("-")]
    for path, help_text, module, add_name, run_name in COMMANDS:
        parent = top
        if len(path) == 2:
            if path[0] not in groups:
                group = top.add_parser(path[0], help=GROUPS[path[0]])
                groups[path[0]] = group.add_subparsers(dest=f"{path[0]}_command", required=True)
            parent = groups[path[0]]
        sub = parent.add_parser(path[-1], help=help_text, description=help_text)
        if list(path) == words[: len(path)]:
            mod = import_module(f"enigma.{module}")
            getattr(mod, add_name)(sub)
            sub.set_defaults(run=getattr(mod, run_name))
    return parser


def _terminated(signum, frame) -> None:
    """SIGTERM unwinds like Ctrl-C: locks are released and a Ray instance this process started
    is shut down on the way out, so the same command can simply be run again."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
    args = build_parser(argv).parse_args(argv)
    args.command_line = "enigma " + shlex.join(argv)  # benchmarks record what produced them
    try:
        status = args.run(args)
    except InputError as err:  # bad input: one line; any other error keeps its traceback
        print(f"enigma: error: {err}", file=sys.stderr)
        return 2
    return status if isinstance(status, int) else 0  # a check that failed may return 1


if __name__ == "__main__":
    sys.exit(main())
