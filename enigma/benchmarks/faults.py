"""``enigma bench faults``: a training run that is shot at, against the same run left alone.

Both runs are the same ``enigma train`` command (tiny, 2 workers, ZeRO-2 fp32, a checkpoint every
few steps), each in a fresh driver process, on a local Ray cluster this command starts and shares
with another job (:mod:`.other_job`: a placement group whose creator died, and a request the
cluster can never place; placement timeout 20 s). The faulty run gets seeded faults:

- worker kills at random steps (the last rank exits; Ray Train restarts the group from the last
  checkpoint),
- a SIGTERM to the driver at a random step in the first half, then the same command again,
- before that rerun, the newest checkpoint is truncated (the rerun must set it aside and resume
  from the one before, and go on past its step),
- the first rerun is SIGKILLed inside setting that checkpoint aside (between taking it out of
  Ray Train's record and moving it), and run again,
- a second SIGTERM two checkpoints later, and before the last rerun the newest checkpoint loses
  its model states (what an upload cut short leaves: the rerun must pass over it too).

And the same run on S3 (moto's server on loopback, the endpoint in the URI's query): its driver
is SIGKILLed mid-run, its lock left as a driver on another host would leave it, and the command
is run again from another output directory (another machine): it must wait out the lease, take
the lock over, resume from the bucket and finish; rank 0 is killed inside its first model swap
into the bucket, and the model there must load at the end. Then the lease part
(:mod:`.faults_lease`, ``--no-lease`` leaves it out): a driver whose store stalls must end before
a taker can start, and a driver paused past its term is fenced while another run finishes.

Reported: faults injected and survived, whether the other job's groups are intact, steps missing
from or logged twice in the final curve, steps trained again after restarts, and the largest
per-step difference of the training loss against the undisturbed run. In fp32 with the data
position in every checkpoint the two curves should agree to rounding. ``--no-reference`` leaves
the undisturbed run out (one run fewer) and compares each step trained again after a restart
with its first training instead: every restart here resumes from before where its run stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import InputError
from . import meta
from .faults_lease import lease_scenarios
from .faults_s3 import s3_scenario
from .train_overhead import fp32_ds_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help="prepared shards (default: 三国演义 at seq 64)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--save-every", type=int, default=5, help="steps between checkpoints")
    p.add_argument("--kills", type=int, default=3, help="worker kills at random steps")
    p.add_argument("--seed", type=int, default=0, help="where the faults fall")
    p.add_argument("--output-dir", default=None, help="default: a temporary directory")
    p.add_argument("--no-s3", dest="s3", action="store_false",
                   help="leave out the S3 part (its pieces have their own tests)")  # fmt: skip
    p.add_argument("--no-lease", dest="lease", action="store_false",
                   help="leave out the lease part (a stalled store, a driver paused past its "
                   "term: enigma/benchmarks/faults_lease.py)")  # fmt: skip
    p.add_argument("--no-reference", dest="reference", action="store_false",
                   help="compare the steps trained again after each restart with their first "
                   "training instead of running the undisturbed run (needs --no-s3)")  # fmt: skip
    p.add_argument("--json", dest="json_out", default=None)


def plan_faults(args) -> dict:
    """Distinct steps for the kills and the first SIGTERM in the first half of the run, none on a
    checkpoint step (a kill there would race the checkpoint it just wrote) nor before the first
    checkpoint; the second SIGTERM two checkpoints after the first, so that the second invocation
    writes checkpoints of its own (the newest of which the last rerun finds cut short)."""
    every = args.save_every
    free = [s for s in range(every + 1, args.steps // 2) if s % every]
    if len(free) < args.kills + 1:
        raise InputError(f"--steps {args.steps} leaves too few steps for {args.kills} kills")
    steps = random.Random(args.seed).sample(free, args.kills + 1)
    second = steps[-1] + 2 * every  # off the checkpoint steps, as the first is
    if second >= args.steps:
        raise InputError(f"--steps {args.steps} is too few for two restarts; use {second + every}")
    return {"kill_at_steps": sorted(steps[:-1]), "sigterm_at_steps": [steps[-1], second]}


def train_command(args, data: str, out: Path, ds_config: str) -> list[str]:
    sets = ["seq_len=64", "micro_batch=4", "grad_accum=2", "eval_batches=2", "log_steps=1",
            "shuffle_buffer=0", f"eval_steps={args.steps}", f"save_steps={args.save_every}",
            f"max_failures={args.kills + 1}", "sample_tokens=4",
            "placement_timeout_s=20"]  # fmt: skip
    cmd = [sys.executable, "-m", "enigma.cli", "train", "--preset", "tiny", "--data", data]
    cmd += ["--workers", "2", "--gpus-per-worker", "0", "--ds-config", ds_config]
    cmd += ["--output-dir", str(out), "--max-steps", str(args.steps)]
    return cmd + [x for s in sets for x in ("--set", s)]


def _env(address: str, faults: dict | None) -> dict:
    """Every run joins the shared cluster at ``address``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": address}
    if faults:
        env["ENIGMA_FAULTS"] = json.dumps({"kill_at_steps": faults["kill_at_steps"]})
    return env


