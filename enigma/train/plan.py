"""What the driver hands every worker, built once and never changed: the step plan and the run.

Workers change directory and run in other processes, so everything here is plain data: paths are
absolute, the DeepSpeed config is already filled, and whether the run uses GPUs is decided.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..errors import InputError
from .config import TrainConfig


@dataclass(frozen=True)
class RunPlan:
    """Steps and evaluation sizes that every rank uses, computed from the manifest's counts."""

    micro_per_epoch: int  # micro-batches per rank and epoch, a multiple of grad_accum
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    eval_batches: int  # per rank and evaluation

    @classmethod
    def from_manifest(cls, cfg: TrainConfig, manifest: dict) -> RunPlan:
        blocks = {s: manifest["splits"][s]["blocks"] for s in ("train", "val")}
        per_rank = blocks["train"] // cfg.workers
        micro = (per_rank // cfg.micro_batch) // cfg.grad_accum * cfg.grad_accum
        if micro == 0:
            raise InputError(
                f"{cfg.data} has {blocks['train']} train blocks: too few for {cfg.workers} "
                f"workers x micro_batch {cfg.micro_batch} x grad_accum {cfg.grad_accum}"
            )
        eval_batches = min(cfg.eval_batches, blocks["val"] // cfg.workers // cfg.micro_batch)
        if eval_batches == 0:
            raise InputError(f"{cfg.data} has {blocks['val']} val blocks: too few to evaluate on")
        steps_per_epoch = micro // cfg.grad_accum
        total = cfg.max_steps or steps_per_epoch * cfg.max_epochs
        return cls(
            micro_per_epoch=micro,
            steps_per_epoch=steps_per_epoch,
            total_steps=total,
            warmup_steps=max(1, int(cfg.warmup_ratio * total)),
            eval_batches=eval_batches,
        )


@dataclass(frozen=True)
class Faults:
    """Failures injected on purpose (tests, ``enigma bench faults``); none by default."""

    kill_at_steps: tuple[int, ...] = ()  # the last rank exits once after each of these steps
    disk_full_at_step: int = 0  # checkpoints from this step on fail as on a full disk
    import_on_start: str = ""  # every worker imports this module first (a missing one fails)
    kill_in_set_aside: bool = False  # the driver dies between a set-aside's two steps
    kill_in_model_swap: str = ""  # rank 0 dies once inside its first S3 model swap, after this step

    @classmethod
    def from_env(cls, value: str | None) -> Faults:
        """``ENIGMA_FAULTS='{"kill_at_steps": [7]}'``; unset or empty: none."""
        if not value:
            return cls()
        try:
            data = json.loads(value)
            return cls(
                tuple(data.get("kill_at_steps", ())),
                int(data.get("disk_full_at_step", 0)),
                str(data.get("import_on_start", "")),
                bool(data.get("kill_in_set_aside", False)),
                str(data.get("kill_in_model_swap", "")),
            )
        except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as err:
            raise InputError(f"ENIGMA_FAULTS={value!r} is not a fault plan: {err}") from None


@dataclass(frozen=True)
class RunSpec:
    """One training run as every worker sees it."""

    train: TrainConfig  # gpus_per_worker already resolved (never -1 here)
    deepspeed_config: dict  # the DeepSpeed JSON with every "auto" filled
    plan: RunPlan
    data_dir: str
    output_dir: str = ""  # local scratch on every node: lock, staging, rank 0's first copies
    storage_path: str = ""  # absolute path or URI of the lasting state; "": output_dir
    resume_from: str | None = None  # the checkpoint the driver chose (checked) to start from
    fingerprint: dict | None = None  # saved with every checkpoint, checked on resume
    faults: Faults = Faults()
    command: str = ""  # the command line that started the run, for the model card
    data_summary: dict | None = None  # the manifest's summary, for the model card
    shards: dict | None = None  # split -> its shards as shard_paths gives them (checked)
    generation: int = 1  # of the storage (enigma.storage.fence): where checkpoints go, and the
    # generation a checkpoint or a model swap must still be to write

    def run_info(self) -> dict:
        """What every checkpoint and the model card record of the run."""
        return {
            "config": self.train.to_dict(),
            "command": self.command,
            "data": self.data_summary or {},
        }

    @property
    def storage(self):
        from ..storage.store import Storage

        # Storage.of keeps a URI's query (pyarrow's options) apart, so sub-paths go before it.
        return Storage.of(self.storage_path, self.output_dir)

    def local_dir(self, name: str) -> str:
        """Where rank 0 writes ``name`` (tensorboard, model) on its node: in a local storage
        directly, else in the output directory, from which it is copied up."""
        storage = self.storage
        return f"{self.output_dir if storage.remote else storage.root}/{name}"

    def epoch_order(self, split: str):
        """How ``split``'s shards are ordered each epoch (:mod:`enigma.data.epochs`): train's
        drawn from the run's seed, val's as written."""
        from ..data.epochs import EpochOrder

        cfg, shards = self.train, tuple(self.shards[split])
        if split != "train":
            return EpochOrder(shards)
        seed = cfg.seed if cfg.shuffle_shards else None
        return EpochOrder(shards, seed, window=cfg.shuffle_buffer, window_seed=cfg.seed)

    @property
    def use_gpu(self) -> bool:
        return self.train.gpus_per_worker > 0

    @property
    def tokenizer_dir(self) -> str | None:
        """The data's tokenizer, on this node (of data at a URI: mirrored once per node)."""
        if "://" in self.data_dir:
            from ..storage.mirror import local_tokenizer

            return local_tokenizer(self.data_dir)
        return f"{self.data_dir}/tokenizer"

    @property
    def tokens_per_step(self) -> int:
        cfg = self.train
        return cfg.micro_batch * cfg.grad_accum * cfg.workers * cfg.resolved_seq_len
