"""``enigma train`` (and ``ray_jobs/pretrain.py``): the driver of a Ray Train + DeepSpeed run.

Everything that can be wrong with the inputs (preset, config keys, data directory, tokenizer and
seq_len, DeepSpeed JSON) is checked here, before any worker starts. Then the GPU question is
settled once, the :class:`~enigma.train.plan.RunSpec` is built, and a ``TorchTrainer`` runs
:func:`enigma.train.worker.train_loop_per_worker`; rank 0 streams progress lines back through a
Ray queue, and at the end the best model, exported with ``save_pretrained``, is loaded to print
the final perplexity and a sample.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import time
from pathlib import Path

from ..errors import InputError
from ..storage import fence as fences
from ..storage.locks import DirectoryLock
from ..storage.store import Storage
from . import deepspeed_json, precision
from .checkpoint import CHECKPOINT_TMP
from .config import TrainConfig, build_config
from .export import data_summary
from .plan import Faults, RunPlan, RunSpec
from .progress import PlacementWatchdog, ProgressPrinter
from .resume import DATA_ORDER_KEYS, choose_resume, fingerprint

LOCK_FILE = ".lock"  # in the output directory: one training run writes it at a time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help="tiny, small, base or large")
    p.add_argument(
        "--config", default=None, help="a JSON training config (e.g. a sweep's best.json)"
    )
    p.add_argument("--data", default=None, help="a directory written by `enigma data prepare`")
    p.add_argument(
        "--ds-config", default=None, help="DeepSpeed JSON (default ds_configs/zero2.json)"
    )
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--gpus-per-worker", type=int, default=None)
    p.add_argument("--output-dir", default=None, help="local: lock, staging (default runs/PRESET)")
    p.add_argument(
        "--storage-path",
        default=None,
        help="checkpoints, TensorBoard and the model on shared storage: a local/NFS path, "
        "s3://bucket/prefix or gs://bucket/prefix (default: the output directory)",
    )
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--resume", default=None, help="a checkpoint directory to start from")
    p.add_argument("--json", dest="json_out", default=None, help="also write the summary here")


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
        storage_path=args.storage_path,
        max_steps=args.max_steps,
    )
    if args.output_dir is None and args.config is None:
        root = os.environ.get("ENIGMA_RUNS_DIR", "runs")  # ray_jobs/ point it out of the job dir
        cfg = cfg.replace(output_dir=f"{root}/{cfg.preset}")
    return cfg


def check_data(cfg: TrainConfig) -> dict:
    """The data directory, validated against the model; returns its manifest."""
    from ..data.shards import check_compatible, read_manifest
    from ..data.tokenizer import reference_vocab_hash

    manifest = read_manifest(cfg.data)
    model_config = cfg.model_config()
    check_compatible(manifest, cfg.resolved_seq_len, reference_vocab_hash(), cfg.data)
    if manifest["tokenizer"]["vocab_size"] > model_config.vocab_size:
        raise InputError(
            f"{cfg.data} uses {manifest['tokenizer']['vocab_size']} token ids but the model "
            f"has vocab_size={model_config.vocab_size}"
        )
    return manifest


def resolve_gpus(cfg: TrainConfig) -> TrainConfig:
    """``gpus_per_worker=-1`` becomes 1 when the cluster has GPUs, else 0 (said aloud): decided
    once, here. A cluster with GPUs is never used on CPU unless ``--gpus-per-worker 0`` asks."""
    if cfg.gpus_per_worker >= 0:
        return cfg
    import ray

    if ray.cluster_resources().get("GPU", 0) > 0:
        return cfg.replace(gpus_per_worker=1)
    print(
        "the cluster has no GPUs: training on CPU (if GPU nodes are still joining, run again "
        "with --gpus-per-worker 1 once they have; --gpus-per-worker 0 says CPU on purpose)",
        flush=True,
    )
    return cfg.replace(gpus_per_worker=0)


def tuned(cfg: TrainConfig) -> dict | None:
    """What a fine-tuning checkpoint must match besides the model's shape: the base model and
    what trains (None for pretraining)."""
    if not cfg.base_model:
        return None
    if cfg.full:
        return {"base_model": cfg.base_model, "full": True}
    from .tuning import TRAINED_WHOLE

    keys = ("base_model", "lora_r", "lora_alpha", "lora_dropout", "lora_targets")
    return {**{k: getattr(cfg, k) for k in keys}, "trained_whole": TRAINED_WHOLE}


def check_fits(cfg: TrainConfig, workers_flag: str = "--workers") -> None:
    """The workers' CPUs and GPUs against what the cluster has in all, before anything waits."""
    import ray

    total = ray.cluster_resources()
    for kind, per_worker in (("CPU", cfg.cpus_per_worker), ("GPU", max(cfg.gpus_per_worker, 0))):
        need, have = cfg.workers * per_worker, int(total.get(kind, 0))
        if need > have:
            raise InputError(
                f"{cfg.workers} workers x {per_worker} {kind} = {need} {kind}s, but the cluster "
                f"has {have}: use {workers_flag} {have // per_worker} or fewer {kind}s per worker "
                f"(or wait until the nodes with more {kind}s have joined)"
            )


