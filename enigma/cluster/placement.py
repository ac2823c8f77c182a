"""This job's placement groups: the watch that ends a run whose workers cannot be placed, and the
clean-up of groups whose creator died. Both look at this job's groups only: on a cluster that
other jobs share, their pending requests and their groups are none of our business.

Ray Train creates a run's placement group in its controller actor, and a Tune trial stopped early
(ASHA) or killed takes the controller down with it. Ray removes such a group only when its job
ends too, and Train's own cleaner asks the dashboard's state API, which a local cluster started
without the dashboard does not have: the group would hold its CPUs for the rest of the sweep.
"""

from __future__ import annotations

import time

from . import ray_internals

LIVE = ("PENDING", "PREPARED", "CREATED", "RESCHEDULING")
WAITING = ("PENDING", "RESCHEDULING")


def job_groups(states=LIVE) -> list[ray_internals.GroupInfo]:
    """This job's placement groups in ``states``."""
    job = ray_internals.current_job()
    return [g for g in ray_internals.placement_groups() if g.job == job and g.state in states]


def actor_placement_groups(dead_creator_only: bool = True) -> list[str]:
    """This job's live groups made by actors (Train controllers), by default only those whose
    creating actor is dead (orphans); hex ids. Groups made by a driver (Tune's trial groups) and
    detached ones are left alone."""
    return [
        g.id
        for g in job_groups()
        if g.by_actor and not g.detached and (g.creator_dead or not dead_creator_only)
    ]


def orphaned_placement_groups() -> list[str]:
    return actor_placement_groups(dead_creator_only=True)


def remove_orphaned_placement_groups() -> int:
    """Remove what :func:`orphaned_placement_groups` finds; returns how many."""
    orphans = orphaned_placement_groups()
    for hex_id in orphans:
        ray_internals.remove_placement_group(hex_id)
    return len(orphans)


def kill_train_controllers() -> int:
    """Kill this job's live Ray Train controllers, so a ``fit()`` waiting on one returns (with
    an actor error). Ray Train's own abort waits for a controller stuck in scheduling."""
    found = ray_internals.job_actor_ids("TrainController")
    for actor_id in found:
        ray_internals.kill_actor(actor_id)
    return len(found)


class PlacementWatch:
    """Notices this job's placement groups staying PENDING: workers that cannot be placed (more
    GPUs or CPUs asked for than the cluster has free) would otherwise wait for ever. ``check()``
    returns a message saying what is asked, what is free and what holds the rest, once a group
    has waited ``timeout_s``; None before that."""

    def __init__(self, timeout_s: float):
        self.timeout_s, self.since = timeout_s, None

    def check(self) -> str | None:
        import ray

        now = time.monotonic()
        pending = job_groups(WAITING)
        # Ray Train may give up on a group and ask again with a new one: what counts is how long
        # some group of ours has been waiting without a break.
        self.since = (self.since or now) if pending else None
        if not pending or now - self.since < self.timeout_s:
            return None
        asked = _bundles(pending[-1].bundles)
        created = [g for g in ray_internals.placement_groups() if g.state == "CREATED"]
        held = [_bundles(g.bundles) for g in created]
        free = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
        total = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        return (
            f"workers could not be placed for {self.timeout_s:.0f} s: asked for {asked}; the "
            f"cluster has {total}, {free} free; held by {len(held)} placement group(s) "
            f"{'; '.join(held) or '(none)'}; ask for fewer workers or GPUs, or raise "
            "placement_timeout_s if nodes are still joining"
        )


def _bundles(bundles) -> str:
    counts: dict[str, int] = {}
    for bundle in bundles:
        key = ", ".join(f"{k} {v:g}" for k, v in sorted(bundle.items()) if k in ("CPU", "GPU"))
        counts[key or "no CPU/GPU"] = counts.get(key or "no CPU/GPU", 0) + 1
    return " + ".join(f"{n} x {{{k}}}" for k, n in counts.items())


def release_orphans(wait_s: float = 15.0) -> None:
    """After a run was ended by killing its controller: its placement group outlives it
    (pending, it would be placed as soon as the resources free up and hold them for good);
    remove it once Ray marks its creator dead."""
    deadline = time.monotonic() + wait_s
    while not remove_orphaned_placement_groups() and time.monotonic() < deadline:
        time.sleep(0.5)
