"""Fencing: a holder whose lease was taken over cannot corrupt the run, even one that wakes late.

A lease stops a holder that knows it lost it; a holder paused past its term (SIGSTOP, a long GC,
a partition) does not know, and its workers, which were never paused, write on. So each holding
that takes a lapsed lease over starts a new **generation** of the run, and everything a
generation writes lands where the others never read:

- its checkpoints and Ray Train's record of them go under ``ray/train-gN/`` (generation 1, every
  run that never took a lapsed lease over, keeps ``ray/train/``), so no checkpoint mixes two
  holders' shards and no holder's rotation deletes another's checkpoints;
- ``fence.json`` in the storage, the one record readers trust, names the current generation and,
  for each earlier one, the newest step that later generations trust (the step the taker resumed
  from: what the old holder wrote after that is the stale run's). It is written only by a taker
  that holds the lock, by a conditional write naming the version it replaces (an ETag on S3, a
  generation on GCS), so two takers cannot both advance it;
- a model swap (``model/``) and every checkpoint first read the fence: a holder of an older
  generation is refused and ends, saying which generation took over.

A run that never took a lapsed lease over has no ``fence.json``: generation 1, everything
trusted, the layout as before.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

from ..errors import InputError
from .locks import LeaseLost

FENCE = "fence.json"
RUNS = "ray"  # Ray Train's storage_path is ROOT/ray; a generation's run name is below it


class Fenced(LeaseLost):
    """This holder's generation is no longer the run's: a taker-over started a newer one."""


@dataclass
class Fence:
    """The run's current generation and, for each earlier one, the newest step still trusted."""

    generation: int = 1
    cuts: dict[int, int] = field(default_factory=dict)

    def trusts(self, generation: int, step: int) -> bool:
        if generation == self.generation:
            return True
        return generation < self.generation and step <= self.cuts.get(generation, -1)

    def successor(self, resumed_step: int) -> Fence:
        """The next generation, which resumes from ``resumed_step`` (0: from the start): every
        earlier generation is trusted up to there and no further."""
        cuts = {g: min(self.cuts.get(g, math.inf), resumed_step)
                for g in range(1, self.generation + 1)}  # fmt: skip
        return Fence(self.generation + 1, {g: int(c) for g, c in cuts.items()})

    def to_json(self) -> str:
        return json.dumps({"generation": self.generation,
                           "cuts": {str(g): s for g, s in sorted(self.cuts.items())}})  # fmt: skip


def run_name(generation: int) -> str:
    """Ray Train's run name (the directory under ``ray/``) of a generation."""
    return "train" if generation <= 1 else f"train-g{generation}"


def generation_of(name: str) -> int | None:
    """The generation whose Ray run directory is called ``name``; None for another directory."""
    if name == "train":
        return 1
    found = re.fullmatch(r"train-g(\d+)", name)
    return int(found.group(1)) if found else None


def step_of(name: str) -> int | None:
    found = re.fullmatch(r"step-(\d+)", name)
    return int(found.group(1)) if found else None


def read(storage, bounded: bool = True) -> tuple[Fence, str | None]:
    """The run's fence (generation 1 when it has none) and the version a conditional write of
    the next one names (an S3 ETag; ``""`` when there is none; None elsewhere)."""
    text, version = _read_versioned(storage, bounded)
    if text is None:
        return Fence(), version
    try:
        data = json.loads(text)
        cuts = {int(g): int(s) for g, s in data.get("cuts", {}).items()}
        return Fence(int(data["generation"]), cuts), version
    except (ValueError, KeyError, TypeError, AttributeError):
        raise InputError(f"{storage.uri(FENCE)} is not a fence record; restore it, or remove it "
                         "if this run never had its lock taken over") from None  # fmt: skip


def _read_versioned(storage, bounded: bool) -> tuple[str | None, str | None]:
    if storage.remote:
        data, version = _object(storage, bounded).read()
        return (None if data is None else data.decode()), (version or "")
    return storage.read_text(FENCE), None


def write(storage, fence: Fence, version: str | None) -> None:
    """Replace the fence, conditionally on ``version`` (from :func:`read`): on an object store a
    taker that lost a race for it is refused in one line; locally (and on NFS) the writer holds
    the storage's lock, and the file is replaced whole."""
    body = fence.to_json().encode()
    if not storage.remote:
        storage.write_bytes(body, FENCE)
        return
    from .objects import Conflict

    stored = _object(storage)
    try:
        stored.replace(body, version) if version else stored.create(body)
    except Conflict:
        if stored.read()[0] == body:
            return  # our own write, retried by the client after it went through
        raise InputError(f"{storage.uri()} was taken over by another run just now (its fence "
                         "changed)") from None  # fmt: skip


def _object(storage, bounded: bool = True):
    """The fence's object; ``bounded``: its calls within a lease's term, as the lock's are."""
    from .locks import lease_term
    from .objects import conditional_object

    return conditional_object(storage.uri(FENCE), lease_term() if bounded else None)


def advance(storage) -> Fence:
    """A lapsed lease was just taken over: write the next generation at once (before anything
    that could fail, so no later run mistakes the old holder's writes for its own), trusting
    each earlier generation up to its newest checkpoint listed now; :func:`settle` lowers that
    to the step the run resumes from."""
    fence, version = read(storage)
    listed = checkpoints(storage, fence)
    new = fence.successor(listed[-1].step if listed else 0)
    write(storage, new, version)
    return new


def settle(storage, step: int) -> Fence:
    """Every earlier generation trusted no further than ``step``, where the current one resumed
    (a checkpoint of theirs past it, complete or not, is the old holder's)."""
    fence, version = read(storage)
    lowered = {g: min(cut, step) for g, cut in fence.cuts.items()}
    if lowered != fence.cuts:
        fence = Fence(fence.generation, lowered)
        write(storage, fence, version)
    return fence


def check(storage, generation: int) -> None:
    """Raise :class:`Fenced` when a newer generation holds the run (before a checkpoint or a
    model swap of generation ``generation``). Read with the store client's usual patience:
    a slow answer here only delays a checkpoint."""
    current, _ = read(storage, bounded=False)
    if current.generation > generation:
        raise Fenced(f"generation {current.generation} of {storage.uri()} took the run over "
                     f"from this one ({generation})")  # fmt: skip


@dataclass(frozen=True)
class Checkpoint:
    generation: int
    name: str  # step-NNNNNNN
    step: int

    @property
    def parts(self) -> tuple[str, str, str]:
        return (RUNS, run_name(self.generation), self.name)


def checkpoints(storage, fence: Fence | None = None) -> list[Checkpoint]:
    """Every checkpoint in the storage, of every generation, oldest step first; with ``fence``,
    those it trusts only."""
    found = []
    for directory in storage.list_dirs(RUNS):
        generation = generation_of(directory)
        if generation is None:
            continue
        for name in storage.list_dirs(RUNS, directory):
            step = step_of(name)
            if step is not None and (fence is None or fence.trusts(generation, step)):
                found.append(Checkpoint(generation, name, step))
    return sorted(found, key=lambda c: (c.step, c.generation))
