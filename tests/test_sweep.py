"""`enigma tune`, scaled down: a 4-trial ASHA sweep of two waves with its tables, plot, hparams
and best.json (which `enigma train --config` accepts), and a sweep whose driver is killed and then
restored.

The module's cluster is shared with another job, as on a real cluster: a second driver holds a
placement group whose creating actor it killed, and a request the cluster can never place. Every
sweep and run here must finish (placement timeout 20 s) and leave that job's groups alone."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, SMALL_RUN, own_ray_cluster

from enigma.cli import main
from enigma.train.sweep import parse_grid, parse_lr, parse_ranges

SETS = [*SMALL_RUN, "eval_steps=2", "log_steps=2", "lr=2e-3", "placement_timeout_s=20"]


@pytest.fixture(scope="module", autouse=True)
def other_job():
    """A 2-CPU cluster (plus the other job's resource) and the other job's driver on it."""
    import ray

    from enigma.benchmarks.other_job import RESOURCE, OtherJob
    from enigma.cluster.ray_setup import init_ray

    own_ray_cluster()
    init_ray(num_cpus=2, resources={RESOURCE: 1})
    with OtherJob(ray.get_runtime_context().gcs_address) as job:
        yield job
    ray.shutdown()


def other_groups_intact(job) -> None:
    assert job.intact() == {"created_group_kept": True, "pending_request_kept": True}


def sweep_argv(data, out, *extra):
    argv = ["tune", "--preset", "tiny", "--data", str(data), "--output-dir", str(out)]
    argv += ["--grid", "num_rev_blocks=0,2", "--max-steps", "4", *extra]
    return argv + [x for s in SETS for x in ("--set", s)]


def test_asha_sweep_of_two_waves_outputs_best_json_and_never_stalls(
    data, tmp_path, capsys, other_job
):
    """4 trials, 2 at a time: two waves, the second placed after the first has ended. ASHA stops
    trials mid-run; their Train workers' placement groups must be freed, or the second wave
    waits for ever (it did, before ended trials' groups were released). Then the tables, plot,
    per-trial curves and best.json, which `enigma train --config` accepts."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from enigma.cluster.placement import job_groups, orphaned_placement_groups

    out = tmp_path / "sweep"
    # A full-length warmup learns far less by the first rung: ASHA stops those trials there.
    argv = sweep_argv(data, out, "--max-steps", "6")
    argv[argv.index("num_rev_blocks=0,2") + 1 : argv.index("num_rev_blocks=0,2") + 1] = [
        "warmup_ratio=0.01,1.0"
    ]
    start = time.monotonic()
    assert main(argv) == 0
    console = capsys.readouterr()
    assert "2 at a time" in console.out and "released" in console.out
    # Quiet: no Tune configuration box or paths, no raylet worker-start warnings.
    for noise in ("Configuration for experiment", "View detailed results", "have been started"):
        assert noise not in console.out + console.err, noise
    assert time.monotonic() - start < 480
    assert not job_groups() and not orphaned_placement_groups(), "every trial's workers released"

    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 4 and {r["num_rev_blocks"] for r in rows} == {"0", "2"}
    assert all(r["error"] == "False" and float(r["tokens_per_sec"]) > 0 for r in rows)
    stopped = [r for r in rows if r["asha_stopped"] == "True"]
    assert stopped, "ASHA stopped the slow-warmup trials at a rung"
    for r in rows:
        if r["asha_stopped"] == "False":
            assert int(r["steps"]) == 6 and float(r["best_val_ppl"]) < 21128  # learnt something
    params = {r["num_rev_blocks"]: int(r["params"]) for r in rows}
    assert params["2"] > params["0"]  # the machine's blocks add parameters
    table = (out / "results.md").read_text()
    assert "At equal steps" in table and "At equal wall time" in table
    assert "| 0 |" in table and "| 2 |" in table  # the plain Transformer row is there
    assert (out / "val_ppl_vs_knobs.png").stat().st_size > 1000
    runs = [p for p in (out / "tensorboard").iterdir() if p.is_dir()]
    assert len(runs) == 4
    acc = EventAccumulator(str(runs[0]))
    acc.Reload()
    assert "val/best_ppl" in acc.Tags()["scalars"]
    # Each trial wrote its own training curves, in a run named by its knobs.
    for r in rows:
        (named,) = (out / "trials" / r["trial"] / "tensorboard").iterdir()
        assert named.name.startswith(f"num_rev_blocks={r['num_rev_blocks']},"), named.name

    # Another sweep in the same directory must not restore this one.
    other = sweep_argv(data, out, "--scheduler", "fifo")
    other[other.index("num_rev_blocks=0,2")] = "num_rotors=0,2"
    assert main(other) == 2
    assert "holds a different sweep" in capsys.readouterr().err

    best = json.loads((out / "best.json").read_text())
    winner = min(rows, key=lambda r: float(r["best_val_ppl"]))
    assert best["model"]["num_rev_blocks"] == int(winner["num_rev_blocks"])
    argv = ["train", "--config", str(out / "best.json"), "--max-steps", "8"]
    start = time.monotonic()
    assert main([*argv, "--output-dir", str(tmp_path / "best")]) == 0
    assert "=== done ===" in capsys.readouterr().out
    assert time.monotonic() - start > 25, "long enough for the watch to have judged (20 s)"
    assert (tmp_path / "best" / "model" / "model.safetensors").is_file()
    other_groups_intact(other_job)


def test_a_sweep_beside_a_job_holding_room_runs_its_trials_in_turn(data, tmp_path, capsys):
    """Another job holds {CPU 0.1} and asks for {CPU 64}: of the 2 CPUs, 1.9 are free, room for
    one trial's worker. Both trials run, one after the other (the second waits for room rather
    than ending the sweep), and that job's groups stay as it left them."""
    import ray

    from enigma.benchmarks.other_job import OtherJob

    out = tmp_path / "queued"
    argv = sweep_argv(data, out, "--scheduler", "fifo")
    argv[argv.index("num_rev_blocks=0,2")] = "num_rotors=0,2"
    address = ray.get_runtime_context().gcs_address
    with OtherJob(address, hold={"CPU": 0.1}, ask={"CPU": 64}) as busy:
        assert main(argv) == 0
        assert busy.intact() == {"created_group_kept": True, "pending_request_kept": True}
    assert "1 at a time" in capsys.readouterr().out
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert sorted(r["num_rotors"] for r in rows) == ["0", "2"]
    assert all(r["error"] == "False" and int(r["steps"]) == 4 for r in rows)


@pytest.fixture
def bucket():
    from conftest import moto_server

    with moto_server(endpoint_in_env=False) as client:
        yield client


def test_killed_optuna_sweep_with_asha_is_restored_from_the_bucket_on_another_machine(
    data, tmp_path, bucket
):
    """2 trials chosen by Optuna (a discrete and a continuous knob), ASHA on top, one at a time,
    every lasting thing in an S3 bucket (moto's server); the driver is killed after the first,
    and the same command from another output directory (another machine's disk) restores the
    sweep from the bucket without training the finished trial again."""
    endpoint = bucket.meta.endpoint_url.removeprefix("http://")
    storage = f"s3://runs/sweep?scheme=http&endpoint_override={endpoint}"

    def command(out):
        argv = sweep_argv(data, out, "--max-concurrent", "1", "--search", "optuna")
        argv += ["--num-samples", "2", "--range", "warmup_ratio=uniform:0.05:0.5"]
        return [sys.executable, "-m", "enigma.cli", *argv, "--storage-path", storage]

    def objects(prefix: str) -> dict[str, str]:
        pages = bucket.get_paginator("list_objects_v2").paginate(Bucket="runs", Prefix=prefix)
        return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}

    cmd = command(tmp_path / "machine-a")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)  # its own cluster, which dies with its driver
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=env, cwd=ROOT, start_new_session=True)  # fmt: skip
    done_line, deadline = None, time.monotonic() + 300
    for line in first.stdout:
        if line.startswith("trial done"):
            done_line = line
            break
        assert time.monotonic() < deadline, "no trial finished in time"
    assert done_line, "the sweep ended before any trial finished"
    os.killpg(first.pid, signal.SIGKILL)  # the driver and the cluster it started
    first.wait()
    finished = done_line.split()[2]
    # The finished trial's events and reports, in the bucket: a new event file (or a changed
    # one) would say it trained again.
    before = objects(f"sweep/trials/{finished}/tensorboard/")
    assert before and objects(f"sweep/trials/{finished}/reports.json")
    assert not objects("sweep/results.csv")

    out = tmp_path / "machine-b"  # machine-a's disk is not there
    second = subprocess.run(command(out), capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=600)  # fmt: skip
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "restoring the interrupted sweep" in second.stdout
    assert objects(f"sweep/trials/{finished}/tensorboard/") == before
    assert objects("sweep/results.csv") and objects("sweep/best.json")
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 2 and {r["trial"] for r in rows} >= {finished}
    assert len({r["warmup_ratio"] for r in rows}) == 2  # Optuna drew each trial's warmup
    assert all(0.05 <= float(r["warmup_ratio"]) <= 0.5 for r in rows)
    for r in rows:  # ASHA (the default) may stop a trial at its first rung
        assert int(r["steps"]) in (2, 4) and r["asha_stopped"] == str(int(r["steps"]) < 4)
    assert "warmup_ratio" in (out / "results.md").read_text()
    assert (out / "val_ppl_vs_knobs.png").stat().st_size > 1000
    best = json.loads((out / "best.json").read_text())
    winner = min(rows, key=lambda r: float(r["best_val_ppl"]))
    assert best["warmup_ratio"] == pytest.approx(float(winner["warmup_ratio"]))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--grid", "num_rotorz=0,2"], "unknown config key 'num_rotorz'"),
        (["--grid", "num_rotors"], "expected key=v1,v2"),
        (["--grid", "num_rotors=zero"], "expected a int"),
        (["--lr", "loguniform:1e-3:1e-4"], "need 0 < LOW < HIGH"),
        (["--seeds", "0"], "at least 1"),
        (["--workers-per-trial", "3"], "use --workers-per-trial 2"),
        (["--range", "d=uniform:64:128"], "a model key takes discrete values; use --grid"),
        (["--range", "preset=uniform:0:1"], "preset is not a continuous knob"),
        (["--range", "warmup_ratio=normal:0:1"], "expected loguniform:LOW:HIGH or uniform"),
        (["--search", "optuna", "--seeds", "2"], "each Optuna trial is its own sample"),
        (["--search", "random", "--seeds", "3"], "each random trial is its own sample"),
    ],
)
def test_bad_sweep_input_is_one_line(data, tmp_path, capsys, argv, message):
    base = ["tune", "--preset", "tiny", "--data", str(data), "--output-dir", str(tmp_path)]
    assert main([*base, "--max-steps", "4", "--set", "seq_len=64", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "tune").exists()


def test_grid_and_lr_parsing():
    assert parse_grid(["num_rotors=0,2", "d=64,128"]) == {"num_rotors": [0, 2], "d": [64, 128]}
    assert parse_lr("3e-4") == pytest.approx(3e-4)
    domain = parse_lr("loguniform:1e-4:1e-3")
    assert 1e-4 <= domain.sample() <= 1e-3
    ranges = parse_ranges(["warmup_ratio=uniform:0.05:0.2", "weight_decay=loguniform:1e-4:1e-1"])
    assert 0.05 <= ranges["warmup_ratio"].sample() <= 0.2
    assert 1e-4 <= ranges["weight_decay"].sample() <= 1e-1


def test_ordering_check_compares_the_last_two_evaluations():
    import math

    from enigma.train.sweep_results import group_by_knobs, ordering_settled

    def row(knob, ppl_40, ppl_80):
        history = [
            {"step": 40, "val_loss": math.log(ppl_40)},
            {"step": 80, "val_loss": math.log(ppl_80)},
        ]
        return {"k": knob, "best_val_ppl": min(ppl_40, ppl_80), "history": history}

    same = [row(0, 500, 400), row(1, 520, 420), row(2, 540, 440)]
    line = ordering_settled(group_by_knobs(same, ["k"]), same)
    assert "step 40 against step 80" in line and "ρ = 1.00" in line
    swapped = [row(0, 500, 440), row(1, 520, 420), row(2, 540, 400)]
    assert "ρ = -1.00" in ordering_settled(group_by_knobs(swapped, ["k"]), swapped)
