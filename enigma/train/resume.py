"""Which checkpoint a run resumes from, chosen and checked on the driver before any worker starts.

A checkpoint records a fingerprint: the model's shape, the data, the world size, and what decides
the order in which the data come (micro-batch, accumulation, seed, shuffle buffer). Another
model, other data or another worker count is refused with what differs; so is a data-order key
that differs, since the run would then repeat or skip data without a word. Knobs of how training
runs (backward, rotor start, rotor precision) change no weight and no data position and are not
checked.

An incomplete or damaged checkpoint (:func:`enigma.train.checkpoint.damage`) is named in one
line and set aside as ``damaged-step-N`` beside the others, and taken out of Ray Train's record
of the run, so that neither this run nor Ray offers it again, and a later checkpoint of the same
step is not mistaken for it; the one before is tried.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from ..errors import InputError
from ..storage.store import CHECKPOINT_PARTS, Storage
from .checkpoint import TrainState, damage, read_state

UNCHECKED_MODEL_KEYS = {
    "activation_checkpointing",
    "machine_memory_efficient",
    "reversible_backward",
    "rotor_offset",
    "rotor_matmul",
}
DATA_ORDER_KEYS = ("micro_batch", "grad_accum", "seed", "shuffle_buffer")


def fingerprint(
    model_config, manifest: dict, world_size: int, data_order: dict, tuned: dict | None = None
) -> dict:
    """What a checkpoint must match to be resumed (see the module); ``data_order``: the
    training config's :data:`DATA_ORDER_KEYS`; ``tuned``: a fine-tuning run's base model and
    what trains."""
    from .config import MODEL_KEYS

    values = model_config.to_dict()
    model = {k: values[k] for k in MODEL_KEYS if k in values and k not in UNCHECKED_MODEL_KEYS}
    data = {k: v for k, v in manifest.items() if k not in ("created", "seconds")}
    digest = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
    stamp = {"model": model, "data": digest[:16], "world_size": world_size}
    stamp["data_order"] = {k: data_order[k] for k in DATA_ORDER_KEYS}
    if tuned:
        stamp["model"]["finetune"] = tuned
    # As JSON would give it back, so a saved fingerprint compares equal to a fresh one.
    return json.loads(json.dumps(stamp))


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
    order_a, order_b = saved.get("data_order"), current["data_order"]
    for key in DATA_ORDER_KEYS if order_a else ():
        if order_a.get(key) != order_b[key]:
            return (
                f"{key} {order_a.get(key)!r} -> {order_b[key]!r} would change the order of the "
                f"data, repeating or skipping some; resume with --set {key}={order_a.get(key)}"
            )
    return None


@dataclass(frozen=True)
class Resume:
    """The checkpoint a run starts from and its state."""

    path: str
    state: TrainState


def set_aside(storage: Storage, name: str, problem: str) -> str:
    """Move the checkpoint ``name`` to ``damaged-NAME`` and out of Ray Train's record; returns
    the new name."""
    from ..cluster.ray_internals import forget_checkpoints

    taken = set(storage.list_dirs(*CHECKPOINT_PARTS))
    aside, n = f"damaged-{name}", 1
    while aside in taken:
        n += 1
        aside = f"damaged-{name}-{n}"
    storage.move_dir((*CHECKPOINT_PARTS, name), (*CHECKPOINT_PARTS, aside))
    fs, run_path = storage.filesystem(*CHECKPOINT_PARTS)
    forget_checkpoints(fs, run_path, {name})
    print(f"checkpoint {name} is damaged ({problem}): set aside as {aside}; trying the one "
          "before", flush=True)  # fmt: skip
    return aside


def choose_resume(storage: Storage, explicit: str | None, current: dict) -> Resume | None:
    """The checkpoint this run starts from, said aloud: ``--resume PATH``, or the newest complete
    one of an earlier run in the same storage (the output directory, or ``--storage-path``), or
    none. Damaged ones are set aside; one that does not match ``current`` is refused."""
    run = storage.uri(*CHECKPOINT_PARTS)
    names = [n for n in storage.list_dirs(*CHECKPOINT_PARTS) if n.startswith("step-")]
    if explicit and names:
        raise InputError(
            f"{storage.uri()} already holds a run (latest {names[-1]}), which this command "
            f"resumes; --resume {explicit} would be ignored: drop --resume, or use another "
            "--output-dir"
        )
    if explicit:
        broken = damage(explicit)
        if broken:
            raise InputError(f"--resume {explicit} is damaged: {broken}")
        return _checked(explicit, read_state(explicit), current, "--resume")
    for name in reversed(names):
        fs, path = storage.filesystem(*CHECKPOINT_PARTS, name)
        broken = damage(path, fs)
        if broken:
            set_aside(storage, name, broken)
            continue
        where = storage.uri(*CHECKPOINT_PARTS, name)
        return _checked(where, read_state(path, fs), current, f"the newest complete one in {run}")
    if names:
        raise InputError(
            f"every checkpoint in {run} is damaged (set aside as damaged-step-*); the same "
            "command now starts over from step 0, or use another --output-dir"
        )
    return None


def _checked(path: str, state: TrainState, current: dict, why: str) -> Resume:
    reason = mismatch(state.fingerprint, current)
    if reason:
        raise InputError(
            f"cannot resume from {path}: {reason}; use another --output-dir for a new run"
        )
    print(f"resuming from {path} (step {state.step}): {why}", flush=True)
    return Resume(path, state)
