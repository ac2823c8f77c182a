"""The lease part of ``enigma bench faults``: a driver whose store stalls, and a driver paused
past its term, each while a run on another machine takes over (moto's S3 on loopback, a short
term, ``ENIGMA_LEASE_S``).

Each driver ``a`` runs in a PID namespace of its own (``unshare -pf``), as on another host: the
taker can judge it by its lease alone. One worker a run, so that a taker's worker fits beside
the old run's on the benchmark's 2-CPU cluster.

1. **Stalled store.** ``a`` reaches the bucket through a proxy that, after its first checkpoint,
   stops answering (connections held open, as a store or a network that hangs): ``a`` must end
   on its own before a taker could start (its lease expires two thirds of a term after its last
   renewal that went through); ``b`` then takes the lease over, resumes and finishes; nothing
   ``a`` sent after the stall ever lands.
2. **Paused past its term.** ``a`` is stopped (SIGSTOP, its driver only: its workers run on);
   ``b`` takes the lease over as a new generation, resumes from ``a``'s newest checkpoint and
   finishes while ``a``'s workers still train; then ``a`` is continued. Fenced: the fence names
   generation 2, trusts ``a``'s run up to the step ``b`` resumed from, the newest trusted
   checkpoint is ``b``'s last and the model in the bucket is ``b``'s; ``a`` ends without writing
   over any of it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

LEASE_S = 6
# Long enough that the old run's workers, which the pause does not stop, are still training when
# the taker has waited out the lease and started (they would otherwise finish the run first).
STEPS = 120


class StallingProxy:
    """A TCP forwarder to ``127.0.0.1:port`` that, once :meth:`stall` is called, forwards nothing
    more in either direction and keeps every connection open."""

    def __init__(self, port: int):
        self.target, self.stalled = port, threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.sockets: list[socket.socket] = [self.server]
        threading.Thread(target=self._accept, daemon=True).start()

    def stall(self) -> None:
        self.stalled.set()

    def release(self) -> None:
        """Forward what was held: requests a dead run sent before the stall land now, late."""
        self.stalled.clear()

    def close(self) -> None:
        for s in self.sockets:
            s.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                while self.stalled.is_set():
                    time.sleep(0.5)  # held: neither forwarded nor closed
                dst.sendall(data)
        except OSError:
            pass


def _uri(prefix: str, port: int) -> str:
    return f"s3://runs/{prefix}?scheme=http&endpoint_override=127.0.0.1:{port}"


def _one_worker(command: list[str]) -> list[str]:
    """One worker, :data:`STEPS` steps, one evaluation and export (at the end)."""
    cmd = list(command)
    cmd[cmd.index("--workers") + 1] = "1"
    cmd[cmd.index("--max-steps") + 1] = str(STEPS)
    return [*cmd, "--set", "max_failures=1", "--set", f"eval_steps={STEPS}"]


def _start(cmd: list[str], env: dict, log: Path, apart: bool) -> subprocess.Popen:
    """``cmd`` in a session of its own (``apart``: and a PID namespace of its own)."""
    with open(log, "a") as sink:
        sink.write(f"$ {' '.join(cmd)}\n")
    prefix = ["unshare", "-pf"] if apart else []
    return subprocess.Popen([*prefix, *cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, start_new_session=True)  # fmt: skip


def _until_step(proc: subprocess.Popen, log: Path, step: int) -> None:
    """Copy ``proc``'s output to ``log`` until its progress line for ``step``."""
    with open(log, "a") as sink:
        for line in proc.stdout:
            sink.write(line)
            if line.startswith("step") and int(line.split()[1].split("/")[0]) >= step:
                return


