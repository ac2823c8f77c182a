"""Shared storage: a run writes its checkpoints, TensorBoard events and model to an S3 bucket
(moto's S3 server on loopback, reached through the standard AWS_* variables) and resumes from it
on a machine that has never seen the run."""

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
from conftest import UNINTERRUPTED

from enigma.cli import main
from enigma.train.config import build_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def bucket():
    """moto's S3 server with a bucket ``runs``; the AWS_* variables point at it before the
    module's Ray cluster starts, so its workers inherit them as a cluster's nodes would."""
    import boto3
    import ray

    from enigma.cluster.ray_setup import init_ray

    if ray.is_initialized():  # a session fixture's cluster, started without these variables
        ray.shutdown()
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    client = boto3.client("s3")
    for _ in range(100):
        try:
            client.create_bucket(Bucket="runs")
            break
        except Exception:  # the server is still starting
            time.sleep(0.1)
    init_ray(num_cpus=2)
    yield client
    ray.shutdown()
    server.terminate()
    server.wait()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def run(data, out, ds, *sets, storage=None):
    from enigma.train.driver import train

    sets = [*UNINTERRUPTED, *sets]
    cfg = build_config("tiny", sets=sets, data=str(data), ds_config=ds, workers=1,
                       output_dir=str(out), storage_path=storage)  # fmt: skip
    return train(cfg)


def keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket="runs", Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_resume_from_the_bucket_on_a_machine_that_never_saw_the_run(
    bucket, data, tmp_path, fp32_zero2, fp32_baseline, capsys
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = tmp_path / "machine-a"
    run(data, first, fp32_zero2, "stop_at_step=10", storage="s3://runs/run")
    assert keys(bucket, "run/ray/train/step-0000010/")
    shutil.rmtree(first)  # the first machine is gone
    capsys.readouterr()
    rest = run(data, tmp_path / "machine-b", fp32_zero2, storage="s3://runs/run")
    assert "resuming from s3://runs/run/ray/train/step-0000010 (step 10)" in capsys.readouterr().out
    assert rest["steps"] == 20 and rest["sample"]
    assert rest["model_dir"] == "s3://runs/run/model"
    model_files = {k.rsplit("/", 1)[-1] for k in keys(bucket, "run/model/")}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= model_files
    events = tmp_path / "events"
    events.mkdir()
    for key in [k for k in keys(bucket, "run/tensorboard/") if not k.endswith("/")]:
        bucket.download_file("runs", key, str(events / key.rsplit("/", 1)[-1]))
    acc = EventAccumulator(str(events))
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert sorted(logged) == list(range(1, 21)), "both machines' events, in the bucket"
    for step in range(11, 21):
        assert abs(logged[step] - fp32_baseline[step]) < 1e-4, (step, logged[step])


def test_storage_that_cannot_be_written_stops_in_one_line(bucket, data, tmp_path, capsys):
    argv = ["train", "--preset", "tiny", "--data", str(data), "--set", "seq_len=64"]
    argv += ["--output-dir", str(tmp_path), "--storage-path", "s3://no-such-bucket/run"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "s3://no-such-bucket/run is not writable" in err
