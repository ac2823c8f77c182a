"""Shared fixtures and helpers: invertible-module checks, one Ray cluster per test module, the
prepared corpus and the small-run overrides of the end-to-end tests."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# A training run small enough for a test: every end-to-end test starts from these overrides.
# Gradient accumulation (2) and activation checkpointing (on) stay as shipped, so CI trains the
# path users get; 4 x 2 micro-batches keep 8 sequences per step.
SMALL_RUN = ["seq_len=64", "micro_batch=4", "eval_batches=2"]


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """三国演义 prepared at seq_len 64, once per session, in its own process (so the test process
    holds no Ray instance of its own until a module asks for one)."""
    out = tmp_path_factory.mktemp("data") / "sanguo-64"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "enigma.cli", "data", "prepare", "--seq-len", "64", "--out"]
    subprocess.run([*cmd, str(out)], check=True, env=env, capture_output=True, cwd=ROOT)
    return out


@pytest.fixture(scope="session")
def fp32_zero2(tmp_path_factory) -> str:
    """``zero2_bf16.json`` without bf16: fp32 runs, whose losses compare to 1e-4."""
    from enigma.benchmarks.train_overhead import fp32_ds_config

    return fp32_ds_config(tmp_path_factory.mktemp("ds"))


# The uninterrupted fp32 run the resume tests compare against (one worker, 20 steps).
UNINTERRUPTED = [*SMALL_RUN, "log_steps=1", "lr=2e-3", "max_steps=20", "shuffle_buffer=0"]
UNINTERRUPTED += ["eval_steps=100", "save_steps=100"]


@pytest.fixture(scope="session")
def fp32_baseline(data, fp32_zero2, tmp_path_factory) -> dict[int, float]:
    """Train loss per step of :data:`UNINTERRUPTED`, trained once per session in the Ray cluster
    of the first module that asks."""
    from enigma.train.config import build_config
    from enigma.train.driver import train

    out = tmp_path_factory.mktemp("baseline")
    cfg = build_config("tiny", sets=UNINTERRUPTED, data=str(data), ds_config=fp32_zero2,
                       workers=1, output_dir=str(out))  # fmt: skip
    return {line["step"]: line["loss"] for line in train(cfg)["train_log"]}


def perturb(module: torch.nn.Module, scale: float, seed: int | None = None) -> torch.nn.Module:
    """Move every parameter off its (often identity) start by ``scale`` x N(0, 1) noise, drawn
    from a generator seeded with ``seed``, or from the global RNG when ``seed`` is None."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


@pytest.fixture(scope="module")
def ray_cluster():
    """A local 2-CPU Ray instance shared by one test module (starting one costs seconds)."""
    import ray

    from enigma.cluster.ray_setup import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def jacobian_log_det(module, x: torch.Tensor, position: int, reverse: bool = False) -> float:
    """slogdet of the autograd Jacobian of one token's map at ``position``."""
    pos = torch.tensor(position)

    def token_map(v):
        return module(v[None], pos, reverse=reverse)[0]

    jac = torch.autograd.functional.jacobian(token_map, x)
    sign, logabs = torch.linalg.slogdet(jac)
    assert sign != 0
    return logabs.item()