def prepare_run(
    cfg: TrainConfig,
    resume: str | None = None,
    workers_flag: str = "--workers",
    lapsed: bool = False,
    **spec_fields,
) -> RunSpec:
    """Validate the inputs, join or start Ray, decide GPU or CPU and the precision, choose the
    checkpoint to start from, and build what every worker gets. Raises :class:`InputError` before
    any worker starts; ``resume`` is ``--resume``; ``workers_flag`` names the flag that sets the
    worker count in messages; ``lapsed``: the lock was taken over from a holder whose lease
    lapsed (its new generation is settled, :func:`settled_generation`); ``spec_fields`` go to the
    :class:`RunSpec` as they are."""
    from ..cluster.ray_setup import init_ray
    from ..data.shards import shard_paths

    if cfg.gpus_per_worker == 0:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # quiets DeepSpeed's probe on the driver
    ds = deepspeed_json.load(cfg.ds_config)
    fixed = precision.check_agreement(cfg.precision, ds, cfg.ds_config)
    if cfg.conversations:  # fine-tuning rows: tokenized into cfg.data with the chat template
        from .tuning import prepare_data

        prepare_data(cfg)
    manifest = check_data(cfg)
    # every shard present at its size, one listing a split; workers read them (enigma.data.epochs)
    shards = {split: shard_paths(cfg.data, split)[1] for split in ("train", "val")}
    if cfg.gpus_per_worker == 0:  # known before Ray starts: fail before starting it
        deepspeed_json.check_device(fixed, cfg.ds_config, use_gpu=False)
    storage = Storage.of(cfg.storage_path, str(Path(cfg.output_dir).resolve()))
    if cfg.storage_path:
        storage.check()
    init_ray()
    cfg = resolve_gpus(cfg)
    check_fits(cfg, workers_flag)
    order = {k: getattr(cfg, k) for k in DATA_ORDER_KEYS}
    stamp = fingerprint(cfg.model_config(), manifest, cfg.workers, order, tuned(cfg))
    faults = spec_fields.get("faults")
    fence, _ = fences.read(storage)
    start = choose_resume(storage, resume, stamp, bool(faults and faults.kill_in_set_aside), fence)
    if lapsed:
        fence = settled_generation(storage, start)
    resumed = start.state.precision if start else None
    chosen, line = precision.resolve(cfg.precision, ds, cfg.ds_config, cfg.gpus_per_worker > 0,
                                     resumed)  # fmt: skip
    print(line, flush=True)
    cfg = cfg.replace(precision=chosen)
    deepspeed_json.check_device(chosen, cfg.ds_config, use_gpu=cfg.gpus_per_worker > 0)
    spec_fields.setdefault("data_summary", data_summary(manifest))
    spec_fields.setdefault("resume_from", start.path if start else None)
    return RunSpec(
        train=cfg,
        deepspeed_config=deepspeed_json.fill_auto(ds, cfg, cfg.workers),
        plan=RunPlan.from_manifest(cfg, manifest),
        data_dir=cfg.data if "://" in cfg.data else str(Path(cfg.data).resolve()),
        output_dir=str(Path(cfg.output_dir).resolve()),
        storage_path=storage.uri() if cfg.storage_path else "",
        fingerprint=stamp,
        shards=shards,
        generation=fence.generation,
        **spec_fields,
    )