def run_until(cmd: list[str], env: dict, log: Path, sigterm_at: int | None,
              sig: int = signal.SIGTERM) -> int:  # fmt: skip
    """Run ``cmd``; with ``sigterm_at``, send ``sig`` (SIGTERM) once its progress line for that
    step is printed. Returns the exit code; the output goes to ``log``."""
    with open(log, "a") as sink:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, start_new_session=True)  # fmt: skip
        for line in proc.stdout:
            sink.write(line)
            if (
                sigterm_at
                and line.startswith("step")
                and int(line.split()[1].split("/")[0]) >= (sigterm_at)
            ):
                proc.send_signal(sig)
                sigterm_at = None
        return proc.wait()


def corrupt_latest(out: Path) -> str:
    """Truncate an optimizer shard of the newest checkpoint; returns the checkpoint's name."""
    latest = sorted((out / "ray" / "train").glob("step-*"))[-1]
    shard = sorted((latest / "ds").glob("*optim_states.pt"))[0]
    shard.write_bytes(shard.read_bytes()[:4096])
    return latest.name


def cut_short(out: Path) -> str:
    """Remove the newest checkpoint's model states, as an upload cut short leaves it (the
    optimizer shards there, the model states not); returns the checkpoint's name."""
    latest = sorted((out / "ray" / "train").glob("step-*"))[-1]
    for f in (latest / "ds").glob("*model_states.pt"):
        f.unlink()
    return latest.name


def losses(out: Path, purge: bool = True) -> dict[int, list[float]]:
    """Every ``train/loss`` event that survives TensorBoard's purge of re-run steps, by step;
    with ``purge=False``, every one written, the attempts that a restart re-ran included."""
    import logging

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # Each purge of re-run steps is a warning while reading; they are expected here.
    logging.getLogger("tensorboard").setLevel(logging.ERROR)
    acc = EventAccumulator(str(out / "tensorboard" / out.name), size_guidance={"scalars": 0},
                           purge_orphaned_data=purge)  # fmt: skip
    acc.Reload()
    by_step: dict[int, list[float]] = {}
    for event in acc.Scalars("train/loss"):
        by_step.setdefault(event.step, []).append(event.value)
    return by_step


def restarts_in(log: Path) -> int:
    """Steps trained again: each progress step number printed more than once."""
    seen: dict[int, int] = {}
    for line in log.read_text().splitlines():
        if line.startswith("step"):
            step = int(line.split()[1].split("/")[0])
            seen[step] = seen.get(step, 0) + 1
    return sum(n - 1 for n in seen.values())


def compare(reference: dict, faulty: dict, steps: int) -> dict:
    expected = set(range(1, steps + 1))
    lost = sorted(expected - set(faulty))
    repeated = sorted(s for s, values in faulty.items() if len(values) > 1)
    diffs = [abs(faulty[s][-1] - reference[s][-1]) for s in sorted(expected & set(faulty))]
    return {"steps_lost": lost, "steps_logged_twice": repeated,
            "max_loss_diff": max(diffs) if diffs else None}  # fmt: skip


def compare_retrained(every: dict, faulty: dict, steps: int) -> dict:
    """:func:`compare` without a reference: each step trained more than once (``every``, the
    unpurged events) against its other trainings; ``faulty`` is the final curve."""
    retrained = {s: values for s, values in every.items() if len(values) > 1}
    diffs = [max(values) - min(values) for values in retrained.values()]
    lost = sorted(set(range(1, steps + 1)) - set(faulty))
    return {"steps_lost": lost,
            "steps_logged_twice": sorted(s for s, values in faulty.items() if len(values) > 1),
            "compared_with": "their first training", "steps_compared": sorted(retrained),
            "max_loss_diff": max(diffs) if diffs else None}  # fmt: skip