def _drain(proc: subprocess.Popen, log: Path, timeout: float) -> int | None:
    """The rest of ``proc``'s output into ``log``; its exit code, None if it outlives
    ``timeout``."""

    def copy() -> None:
        with open(log, "a") as sink:
            for line in proc.stdout:
                sink.write(line)

    reader = threading.Thread(target=copy, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None
    reader.join(5)
    return code


def _trusted(prefix: str, port: int) -> tuple[dict, list[str]]:
    """The run's fence and its trusted checkpoints (``train-gN/step-M``), oldest first."""
    from ..storage import fence as fences
    from ..storage.store import Storage

    storage = Storage.at(_uri(prefix, port))
    fence, _ = fences.read(storage)
    found = fences.checkpoints(storage, fence)
    return json.loads(fence.to_json()), ["/".join(c.parts[1:]) for c in found]


def _landed_after(client, prefix: str, when: float) -> int:
    """Checkpoint files under ``prefix/ray/train/step-*/`` last written after wall-clock time
    ``when``."""
    from ..storage import fence as fences

    pages = client.get_paginator("list_objects_v2").paginate(
        Bucket="runs", Prefix=f"{prefix}/ray/train/"
    )
    return sum(o["LastModified"].timestamp() > when for p in pages for o in p.get("Contents", [])
               if fences.step_of(o["Key"].split("/")[3]) is not None)  # fmt: skip


def _refusals(uri: str) -> int | None:
    """How many times a worker's checkpoint or export was refused by the fence of ``uri``: the
    old run's workers print to its paused driver, so their own logs in the local cluster's
    session (Ray's default place) are read."""
    logs = Path("/tmp/ray/session_latest/logs")
    if not logs.is_dir():
        return None
    said = f"Fenced: generation 2 of {uri}"
    return sum(f.read_text(errors="replace").count(said) for f in logs.glob("worker-*.err"))


def _beyond_cut(client, prefix: str, cut: int) -> list[str]:
    """The old generation's checkpoints past the step the taker resumed from (what it wrote
    while the taker started, at most the one it was writing when the fence moved)."""
    from ..storage import fence as fences

    pages = client.get_paginator("list_objects_v2").paginate(
        Bucket="runs", Prefix=f"{prefix}/ray/train/"
    )
    names = {o["Key"].split("/")[3] for p in pages for o in p.get("Contents", [])}
    return sorted(n for n in names if (fences.step_of(n) or 0) > cut)


def _late_writes(client, prefix: str, when: float) -> dict:
    """What landed in the run after wall-clock ``when`` (the held requests of a dead run,
    released late): where each went, and whether anything a reader trusts is among it."""
    from ..storage import fence as fences
    from ..storage.store import Storage

    pages = client.get_paginator("list_objects_v2").paginate(Bucket="runs", Prefix=f"{prefix}/")
    keys = [o["Key"] for p in pages for o in p.get("Contents", [])
            if o["LastModified"].timestamp() > when]  # fmt: skip
    port = client.meta.endpoint_url.rsplit(":", 1)[1]
    fence, _ = fences.read(Storage.at(_uri(prefix, int(port))))
    trusted = []
    for key in keys:
        parts = key.split("/")
        generation = fences.generation_of(parts[2]) if len(parts) > 3 else None
        step = fences.step_of(parts[3]) if len(parts) > 3 else None
        if generation is not None and step is not None and fence.trusts(generation, step):
            trusted.append(key)
    return {"keys": sorted(keys), "in_trusted_checkpoints": trusted}


def stalled_store(command, env: dict, work: Path, port: int, client, step: int) -> dict:
    """Scenario 1 (see the module)."""
    proxy, log = StallingProxy(port), work / "lease-stalled.log"
    try:
        a = _start([*_one_worker(command(work / "stalled-a")), "--storage-path",
                    _uri("stalled", proxy.port)], env, log, apart=True)  # fmt: skip
        _until_step(a, log, step)
        proxy.stall()
        stalled_at, wall = time.monotonic(), time.time()
        code_a = _drain(a, log, timeout=10 * LEASE_S)
        ended_after = round(time.monotonic() - stalled_at, 1)
        b = _start([*_one_worker(command(work / "stalled-b")), "--storage-path",
                    _uri("stalled", port)], env, log, apart=False)  # fmt: skip
        code_b = _drain(b, log, timeout=600)
        finished = time.time()
        proxy.release()  # the old run's held requests reach the store now, after the taker
        time.sleep(3.0)
        late = _late_writes(client, "stalled", finished)
    finally:
        proxy.close()
    text = log.read_text()
    fence, trusted = _trusted("stalled", port)
    return {
        "a_exit_code": code_a,
        "a_said_its_lease_expired": "expired (not renewed for" in text,
        "a_ended_s_after_the_stall": ended_after,
        # its last good renewal went out at most a beat (term/6) before the stall: no taker
        # before stall + 5/6 of the term
        "a_ended_before_a_taker_could_start": code_a is not None and ended_after < LEASE_S * 5 / 6,
        "b_took_over": "taking over the lock of" in text,
        "b_resumed": "resuming from s3://runs/stalled/ray/train/step-" in text,
        "b_finished": code_b == 0 and "=== done ===" in text,
        "fence": fence,
        "newest_trusted_checkpoint": trusted[-1] if trusted else None,
        "objects_from_a_after_the_stall": _landed_after(client, "stalled", wall + 1.0),
        "held_requests_released_after_the_taker_finished": late,
    }


def paused_past_its_term(command, env: dict, work: Path, port: int, client, step: int) -> dict:
    """Scenario 2 (see the module)."""
    log, uri = work / "lease-paused.log", _uri("paused", port)
    a = _start([*_one_worker(command(work / "paused-a")), "--storage-path", uri], env, log,
               apart=True)  # fmt: skip
    _until_step(a, log, step)
    os.killpg(a.pid, signal.SIGSTOP)
    paused = time.monotonic()
    b = _start([*_one_worker(command(work / "paused-b")), "--storage-path", uri], env, log,
               apart=False)  # fmt: skip
    code_b = _drain(b, log, timeout=600)
    paused_for = round(time.monotonic() - paused, 1)
    os.killpg(a.pid, signal.SIGCONT)
    code_a = _drain(a, log, timeout=120)
    if code_a is None:
        os.killpg(a.pid, signal.SIGKILL)
    text = log.read_text()
    fence, trusted = _trusted("paused", port)
    card = client.get_object(Bucket="runs", Key="paused/model/README.md")["Body"].read().decode()
    return {
        "a_paused_s": paused_for,
        "b_took_over_as_generation_2": "starts generation 2" in text,
        "b_finished": code_b == 0 and "=== done ===" in text,
        "a_exit_code": code_a,
        "a_refused_by_the_fence": _refusals("s3://runs/paused"),
        "a_checkpoints_after_the_cut": _beyond_cut(client, "paused", fence["cuts"].get("1", 0)),
        "a_stopped_on_its_lease": "is no longer ours" in text or "expired (not renewed" in text,
        "fence": fence,
        "newest_trusted_checkpoint": trusted[-1] if trusted else None,
        "model_is_b_s": "paused-b" in card and "paused-a" not in card,
    }


def apart_works() -> bool:
    """Whether ``unshare -pf`` (a PID namespace of one's own) is permitted here."""
    return subprocess.run(["unshare", "-pf", "true"], capture_output=True).returncode == 0


def lease_scenarios(command, env: dict, work: Path, step: int) -> dict:
    """Both scenarios on a moto server of their own; ``command(out)`` is the train command for
    output directory ``out`` (without ``--storage-path``), ``step`` one past the first
    checkpoint."""
    from .faults_s3 import _client, _moto

    if not apart_works():
        return {"skipped": "unshare -pf is not permitted here (the old driver must look like "
                "another host's)"}  # fmt: skip
    env = {**env, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "ENIGMA_LEASE_S": str(LEASE_S)}  # fmt: skip
    for name in ("AWS_ENDPOINT_URL", "ENIGMA_FAULTS"):
        env.pop(name, None)
    server, port = _moto()
    try:
        client = _client(port)
        return {
            "lease_term_s": LEASE_S,
            "stalled_store": stalled_store(command, env, work, port, client, step),
            "paused_past_its_term": paused_past_its_term(command, env, work, port, client, step),
        }
    finally:
        server.terminate()
        server.wait()
