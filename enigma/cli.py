"""The ``enigma`` command line."""

from __future__ import annotations

import argparse
import sys

from .benchmarks import core as bench_core


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="enigma", description="Enigma: invertible machine, LM, flow."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser(
        "bench", help="benchmarks; each measures its baseline in the same run"
    )
    benches = bench.add_subparsers(dest="bench", required=True)
    core = benches.add_parser("core", help="machine fwd+bwd tokens/s vs an MLP of equal FLOPs")
    bench_core.add_arguments(core)
    core.set_defaults(run=bench_core.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except ValueError as err:  # bad input: one line, no traceback
        print(f"enigma: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
