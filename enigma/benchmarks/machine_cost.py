"""Where EnigmaLM's machine spends a training step: the machine alone and each of its parts,
forward and backward under bf16 autocast (as training runs it), at one shape.

For each part: the aten operations one call launches (views left out; the count is the same on
any device, so it is measured here as on a GPU), milliseconds per call (synchronised), and on CUDA
the milliseconds the GPU was busy with its kernels (profiler). ``ms`` well above ``busy_ms`` means
the host cannot launch kernels as fast as the GPU runs them: fewer operations, compilation or
CUDA graphs help there, fewer FLOPs do not. ``uses`` is how often one machine pass runs the part
(the involutive machine goes through ``F`` and back).
"""

from __future__ import annotations

import collections
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .timing import autocast, sync

# Operations that make views or aliases: no kernel runs for them.
_VIEWS = {"view", "_unsafe_view", "t", "transpose", "expand", "slice", "select", "split",
          "split_with_sizes", "chunk", "unsqueeze", "squeeze", "permute", "detach", "alias",
          "as_strided", "unbind", "diagonal", "_reshape_alias", "reshape"}  # fmt: skip


class OpCounter(TorchDispatchMode):
    """Counts the aten operations that run under it, by name, views left out."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in _VIEWS:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _busy_ms(step, rounds: int, device: torch.device) -> float | None:
    """GPU kernel time per call from the profiler (None off CUDA)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(rounds):
            step()
        sync(device)
    total_us = sum(getattr(e, "self_device_time_total", 0) for e in prof.key_averages())
    return round(total_us / rounds / 1e3, 3)


def measure(fn, x: torch.Tensor, rounds: int, device: torch.device) -> dict:
    """Operations, ms per call and busy ms of ``fn(x)`` forward + backward under bf16 autocast."""

    def step():
        with autocast(device):
            out = fn(x)
        out.float().square().mean().backward()

    for _ in range(2):  # warm-up
        step()
    with OpCounter() as ops:
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(rounds):
        step()
    sync(device)
    ms = (time.perf_counter() - start) / rounds * 1e3
    return {"ops": ops.total, "ms": round(ms, 3), "busy_ms": _busy_ms(step, rounds, device)}


def machine_cost(preset: str, batch: int, seq_len: int, rounds: int, device) -> dict:
    """The machine of EnigmaLM ``preset`` and each of its parts at ``(batch, seq_len)``."""
    from ..models.lm import EnigmaLM
    from ..models.lm_config import EnigmaConfig

    device = torch.device(device)
    torch.manual_seed(0)
    model = EnigmaLM(EnigmaConfig.from_preset(preset, max_len=max(2048, seq_len)))
    machine = model.machine.to(device).train()
    x = torch.randn(batch, seq_len, machine.d, device=device, requires_grad=True)
    positions = torch.arange(seq_len, device=device)
    parts = {"machine": (machine, 1), "plugboard": (machine.plugboard, 2)}
    if machine.rotors.num_layers:
        parts["rotors"] = (machine.rotors, 2)
    if len(machine.blocks):
        parts["rev_block"] = (machine.blocks[0], 2 * len(machine.blocks))
    if machine.reflector is not None:
        parts["reflector"] = (machine.reflector, 1)
    out = {"preset": preset, "batch": batch, "seq_len": seq_len, "d": machine.d, "parts": {}}
    loss_ops = measure(lambda h: h, x, 1, device)["ops"]  # the loss and its backward alone
    for name, (part, uses) in parts.items():
        figures = measure(lambda h, part=part: part(h, positions), x, rounds, device)
        figures["ops"] -= loss_ops
        out["parts"][name] = {"uses": uses, **figures}
    whole = out["parts"]["machine"]
    busy = whole["busy_ms"]
    out["busy_fraction"] = round(busy / whole["ms"], 3) if busy is not None else None
    each = [p["uses"] * p["ops"] for k, p in out["parts"].items() if k != "machine"]
    # Near the whole machine's count: the difference is the chain's own bookkeeping, and weight
    # casts that autocast caches between a block's two passes.
    out["ops_in_parts"] = sum(each)
    out["ok"] = whole["ops"] > 0 and whole["ms"] > 0
    return out
