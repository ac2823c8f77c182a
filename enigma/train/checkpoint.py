"""A checkpoint: what it holds, how every rank writes and reads it, and when it is complete.

A checkpoint is DeepSpeed's sharded state (every rank writes its part under the tag ``ds``),
``run.json`` (the config, command and data summary that ``enigma export`` and the model card
need) and ``trainer_state.json`` from rank 0: the step, the epoch and the micro-batches consumed
in it, the best val loss, the early-stop count, the precision, the fingerprint a resume must
match, and the size of every file every rank wrote. Resuming skips the consumed micro-batches of
the epoch, so no batch repeats or is skipped.

A checkpoint is complete when its state file parses, ``run.json`` is there, and every file in
the state's list is there at its size and, for DeepSpeed's archives, readable: whatever the ZeRO
stage and world size, an upload cut short (optimizer shards but no model states, say) fails
this, so it is never chosen.
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
RUN_FILE = "run.json"  # what the model card and `enigma export` need
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
    fingerprint: dict | None = None  # what a resume must match (see enigma.train.resume)
    precision: str | None = None  # bf16, fp16 or fp32: a resume keeps it
    files: dict | None = None  # path under the checkpoint -> bytes, of every rank's files

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in json.loads(text).items() if k in known})


def _written(local: Path) -> dict[str, int]:
    return {
        str(p.relative_to(local)): p.stat().st_size for p in sorted(local.rglob("*")) if p.is_file()
    }


def save(
    engine, state: TrainState, rank: int, tmp_root: str | None = None, run: dict | None = None
) -> str:
    """Write a checkpoint into a fresh local directory under ``tmp_root`` and return it; every
    rank calls this (it gathers every rank's file list: a collective). ``run`` goes beside the
    state. The directory is removed again if writing fails."""
    import torch.distributed as dist

    if tmp_root:
        Path(tmp_root).mkdir(parents=True, exist_ok=True)
    local = Path(tempfile.mkdtemp(prefix="enigma-ckpt-", dir=tmp_root))
    try:
        engine.save_checkpoint(str(local), tag=DS_TAG)
        if rank == 0 and run is not None:
            (local / RUN_FILE).write_text(json.dumps(run, ensure_ascii=False))
        lists = [_written(local)]
        if dist.is_initialized() and dist.get_world_size() > 1:
            lists = [None] * dist.get_world_size()
            dist.all_gather_object(lists, _written(local))
        if rank == 0:
            files = {}
            for listed in reversed(lists):  # rank 0's entry wins for a name several ranks write
                files.update(listed)
            state = dataclasses.replace(state, files=files)
            (local / STATE_FILE).write_text(state.to_json())
    except BaseException:
        shutil.rmtree(local, ignore_errors=True)
        raise
    return str(local)


def restore(engine, directory: str) -> TrainState:
    """Load a checkpoint written by :func:`save` into ``engine``; returns its state. A load that
    finds nothing is an error, never a fresh start."""
    state = TrainState.from_json((Path(directory) / STATE_FILE).read_text())
    loaded, _ = engine.load_checkpoint(directory, tag=DS_TAG, load_lr_scheduler_states=False)
    if loaded is None:
        raise RuntimeError(f"DeepSpeed loaded nothing from {directory}/{DS_TAG}")
    return state


def damage(directory: str, fs=None) -> str | None:
    """What is missing or broken in a checkpoint directory (local, or on ``fs``: a pyarrow file
    system), or None when it is complete (see the module)."""
    import pyarrow.fs as pafs

    fs = fs or pafs.LocalFileSystem()
    try:
        with fs.open_input_stream(f"{directory}/{STATE_FILE}") as f:
            state = json.loads(f.read())
    except FileNotFoundError:
        return f"{STATE_FILE} is missing"
    except (OSError, json.JSONDecodeError) as err:
        return f"{STATE_FILE}: {err}"
    if fs.get_file_info(f"{directory}/{RUN_FILE}").type == pafs.FileType.NotFound:
        return f"{RUN_FILE} is missing"
    files = state.get("files")
    if files is None:  # written before the state listed its files
        return _damage_unlisted(directory, fs, state)
    for name, size in sorted(files.items()):
        info = fs.get_file_info(f"{directory}/{name}")
        if info.type == pafs.FileType.NotFound:
            return f"{name} is missing"
        if info.size != size:
            return f"{name} holds {info.size:,} of its {size:,} bytes"
    return _unreadable(directory, fs, [n for n in files if n.endswith(".pt")])


def _unreadable(directory: str, fs, names: list[str]) -> str | None:
    """The first of DeepSpeed's archives ``names`` whose zip directory cannot be read."""
    import zipfile

    for name in sorted(names):
        try:  # the archive's directory sits at its end: a random-access read, not a download
            with fs.open_input_file(f"{directory}/{name}") as f, zipfile.ZipFile(f):
                pass
        except (OSError, zipfile.BadZipFile) as err:
            return f"{name}: {err}"
    return None


def _damage_unlisted(directory: str, fs, state: dict) -> str | None:
    """An older checkpoint's check: model states, one optimizer shard per rank, all readable."""
    import pyarrow.fs as pafs

    listing = fs.get_file_info(pafs.FileSelector(f"{directory}/{DS_TAG}", allow_not_found=True))
    names = sorted(i.path[len(directory) + 1 :] for i in listing if i.path.endswith(".pt"))
    if not [n for n in names if n.endswith("model_states.pt")]:
        return f"no model states in {DS_TAG}/"
    ranks = (state.get("fingerprint") or {}).get("world_size")
    optim = [n for n in names if n.endswith("optim_states.pt")]
    if ranks and len(optim) != ranks:
        return f"{len(optim)} optimizer shards for {ranks} ranks"
    return _unreadable(directory, fs, names)


def read_state(directory: str, fs=None) -> TrainState:
    import pyarrow.fs as pafs

    fs = fs or pafs.LocalFileSystem()
    with fs.open_input_stream(f"{directory}/{STATE_FILE}") as f:
        return TrainState.from_json(f.read().decode())
