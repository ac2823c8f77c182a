"""``enigma bench lm``: EnigmaLM training tokens/s against the plain-Transformer baseline.

Both models take full training steps (forward + backward + AdamW) on the same batch, interleaved
round by round in one process, so the ratio is free of drift between runs.
"""

from __future__ import annotations

import argparse

import torch

from enigma.models.lm import EnigmaLM
from enigma.models.lm_config import PRESET_SEQ_LEN, EnigmaConfig

from . import meta
from .timing import interleaved


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=None, help="default: the preset's")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--memory-efficient", action="store_true", help="reversible machine backprop")
    p.add_argument("--json", dest="json_out", default=None)


def matched_plain_transformer(shape: dict, target: int, seed: int = 0) -> EnigmaLM:
    """The plain Transformer (no machine) of ``shape`` whose MLP width brings its parameter
    count closest to ``target``, the EnigmaLM it is compared with."""

    def build(ratio: int) -> EnigmaLM:
        torch.manual_seed(seed)
        return EnigmaLM(EnigmaConfig(**shape, core="none", mlp_ratio=ratio))

    def size(ratio: int) -> int:
        return sum(p.numel() for p in build(ratio).parameters())

    return build(min(range(4, 17), key=lambda r: abs(size(r) - target)))


def _train_step(model: EnigmaLM, ids: torch.Tensor):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        loss = model(ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def run(args: argparse.Namespace) -> dict:
    seq_len = args.seq_len or PRESET_SEQ_LEN.get(args.preset, 256)
    torch.manual_seed(0)
    enigma_cfg = EnigmaConfig.from_preset(
        args.preset, max_len=max(2048, seq_len), machine_memory_efficient=args.memory_efficient
    )
    base_cfg = EnigmaConfig.from_preset(args.preset, max_len=max(2048, seq_len), core="none")
    models = {"enigma": EnigmaLM(enigma_cfg).train(), "baseline": EnigmaLM(base_cfg).train()}
    ids = torch.randint(0, enigma_cfg.vocab_size, (args.batch, seq_len))
    secs = interleaved({k: _train_step(m, ids) for k, m in models.items()}, rounds=args.rounds)
    tokens = args.batch * seq_len
    tps = {k: tokens / s for k, s in secs.items()}
    result = {
        "benchmark": "lm",
        "preset": args.preset,
        "batch": args.batch,
        "seq_len": seq_len,
        "machine_memory_efficient": args.memory_efficient,
        "params": {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()},
        "tokens_per_sec": {k: round(v, 1) for k, v in tps.items()},
        "ratio": tps["enigma"] / tps["baseline"],
    }
    print(f"preset {args.preset}: B={args.batch} L={seq_len}, train step = fwd + bwd + AdamW")
    for k in models:
        print(f"  {k:<9} {result['params'][k]:>12,} params {tps[k]:>10,.0f} tokens/s")
    print(f"  ratio enigma / baseline: {result['ratio']:.3f}")
    meta.save(result, args.json_out, args.command_line)
    return result
