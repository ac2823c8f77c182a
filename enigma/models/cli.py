"""``enigma model info``: a model's shape and its parameters per part."""

from __future__ import annotations

import argparse


def add_info_arguments(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--preset", help="one of tiny, small, base, large")
    group.add_argument("--model", help="a directory written by save_pretrained, or its URI")


def info(args: argparse.Namespace) -> None:
    from ..inference.generate import load_model
    from .lm import EnigmaLM
    from .lm_config import EnigmaConfig

    if args.preset:
        model = EnigmaLM(EnigmaConfig.from_preset(args.preset))
    else:
        from ..storage.mirror import local_model

        model = load_model(local_model(args.model))
    c = model.config
    print(
        f"EnigmaLM d={c.d} layers={c.num_transformer_layers} heads={c.num_heads} "
        f"rev_blocks={c.num_rev_blocks if c.has_machine else 0} "
        f"rotors={c.num_rotors if c.has_machine else 0} rotor_positions={c.rotor_positions} "
        f"alibi={c.use_alibi}"
    )
    for part, n in model.parameter_counts().items():
        print(f"  {part:<12} {n:>14,}")
