"""Start or join Ray quietly: the cluster at ``RAY_ADDRESS`` when set, else a local one."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time


def init_ray(num_cpus: int | None = None, object_store_memory: int | None = None, **kwargs) -> None:
    """``object_store_memory`` applies only to a local cluster started here."""
    import ray

    # A local cluster with token auth on says so at every start; the CLI is not the place.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR
    )
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or None
        local = {} if address else {"num_cpus": num_cpus, "include_dashboard": False}
        if object_store_memory and not address:
            local["object_store_memory"] = object_store_memory
        ray.init(
            address=address,
            logging_level=logging.WARNING,
            log_to_driver=False,
            **local,
            **kwargs,
        )
        keep_python_sigterm()
    quiet_worker_start_warnings()
    quiet_ray_data()


def keep_python_sigterm() -> None:
    """Ray's core worker installs a C-level SIGTERM handler that aborts the process; hand SIGTERM
    back to the Python handler the CLI installed (it unwinds: locks released, Ray shut down)."""
    if threading.current_thread() is not threading.main_thread():
        return
    handler = signal.getsignal(signal.SIGTERM)
    if callable(handler):
        signal.signal(signal.SIGTERM, handler)


WORKER_START_WARNING = "worker processes have been started on node"


def quiet_worker_start_warnings() -> None:
    """Drop the raylet's "N worker processes have been started" warnings on this driver.

    The raylet sends one each time it has started another multiple of the node's CPU count in
    worker processes. A sweep on a small machine starts many short-lived actors (trials, Train
    controllers, workers) by design, so on 2 CPUs the warning repeats with every wave and says
    nothing. Ray has no setting for it; its driver prints raylet messages through
    ``print_to_stdstream``, which is wrapped here to leave those lines out. Every other raylet
    message (a worker that died, out of memory) still reaches the console.
    """
    import ray._private.worker as ray_worker

    original = ray_worker.print_to_stdstream
    if getattr(original, "enigma_quiet", False):
        return

    def without_start_warnings(data, ignore_prefix):
        lines = [x for x in data.get("lines", []) if WORKER_START_WARNING not in x]
        if lines:
            original({**data, "lines": lines}, ignore_prefix)

    without_start_warnings.enigma_quiet = True
    ray_worker.print_to_stdstream = without_start_warnings


def quiet_ray_data() -> None:
    """Our own progress bars and lines replace Ray Data's per-operator chatter."""
    from ray.data import DataContext

    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def actor_placement_groups(dead_creator_only: bool = True) -> list[str]:
    """Placement groups (hex ids) made by actors that still hold resources; by default only
    those whose creating actor is dead (orphans).

    Ray Train creates a run's placement group in its controller actor, and a Tune trial stopped
    early (ASHA) or killed takes the controller down with it. Ray removes such a group only when
    its job ends too, and Train's own cleaner asks the dashboard's state API, which a local
    cluster started without the dashboard does not have: the group then holds its CPUs for the
    rest of the sweep. The GCS table says which creators are dead, dashboard or not.
    """
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    found = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        live = pg.state != gcs_pb2.PlacementGroupTableData.REMOVED
        # A group made by a driver (Tune's own trial groups) has the nil actor id, all 0xff
        # bytes, and counts as "actor dead": those belong to a live job and are left alone.
        by_actor = pg.creator_actor_id.strip(b"\xff") != b""
        dead = pg.creator_actor_dead or not dead_creator_only
        if live and by_actor and dead and not pg.is_detached:
            found.append(pg.placement_group_id.hex())
    return found


def orphaned_placement_groups() -> list[str]:
    return actor_placement_groups(dead_creator_only=True)


def remove_orphaned_placement_groups() -> int:
    """Remove what :func:`orphaned_placement_groups` finds; returns how many."""
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    orphans = orphaned_placement_groups()
    for hex_id in orphans:
        remove_placement_group(PlacementGroup(ray_pg_id(hex_id)))
    return len(orphans)


def ray_pg_id(hex_id: str):
    import ray

    return ray.PlacementGroupID(bytes.fromhex(hex_id))


class PlacementWatch:
    """Notices placement groups that stay PENDING: workers that cannot be placed (more GPUs or
    CPUs asked for than the cluster has free) would otherwise wait for ever. ``check()`` returns
    a message saying what is asked, what is free and what holds the rest, once a group has
    waited ``timeout_s``; None before that."""

    def __init__(self, timeout_s: float):
        self.timeout_s, self.since = timeout_s, None

    def check(self) -> str | None:
        import ray

        now = time.monotonic()
        table = ray.util.placement_group_table()
        pending = [v for v in table.values() if v["state"] in ("PENDING", "RESCHEDULING")]
        # Ray Train may give up on a group and ask again with a new one: what counts is how long
        # some group has been waiting without a break.
        self.since = (self.since or now) if pending else None
        if not pending or now - self.since < self.timeout_s:
            return None
        asked = _bundles(pending[-1]["bundles"])
        held = [_bundles(v["bundles"]) for v in table.values() if v["state"] == "CREATED"]
        free = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
        total = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        return (
            f"workers could not be placed for {self.timeout_s:.0f} s: asked for {asked}; the "
            f"cluster has {total}, {free} free; held by {len(held)} placement group(s) "
            f"{'; '.join(held) or '(none)'}; ask for fewer workers or GPUs, or raise "
            "placement_timeout_s if nodes are still joining"
        )


def _bundles(bundles: dict) -> str:
    counts: dict[str, int] = {}
    for bundle in bundles.values():
        key = ", ".join(f"{k} {v:g}" for k, v in sorted(bundle.items()) if k in ("CPU", "GPU"))
        counts[key or "no CPU/GPU"] = counts.get(key or "no CPU/GPU", 0) + 1
    return " + ".join(f"{n} x {{{k}}}" for k, n in counts.items())


def kill_train_controllers() -> int:
    """Kill this job's live Ray Train controllers, so a ``fit()`` waiting on one returns (with
    an actor error). Ray Train's own abort waits for a controller stuck in scheduling."""
    import ray
    from ray._private.state import state

    job = ray.get_runtime_context().get_job_id()
    core = ray._private.worker.global_worker.core_worker
    killed = 0
    for actor_id, actor in state.actor_table(None).items():
        mine = actor.get("JobID") == job and actor.get("State") == "ALIVE"
        if mine and actor.get("ActorClassName") == "TrainController":
            core.kill_actor(ray.ActorID(bytes.fromhex(actor_id)), True)
            killed += 1
    return killed
