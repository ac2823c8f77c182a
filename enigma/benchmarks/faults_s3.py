"""The S3 part of ``enigma bench faults``: a driver killed outright, and the run taken up from
another machine once its lease has lapsed; rank 0 killed inside a model swap into the bucket.

moto's S3 server runs on loopback (``moto[server]``, the dev dependencies), named in the URI's
query as MinIO users name theirs. The run is the faulty run's command with ``--storage-path``:

1. started from output directory ``a``, its driver SIGKILLed at a step (no lock released, no
   shutdown); its lock object is then rewritten once as a driver on another host writes it
   (this host cannot see that host's processes: only the lease can tell);
2. run again from output directory ``b`` (another machine), which waits out the lease (a short
   term here, ``ENIGMA_LEASE_S``), takes the lock over naming the old holder, resumes from the
   bucket, and has rank 0 killed once inside its first model swap (after the old model was
   emptied, before the new one was copied in); Ray restarts the workers and the run finishes.

Reported: the take-over, the resume, the finished run, its losses against the undisturbed
run's, and whether the model in the bucket loads.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

LEASE_S = 6


def _moto() -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return server, port


def _client(port: int):
    import boto3

    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id="test",
                          aws_secret_access_key="test", region_name="us-east-1")  # fmt: skip
    for _ in range(100):
        try:
            client.create_bucket(Bucket="runs")
            return client
        except Exception:  # the server is still starting
            time.sleep(0.1)
    raise RuntimeError("moto's S3 server did not start")


def as_another_host(client) -> dict:
    """Rewrite the lock object once as a driver on another host would have written it."""
    found = client.get_object(Bucket="runs", Key="faults/.lock")
    record = json.loads(found["Body"].read())
    record.update(host="another-machine", boot_id="another-kernel", pid_ns=0)
    client.put_object(Bucket="runs", Key="faults/.lock", Body=json.dumps(record).encode())
    return record


def bucket_losses(client, work: Path) -> dict[int, list[float]]:
    """Every run's TensorBoard events in the bucket, read as one curve."""
    import logging

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.ERROR)
    events = work / "s3-events"
    events.mkdir(exist_ok=True)
    pages = client.get_paginator("list_objects_v2").paginate(
        Bucket="runs", Prefix="faults/tensorboard"
    )
    for key in [o["Key"] for p in pages for o in p.get("Contents", []) if "tfevents" in o["Key"]]:
        client.download_file("runs", key, str(events / key.rsplit("/", 1)[-1]))
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    by_step: dict[int, list[float]] = {}
    for event in acc.Scalars("train/loss"):
        by_step.setdefault(event.step, []).append(event.value)
    return by_step


def model_loads(client, work: Path) -> bool:
    from ..inference.generate import load_model

    local = work / "s3-model"
    local.mkdir(exist_ok=True)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket="runs", Prefix="faults/model/")
    for key in [
        o["Key"] for p in pages for o in p.get("Contents", []) if not o["Key"].endswith("/")
    ]:
        client.download_file("runs", key, str(local / key.rsplit("/", 1)[-1]))
    try:
        load_model(str(local))
        return True
    except Exception:
        return False


def s3_scenario(command, run_until, env: dict, work: Path, kill_at: int) -> tuple[dict, dict]:
    """Runs the scenario; ``command(out)`` is the train command for output directory ``out``
    (without ``--storage-path``), ``run_until`` the faults benchmark's runner. Returns the
    outcome and the bucket's losses."""
    server, port = _moto()
    try:
        client = _client(port)
        uri = f"s3://runs/faults?scheme=http&endpoint_override=127.0.0.1:{port}"
        env = {**env, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
               "AWS_DEFAULT_REGION": "us-east-1", "ENIGMA_LEASE_S": str(LEASE_S)}  # fmt: skip
        env.pop("AWS_ENDPOINT_URL", None)
        env.pop("ENIGMA_FAULTS", None)
        log = work / "s3.log"
        storage = ["--storage-path", uri]
        first = run_until([*command(work / "s3-a"), *storage], env, log, kill_at, signal.SIGKILL)
        old = as_another_host(client)
        swap = {**env, "ENIGMA_FAULTS": json.dumps({"kill_in_model_swap": "empty"})}
        start = time.monotonic()
        second = run_until([*command(work / "s3-b"), *storage], swap, log, None)
        text = log.read_text()
        outcome = {
            "driver_sigkilled": first == -signal.SIGKILL,
            "lease_taken_over": f"taking over the lock of {uri}" in text
            and f"pid {old['pid']} on another-machine" in text,
            "resumed_from_bucket": "resuming from s3://runs/faults/ray/train/step-" in text,
            "killed_in_model_swap": (work / "s3-b" / ".fault-injected-swap-model").is_file(),
            "finished": second == 0 and "=== done ===" in text,
            "rerun_seconds": round(time.monotonic() - start, 1),
            "lease_term_s": LEASE_S,
        }
        outcome["model_loads"] = model_loads(client, work)
        return outcome, bucket_losses(client, work)
    finally:
        server.terminate()
        server.wait()
