"""``enigma bench train-overhead``: what Ray Train + DeepSpeed cost over a plain PyTorch loop.

The same EnigmaLM, micro-batch, sequence length, AdamW hyper-parameters, gradient clipping and
precision (fp32: DeepSpeed's bf16 keeps bf16 weights, a different computation) run two ways in
one invocation, with the same number of CPU threads:

- **ray+deepspeed**: ``enigma train`` with one worker (ZeRO-2), batches streamed by Ray Data.
- **plain**: a ``torch.optim.AdamW`` loop in this process on the same shards.

The plain loop runs half its steps before the Ray run and half after, so drift in the machine's
speed hits both sides. Each side's first steps are warm-up and not timed; the Ray side's rate is
the one its progress lines report (logging and evaluation fall outside the timed intervals, and
the plain loop has neither).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

from . import meta


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny")
    p.add_argument("--data", default=None, help="prepared shards (default: 三国演义 at --seq-len)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=40, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per side")
    p.add_argument("--threads", type=int, default=None, help="default: all CPUs (of the cluster)")
    p.add_argument("--output-dir", default=None, help="default: a temporary directory")
    p.add_argument("--json", dest="json_out", default=None)


def _data_dir(args, work: Path) -> str:
    if args.data:
        return args.data
    from enigma.data.prepare import prepare
    from enigma.data.sources import Source

    out = work / f"sanguo-{args.seq_len}"
    prepare(Source.parse("sanguo"), out, seq_len=args.seq_len, progress=False)
    return str(out)


def fp32_ds_config(work: Path, source: str = "zero2.json") -> str:
    """A shipped config (``zero2.json`` by default) without bf16, written into ``work``: fp32
    runs compare exactly, on any CPU."""
    from enigma.train import deepspeed_json

    root = Path(__file__).resolve().parents[2]
    config = deepspeed_json.load(str(root / "ds_configs" / source))
    config.pop("bf16", None)
    path = work / source.replace(".json", "_fp32.json")
    path.write_text(json.dumps(config, indent=2))
    return str(path)


def plain_loop(cfg, blocks, steps: int, warmup: int, seed: int) -> float:
    """Seconds per timed step of a plain PyTorch training loop."""
    import torch

    from enigma.models.lm import EnigmaLM
    from enigma.train.schedule import lr_at

    torch.manual_seed(seed)
    model = EnigmaLM(cfg.model_config()).train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=1e-8, weight_decay=cfg.weight_decay
    )
    rng = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(blocks), generator=rng)
    total = warmup + steps
    times = []
    for step in range(total):
        rows = order[(step * cfg.micro_batch) % len(blocks) :][: cfg.micro_batch]
        ids = torch.from_numpy(blocks[rows.numpy()]).long()
        start = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg, total, max(1, int(cfg.warmup_ratio * total)))
        loss = model(ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        loss.item()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return sum(times) / len(times)


def overhead_config(args: argparse.Namespace, work: Path, data: str, threads: int):
    """One fp32 worker with ``threads`` CPUs, no evaluation until the end."""
    from enigma.train.config import build_config

    return build_config(
        args.preset,
        sets=[
            f"seq_len={args.seq_len}",
            f"micro_batch={args.micro_batch}",
            "grad_accum=1",
            "activation_checkpointing=false",
            f"log_steps={args.warmup}",
            f"eval_steps={10**9}",
            "eval_batches=1",
            f"cpus_per_worker={threads}",
            "sample_tokens=8",
        ],
        data=data,
        ds_config=fp32_ds_config(work),
        workers=1,
        gpus_per_worker=0,
        output_dir=str(work / "run"),
        max_steps=args.warmup + args.steps,
    )


def ray_rate(lines: list[dict], warmup: int, tokens_per_step: int) -> float:
    """Tokens/s over the progress intervals after the warm-up, weighted by their steps."""
    lines = [x for x in lines if x["step"] > warmup]
    if not lines:
        raise RuntimeError("the Ray run reported no progress past its warm-up steps")
    steps_seen, prev, seconds = 0, warmup, 0.0
    for line in lines:
        n = line["step"] - prev
        seconds += n * tokens_per_step / line["tokens_per_sec"]
        steps_seen, prev = steps_seen + n, line["step"]
    return steps_seen * tokens_per_step / seconds


def run(args: argparse.Namespace) -> dict:
    import ray
    import torch

    from enigma.cluster.ray_setup import init_ray
    from enigma.data.shards import read_blocks
    from enigma.train.driver import train

    init_ray()
    # One worker with every CPU this machine has, and no more than the cluster can give it.
    available = int(ray.cluster_resources().get("CPU", 1))
    threads = args.threads or min(os.cpu_count() or 1, available)
    work = Path(args.output_dir or tempfile.mkdtemp(prefix="enigma-overhead-"))
    work.mkdir(parents=True, exist_ok=True)
    data = _data_dir(args, work)
    cfg = overhead_config(args, work, data, threads)
    tokens_per_step = cfg.micro_batch * cfg.resolved_seq_len
    blocks = read_blocks(data, "train")
    torch.set_num_threads(threads)
    first = args.steps // 2
    plain_secs = [plain_loop(cfg, blocks, first, args.warmup, cfg.seed)]
    start = time.perf_counter()
    summary = train(cfg)
    ray_wall = time.perf_counter() - start
    plain_secs.append(plain_loop(cfg, blocks, args.steps - first, args.warmup, cfg.seed))
    lines = [x for x in summary["train_log"] if x["step"] > args.warmup]
    ray_tps = ray_rate(summary["train_log"], args.warmup, tokens_per_step)
    plain_tps = tokens_per_step / statistics.mean(plain_secs)
    result = {
        "benchmark": "train-overhead",
        "preset": args.preset,
        "seq_len": cfg.resolved_seq_len,
        "micro_batch": cfg.micro_batch,
        "precision": "fp32",
        "threads": threads,
        "worker_torch_threads": lines[-1].get("torch_threads"),
        "steps": args.steps,
        "wall_seconds_ray_run": round(ray_wall, 1),
        "tokens_per_sec": {"ray+deepspeed": round(ray_tps, 1), "plain": round(plain_tps, 1)},
        "plain_halves_tokens_per_sec": [round(tokens_per_step / s, 1) for s in plain_secs],
        "ratio": ray_tps / plain_tps,
        "final_loss": lines[-1]["loss"],
    }
    print(
        f"EnigmaLM {args.preset}, micro-batch {cfg.micro_batch} x {cfg.resolved_seq_len}, fp32, "
        f"{threads} threads, {args.steps} timed steps each"
    )
    print(f"  plain PyTorch loop     {plain_tps:>9,.0f} tokens/s  (halves: "
          f"{', '.join(f'{tokens_per_step / s:,.0f}' for s in plain_secs)})")  # fmt: skip
    print(f"  Ray Train + DeepSpeed  {ray_tps:>9,.0f} tokens/s  (1 worker, ZeRO-2)")
    print(f"  ratio {result['ratio']:.3f} (target >= 0.85)")
    if not math.isfinite(result["final_loss"]):
        raise RuntimeError("the Ray run's loss is not finite")
    meta.save(result, args.json_out, args.command_line)
    return result
