"""``enigma train`` (and ``ray_jobs/pretrain.py``): the driver of a Ray Train + DeepSpeed run.

Everything that can be wrong with the inputs (preset, config keys, data directory, tokenizer and
seq_len, DeepSpeed JSON) is checked here, before any worker starts. Then a ``TorchTrainer`` runs
:func:`enigma.train_loop.train_loop_per_worker`, rank 0 streams progress lines back through a
Ray queue, and at the end the best model, exported with ``save_pretrained``, is loaded to print
the final perplexity and a sample.
"""

from __future__ import annotations

import argparse
import math
import os
import threading
import time
from pathlib import Path

from . import ds_config as dsc
from .train_config import TrainConfig, build_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help="tiny, small, base or large")
    p.add_argument(
        "--config", default=None, help="a JSON training config (e.g. a sweep's best.json)"
    )
    p.add_argument("--data", default=None, help="a directory written by `enigma data prepare`")
    p.add_argument("--ds-config", default=None, help="DeepSpeed JSON (default zero2_bf16)")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--gpus-per-worker", type=int, default=None)
    p.add_argument("--output-dir", default=None)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--resume", default=None, help="a checkpoint directory to start from")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    cfg = build_config(
        args.preset,
        args.config,
        args.sets,
        data=args.data,
        ds_config=args.ds_config,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        output_dir=args.output_dir,
        max_steps=args.max_steps,
    )
    if args.output_dir is None and args.config is None:
        cfg.output_dir = f"runs/{cfg.preset}"
    return cfg


