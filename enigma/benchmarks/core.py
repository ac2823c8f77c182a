"""``enigma bench core``: the machine's training speed against a plain MLP stack of equal FLOPs.

Both run forward + backward on the same tokens in the same process, interleaved round by round.
An AdamW step (untimed) follows each machine pass so the rotors and blocks leave their identity
start, and the reconstruction errors are measured on the machine so moved.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from enigma import Enigma

from . import meta
from .timing import interleaved


def machine_macs_per_token(machine: Enigma) -> int:
    """Multiply-adds of one forward pass per token (rotors + coupling nets, both directions)."""
    per_pass = machine.rotors.num_layers * machine.d**2
    for block in machine.blocks:
        for net in (block.f, block.g):
            per_pass += sum(m.in_features * m.out_features for m in net if isinstance(m, nn.Linear))
    return per_pass * (2 if machine.involutive else 1)


class MLPStack(nn.Module):
    """Residual ``Linear(d, d) + GELU`` layers: a plain, non-invertible network to compare with."""

    def __init__(self, d: int, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + nn.functional.gelu(layer(x))
        return x


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rev-blocks", type=int, default=4)
    p.add_argument("--rotors", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", dest="json_out", default=None, help="also write the figures here")


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    d, tokens = args.d, args.batch * args.length
    machine = Enigma(d, num_rev_blocks=args.rev_blocks, num_rotors=args.rotors)
    mlp_layers = max(1, round(machine_macs_per_token(machine) / d**2))
    mlp = MLPStack(d, mlp_layers)
    opt = torch.optim.AdamW(machine.parameters(), lr=1e-3)
    x = torch.randn(args.batch, args.length, d)
    target = torch.randn_like(x)

    def machine_step(memory_efficient: bool):
        def step():
            machine.memory_efficient = memory_efficient
            loss = (machine(x) - target).square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()  # so the machine moves; its cost is tiny next to fwd + bwd

        return step

    def mlp_step():
        mlp.zero_grad(set_to_none=True)
        (mlp(x) - target).square().mean().backward()

    secs = interleaved(
        {
            "machine_memory_efficient": machine_step(True),
            "machine_plain_autograd": machine_step(False),
            "mlp_equal_flops": mlp_step,
        },
        rounds=args.rounds,
    )
    tps = {name: tokens / s for name, s in secs.items()}
    recon = reconstruction(machine, args.batch, args.length)
    result = {
        "benchmark": "core",
        "shape": {"d": d, "batch": args.batch, "length": args.length},
        "parts": {"rev_blocks": args.rev_blocks, "rotors": args.rotors},
        "mlp_layers": mlp_layers,
        "macs_per_token": machine_macs_per_token(machine),
        "tokens_per_sec": {k: round(v, 1) for k, v in tps.items()},
        "ratio_memory_efficient_vs_mlp": tps["machine_memory_efficient"] / tps["mlp_equal_flops"],
        "ratio_plain_vs_mlp": tps["machine_plain_autograd"] / tps["mlp_equal_flops"],
        "reconstruction": recon,
    }
    show(result, args.rounds)
    meta.save(result, args.json_out, args.command_line)
    return result


@torch.no_grad()
def reconstruction(machine: Enigma, batch: int, length: int) -> dict:
    """‖x − x'‖/‖x‖ after the benchmark's steps: inverse and involution in fp32, fp64."""
    probe = torch.randn(batch, length, machine.d)
    y = machine(probe)
    recon = {
        "fp32_inverse": ((machine.inverse(y) - probe).norm() / probe.norm()).item(),
        "fp32_involution": ((machine(y) - probe).norm() / probe.norm()).item(),
    }
    wide = machine.double()
    p64 = probe.double()
    recon["fp64_involution"] = ((wide(wide(p64)) - p64).norm() / p64.norm()).item()
    return recon


def show(result: dict, rounds: int) -> None:
    shape, parts = result["shape"], result["parts"]
    print(
        f"machine d={shape['d']} blocks={parts['rev_blocks']} rotors={parts['rotors']}, "
        f"B={shape['batch']} L={shape['length']}"
    )
    print(f"  forward+backward tokens/s (median of {rounds} interleaved rounds):")
    for name, value in result["tokens_per_sec"].items():
        print(f"    {name:<26} {value:>10,.0f}")
    print(f"  ratio memory-efficient / MLP: {result['ratio_memory_efficient_vs_mlp']:.2f}")
    print(f"  ratio plain autograd / MLP:   {result['ratio_plain_vs_mlp']:.2f}")
    recon = result["reconstruction"]
    print(
        "  reconstruction ||x - x'||/||x||: " + ", ".join(f"{k} {v:.1e}" for k, v in recon.items())
    )