def settled_generation(storage: Storage, start) -> fences.Fence:
    """The generation this run started on taking a lapsed lease over, every earlier one trusted
    no further than the step resumed from (in this storage; 0 otherwise), said aloud."""
    inside = start is not None and start.path.startswith(storage.uri(fences.RUNS).split("?")[0])
    step = start.state.step if inside else 0
    fence = fences.settle(storage, step)
    print(f"note: {storage.uri()} starts generation {fence.generation} (checkpoints in "
          f"{fences.RUNS}/{fences.run_name(fence.generation)}); what generation "
          f"{fence.generation - 1} writes after step {step} is never read", flush=True)  # fmt: skip
    return fence


def build_trainer(
    spec: RunSpec,
    *,
    name: str = "train",
    storage_path: str | None = None,
    callbacks: list | None = None,
    progress=None,
):
    """The ``TorchTrainer`` of one training run (``enigma train``, or one sweep trial)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .worker import train_loop_per_worker

    cfg = spec.train
    resources = {"CPU": cfg.cpus_per_worker}
    if spec.use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec, "progress": progress},
        scaling_config=ScalingConfig(
            num_workers=cfg.workers, use_gpu=spec.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name if storage_path else fences.run_name(spec.generation),
            storage_path=storage_path or spec.storage.uri(fences.RUNS),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
    )


def describe(spec: RunSpec) -> str:
    """The plan line: hardware, ZeRO stage, precision and the batch arithmetic."""
    cfg, ds, plan = spec.train, spec.deepspeed_config, spec.plan
    return (
        f"EnigmaLM {cfg.preset} on {cfg.workers} worker(s) ({'GPU' if spec.use_gpu else 'CPU'}), "
        f"DeepSpeed ZeRO-{deepspeed_json.zero_stage(ds)} "
        f"{deepspeed_json.precision(ds)}; tokens/step = {cfg.grad_accum} accum x {cfg.workers} "
        f"workers x {cfg.micro_batch} batch x {cfg.resolved_seq_len} seq = "
        f"{spec.tokens_per_step:,}; {plan.total_steps} steps ({plan.steps_per_epoch}/epoch)"
    )


def train(
    cfg: TrainConfig, resume: str | None = None, faults: Faults | None = None, command: str = ""
) -> dict:
    """Run the training job; returns a summary (val perplexities, paths, sample). The output
    directory, and the storage path when it is elsewhere, are locked for the run: a second
    ``train`` into either is refused. ``command``: the command line, for the model card."""
    if resume and not Path(resume).is_dir():
        raise InputError(f"--resume {resume}: no such checkpoint directory")
    resume = os.path.abspath(resume) if resume else None
    out = Path(cfg.output_dir).resolve()
    with DirectoryLock(out / LOCK_FILE, "enigma train") as held:
        storage = Storage.of(cfg.storage_path, str(out))
        if storage.root == str(out):  # the output directory's lock covers it
            return _train_locked(cfg, resume, faults or Faults(), command, _fenced(storage, held))
        storage.check()
        with storage.lock("enigma train") as held:
            return _train_locked(cfg, resume, faults or Faults(), command, _fenced(storage, held))


def _fenced(storage: Storage, held) -> bool:
    """Whether this run took a lapsed lease over; if so, the next generation is written now,
    before any check that could end the run (:func:`enigma.storage.fence.advance`)."""
    if held.lapsed:
        fences.advance(storage)
    return held.lapsed


def _train_locked(cfg: TrainConfig, resume: str | None, faults: Faults, command: str,
                  lapsed: bool = False) -> dict:  # fmt: skip
    """``lapsed``: the storage's lock was taken over from a holder whose lease lapsed, which
    may live on: this run is a new generation (:mod:`enigma.storage.fence`)."""
    import ray.exceptions
    from ray.util.queue import Queue

    from ..cluster.placement import release_orphans

    spec = prepare_run(cfg, resume, lapsed=lapsed, faults=faults, command=command)
    # Checkpoints staged by ranks that were killed mid-write (this directory is locked: none of
    # them belongs to a live run).
    shutil.rmtree(Path(spec.output_dir) / CHECKPOINT_TMP, ignore_errors=True)
    queue = Queue(actor_options={"num_cpus": 0})
    printer = ProgressPrinter(queue)
    print(describe(spec), flush=True)
    trainer = build_trainer(spec, progress=queue)
    printer.start()
    watchdog = PlacementWatchdog(cfg.placement_timeout_s)
    try:
        with watchdog:
            result = trainer.fit()
    except ray.exceptions.RayActorError:
        if watchdog.reason:  # the watchdog killed the controller: its reason is the error
            release_orphans()
            raise InputError(watchdog.reason) from None
        raise
    finally:
        time.sleep(1.0)  # let the last progress lines arrive
        printer.stopped.set()
        printer.join()
    return summarize(spec, result, printer)


def sample_text(spec: RunSpec, model_dir: Path) -> str | None:
    """A continuation of the configured prompt from the exported best model."""
    import torch

    from ..data.tokenizer import load_tokenizer
    from ..inference.generate import continue_text, load_model

    if not (model_dir / "config.json").is_file():
        return None
    cfg = spec.train
    if not cfg.sample_tokens:
        return None
    model = load_model(str(model_dir))
    tokenizer = load_tokenizer(str(model_dir), quiet=True)
    with torch.no_grad():
        return continue_text(
            model, tokenizer, cfg.sample_prompt, max_new_tokens=cfg.sample_tokens, seed=cfg.seed
        )


def exported_sample(spec: RunSpec) -> str | None:
    """The sample, from the model in the run's storage (read back from a bucket if need be)."""
    storage = spec.storage
    if not storage.remote:
        return sample_text(spec, Path(storage.root) / "model")
    import tempfile

    with tempfile.TemporaryDirectory(prefix="enigma-model-") as tmp:
        return sample_text(spec, Path(tmp)) if storage.download(Path(tmp), "model") else None