def plan_run(cfg: TrainConfig, manifest: dict) -> dict:
    """Steps per epoch and evaluation sizes every rank will use, from the manifest's counts."""
    blocks = {s: manifest["splits"][s]["blocks"] for s in ("train", "val")}
    per_rank = blocks["train"] // cfg.workers
    micro = (per_rank // cfg.micro_batch) // cfg.grad_accum * cfg.grad_accum
    if micro == 0:
        raise ValueError(
            f"{cfg.data} has {blocks['train']} train blocks: too few for {cfg.workers} workers x "
            f"micro_batch {cfg.micro_batch} x grad_accum {cfg.grad_accum}"
        )
    eval_batches = min(cfg.eval_batches, blocks["val"] // cfg.workers // cfg.micro_batch)
    if eval_batches == 0:
        raise ValueError(f"{cfg.data} has {blocks['val']} val blocks: too few to evaluate on")
    steps_per_epoch = micro // cfg.grad_accum
    total = cfg.max_steps or steps_per_epoch * cfg.max_epochs
    return {
        "micro_per_epoch": micro,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total,
        "warmup_steps": max(1, int(cfg.warmup_ratio * total)),
        "eval_batches": eval_batches,
    }


def check_inputs(cfg: TrainConfig, use_gpu: bool) -> tuple[dict, dict]:
    """The data and DeepSpeed config, validated against the model; errors are one line."""
    from .data.shards import check_compatible, read_manifest
    from .data.tokenizer import reference_vocab_hash

    ds_raw = dsc.load(cfg.ds_config)
    if not use_gpu:
        dsc.check_device(ds_raw, cfg.ds_config, use_gpu)
    manifest = read_manifest(cfg.data)
    model_config = cfg.model_config()
    check_compatible(manifest, cfg.resolved_seq_len, reference_vocab_hash(), cfg.data)
    if manifest["tokenizer"]["vocab_size"] > model_config.vocab_size:
        raise ValueError(
            f"{cfg.data} uses {manifest['tokenizer']['vocab_size']} token ids but the model "
            f"has vocab_size={model_config.vocab_size}"
        )
    return ds_raw, manifest


class ProgressPrinter(threading.Thread):
    """Prints rank 0's progress lines: step, loss, ppl, tokens/s, ETA."""

    def __init__(self, queue):
        super().__init__(daemon=True)
        self.queue, self.stopped = queue, threading.Event()
        self.start_time, self.trains, self.evals = time.perf_counter(), [], []

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                item = self.queue.get(timeout=0.5)
            except Exception:
                continue
            self.show(item)

    def show(self, item: dict) -> None:
        if item["kind"] == "train":
            self.trains.append(item)
            rate = item["tokens_per_sec"]
            elapsed = time.perf_counter() - self.start_time
            eta = elapsed / max(item["step"], 1) * (item["total"] - item["step"])
            print(
                f"step {item['step']:>6}/{item['total']} | loss {item['loss']:.4f} | "
                f"ppl {item['ppl']:>9.2f} | {rate:>8,.0f} tok/s | lr {item['lr']:.2e} | "
                f"ETA {_duration(eta)}",
                flush=True,
            )
        elif item["kind"] == "eval":
            self.evals.append(item)
            mark = " (best, exported)" if item["improved"] else ""
            print(
                f"  eval @ {item['step']}: val loss {item['val_loss']:.4f} | "
                f"val ppl {item['val_ppl']:.2f}{mark}",
                flush=True,
            )


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s"


def prepare_run(cfg: TrainConfig) -> dict:
    """Validate the inputs, join or start Ray, and fix what every worker needs: the filled
    DeepSpeed config, the step plan, GPU or CPU. Raises ValueError before any worker starts."""
    import ray

    from .ray_setup import init_ray

    if cfg.gpus_per_worker == 0:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # quiets DeepSpeed's probe on the driver
    ds_raw, manifest = check_inputs(cfg, use_gpu=cfg.gpus_per_worker != 0)
    init_ray()
    if cfg.gpus_per_worker < 0:  # 1 GPU per worker when the cluster has GPUs
        cfg.gpus_per_worker = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    use_gpu = cfg.gpus_per_worker > 0
    dsc.check_device(ds_raw, cfg.ds_config, use_gpu)
    plan = plan_run(cfg, manifest)
    return {
        "ds_config": dsc.fill_auto(ds_raw, cfg, cfg.workers, use_gpu),
        "plan": plan,
        "use_gpu": use_gpu,
        "data_dir": str(Path(cfg.data).resolve()),
    }


def build_trainer(
    cfg: TrainConfig,
    run: dict,
    out: Path,
    *,
    name: str = "train",
    storage_path: str | None = None,
    callbacks: list | None = None,
    progress=None,
    resume: str | None = None,
    fail_at_step: int | None = None,
):
    """The ``TorchTrainer`` of one training run (``enigma train``, or one sweep trial)."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .data.shards import load_split
    from .train_loop import train_loop_per_worker

    use_gpu, data_dir = run["use_gpu"], run["data_dir"]
    resources = {"CPU": cfg.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": cfg.to_dict(),
            "ds_config": run["ds_config"],
            "plan": run["plan"],
            "use_gpu": use_gpu,
            "output_dir": str(out),
            "tokenizer_dir": str(Path(data_dir) / "tokenizer"),
            "progress": progress,
            "fail_at_step": fail_at_step,
            "resume_from": os.path.abspath(resume) if resume else None,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path or str(out / "ray"),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
        datasets={
            "train": load_split(data_dir, "train", verify=True),
            "val": load_split(data_dir, "val", verify=False),
        },
        dataset_config=DataConfig(
            datasets_to_split=["train", "val"],
            execution_options=ExecutionOptions(preserve_order=True),  # same order on resume
        ),
    )


def train(cfg: TrainConfig, resume: str | None = None, fail_at_step: int | None = None) -> dict:
    """Run the training job; returns a summary (val perplexities, paths, sample)."""
    from ray.util.queue import Queue

    out = Path(cfg.output_dir).resolve()
    if resume and not Path(resume).is_dir():
        raise ValueError(f"--resume {resume}: no such checkpoint directory")
    run = prepare_run(cfg)
    plan, ds = run["plan"], run["ds_config"]
    out.mkdir(parents=True, exist_ok=True)
    queue = Queue(actor_options={"num_cpus": 0})
    printer = ProgressPrinter(queue)
    tokens_per_step = cfg.micro_batch * cfg.grad_accum * cfg.workers * cfg.resolved_seq_len
    print(
        f"EnigmaLM {cfg.preset} on {cfg.workers} worker(s) ({'GPU' if run['use_gpu'] else 'CPU'}), "
        f"DeepSpeed ZeRO-{ds.get('zero_optimization', {}).get('stage', 0)} "
        f"{dsc.precision(ds)}; tokens/step = {cfg.grad_accum} accum x {cfg.workers} workers x "
        f"{cfg.micro_batch} batch x {cfg.resolved_seq_len} seq = {tokens_per_step:,}; "
        f"{plan['total_steps']} steps ({plan['steps_per_epoch']}/epoch)",
        flush=True,
    )
    trainer = build_trainer(cfg, run, out, progress=queue, resume=resume, fail_at_step=fail_at_step)
    printer.start()
    try:
        result = trainer.fit()
    finally:
        time.sleep(1.0)  # let the last progress lines arrive
        printer.stopped.set()
        printer.join()
    return summarize(cfg, out, result, printer)


def summarize(cfg: TrainConfig, out: Path, result, printer: ProgressPrinter) -> dict:
    """Final val perplexity, a sample from the exported best model, where everything is."""
    import torch

    from .data.tokenizer import load_tokenizer
    from .lm import EnigmaLM
    from .model_cli import continue_text

    evals = printer.evals
    summary = {
        "first_val_ppl": evals[0]["val_ppl"] if evals else None,
        "last_val_ppl": evals[-1]["val_ppl"] if evals else None,
        "best_val_ppl": min((e["val_ppl"] for e in evals), default=None),
        "steps": result.metrics.get("step") if result.metrics else None,
        "model_dir": str(out / "model"),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "tensorboard": str(out / "tensorboard"),
        "train_log": printer.trains,
    }
    model_dir = out / "model"
    if (model_dir / "config.json").is_file():
        model = EnigmaLM.from_pretrained(model_dir).eval()
        tokenizer = load_tokenizer(str(model_dir), quiet=True)
        sample_args = argparse.Namespace(
            max_new_tokens=cfg.sample_tokens, temperature=0.8, top_k=50, top_p=0.95, seed=cfg.seed
        )
        with torch.no_grad():
            summary["sample"], _ = continue_text(model, tokenizer, cfg.sample_prompt, sample_args)
    print("\n=== done ===")
    if summary["last_val_ppl"] is not None:
        print(
            f"val perplexity: first eval {summary['first_val_ppl']:.2f} -> last eval "
            f"{summary['last_val_ppl']:.2f} (best {summary['best_val_ppl']:.2f}, "
            f"val loss {math.log(summary['best_val_ppl']):.4f})"
        )
    if "sample" in summary:
        print(f"sample: {summary['sample']}")
    print(f"model (save_pretrained + tokenizer): {summary['model_dir']}")
    print(f"checkpoints: {out / 'ray' / 'train'}")
    print(f"TensorBoard: tensorboard --logdir {summary['tensorboard']}")
    return summary


def run(args: argparse.Namespace) -> dict:
    cfg = config_from_args(args)
    fail_at = os.environ.get("ENIGMA_FAIL_AT_STEP")
    return train(cfg, resume=args.resume, fail_at_step=int(fail_at) if fail_at else None)


def main(argv: list[str] | None = None) -> int:
    """Entry point shared by ``enigma train`` and ``ray_jobs/pretrain.py``."""
    from .cli import main as cli_main

    return cli_main(["train", *(argv or [])])