def _data(args, work: Path) -> str:
    if args.data:
        return str(Path(args.data).resolve())
    out = work / "sanguo-64"
    cmd = [sys.executable, "-m", "enigma.cli", "data", "prepare", "--seq-len", "64", "--out"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    subprocess.run([*cmd, str(out)], check=True, env=env, capture_output=True)
    return str(out)


def faulty_run(cmd: list[str], out: Path, faults: dict, address: str) -> dict:
    """Kills and a SIGTERM, a truncated checkpoint and a rerun with a second SIGTERM, a
    checkpoint cut short and the last rerun."""
    log, env = out.parent / "faulty.log", _env(address, faults)
    first, second = faults["sigterm_at_steps"]
    codes = [run_until(cmd, env, log, first)]
    truncated = corrupt_latest(out)
    killed_env = {**env, "ENIGMA_FAULTS": json.dumps({"kill_in_set_aside": True})}
    killed_in_set_aside = run_until(cmd, killed_env, log, None)
    codes.append(run_until(cmd, env, log, second))
    short = cut_short(out)
    codes.append(run_until(cmd, env, log, None))
    kills = sorted(int(p.name.rsplit("-", 1)[1]) for p in out.glob(".fault-injected-*"))
    text = log.read_text()
    return {
        "exit_codes": codes,
        "kills_done": kills,
        "killed_in_set_aside": killed_in_set_aside == -signal.SIGKILL,
        "corrupted_checkpoint": truncated,
        "fell_back": f"checkpoint {truncated} is damaged" in text,
        "checkpoint_without_model_states": short,
        "passed_over_missing_model_states": f"checkpoint {short} is damaged (ds/" in text,
        "finished": codes[-1] == 0 and "=== done ===" in text,
        "steps_trained_again": restarts_in(log),
    }


def shared_cluster():
    """A local 2-CPU cluster in this process, with the other job's resource; its address."""
    import ray

    from ..cluster.ray_setup import init_ray
    from .other_job import RESOURCE

    os.environ.pop("RAY_ADDRESS", None)
    init_ray(num_cpus=2, resources={RESOURCE: 1})
    return ray.get_runtime_context().gcs_address


def clear_earlier(work: Path) -> None:
    """What an earlier run of the benchmark left in ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    for name in ("reference", "faulty", "reference.log", "faulty.log", "s3-a", "s3-b", "s3.log",
                 "s3-events", "s3-model", "stalled-a", "stalled-b", "paused-a", "paused-b",
                 "lease-stalled.log", "lease-paused.log"):  # fmt: skip
        target = work / name
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)


def run(args: argparse.Namespace) -> dict:
    import ray

    from .other_job import OtherJob

    if args.s3 and not args.reference:
        raise InputError("the S3 part compares with the undisturbed run: add --no-s3 to "
                         "--no-reference, or drop --no-reference")  # fmt: skip
    work = Path(args.output_dir or tempfile.mkdtemp(prefix="enigma-faults-")).resolve()
    clear_earlier(work)
    data, ds_config = _data(args, work), fp32_ds_config(work)
    faults = plan_faults(args)
    print(
        f"faults: kills at {faults['kill_at_steps']}, driver SIGTERM at steps "
        f"{faults['sigterm_at_steps']} (the newest checkpoint truncated before the first rerun, "
        "its model states removed before the second), on a cluster shared with another job",
        flush=True,
    )
    start = time.perf_counter()
    ref_out, faulty_out = work / "reference", work / "faulty"
    # moto's credentials (the S3 part), set before the cluster starts so its workers have them
    os.environ.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
                      AWS_DEFAULT_REGION="us-east-1")  # fmt: skip
    os.environ.pop("AWS_ENDPOINT_URL", None)  # the endpoint is in the URI's query
    address = shared_cluster()
    try:
        with OtherJob(address) as other:
            if args.reference:
                ref_code = run_until(train_command(args, data, ref_out, ds_config),
                                     _env(address, None), work / "reference.log", None)  # fmt: skip
                if ref_code != 0:
                    raise RuntimeError(f"the undisturbed run failed; see {work / 'reference.log'}")
            cmd = train_command(args, data, faulty_out, ds_config)
            outcome = faulty_run(cmd, faulty_out, faults, address)
            outcome["other_job"] = other.intact()
            if args.s3:
                command = lambda out: train_command(args, data, out, ds_config)  # noqa: E731
                kill_at = faults["sigterm_at_steps"][0]
                s3 = s3_scenario(command, run_until, _env(address, None), work, kill_at)
                if args.lease:
                    lease = lease_scenarios(command, _env(address, None), work,
                                            args.save_every + 1)  # fmt: skip
    finally:
        ray.shutdown()
    if args.reference:
        curves = compare(losses(ref_out), losses(faulty_out), args.steps)
    else:
        curves = compare_retrained(losses(faulty_out, purge=False), losses(faulty_out), args.steps)
    result = summarize(args, faults, outcome, curves)
    if args.s3:
        result["s3"] = summarize_s3(s3, losses(ref_out), args.steps)
        if args.lease:
            result["lease"] = summarize_lease(lease)
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    meta.save(result, args.json_out, args.command_line)
    return result


def summarize_lease(lease: dict) -> dict:
    if "skipped" in lease:
        print(f"lease: skipped ({lease['skipped']})")
        return lease
    stalled, paused = lease["stalled_store"], lease["paused_past_its_term"]
    print(f"lease (term {lease['lease_term_s']} s): store stalled: the driver ended "
          f"{stalled['a_ended_s_after_the_stall']} s after (exit {stalled['a_exit_code']}), "
          f"taken over {stalled['b_took_over']}, finished {stalled['b_finished']}, objects of "
          f"the old run after the stall {stalled['objects_from_a_after_the_stall']}; paused "
          f"{paused['a_paused_s']} s: taken over as generation 2 "
          f"{paused['b_took_over_as_generation_2']}, finished {paused['b_finished']}, the old "
          f"run refused by the fence {paused['a_refused_by_the_fence']} time(s), the model the "
          f"taker's {paused['model_is_b_s']}")  # fmt: skip
    return lease


def summarize_s3(scenario: tuple[dict, dict], reference: dict, steps: int) -> dict:
    outcome, bucket_losses = scenario
    s3 = {**outcome, **compare(reference, bucket_losses, steps)}
    print(f"S3: driver SIGKILLed, lease taken over from another host {s3['lease_taken_over']}, "
          f"resumed from the bucket {s3['resumed_from_bucket']}, killed inside a model swap "
          f"{s3['killed_in_model_swap']}, finished {s3['finished']}, model loads "
          f"{s3['model_loads']}; steps lost {len(s3['steps_lost'])}, largest per-step loss "
          f"difference {s3['max_loss_diff']}")  # fmt: skip
    return s3


def summarize(args, faults: dict, outcome: dict, curves: dict) -> dict:
    finished = outcome["finished"]
    # the kills, two SIGTERMs, two bad checkpoints, a kill inside the set-aside
    injected = len(outcome["kills_done"]) + 2 + 2 + 1
    survived = len(outcome["kills_done"]) * finished
    survived += sum(finished and code != 0 for code in outcome["exit_codes"][:2])  # SIGTERMs
    survived += int(finished and outcome["fell_back"])
    survived += int(finished and outcome["passed_over_missing_model_states"])
    survived += int(finished and outcome["killed_in_set_aside"])
    result = {
        "benchmark": "faults",
        "steps": args.steps,
        "workers": 2,
        "precision": "fp32",
        "save_every": args.save_every,
        "faults_planned": faults,
        "faults_injected": injected,
        "faults_survived": survived,
        **outcome,
        "compared_with": "the undisturbed run",
        **curves,
    }
    intact = all(outcome["other_job"].values())
    print(f"faults injected {injected}, survived {survived}; the other job's groups "
          f"{'intact' if intact else 'TOUCHED'}; steps lost {len(result['steps_lost'])}, logged "
          f"twice {len(result['steps_logged_twice'])}; trained again after restarts "
          f"{outcome['steps_trained_again']}; largest per-step loss difference "
          f"{result['max_loss_diff']} (against {result['compared_with']})")  # fmt: skip
    return result
