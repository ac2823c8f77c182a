"""``enigma bench memory``: peak RSS of one forward + backward, each point in a fresh process.

Two parts. The machine alone, memory-efficient (reversible) backprop against plain autograd as its
RevBlocks grow. And EnigmaLM by Transformer depth (2, 4, 8, 16 layers; 4 RevBlocks, 2 rotors):
plain autograd, activation checkpointing of each layer (the machine reversible), and reversible
layers (the whole model one reversible chain), with the training tokens/s of the step; then the
deepest reversible model whose peak stays within the plain 4-layer model's.

``python -m enigma.benchmarks.memory --blocks 16 --memory-efficient`` (or ``--layers 8 --mode
reversible``) measures one point and prints one JSON line. The RSS high-water mark is what the
operating system saw, so it counts every allocator and every buffer autograd kept; a fresh process
keeps earlier work out of the figure. An LM point runs one step to warm up and times the second
(forward, backward, no optimizer: ZeRO partitions the optimizer's states across ranks, and the
figure here is what depth costs).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch


def peak_rss_mb() -> float:
    """This address space's RSS high-water mark. Linux's ``ru_maxrss`` is not used: it survives
    exec, so a child forked from a large parent (a long pytest run) starts at the parent's peak;
    ``VmHWM`` belongs to the new address space alone."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure(blocks: int, memory_efficient: bool, d: int, batch: int, length: int) -> dict:
    from enigma import Enigma

    torch.manual_seed(0)
    machine = Enigma(d, num_rev_blocks=blocks, num_rotors=2, memory_efficient=memory_efficient)
    x = torch.randn(batch, length, d, requires_grad=True)
    before = peak_rss_mb()
    machine(x).square().mean().backward()
    return {
        "blocks": blocks,
        "memory_efficient": memory_efficient,
        "d": d,
        "batch": batch,
        "length": length,
        "rss_before_mb": round(before, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


DEPTHS = (8, 12, 16, 24, 32, 48, 64, 96, 128)  # the reversible search's steps
LM_MODES = {
    "plain": dict(reversible_backward=False),
    "checkpointing": dict(activation_checkpointing=True, reversible_backward=True),
    "reversible": dict(reversible_layers=True),
}


def lm_config(layers: int, mode: str, d: int, length: int):
    from enigma import EnigmaConfig

    heads = max(h for h in (8, 4, 2, 1) if d % h == 0)
    return EnigmaConfig(
        d=d, num_heads=heads, num_transformer_layers=layers, num_rev_blocks=4, num_rotors=2,
        max_len=max(length, 2048), **LM_MODES[mode],
    )  # fmt: skip


def measure_lm(layers: int, mode: str, d: int, batch: int, length: int) -> dict:
    from enigma import EnigmaLM

    torch.manual_seed(0)
    config = lm_config(layers, mode, d, length)
    model = EnigmaLM(config).train()
    ids = torch.randint(0, config.vocab_size, (batch, length))
    before = peak_rss_mb()
    seconds = []
    for _ in range(2):  # the first step warms the allocator up; the second is timed
        start = time.perf_counter()
        model(ids, labels=ids).loss.backward()
        seconds.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return {
        "layers": layers,
        "mode": mode,
        "parameters": sum(p.numel() for p in model.parameters()),
        "rss_before_mb": round(before, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "step_s": round(seconds[-1], 3),
        "tokens_per_sec": round(batch * length / seconds[-1], 1),
    }


# glibc raises its mmap threshold as large blocks are freed (up to 32 MB), after which freed
# activations stay in the heap and the peak RSS depends on the order of allocations more than on
# what is alive. A fixed threshold gives every block of 64 KiB or more its own mapping, returned
# on free, so the peak RSS follows the live tensors.
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _child(args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "enigma.benchmarks.memory", *args]
    env = {**os.environ, **CHILD_ENV}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure_in_fresh_process(
    blocks: int, memory_efficient: bool, d: int = 512, batch: int = 8, length: int = 512
) -> dict:
    """Run :func:`measure` in a new interpreter and return its result."""
    args = ["--blocks", str(blocks), "--d", str(d), "--batch", str(batch), "--length", str(length)]
    return _child(args + (["--memory-efficient"] if memory_efficient else []))


def measure_lm_in_fresh_process(layers: int, mode: str, d: int, batch: int, length: int) -> dict:
    """Run :func:`measure_lm` in a new interpreter and return its result."""
    args = ["--layers", str(layers), "--mode", mode, "--d", str(d), "--batch", str(batch)]
    return _child(args + ["--length", str(length)])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--blocks", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument(
        "--part", choices=("machine", "lm", "both"), default="both", help="which part to measure"
    )
    p.add_argument(
        "--deepest-up-to", type=int, default=64, help="largest depth the reversible search tries"
    )
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--json", dest="json_out", default=None)


def run(args: argparse.Namespace) -> dict:
    from . import meta

    result = {
        "benchmark": "memory",
        "shape": {"d": args.d, "batch": args.batch, "length": args.length, "rotors": 2},
        "child_env": CHILD_ENV,
    }
    if args.part in ("machine", "both"):
        result["points"] = machine_points(args)
    if args.part in ("lm", "both"):
        result["lm"] = lm_points(args)
    return meta.save(result, args.json_out, args.command_line)


def machine_points(args: argparse.Namespace) -> list[dict]:
    points = []
    for blocks in args.blocks:
        for memory_efficient in (True, False):
            point = measure_in_fresh_process(
                blocks, memory_efficient, args.d, args.batch, args.length
            )
            mode = "memory-efficient" if memory_efficient else "plain autograd"
            print(f"  {blocks:>3} RevBlocks, {mode:<16} peak RSS {point['peak_rss_mb']:>8,.0f} MB")
            points.append(point)
    return points


def depth_sweep(point, layers: list[int], peak_key: str, limit: int):
    """Every mode at every depth (``point(layers, mode)`` measures one), then the reversible model
    deeper through :data:`DEPTHS` (up to ``limit``) while its peak stays within the plain 4-layer
    model's. Returns the points, that budget (None without a plain 4-layer point) and the
    deepest reversible point that fit (None if none did)."""
    points = [point(n, mode) for n in layers for mode in LM_MODES]
    budget = next((p[peak_key] for p in points if p["layers"] == 4 and p["mode"] == "plain"), None)
    deepest = None
    if budget is not None:
        tried = {p["layers"]: p for p in points if p["mode"] == "reversible"}
        for n in [n for n in DEPTHS if n <= limit]:
            p = tried.get(n) or point(n, "reversible")
            if p[peak_key] > budget:
                break
            deepest = p
    return points, budget, deepest


def lm_points(args: argparse.Namespace) -> dict:
    def point(layers: int, mode: str) -> dict:
        p = measure_lm_in_fresh_process(layers, mode, args.d, args.batch, args.length)
        print(
            f"  EnigmaLM {layers:>3} layers, {mode:<13} peak RSS {p['peak_rss_mb']:>8,.0f} MB, "
            f"{p['tokens_per_sec']:>7,.0f} tokens/s",
            flush=True,
        )
        return p

    points, budget, deepest = depth_sweep(point, args.layers, "peak_rss_mb", args.deepest_up_to)
    if budget is not None:
        print(f"  deepest reversible EnigmaLM within plain 4 layers' {budget:,.0f} MB: "
              f"{deepest['layers'] if deepest else 'none'} layers")  # fmt: skip
    return {
        "blocks": 4,
        "points": points,
        "plain_4_layers_peak_mb": budget,
        "deepest_reversible_within_plain_4": deepest,
        "search_limit_layers": args.deepest_up_to,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=None, help="a machine point")
    p.add_argument("--memory-efficient", action="store_true")
    p.add_argument("--layers", type=int, default=None, help="an EnigmaLM point")
    p.add_argument("--mode", choices=tuple(LM_MODES), default="plain")
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=512)
    a = p.parse_args(argv)
    if a.layers is not None:
        print(json.dumps(measure_lm(a.layers, a.mode, a.d, a.batch, a.length)))
        return
    torch.set_num_threads(1)
    print(json.dumps(measure(a.blocks, a.memory_efficient, a.d, a.batch, a.length)))


if __name__ == "__main__":
    main()
