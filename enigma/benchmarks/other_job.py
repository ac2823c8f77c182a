"""Another job on the cluster, as on any cluster that is shared: a second driver holding a
placement group whose creating actor it killed (Ray keeps such a group while its job lives) and a
request the cluster can never place. What shares a cluster with it must finish, and leave both
alone. Used by ``enigma bench faults`` and the sweep tests."""

from __future__ import annotations

import json
import subprocess
import sys

RESOURCE = "other_job"  # a resource only the other job uses, so it holds nothing of ours

DRIVER = """
import json, sys, ray
from ray.util.placement_group import placement_group
ray.init(address=sys.argv[1], log_to_driver=False)

hold, ask = json.loads(sys.argv[2]), json.loads(sys.argv[3])

@ray.remote(num_cpus=0)
class Maker:
    def make(self):
        group = placement_group([hold])
        ray.get(group.ready())
        return group.id.hex()

maker = Maker.remote()
created = ray.get(maker.make.remote())
ray.kill(maker)  # its creator is dead; the group lives as long as this job
pending = placement_group([ask])  # more than the cluster has: pending for ever
print(json.dumps({"created": created, "pending": pending.id.hex()}), flush=True)
sys.stdin.readline()
"""


class OtherJob:
    """``with OtherJob(address) as job:`` runs the other driver on the cluster at ``address``
    for the block: it holds a group of ``hold`` (by default a resource only it uses: start the
    cluster with ``resources={RESOURCE: 1}``) and asks for ``ask``, more than the cluster has;
    ``job.intact()`` says whether its groups are still as it left them."""

    def __init__(self, address: str, hold: dict | None = None, ask: dict | None = None):
        self.address, self.proc, self.groups = address, None, {}
        self.hold, self.ask = hold or {RESOURCE: 1}, ask or {"CPU": 1024}

    def __enter__(self) -> OtherJob:
        cmd = [sys.executable, "-c", DRIVER, self.address, json.dumps(self.hold),
               json.dumps(self.ask)]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.groups = json.loads(self.proc.stdout.readline())
        return self

    def intact(self) -> dict[str, bool]:
        from ..cluster import ray_internals

        states = {g.id: g.state for g in ray_internals.placement_groups()}
        return {
            "created_group_kept": states.get(self.groups["created"]) == "CREATED",
            "pending_request_kept": states.get(self.groups["pending"]) == "PENDING",
        }

    def __exit__(self, *exc) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
