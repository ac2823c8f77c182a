"""``enigma bench faults``: a training run that is shot at, against the same run left alone.

Both runs are the same ``enigma train`` command (tiny, 2 workers, ZeRO-2 fp32, a checkpoint every
few steps), each in a fresh process with its own local Ray. The faulty one gets seeded faults:

- worker kills at random steps (the last rank exits; Ray Train restarts the group from the last
  checkpoint),
- a SIGTERM to the driver at a random step, then the same command run again (it resumes),
- before that rerun, the newest checkpoint is truncated (the rerun must pass over it).

Reported: faults injected and survived, steps missing from or logged twice in the final curve,
steps trained again after restarts, and the largest per-step difference of the training loss
against the undisturbed run. In fp32 with the data position in every checkpoint the two curves
should agree to rounding.
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
from .train_overhead import fp32_ds_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help="prepared shards (default: 三国演义 at seq 64)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--save-every", type=int, default=5, help="steps between checkpoints")
    p.add_argument("--kills", type=int, default=3, help="worker kills at random steps")
    p.add_argument("--seed", type=int, default=0, help="where the faults fall")
    p.add_argument("--output-dir", default=None, help="default: a temporary directory")
    p.add_argument("--json", dest="json_out", default=None)


def plan_faults(args) -> dict:
    """Distinct steps for the kills and the driver's SIGTERM, none on a checkpoint step (a kill
    there would race the checkpoint it just wrote), and after the first checkpoint."""
    free = [s for s in range(args.save_every + 1, args.steps) if s % args.save_every]
    if len(free) < args.kills + 1:
        raise InputError(f"--steps {args.steps} leaves too few steps for {args.kills} kills")
    steps = random.Random(args.seed).sample(free, args.kills + 1)
    return {"kill_at_steps": sorted(steps[:-1]), "sigterm_at_step": steps[-1]}


def train_command(args, data: str, out: Path, ds_config: str) -> list[str]:
    sets = ["seq_len=64", "micro_batch=4", "grad_accum=2", "eval_batches=2", "log_steps=1",
            "shuffle_buffer=0", f"eval_steps={args.steps}", f"save_steps={args.save_every}",
            f"max_failures={args.kills + 1}", "sample_tokens=4"]  # fmt: skip
    cmd = [sys.executable, "-m", "enigma.cli", "train", "--preset", "tiny", "--data", data]
    cmd += ["--workers", "2", "--gpus-per-worker", "0", "--ds-config", ds_config]
    cmd += ["--output-dir", str(out), "--max-steps", str(args.steps)]
    return cmd + [x for s in sets for x in ("--set", s)]


def _env(faults: dict | None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)  # each run starts (and ends) its own local cluster
    if faults:
        env["ENIGMA_FAULTS"] = json.dumps({"kill_at_steps": faults["kill_at_steps"]})
    return env


def run_until(cmd: list[str], env: dict, log: Path, sigterm_at: int | None) -> int:
    """Run ``cmd``; with ``sigterm_at``, send SIGTERM once its progress line for that step is
    printed. Returns the exit code; the output goes to ``log``."""
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
                proc.send_signal(signal.SIGTERM)
                sigterm_at = None
        return proc.wait()


def corrupt_latest(out: Path) -> str:
    """Truncate an optimizer shard of the newest checkpoint; returns the checkpoint's name."""
    latest = sorted((out / "ray" / "train").glob("step-*"))[-1]
    shard = sorted((latest / "ds").glob("*optim_states.pt"))[0]
    shard.write_bytes(shard.read_bytes()[:4096])
    return latest.name


def losses(out: Path) -> dict[int, list[float]]:
    """Every ``train/loss`` event that survives TensorBoard's purge of re-run steps, by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard" / out.name), size_guidance={"scalars": 0})
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


def _data(args, work: Path) -> str:
    if args.data:
        return str(Path(args.data).resolve())
    out = work / "sanguo-64"
    cmd = [sys.executable, "-m", "enigma.cli", "data", "prepare", "--seq-len", "64", "--out"]
    subprocess.run([*cmd, str(out)], check=True, env=_env(None), capture_output=True)
    return str(out)


def faulty_run(args, cmd: list[str], out: Path, faults: dict) -> dict:
    """Kills and a SIGTERM in the first invocation, a truncated checkpoint, then the rerun."""
    log = out.parent / "faulty.log"
    first = run_until(cmd, _env(faults), log, faults["sigterm_at_step"])
    corrupted = corrupt_latest(out)
    second = run_until(cmd, _env(faults), log, None)
    kills = sorted(int(p.name.rsplit("-", 1)[1]) for p in out.glob(".fault-injected-*"))
    text = log.read_text()
    return {
        "first_exit_code": first,
        "second_exit_code": second,
        "kills_done": kills,
        "corrupted_checkpoint": corrupted,
        "fell_back": f"checkpoint {corrupted} is damaged" in text,
        "finished": "=== done ===" in text,
        "steps_trained_again": restarts_in(log),
    }


def run(args: argparse.Namespace) -> dict:
    work = Path(args.output_dir or tempfile.mkdtemp(prefix="enigma-faults-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    for old in ("reference", "faulty", "reference.log", "faulty.log"):  # an earlier run's
        target = work / old
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    data, ds_config = _data(args, work), fp32_ds_config(work)
    faults = plan_faults(args)
    print(
        f"faults: kills at {faults['kill_at_steps']}, driver SIGTERM at step "
        f"{faults['sigterm_at_step']}, then the newest checkpoint truncated",
        flush=True,
    )
    start = time.perf_counter()
    ref_out, faulty_out = work / "reference", work / "faulty"
    ref_code = run_until(train_command(args, data, ref_out, ds_config), _env(None),
                         work / "reference.log", None)  # fmt: skip
    if ref_code != 0:
        raise RuntimeError(f"the undisturbed run failed; see {work / 'reference.log'}")
    outcome = faulty_run(args, train_command(args, data, faulty_out, ds_config), faulty_out, faults)
    result = summarize(args, faults, outcome, losses(ref_out), losses(faulty_out))
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    meta.save(result, args.json_out, args.command_line)
    return result


def summarize(args, faults: dict, outcome: dict, reference: dict, faulty: dict) -> dict:
    survived = len(outcome["kills_done"]) * outcome["finished"]
    survived += int(outcome["finished"] and outcome["first_exit_code"] != 0)  # the SIGTERM
    survived += int(outcome["finished"] and outcome["fell_back"])
    injected = len(outcome["kills_done"]) + 1 + 1
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
        **compare(reference, faulty, args.steps),
    }
    print(f"faults injected {injected}, survived {survived}; steps lost "
          f"{len(result['steps_lost'])}, logged twice {len(result['steps_logged_twice'])}; "
          f"trained again after restarts {outcome['steps_trained_again']}; largest per-step "
          f"loss difference {result['max_loss_diff']}")  # fmt: skip
    return result
