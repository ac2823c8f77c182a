"""Where a run's state is written and read back: checkpoints and the exported model.

A checkpoint is DeepSpeed's sharded state (every rank writes its part under the tag ``ds``) plus
``trainer_state.json`` from rank 0: the step, the epoch and the micro-batches consumed in it, the
best val loss and the early-stop count. Resuming skips the consumed micro-batches of the epoch, so
no batch repeats or is skipped. The exported model is ``save_pretrained`` of the full weights
plus the tokenizer, the directory that ``from_pretrained`` and ``enigma generate`` read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

STATE_FILE = "trainer_state.json"
DS_TAG = "ds"


@dataclass
class TrainState:
    """Everything beyond the weights and optimizer that a resume needs, and the run's record."""

    step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0  # micro-batches of ``epoch`` already consumed
    best_val: float = math.inf
    best_step: int = 0
    bad_evals: int = 0  # evaluations in a row without a new best
    first_val: float | None = None
    last_val: float | None = None
    tokens: int = 0
    tokens_per_sec: float | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in json.loads(text).items() if k in known})


def save(engine, state: TrainState, rank: int) -> str:
    """Write a checkpoint into a fresh local directory and return it; every rank calls this."""
    local = tempfile.mkdtemp(prefix="enigma-ckpt-")
    engine.save_checkpoint(local, tag=DS_TAG)
    if rank == 0:
        (Path(local) / STATE_FILE).write_text(state.to_json())
    return local


def restore(engine, directory: str) -> TrainState:
    """Load a checkpoint written by :func:`save` into ``engine``; returns its state."""
    engine.load_checkpoint(directory, tag=DS_TAG, load_lr_scheduler_states=False)
    return TrainState.from_json((Path(directory) / STATE_FILE).read_text())


def export_model(engine, model_config, out: Path, tokenizer_dir: str, rank: int, stage: int):
    """Write the full weights with ``save_pretrained`` (+ tokenizer), atomically. Under ZeRO-3
    every rank takes part in gathering the partitioned parameters."""
    if stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict() if rank == 0 else None
    if rank != 0:
        return
    from ..lm import EnigmaLM

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
