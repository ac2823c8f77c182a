"""``enigma bench memory``: peak RSS of one forward + backward of the machine, each point in a
fresh process, memory-efficient (reversible) backprop against plain autograd as blocks grow.

``python -m enigma.benchmarks.memory --blocks 16 --memory-efficient`` measures one point and
prints one JSON line. The RSS high-water mark is what the operating system saw, so it counts every
allocator and every buffer autograd kept; a fresh process keeps earlier work out of the figure.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

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


def measure_in_fresh_process(
    blocks: int, memory_efficient: bool, d: int = 512, batch: int = 8, length: int = 512
) -> dict:
    """Run :func:`measure` in a new interpreter and return its result."""
    cmd = [sys.executable, "-m", "enigma.benchmarks.memory", "--blocks", str(blocks)]
    cmd += ["--d", str(d), "--batch", str(batch), "--length", str(length)]
    if memory_efficient:
        cmd.append("--memory-efficient")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--blocks", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--json", dest="json_out", default=None)


def run(args: argparse.Namespace) -> dict:
    from . import meta

    points = []
    for blocks in args.blocks:
        for memory_efficient in (True, False):
            point = measure_in_fresh_process(
                blocks, memory_efficient, args.d, args.batch, args.length
            )
            mode = "memory-efficient" if memory_efficient else "plain autograd"
            print(f"  {blocks:>3} RevBlocks, {mode:<16} peak RSS {point['peak_rss_mb']:>8,.0f} MB")
            points.append(point)
    result = {
        "benchmark": "memory",
        "shape": {"d": args.d, "batch": args.batch, "length": args.length, "rotors": 2},
        "points": points,
    }
    return meta.save(result, args.json_out, args.command_line)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, required=True)
    p.add_argument("--memory-efficient", action="store_true")
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=512)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    print(json.dumps(measure(a.blocks, a.memory_efficient, a.d, a.batch, a.length)))


if __name__ == "__main__":
    main()
