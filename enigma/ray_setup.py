"""Start or join Ray quietly: the cluster at ``RAY_ADDRESS`` when set, else a local one."""

from __future__ import annotations

import logging
import os


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
    quiet_ray_data()


def quiet_ray_data() -> None:
    """Our own progress bars and lines replace Ray Data's per-operator chatter."""
    from ray.data import DataContext

    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
