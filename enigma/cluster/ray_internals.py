"""Every private Ray interface the project uses, in one place (checked against Ray 2.60.0).

Ray's public API covers what a run asks for; a few things a good citizen of a shared cluster must
do are only reachable through Ray's internals. Each is wrapped here, with what it relies on:

- ``ray._private.state.state._connect_and_get_accessor().get_placement_group_table()`` returns
  the GCS placement-group table as serialized ``gcs_pb2.PlacementGroupTableData``, whose fields
  ``creator_job_id``, ``creator_actor_id``, ``creator_actor_dead``, ``is_detached``, ``state``
  and ``bundles[].unit_resources`` say whose a group is and what it holds, with or without the
  dashboard. The public ``ray.util.placement_group_table()`` leaves out the creating job.
- ``ray.util.placement_group.PlacementGroup(PlacementGroupID)`` builds a handle from a group's id,
  so that ``remove_placement_group`` can free a group whose creator (a killed Train controller)
  is gone.
- ``ray._private.state.state.actor_table(None)`` lists actors with ``JobID``, ``State`` and
  ``ActorClassName``; ``global_worker.core_worker.kill_actor(ActorID, no_restart)`` kills one by
  id (``ray.kill`` needs a handle, which a driver does not have for Train's controller).
- ``ray._private.worker.print_to_stdstream`` is how a driver prints raylet messages; wrapping it
  drops the "worker processes have been started" warnings a sweep triggers by design.
- Ray Train V2 keeps the checkpoints a run reported in ``RUN/checkpoint_manager_snapshot.json``
  (a pydantic ``_CheckpointManagerState``: ``checkpoint_results`` and the parallel
  ``checkpoint_report_indices``, ``latest_checkpoint_result``, and three lists of names) and
  restores it when a run of the same name starts again.

Everything else (``ray.get_runtime_context().get_job_id()``, resources, ``ray.init``) is public.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"


@dataclass(frozen=True)
class GroupInfo:
    """One placement group, as the GCS table has it."""

    id: str  # hex
    state: str  # PENDING, PREPARED, CREATED, RESCHEDULING, REMOVED
    job: str  # hex id of the job that created it
    by_actor: bool  # created by an actor (a Train controller), not by a driver
    creator_dead: bool
    detached: bool
    bundles: tuple[dict, ...]


def current_job() -> str:
    import ray

    return ray.get_runtime_context().get_job_id()


def placement_groups() -> list[GroupInfo]:
    """Every placement group on the cluster, any job's."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    table = gcs_pb2.PlacementGroupTableData
    found = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = table.FromString(raw)
        found.append(
            GroupInfo(
                id=pg.placement_group_id.hex(),
                state=table.PlacementGroupState.Name(pg.state),
                job=pg.creator_job_id.hex(),
                # A group made by a driver (Tune's trial groups) has the nil actor id (0xff bytes).
                by_actor=pg.creator_actor_id.strip(b"\xff") != b"",
                creator_dead=pg.creator_actor_dead,
                detached=pg.is_detached,
                bundles=tuple(dict(b.unit_resources) for b in pg.bundles),
            )
        )
    return found


def remove_placement_group(hex_id: str) -> None:
    import ray
    from ray.util.placement_group import PlacementGroup
    from ray.util.placement_group import remove_placement_group as remove

    remove(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(hex_id))))


def job_actor_ids(class_name: str) -> list[str]:
    """Live actors of this job whose class is ``class_name`` (hex ids)."""
    from ray._private.state import state

    job = current_job()
    return [
        actor_id
        for actor_id, actor in state.actor_table(None).items()
        if actor.get("JobID") == job
        and actor.get("State") == "ALIVE"
        and actor.get("ActorClassName") == class_name
    ]


def kill_actor(hex_id: str) -> None:
    import ray

    core = ray._private.worker.global_worker.core_worker
    core.kill_actor(ray.ActorID(bytes.fromhex(hex_id)), True)


def filter_raylet_lines(drop) -> None:
    """Raylet messages printed on this driver leave out the lines for which ``drop(line)``."""
    import ray._private.worker as ray_worker

    original = ray_worker.print_to_stdstream
    if getattr(original, "enigma_filter", False):
        return

    def filtered(data, ignore_prefix):
        lines = [x for x in data.get("lines", []) if not drop(x)]
        if lines:
            original({**data, "lines": lines}, ignore_prefix)

    filtered.enigma_filter = True
    ray_worker.print_to_stdstream = filtered


def forget_checkpoints(fs, run_path: str, names: set[str]) -> bool:
    """Take the checkpoints called ``names`` out of Ray Train's record of the run at
    ``run_path`` (on pyarrow file system ``fs``), so that a run started again under the same name
    neither offers them to its workers nor deletes a later checkpoint of the same name as an old
    one. True when the record named any of them."""
    path = f"{run_path}/{TRAIN_SNAPSHOT}"
    try:
        with fs.open_input_stream(path) as f:
            snapshot = json.loads(f.read())
    except FileNotFoundError:
        return False
    kept = [
        (result, index)
        for result, index in zip(
            snapshot["checkpoint_results"], snapshot["checkpoint_report_indices"], strict=True
        )
        if result["checkpoint_dir_name"] not in names
    ]
    if len(kept) == len(snapshot["checkpoint_results"]):
        return False
    snapshot["checkpoint_results"] = [result for result, _ in kept]
    snapshot["checkpoint_report_indices"] = [index for _, index in kept]
    latest = snapshot.get("latest_checkpoint_result")
    if latest and latest["checkpoint_dir_name"] in names:
        snapshot["latest_checkpoint_result"] = kept[-1][0] if kept else None
    for key in (
        "validated_checkpoint_dir_names",
        "timed_out_validation_checkpoint_dir_names",
        "failed_validation_checkpoint_dir_names",
    ):
        snapshot[key] = [n for n in snapshot.get(key, []) if n not in names]
    _write_whole(fs, path, json.dumps(snapshot).encode())
    return True


def recorded_checkpoints(fs, run_path: str) -> set[str]:
    """The checkpoint directory names Ray Train's record of the run at ``run_path`` holds."""
    try:
        with fs.open_input_stream(f"{run_path}/{TRAIN_SNAPSHOT}") as f:
            snapshot = json.loads(f.read())
    except FileNotFoundError:
        return set()
    return {r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results", [])}


def _write_whole(fs, path: str, data: bytes) -> None:
    """Replace the file ``path`` so that a reader, or a kill, meets the old or the new content,
    never a truncated one: a temporary file renamed over it locally; on an object store one PUT
    already lands whole."""
    import pyarrow.fs as pafs

    if not isinstance(fs, pafs.LocalFileSystem):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    import os

    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
