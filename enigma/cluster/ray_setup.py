"""Start or join Ray quietly: the cluster at ``RAY_ADDRESS`` when set, else a local one."""

from __future__ import annotations

import logging
import os
import signal
import threading

from . import ray_internals


def init_ray(num_cpus: int | None = None, object_store_memory: int | None = None, **kwargs) -> None:
    """``object_store_memory`` applies only to a local cluster started here."""
    import ray

    # A local cluster with token auth on says so at every start; the CLI is not the place.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR
    )
    if not ray.is_initialized():
        # "local": a cluster of its own; with no address Ray would join one that `ray start`
        # left on this machine, and a command that thinks it started it would shut it down
        address = os.environ.get("RAY_ADDRESS") or "local"
        joins = address != "local"
        local = {} if joins else {"num_cpus": num_cpus, "include_dashboard": False}
        if object_store_memory and not joins:
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
    nothing. Ray has no setting for it (see :mod:`enigma.cluster.ray_internals`). Every other
    raylet message (a worker that died, out of memory) still reaches the console.
    """
    ray_internals.filter_raylet_lines(lambda line: WORKER_START_WARNING in line)


def quiet_ray_data() -> None:
    """Our own progress bars and lines replace Ray Data's per-operator chatter."""
    from ray.data import DataContext

    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
