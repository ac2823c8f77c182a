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
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

STATE_FILE = "trainer_state.json"
DS_TAG = "ds"
CHECKPOINT_TMP = ".checkpoint-tmp"  # under the output directory: where ranks stage checkpoints


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
    last_val_step: int = 0  # the step of ``last_val``
    tokens: int = 0
    tokens_per_sec: float | None = None
    fingerprint: dict | None = None  # what a resume must match (see :func:`fingerprint`)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in json.loads(text).items() if k in known})


def save(
    engine, state: TrainState, rank: int, tmp_root: str | None = None, run: dict | None = None
) -> str:
    """Write a checkpoint into a fresh local directory under ``tmp_root`` and return it; every
    rank calls this. ``run`` (the config, command and data summary: what ``enigma export``
    needs) goes beside the state. The directory is removed again if writing fails."""
    if tmp_root:
        Path(tmp_root).mkdir(parents=True, exist_ok=True)
    local = tempfile.mkdtemp(prefix="enigma-ckpt-", dir=tmp_root)
    try:
        engine.save_checkpoint(local, tag=DS_TAG)
        if rank == 0:
            (Path(local) / STATE_FILE).write_text(state.to_json())
            if run is not None:
                from .export import RUN_FILE

                (Path(local) / RUN_FILE).write_text(json.dumps(run, ensure_ascii=False))
    except BaseException:
        shutil.rmtree(local, ignore_errors=True)
        raise
    return local


def restore(engine, directory: str) -> TrainState:
    """Load a checkpoint written by :func:`save` into ``engine``; returns its state. A load that
    finds nothing is an error, never a fresh start."""
    state = TrainState.from_json((Path(directory) / STATE_FILE).read_text())
    loaded, _ = engine.load_checkpoint(directory, tag=DS_TAG, load_lr_scheduler_states=False)
    if loaded is None:
        raise RuntimeError(f"DeepSpeed loaded nothing from {directory}/{DS_TAG}")
    return state


def export_model(
    engine, model_config, out: Path, tokenizer_dir: str, rank: int, stage: int, card=None
):
    """Write the full weights with ``save_pretrained`` (+ tokenizer, + the model card that
    ``card(model)`` renders), atomically. Under ZeRO-3 every rank takes part in gathering the
    partitioned parameters."""
    if stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict() if rank == 0 else None
    if rank != 0:
        return
    from ..models.lm import EnigmaLM

    model = EnigmaLM(model_config)
    state = {k: v.detach().float().cpu() for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"export: missing {missing}, unexpected {unexpected}")
    write_model_dir(model, out, tokenizer_dir, card(model) if card else None)


def write_model_dir(model, out: Path, tokenizer_dir: str | None, card: str | None = None) -> None:
    """``save_pretrained`` (weights, config and the modelling code) + tokenizer + the model card
    (``README.md``) into a unique staging directory, then swapped in whole: a complete ``out``
    exists at every instant (:func:`enigma.storage.atomic.replace_dir`)."""
    from transformers.utils import logging as hf_logging

    from ..storage.atomic import remove_leftovers, replace_dir, staging_dir

    hf_logging.disable_progress_bar()  # no "Writing model shards" bar for every export
    remove_leftovers(out)  # of exports killed before their swap
    staging = staging_dir(out)
    try:
        model.save_pretrained(staging)
        if tokenizer_dir and Path(tokenizer_dir).is_dir():
            for f in Path(tokenizer_dir).iterdir():
                shutil.copy(f, staging / f.name)
        if card is not None:
            (staging / "README.md").write_text(card, encoding="utf-8")
        replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------
# Which checkpoint a run resumes from, checked before any worker starts

# Knobs of how training runs (backward, rotor start and precision): they change no weight and no
# data position.
UNCHECKED_MODEL_KEYS = {
    "activation_checkpointing",
    "machine_memory_efficient",
    "reversible_backward",
    "rotor_offset",
    "rotor_matmul",
}


def fingerprint(model_config, manifest: dict, world_size: int) -> dict:
    """What a checkpoint must match to be resumed: the model's shape, the data, the world size.
    Backprop and memory knobs are left out: they change no weight or data position."""
    import hashlib

    from .config import MODEL_KEYS

    values = model_config.to_dict()
    model = {k: values[k] for k in MODEL_KEYS if k in values and k not in UNCHECKED_MODEL_KEYS}
    data = {k: v for k, v in manifest.items() if k not in ("created", "seconds")}
    digest = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
    # As JSON would give it back, so a saved fingerprint compares equal to a fresh one.
    return json.loads(json.dumps({"model": model, "data": digest[:16], "world_size": world_size}))


def mismatch(saved: dict | None, current: dict) -> str | None:
    """Why a checkpoint with fingerprint ``saved`` cannot be resumed here, or None."""
    if not saved:
        return None  # written before fingerprints existed: nothing to compare
    model_a, model_b = saved.get("model", {}), current["model"]
    keys = sorted(k for k in {*model_a, *model_b} if model_a.get(k) != model_b.get(k))
    if keys:
        diffs = ", ".join(f"{k} {model_a.get(k)!r} -> {model_b.get(k)!r}" for k in keys[:4])
        return f"its model differs ({diffs})"
    if saved.get("data") != current["data"]:
        return "it was trained on other data (the data manifest differs)"
    if saved.get("world_size") != current["world_size"]:
        return (
            f"it was written by {saved.get('world_size')} workers and this run has "
            f"{current['world_size']}: each rank's data position is its own; resume with "
            f"--workers {saved.get('world_size')}"
        )
    return None


def damage(directory: str, fs=None) -> str | None:
    """What is missing or broken in a checkpoint directory (local, or on ``fs``: a pyarrow file
    system), or None when it looks complete: the state file parses and every DeepSpeed file is
    a readable archive, one optimizer shard per rank."""
    import zipfile

    import pyarrow.fs as pafs

    fs = fs or pafs.LocalFileSystem()
    try:
        with fs.open_input_stream(f"{directory}/{STATE_FILE}") as f:
            state = json.loads(f.read())
    except (OSError, json.JSONDecodeError) as err:
        return f"{STATE_FILE}: {err}"
    listing = fs.get_file_info(pafs.FileSelector(f"{directory}/{DS_TAG}", allow_not_found=True))
    shards = sorted(i.path for i in listing if i.path.endswith(".pt"))
    if not shards:
        return f"no DeepSpeed files in {DS_TAG}/"
    for path in shards:
        try:  # the archive's directory sits at its end: a random-access read, not a download
            with fs.open_input_file(path) as f, zipfile.ZipFile(f):
                pass
        except (OSError, zipfile.BadZipFile) as err:
            return f"{path[len(directory) + 1 :]}: {err}"
    ranks = (state.get("fingerprint") or {}).get("world_size")
    optim = [p for p in shards if "optim_states" in p.rsplit("/", 1)[-1]]
    if ranks and len(optim) != ranks:
        return f"{len(optim)} optimizer shards for {ranks} ranks"
    return None


def read_state(directory: str, fs=None) -> TrainState:
    import pyarrow.fs as pafs

    fs = fs or pafs.LocalFileSystem()
    with fs.open_input_stream(f"{directory}/{STATE_FILE}") as f:
        return TrainState.from_json(f.read().decode())
