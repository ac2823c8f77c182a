"""The per-worker training loop that Ray Train runs: DeepSpeed ZeRO on streamed shards.

Every rank runs the same fixed number of micro-batches per epoch (computed by the driver from the
manifest), so no rank waits on a collective that another never reaches. A checkpoint is
DeepSpeed's sharded state plus ``trainer_state.json`` (step, epoch, micro-batches consumed in the
epoch, best val loss, early-stop count); resuming skips the consumed micro-batches of the epoch,
so no batch repeats or is skipped. The learning rate is a function of the step alone.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .train_config import TrainConfig

STATE_FILE = "trainer_state.json"
DS_TAG = "ds"


def lr_at(step: int, cfg: TrainConfig, total: int, warmup: int) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr``."""
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = cfg.min_lr_ratio * cfg.lr
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def mean_over_workers(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


def train_batches(shard, cfg: TrainConfig, plan: dict, state: dict):
    """Micro-batches for ever, ``plan['micro_per_epoch']`` per epoch on every rank, resuming at
    ``state['micro_in_epoch']`` of ``state['epoch']``."""
    per_epoch = plan["micro_per_epoch"]
    while True:
        batches = shard.iter_torch_batches(
            batch_size=cfg.micro_batch,
            drop_last=True,
            local_shuffle_buffer_size=cfg.shuffle_buffer or None,
            local_shuffle_seed=cfg.seed + state["epoch"] if cfg.shuffle_buffer else None,
        )
        seen = 0
        for batch in batches:
            if seen >= per_epoch:
                break
            seen += 1
            if seen <= state["micro_in_epoch"]:
                continue  # consumed before the checkpoint we resumed from
            state["micro_in_epoch"] = seen
            yield batch["input_ids"]
        if seen < per_epoch:
            raise RuntimeError(f"worker shard ran out after {seen} of {per_epoch} micro-batches")
        state["epoch"] += 1
        state["micro_in_epoch"] = 0


@torch.no_grad()
def evaluate(engine, shard, cfg: TrainConfig, batches: int) -> float:
    engine.eval()
    total = 0.0
    seen = 0
    for batch in shard.iter_torch_batches(batch_size=cfg.micro_batch, drop_last=True):
        if seen >= batches:
            break
        ids = batch["input_ids"].to(engine.device).long()
        total += engine(ids, labels=ids).loss.float().item()
        seen += 1
    engine.train()
    return mean_over_workers([total / max(seen, 1)], engine.device)[0]


@torch.no_grad()
def machine_reconstruction(model, ids: torch.Tensor) -> float:
    """‖x − E⁻¹(E(x))‖/‖x‖ of the machine on this batch's embeddings (every rank calls it:
    under ZeRO-3 the parameter gathers are collectives)."""
    if model.machine is None:
        return 0.0
    x = model.embed(ids[:2]).float()
    positions = torch.arange(ids.shape[1], device=ids.device)
    y = model.machine(x, positions)
    back = model.machine.inverse(y, positions)
    return ((back - x).norm() / x.norm()).item()


def memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def export_model(engine, model_config, out: Path, tokenizer_dir: str, rank: int, stage: int):
    """Write the full weights with ``save_pretrained`` (+ tokenizer), atomically. Under ZeRO-3
    every rank takes part in gathering the partitioned parameters."""
    from .lm import EnigmaLM

    if stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict() if rank == 0 else None
    if rank != 0:
        return
    model = EnigmaLM(model_config)
    state = {k: v.detach().float().cpu() for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"export: missing {missing}, unexpected {unexpected}")
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    if tokenizer_dir and Path(tokenizer_dir).is_dir():
        for f in Path(tokenizer_dir).iterdir():
            shutil.copy(f, staging / f.name)
    old = out.with_name(out.name + ".old")
    if out.exists():
        os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point; ``config`` holds plain dicts (workers change directory)."""
    import ray.train

    use_gpu = config["use_gpu"]
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")
    import deepspeed

    from .lm import EnigmaLM

    cfg = TrainConfig(**{**config["train"], "betas": tuple(config["train"]["betas"])})
    plan, ds_config = config["plan"], config["ds_config"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    out = Path(config["output_dir"])

    deepspeed.init_distributed()  # adopts the process group Ray Train set up
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model_config = cfg.model_config()
    model = EnigmaLM(model_config)
    if cfg.activation_checkpointing and "activation_checkpointing" in ds_config:
        deepspeed.checkpointing.configure(None, deepspeed_config=ds_config)
        model.use_deepspeed_checkpointing()
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=ds_config
    )
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)

    state = {"step": 0, "epoch": 0, "micro_in_epoch": 0, "best_val": math.inf, "bad_evals": 0}
    state.update(first_val=None, last_val=None, best_step=0, tokens=0)
    # A restart after a failure resumes from Ray's latest checkpoint; a new run may start from
    # --resume (Train V2's replacement for resume_from_checkpoint).
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config.get("resume_from"):
        checkpoint = ray.train.Checkpoint(config["resume_from"])
    if checkpoint:
        with checkpoint.as_directory() as d:
            engine.load_checkpoint(d, tag=DS_TAG, load_lr_scheduler_states=False)
            state.update(json.loads((Path(d) / STATE_FILE).read_text()))

    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        # After a restart, drop the events logged past the checkpoint: those steps run again.
        purge = state["step"] + 1 if state["step"] else None
        writer = SummaryWriter(str(out / "tensorboard"), purge_step=purge)
    queue = config.get("progress")

    def report(metrics: dict, with_checkpoint: bool) -> None:
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        local = tempfile.mkdtemp(prefix="enigma-ckpt-")
        engine.save_checkpoint(local, tag=DS_TAG)
        if rank == 0:
            (Path(local) / STATE_FILE).write_text(json.dumps(state))
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(local),
            checkpoint_dir_name=f"step-{state['step']:07d}",
        )
        shutil.rmtree(local, ignore_errors=True)

    def validate_and_checkpoint() -> bool:
        """Evaluate, export on a new best, report with a checkpoint; True to stop early."""
        val = evaluate(engine, val_shard, cfg, plan["eval_batches"])
        state["last_val"] = val
        if state["first_val"] is None:
            state["first_val"] = val
        improved = val < state["best_val"]
        if improved:
            state.update(best_val=val, best_step=state["step"], bad_evals=0)
            export_model(engine, model_config, out / "model", config["tokenizer_dir"], rank, stage)
        else:
            state["bad_evals"] += 1
        metrics = {"step": state["step"], "val_loss": val, "val_ppl": math.exp(min(val, 50))}
        metrics.update(best_val_loss=state["best_val"], epoch=state["epoch"])
        metrics.update(tokens_per_sec=state.get("tokens_per_sec"), tokens=state["tokens"])
        if writer:
            writer.add_scalar("val/loss", val, state["step"])
            writer.add_scalar("val/ppl", metrics["val_ppl"], state["step"])
            writer.flush()
        if queue is not None and rank == 0:
            queue.put({"kind": "eval", **metrics, "improved": improved})
        report(metrics, with_checkpoint=True)
        return state["bad_evals"] > cfg.early_stop_patience

    val_shard = ray.train.get_dataset_shard("val")
    batches = train_batches(ray.train.get_dataset_shard("train"), cfg, plan, state)
    total, warmup = plan["total_steps"], plan["warmup_steps"]
    tokens_per_step = cfg.micro_batch * cfg.grad_accum * world * cfg.resolved_seq_len
    interval_loss, interval_start, interval_steps = 0.0, time.perf_counter(), 0
    fail_at = config.get("fail_at_step")
    engine.train()
    while state["step"] < total:
        lr = lr_at(state["step"], cfg, total, warmup)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        for _ in range(cfg.grad_accum):
            ids = next(batches).to(engine.device).long()
            loss = engine(ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            interval_loss += loss.float().item() / cfg.grad_accum
        state["step"] += 1
        state["tokens"] += tokens_per_step
        interval_steps += 1
        if fail_at and state["step"] == fail_at and rank == world - 1:
            marker = out / ".fault-injected"
            if not marker.exists():
                marker.write_text(str(state["step"]))
                os._exit(1)  # a worker dies; Ray restarts the group from the last checkpoint
        last = state["step"] == total
        if state["step"] % cfg.log_steps == 0 or last:
            elapsed = time.perf_counter() - interval_start
            loss_avg, grad_norm = mean_over_workers(
                [interval_loss / interval_steps, float(engine.get_global_grad_norm() or 0.0)],
                engine.device,
            )
            recon = machine_reconstruction(engine.module, ids)
            line = {
                "kind": "train",
                "step": state["step"],
                "total": total,
                "loss": loss_avg,
                "ppl": math.exp(min(loss_avg, 50)),
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_sec": tokens_per_step * interval_steps / elapsed,
                "memory_mb": memory_mb(engine.device),
                "machine_reconstruction_error": recon,
                "torch_threads": torch.get_num_threads(),
            }
            if writer:
                for key in ("loss", "ppl"):
                    writer.add_scalar(f"train/{key}", line[key], state["step"])
                for key in ("lr", "grad_norm", "tokens_per_sec"):
                    writer.add_scalar(key, line[key], state["step"])
                writer.add_scalar("memory/worker_mb", line["memory_mb"], state["step"])
                writer.add_scalar("machine/reconstruction_error", recon, state["step"])
            state["tokens_per_sec"] = line["tokens_per_sec"]
            if queue is not None and rank == 0:
                queue.put(line)
            interval_loss, interval_start, interval_steps = 0.0, time.perf_counter(), 0
        stop_here = state["step"] == cfg.stop_at_step
        if state["step"] % cfg.eval_steps == 0 or last:
            if validate_and_checkpoint():
                break
        elif state["step"] % cfg.save_steps == 0 or stop_here:
            report({"step": state["step"], "val_loss": state["last_val"]}, with_checkpoint=True)
        if stop_here:
            break
    if writer:
        writer.close()
    if queue is not None and rank == 0:
        queue.put({"kind": "done", **{k: state[k] for k in ("step", "best_val", "first_val")}})
