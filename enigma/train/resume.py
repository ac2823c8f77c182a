"""Which checkpoint a run resumes from, chosen and checked on the driver before any worker starts.

A checkpoint records a fingerprint: the model's config, the data, the world size, and what
decides the order in which the data come (micro-batch, accumulation, seed, shuffle buffer).
What changes the weights' shapes or meaning (width, depth, the machine's parts and seed, the
vocabulary, positions), other data, another worker count and a data-order key that differs (the
run would repeat or skip data without a word) are refused, in one line naming what differs.
Knobs of how training runs (:data:`RUN_KNOBS`: the backward, kernels, rotor start and precision,
dropout, special-token ids) change no weight and no data position: a resume that changes one
goes on, and says so in one line. A key the checkpoint predates is taken to have been its
default: a resume whose value is that default goes on (the old behaviour), another is refused.

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
from ..storage import fence as fences
from ..storage.store import Storage
from .checkpoint import TrainState, damage, read_state

RUN_KNOBS = {
    "activation_checkpointing",
    "machine_memory_efficient",
    "reversible_backward",
    "rotor_offset",
    "rotor_matmul",
    "attention_kernel",
    "dropout",
    "initializer_range",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
}
DATA_ORDER_KEYS = ("micro_batch", "grad_accum", "seed", "shuffle_buffer", "shuffle_shards")
# What a checkpoint written before a key existed ran with: its shards in the written order.
ORDER_BEFORE = {"shuffle_shards": False}
# The prepared tokens' identity: the recipe and the counts, not where or when they were made
# (the source's path and mtimes, the shards' bytes), so the same corpus prepared on another
# machine is the same data.
DATA_IDENTITY = ("format", "seq_len", "normalization", "dedup", "val_fraction", "test_fraction",
                 "kind", "chat_template", "seed", "source_sha256")  # fmt: skip


def fingerprint(
    model_config, manifest: dict, world_size: int, data_order: dict, tuned: dict | None = None
) -> dict:
    """What a checkpoint must match to be resumed (see the module); ``data_order``: the
    training config's :data:`DATA_ORDER_KEYS`; ``tuned``: a fine-tuning run's base model and
    what trains."""
    from .config import MODEL_KEYS

    values = model_config.to_dict()
    model = {k: values[k] for k in MODEL_KEYS if k in values}
    stamp = {"model": model, "data": _digest(data_identity(manifest)), "world_size": world_size}
    # what checkpoints written before the identity recorded: the whole manifest but its times
    stamp["data_before"] = _digest({k: v for k, v in manifest.items()
                                    if k not in ("created", "seconds")})  # fmt: skip
    stamp["data_order"] = {k: data_order[k] for k in DATA_ORDER_KEYS}
    if tuned:
        stamp["model"]["finetune"] = tuned
    # As JSON would give it back, so a saved fingerprint compares equal to a fresh one.
    return json.loads(json.dumps(stamp))


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_identity(manifest: dict) -> dict:
    """The manifest's recipe (tokenizer by its vocabulary) and every split's counts."""
    identity = {k: manifest.get(k) for k in DATA_IDENTITY}
    identity["vocab_hash"] = manifest.get("tokenizer", {}).get("vocab_hash")
    counts = ("documents", "tokens", "separators", "blocks", "dropped_tokens", "assistant_tokens",
              "too_long")  # fmt: skip
    splits = manifest.get("splits")
    identity["splits"] = {split: {k: s.get(k) for k in counts} for split, s in splits.items()
                          } if isinstance(splits, dict) else splits  # fmt: skip
    return identity


def mismatch(saved: dict | None, current: dict) -> str | None:
    """Why a checkpoint with fingerprint ``saved`` cannot be resumed here, or None."""
    return compare(saved, current)[0]


def compare(saved: dict | None, current: dict) -> tuple[str | None, list[str]]:
    """``(why not, what differs but is accepted)`` for a checkpoint with fingerprint ``saved``
    (see the module)."""
    if not saved:
        return None, []  # written before fingerprints existed: nothing to compare
    refused, accepted = _model_differences(saved.get("model", {}), current["model"])
    if refused:
        return f"its model differs ({', '.join(refused[:4])})", accepted
    if saved.get("data") not in (current["data"], current.get("data_before")):
        return "it was trained on other data (the data manifest differs)", accepted
    if saved.get("world_size") != current["world_size"]:
        return (
            f"it was written by {saved.get('world_size')} workers and this run has "
            f"{current['world_size']}: each rank's data position is its own; resume with "
            f"--workers {saved.get('world_size')}"
        ), accepted
    order_a, order_b = saved.get("data_order"), current["data_order"]
    for key in DATA_ORDER_KEYS if order_a else ():
        was = order_a.get(key, ORDER_BEFORE.get(key))
        if was != order_b[key]:
            return (
                f"{key} {was!r} -> {order_b[key]!r} would change the order of the data, "
                f"repeating or skipping some; resume with --set {key}={was}"
            ), accepted
    return None, accepted


def _model_differences(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """The model keys that differ, as ``(refused, accepted)`` descriptions."""
    from .config import MODEL_ALIASES, MODEL_KEYS

    saved = {MODEL_ALIASES.get(k, k): v for k, v in saved.items()}
    refused, accepted = [], []
    for key in sorted({*saved, *current}):
        if saved.get(key) == current.get(key):
            continue
        was, now = saved.get(key), current.get(key)
        if key in RUN_KNOBS:
            accepted.append(f"{key} {was!r} -> {now!r}")
        elif key == "finetune":
            refused += _finetune_differences(was or {}, now or {})
        elif key not in saved:  # the checkpoint predates the key: it ran with the default
            default = MODEL_KEYS[key].default if key in MODEL_KEYS else None
            if now == default:
                accepted.append(f"{key} (new since the checkpoint) {now!r}, its default")
            else:
                refused.append(f"{key} is new since the checkpoint, which ran as its default "
                               f"{default!r}, not {now!r}")  # fmt: skip
        elif key in current:
            refused.append(f"{key} {was!r} -> {now!r}")
    return refused, accepted


def _finetune_differences(saved: dict, current: dict) -> list[str]:
    """What a fine-tuning run trains, key by key; a LoRA setting the checkpoint predates is
    taken as its default."""
    from .config import TrainConfig

    defaults = TrainConfig()
    out = []
    for key in sorted({*saved, *current}):
        was = saved.get(key, getattr(defaults, key, None))
        if was != current.get(key):
            out.append(f"{key} {was!r} -> {current.get(key)!r}")
    return out


@dataclass(frozen=True)
class Resume:
    """The checkpoint a run starts from and its state."""

    path: str
    state: TrainState


def set_aside(storage: Storage, found: fences.Checkpoint, problem: str,
              die_between: bool = False) -> str:  # fmt: skip
    """Take checkpoint ``found`` out of Ray Train's record (rewritten whole), then move it to
    ``damaged-NAME`` beside it; returns the new name. In that order: a kill between leaves a
    record that no longer names it and the directory where it was, which the next run judges
    again; the other order would leave a record naming a directory that is gone, which Ray
    refuses to start from (:func:`repair_record` mends that, for records left by older
    versions)."""
    from ..cluster.ray_internals import forget_checkpoints

    run = found.parts[:2]
    taken = set(storage.list_dirs(*run))
    aside, n = f"damaged-{found.name}", 1
    while aside in taken:
        n += 1
        aside = f"damaged-{found.name}-{n}"
    fs, run_path = storage.filesystem(*run)
    forget_checkpoints(fs, run_path, {found.name})
    if die_between:  # an injected fault (enigma bench faults): killed between the two steps
        import os
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    storage.move_dir(found.parts, (*run, aside))
    print(f"checkpoint {found.name} is damaged ({problem}): set aside as {aside}; trying the one "
          "before", flush=True)  # fmt: skip
    return aside


def repair_record(storage: Storage, generation: int = 1) -> None:
    """Ray Train's record of a generation's run naming checkpoints that are gone (a set-aside
    killed half-way by an older version, a directory deleted by hand): take them out, or Ray
    would refuse to start the run again."""
    from ..cluster.ray_internals import forget_checkpoints, recorded_checkpoints

    run = (fences.RUNS, fences.run_name(generation))
    present = [n for n in storage.list_dirs(*run) if n.startswith("step-")]
    fs, run_path = storage.filesystem(*run)
    missing = recorded_checkpoints(fs, run_path) - set(present)
    if missing and forget_checkpoints(fs, run_path, missing):
        gone = ", ".join(sorted(missing))
        print(f"note: Ray Train's record of {storage.uri(*run)} named {gone}, which are gone; "
              "taken out of it", flush=True)  # fmt: skip


def choose_resume(storage: Storage, explicit: str | None, current: dict,
                  die_in_set_aside: bool = False,
                  fence: fences.Fence | None = None) -> Resume | None:  # fmt: skip
    """The checkpoint this run starts from, said aloud: ``--resume PATH``, or the newest complete
    one of an earlier run in the same storage (the output directory, or ``--storage-path``) that
    ``fence`` (the storage's own when not given) trusts, of any generation, or none. Damaged ones
    are set aside; one that does not match ``current`` is refused."""
    fence = fence or fences.read(storage)[0]
    run = storage.uri(fences.RUNS)
    trusted = fences.checkpoints(storage, fence)
    repair_record(storage, fence.generation)
    if explicit and trusted:
        raise InputError(
            f"{storage.uri()} already holds a run (latest {trusted[-1].name}), which this "
            f"command resumes; --resume {explicit} would be ignored: drop --resume, or use "
            "another --output-dir"
        )
    if explicit:
        broken = damage(explicit)
        if broken:
            raise InputError(f"--resume {explicit} is damaged: {broken}")
        return _checked(explicit, read_state(explicit), current, "--resume")
    for found in reversed(trusted):
        fs, path = storage.filesystem(*found.parts)
        broken = damage(path, fs)
        if broken:
            set_aside(storage, found, broken, die_in_set_aside)
            continue
        where = storage.uri(*found.parts)
        return _checked(where, read_state(path, fs), current, f"the newest complete one in {run}")
    if trusted:
        raise InputError(
            f"every checkpoint in {run} is damaged (set aside as damaged-step-*); the same "
            "command now starts over from step 0, or use another --output-dir"
        )
    return None


def _checked(path: str, state: TrainState, current: dict, why: str) -> Resume:
    reason, accepted = compare(state.fingerprint, current)
    if reason:
        raise InputError(
            f"cannot resume from {path}: {reason}; use another --output-dir for a new run"
        )
    print(f"resuming from {path} (step {state.step}): {why}", flush=True)
    if accepted:
        print(f"note: the checkpoint differs in what changes no weight and no data position: "
              f"{', '.join(accepted)}", flush=True)  # fmt: skip
    return Resume(path, state)
