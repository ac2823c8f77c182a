"""This job's placement groups: the watch that lets a run's workers wait for room and ends only
what can never be placed, and the clean-up of groups whose creator died. Both act on this job's
groups only: on a cluster that other jobs share, their pending requests and their groups are
none of our business (their placed groups are read, to say who holds the room).

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
    """Judges this job's placement groups that wait. On a shared cluster waiting is normal: a
    group waits while another of ours is placed (a trial or run of ours holds room it will
    free) or while the cluster could hold it once other jobs let go. It fails at once only when
    no arrangement of the cluster's nodes could ever hold it (a bundle larger than every node, or
    more in all than the cluster has), and after ``timeout_s`` (> 0) of waiting with nothing of
    ours placed; 0 waits as long as it takes. A node lost during the run still counts (it may
    return, or be replaced), and a group Ray reschedules is never judged unplaceable.
    ``check()`` gives the failure's message (None while all is well); ``waiting()`` a line
    saying what waits and for what."""

    def __init__(self, timeout_s: float):
        self.timeout_s, self.since = timeout_s, None
        self.seen: dict[str, dict] = {}  # every node alive at some check: a lost one may return

    def nodes(self) -> list[dict]:
        """The resources of every node seen alive since the watch began (the cluster at its
        largest: a node lost meanwhile may come back, or be replaced)."""
        import ray

        for node in ray.nodes():
            if node.get("Alive"):
                self.seen[node["NodeID"]] = node["Resources"]
        return list(self.seen.values())

    def check(self) -> str | None:
        now = time.monotonic()
        pending = job_groups(WAITING)
        # This job's placed workers: Train controllers make worker groups (Tune's trial groups,
        # made by the driver, hold no CPU and prove nothing).
        placed = [g for g in job_groups(("CREATED",)) if g.by_actor]
        # Ray Train may give up on a group and ask again with a new one: what counts is how long
        # some group of ours has been waiting, without a break, with none of ours placed.
        stalled = bool(pending) and not placed
        self.since = (self.since or now) if stalled else None
        # A group Ray reschedules (its node was lost) was placed once: it may be again.
        for group in [g for g in pending if g.state == "PENDING"]:
            never = never_fits(group.bundles, self.nodes())
            if never:
                return (f"workers can never be placed: asked for {_bundles(group.bundles)}, "
                        f"but {never}; ask for fewer workers, CPUs or GPUs")  # fmt: skip
        if not stalled or not self.timeout_s or now - self.since < self.timeout_s:
            return None
        return (f"workers could not be placed for {self.timeout_s:.0f} s with nothing of this "
                f"job's running: {self.waiting()}; raise placement_timeout_s (0 waits as long as "
                "it takes) or free the cluster")  # fmt: skip

    def waiting(self) -> str | None:
        """What of ours waits, the cluster's room, and who holds it (None: nothing waits)."""
        import ray

        pending = job_groups(WAITING)
        if not pending:
            return None
        job = ray_internals.current_job()
        held = [g for g in ray_internals.placement_groups() if g.state == "CREATED"
                and any(b.get("CPU") or b.get("GPU") for b in g.bundles)]  # fmt: skip
        ours = sum(g.job == job and g.by_actor for g in held)
        free = {k: round(v, 2) for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
        total = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        shown = "; ".join(_bundles(g.bundles) for g in held) or "(none)"
        return (f"asked for {_bundles(pending[-1].bundles)}; the cluster has {total}, {free} "
                f"free; held by {len(held)} placement group(s) {shown} ({ours} of them this "
                "job's running workers)")  # fmt: skip


def never_fits(bundles, nodes: list[dict]) -> str | None:
    """Why ``bundles`` could never be placed on ``nodes`` (their resources), or None."""
    total: dict[str, float] = {}
    for node in nodes:
        for k, v in node.items():
            total[k] = total.get(k, 0.0) + v
    asked: dict[str, float] = {}
    for bundle in bundles:
        for k, v in bundle.items():
            asked[k] = asked.get(k, 0.0) + v
        if not any(all(node.get(k, 0.0) >= v for k, v in bundle.items()) for node in nodes):
            shown = ", ".join(f"{k} {v:g}" for k, v in bundle.items() if v)
            return f"no node has {{{shown}}}"
    for k, v in asked.items():
        if v > total.get(k, 0.0) + 1e-9:
            return f"the cluster has {total.get(k, 0.0):g} {k} in all"
    return None


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
