"""The ``enigma`` command line."""

from __future__ import annotations

import argparse
import sys

from . import model_cli
from .benchmarks import core as bench_core
from .benchmarks import flow as bench_flow
from .benchmarks import lm as bench_lm


def _command(commands, name: str, help: str, add_arguments, run) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help, description=help)
    add_arguments(parser)
    parser.set_defaults(run=run)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="enigma", description="Enigma: an invertible machine, its LM and its flow."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    model = commands.add_parser("model", help="inspect models").add_subparsers(
        dest="model_command", required=True
    )
    _command(
        model, "info", "parameter count per part", model_cli.add_info_arguments, model_cli.info
    )
    _command(
        commands,
        "generate",
        "stream a continuation of a prompt from a saved model",
        model_cli.add_generate_arguments,
        model_cli.generate,
    )

    bench = commands.add_parser("bench", help="benchmarks; each measures its baseline in one run")
    benches = bench.add_subparsers(dest="bench", required=True)
    _command(
        benches,
        "core",
        "machine fwd+bwd tokens/s vs an MLP stack of equal FLOPs",
        bench_core.add_arguments,
        bench_core.run,
    )
    _command(
        benches,
        "lm",
        "EnigmaLM vs the plain Transformer, training tokens/s",
        bench_lm.add_arguments,
        bench_lm.run,
    )
    _command(
        benches,
        "flow",
        "EnigmaFlow vs zuko RealNVP on load_digits, test bits/dim",
        bench_flow.add_arguments,
        bench_flow.run,
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as err:  # bad input: one line, no traceback
        print(f"enigma: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
