"""Shared fixtures and helpers: invertible-module checks, a Ray cluster shared by the modules
that ask for one, the prepared corpus and the small-run overrides of the end-to-end tests."""

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# A training run small enough for a test: every end-to-end test starts from these overrides.
# Gradient accumulation (2) and activation checkpointing (auto: off on these machines) stay as
# shipped, so CI trains the path users get; 4 x 2 micro-batches keep 8 sequences per step.
SMALL_RUN = ["seq_len=64", "micro_batch=4", "eval_batches=2"]

# Every local cluster the suite starts (here or in a command it runs) keeps up to 8 idle worker
# processes for 10 minutes instead of ending all but one a CPU after a second: the next run's
# data and probe tasks start in processes that already imported torch (two 6-step runs in one
# process: the second 38 s against 42-50 s with Ray's defaults). Set for the suite only: a
# user's command trains once, and 8 idle workers hold about 2.7 GB.
os.environ.setdefault("RAY_num_workers_soft_limit", "8")
os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "600000")
# Models and tokenizers named by a URI are mirrored here, not into the user's ~/.cache (set
# before any cluster starts, so its workers mirror here too).
os.environ.setdefault("ENIGMA_CACHE", tempfile.mkdtemp(prefix="enigma-cache-"))


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
    """``zero2.json`` without bf16: fp32 runs, whose losses compare to 1e-4."""
    from enigma.benchmarks.train_overhead import fp32_ds_config

    return fp32_ds_config(tmp_path_factory.mktemp("ds"))


# The uninterrupted fp32 run the resume tests compare against (one worker, 20 steps, a
# checkpoint at step 10 that test_train resumes).
UNINTERRUPTED = [*SMALL_RUN, "log_steps=1", "lr=2e-3", "max_steps=20", "shuffle_buffer=0"]
UNINTERRUPTED += ["eval_steps=100", "save_steps=10"]


@pytest.fixture(scope="session")
def fp32_baseline_run(data, fp32_zero2, tmp_path_factory) -> tuple[Path, dict[int, float]]:
    """The output directory and train loss per step of :data:`UNINTERRUPTED`, trained once per
    session in whatever cluster is up when the first test that asks is set up (or one that
    ``train`` starts)."""
    from enigma.train.config import build_config
    from enigma.train.driver import train

    out = tmp_path_factory.mktemp("baseline")
    cfg = build_config("tiny", sets=UNINTERRUPTED, data=str(data), ds_config=fp32_zero2,
                       workers=1, output_dir=str(out))  # fmt: skip
    return out, {line["step"]: line["loss"] for line in train(cfg)["train_log"]}


@pytest.fixture(scope="session")
def fp32_baseline(fp32_baseline_run) -> dict[int, float]:
    return fp32_baseline_run[1]


def perturb(module: torch.nn.Module, scale: float, seed: int | None = None) -> torch.nn.Module:
    """Move every parameter off its (often identity) start by ``scale`` x N(0, 1) noise, drawn
    from a generator seeded with ``seed``, or from the global RNG when ``seed`` is None."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


@pytest.fixture(scope="module")
def ray_cluster(_ray_left_up):
    """A local 2-CPU Ray instance: started by the first module that asks and kept for the next
    ones that ask (a start costs seconds, and the cluster's warm worker processes carry over). A
    module that needs a cluster of another shape calls :func:`own_ray_cluster` first; the
    session's end shuts down whatever is left."""
    from enigma.cluster.ray_setup import init_ray

    init_ray(num_cpus=2)
    yield


@pytest.fixture(scope="session")
def _ray_left_up():
    yield
    import ray

    ray.shutdown()


def own_ray_cluster() -> None:
    """Shut down a cluster an earlier module left up, so that the caller starts its own."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def cpu_has_fast_bf16() -> bool:
    """Whether this machine's CPU runs a bf16 matmul natively (AVX-512 BF16 or AMX)."""
    from enigma.train.precision import cpu_flags_have_bf16

    return cpu_flags_have_bf16(torch.cpu.get_capabilities())


def slow_bf16_reason(fast: bool | None = None) -> str:
    """The pattern of the reason ``precision: auto`` gives for fp32 under
    ``ONEDNN_MAX_CPU_ISA=AVX2`` on a CPU with the fast bf16 path or without it (None: this
    machine's): the variable where the CPU has the fast path, the CPU itself where it has none
    (the variable then changes nothing)."""
    if cpu_has_fast_bf16() if fast is None else fast:
        return r"ONEDNN_MAX_CPU_ISA=AVX2 keeps oneDNN below AVX512_CORE_BF16"
    return r"the CPU has (AVX2|AVX-512|no AVX2) but no AVX-512 BF16 or AMX"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_server(endpoint_in_env: bool = True):
    """moto's S3 server on loopback with a bucket ``runs``; the AWS_* variables point at it
    while the block runs (set them before a Ray cluster starts, so its workers inherit them).
    Without ``endpoint_in_env`` only the credentials are set: a URI's query must say where the
    server is. Yields a boto3 client (``client.meta.endpoint_url`` is the server)."""
    import boto3

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint if endpoint_in_env else None, "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    saved = {k: os.environ.get(k) for k in env}
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        client = boto3.client("s3", endpoint_url=endpoint)
        for _ in range(100):
            try:
                client.create_bucket(Bucket="runs")
                break
            except Exception:  # the server is still starting
                time.sleep(0.1)
        yield client
    finally:
        server.terminate()
        server.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def site_packages_without(tmp_path, absent=("enigma", "deepspeed", "ray")) -> Path:
    """A directory of links to this Python's site-packages entries, less ``absent`` (their
    packages, metadata and the project's editable-install hooks): with ``python -S`` and this
    on ``PYTHONPATH``, they are not installed."""
    import site

    view = tmp_path / "site-view"
    if view.is_dir():
        return view
    view.mkdir()
    for root in site.getsitepackages():
        for entry in Path(root).iterdir():
            stem = entry.name.split("-")[0].split(".")[0].lower()
            if stem in absent or "__editable__" in entry.name or entry.suffix == ".pth":
                continue
            if not (view / entry.name).exists():
                (view / entry.name).symlink_to(entry)
    return view


def load_without_project(model_dirs, prompt: list, new_tokens: int, tmp_path) -> list[dict]:
    """Each exported model loaded in a fresh Python where ``enigma``, ``deepspeed`` and ``ray``
    are not installed (``tests/remote_load_probe.py``): its greedy ids and first logits."""
    import json

    probe = [sys.executable, "-S", str(ROOT / "tests" / "remote_load_probe.py"), json.dumps(prompt)]
    env = {"PATH": "/usr/bin:/bin", "HF_MODULES_CACHE": str(tmp_path / "hf-modules"),
           "PYTHONPATH": str(site_packages_without(tmp_path))}  # fmt: skip
    done = subprocess.run([*probe, str(new_tokens), *map(str, model_dirs)], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


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