def summarize(spec: RunSpec, result, printer: ProgressPrinter) -> dict:
    """Final val perplexity, a sample from the exported best model, where everything is."""
    storage = spec.storage
    evals = printer.evals
    summary = {
        "first_val_ppl": evals[0]["val_ppl"] if evals else None,
        "last_val_ppl": evals[-1]["val_ppl"] if evals else None,
        "best_val_ppl": min((e["val_ppl"] for e in evals), default=None),
        "steps": result.metrics.get("step") if result.metrics else None,
        "model_dir": storage.uri("model"),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "tensorboard": storage.uri("tensorboard"),
        "precision": spec.train.precision,
        "train_log": printer.trains,
    }
    sample = exported_sample(spec)
    if sample is not None:
        summary["sample"] = sample
    print("\n=== done ===")
    if summary["last_val_ppl"] is not None:
        print(
            f"val perplexity: first eval {summary['first_val_ppl']:.2f} -> last eval "
            f"{summary['last_val_ppl']:.2f} (best {summary['best_val_ppl']:.2f}, "
            f"val loss {math.log(summary['best_val_ppl']):.4f})"
        )
    if sample is not None:
        print(f"sample: {sample}")
    print(f"model (save_pretrained + tokenizer): {summary['model_dir']}")
    if spec.train.base_model and not spec.train.full:
        print(f"adapter (PEFT): {storage.uri('adapter')}")
    print(f"checkpoints: {storage.uri(fences.RUNS, fences.run_name(spec.generation))}")
    print(f"TensorBoard: tensorboard --logdir {summary['tensorboard']}")
    return summary


def run(args: argparse.Namespace) -> dict:
    cfg = config_from_args(args)
    faults = Faults.from_env(os.environ.get("ENIGMA_FAULTS"))
    start = time.perf_counter()
    summary = train(cfg, resume=args.resume, faults=faults, command=args.command_line)
    if args.json_out:
        save_summary(cfg, summary, time.perf_counter() - start, args)
    return summary


def save_summary(cfg: TrainConfig, summary: dict, seconds: float, args) -> None:
    """The run's figures as a benchmark JSON that ``enigma report`` renders."""
    from ..benchmarks import meta

    stage = deepspeed_json.zero_stage(deepspeed_json.load(cfg.ds_config))
    record = {
        "benchmark": "train",
        "name": Path(cfg.output_dir).name,
        "plan": f"{cfg.preset}, {cfg.workers} workers, ZeRO-{stage} "
        f"{summary['precision']}, seq {cfg.resolved_seq_len}",
        "wall_seconds": round(seconds, 1),
        "summary": {k: v for k, v in summary.items() if k != "train_log"},
        "config": cfg.to_dict(),
    }
    meta.save(record, args.json_out, args.command_line)


def main(argv: list[str] | None = None) -> int:
    """Entry point shared by ``enigma train`` and ``ray_jobs/pretrain.py``."""
    from ..cli import main as cli_main

    return cli_main(["train", *(argv or [])])
