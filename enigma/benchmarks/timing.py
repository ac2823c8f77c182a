"""Interleaved timing: every contestant runs once per round, so drift hits all of them alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def interleaved(
    contestants: dict[str, Callable[[], None]], rounds: int, warmup: int = 1
) -> dict[str, float]:
    """Median seconds per call of each contestant over ``rounds`` interleaved rounds."""
    for _ in range(warmup):
        for fn in contestants.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in contestants}
    for _ in range(rounds):
        for name, fn in contestants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device):
    """bf16 autocast on ``device``, as the benchmarks time a training step."""
    return torch.autocast(device.type, dtype=torch.bfloat16)
