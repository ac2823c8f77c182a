"""Nothing lost, nobody waits: locks, atomic exports, checked and fallen-back resumes, a full
disk, honest errors, early stopping, and the fault-injection benchmark's smoke."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import ROOT, SMALL_RUN
from pyarrow.fs import LocalFileSystem

from enigma.cli import main
from enigma.storage.locks import DirectoryLock

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _holder(lock_path, what="enigma train"):
    """A live process that holds ``lock_path`` until killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from enigma.storage.locks import DirectoryLock
        with DirectoryLock({str(lock_path)!r}, {what!r}):
            print("held", flush=True)
            time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_is_refused_and_a_stale_lock_is_taken_over(data, tmp_path, capsys):
    out = tmp_path / "run"
    holder = _holder(out / ".lock")
    try:
        argv = ["train", "--preset", "tiny", "--data", str(data), "--output-dir", str(out)]
        assert main([*argv, "--set", "seq_len=64"]) == 2
        err = capsys.readouterr().err.strip()
        assert f"is in use by enigma train (pid {holder.pid}" in err and len(err.splitlines()) == 1
        assert not (out / "ray").exists(), "nothing of the second run was written"
        prepared = tmp_path / "prep"
        prep_holder = _holder(tmp_path / ".prep.lock", "enigma data prepare")
        try:
            assert main(["data", "prepare", "--seq-len", "64", "--out", str(prepared)]) == 2
            assert "in use by enigma data prepare" in capsys.readouterr().err
        finally:
            prep_holder.kill()
            prep_holder.wait()
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: its lock is stale and the next run takes it over.
    with DirectoryLock(out / ".lock", "enigma train") as lock:
        assert lock.held and json.loads((out / ".lock").read_text())["pid"] == os.getpid()
    assert f"left by pid {holder.pid} (gone)" in capsys.readouterr().out
    assert not (out / ".lock").exists(), "released on exit"


EXPORT_CHILD = """
import os, signal, sys, torch
from pathlib import Path
from enigma import EnigmaConfig, EnigmaLM
from enigma.storage import atomic as fsutil
from enigma.train.export import write_model_dir

out, when = Path(sys.argv[1]), sys.argv[2]
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
if when == "before-swap":
    fsutil.exchange = die
elif when == "after-swap":  # before the old contents are removed
    fsutil.shutil.rmtree = die
else:  # NFS, overlayfs: no exchange; killed between renaming the old aside and the new in
    fsutil.exchange = lambda a, b: False
    renames = []
    def replace(src, dst):
        renames.append(src)
        if len(renames) == 2:
            die()
        os.rename(src, dst)
    fsutil.os.replace = replace
torch.manual_seed(2)
write_model_dir(EnigmaLM(EnigmaConfig.from_preset("tiny", d=32, num_heads=2)), out, None)
"""


def _tiny(seed):
    from enigma import EnigmaConfig, EnigmaLM

    torch.manual_seed(seed)
    return EnigmaLM(EnigmaConfig.from_preset("tiny", d=32, num_heads=2)).eval()


@pytest.mark.parametrize("when", ["before-swap", "after-swap", "no-exchange"])
def test_export_killed_between_its_steps_leaves_a_complete_model(tmp_path, when):
    """Killed anywhere in a replacement, the model is complete: at once where the file system
    exchanges names, and, where it cannot, once the next writer (or clean-up) has put back the
    copy set aside, before anything is removed."""
    from enigma import EnigmaLM
    from enigma.storage.atomic import remove_leftovers
    from enigma.train.export import write_model_dir

    out = tmp_path / "model"
    write_model_dir(_tiny(1), out, None)
    ids = torch.randint(0, 100, (1, 9))
    child = subprocess.run([sys.executable, "-c", EXPORT_CHILD, str(out), when], cwd=ROOT)
    assert child.returncode == -signal.SIGKILL
    if when == "no-exchange":
        assert not out.exists() and list(tmp_path.glob(".model.old-*")), "the gap it leaves"
        remove_leftovers(out)  # what the next export does first, under the lock
    survivor = EnigmaLM.from_pretrained(out).eval()  # complete at this instant, either way
    expected = _tiny(2 if when == "after-swap" else 1)
    with torch.no_grad():
        assert torch.equal(survivor(ids).logits, expected(ids).logits)
    if when != "no-exchange":
        assert [p for p in tmp_path.iterdir() if p.name.startswith(".model.staging-")]
    write_model_dir(_tiny(3), out, None)  # the next export clears what the killed one left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with torch.no_grad():
        assert torch.equal(EnigmaLM.from_pretrained(out)(ids).logits, _tiny(3)(ids).logits)


def test_damaged_model_file_is_one_line(tmp_path, capsys):
    from enigma.data import load_tokenizer

    _tiny(0).save_pretrained(tmp_path)
    load_tokenizer(quiet=True).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path), "--prompt", "曹操"]) == 2
    err = capsys.readouterr().err.strip()
    assert str(tmp_path) in err and "damaged" in err and len(err.splitlines()) == 1


def test_a_bug_while_building_the_model_or_loading_one_keeps_its_traceback(
    data, tmp_path, monkeypatch, capsys
):
    """A shape the model refuses is one line; an error from a bug in the code that builds or
    loads it is not bad input and keeps its traceback."""
    from enigma.inference.generate import load_model
    from enigma.models.attention import CausalSelfAttention
    from enigma.models.lm import EnigmaLM

    argv = ["train", "--preset", "tiny", "--data", str(data), "--output-dir", str(tmp_path)]
    assert main([*argv, "--set", "seq_len=64", "--set", "rotor_positions=7"]) == 2
    assert "not divisible by rotor_positions=7" in capsys.readouterr().err

    def bug(self, *args, **kwargs):
        a, b = (1, 2, 3)  # noqa: F841 -- the injected bug: too many values to unpack

    monkeypatch.setattr(CausalSelfAttention, "__init__", bug)
    with pytest.raises(ValueError, match="too many values to unpack"):
        main([*argv, "--set", "seq_len=64"])
    monkeypatch.undo()
    _tiny(0).save_pretrained(tmp_path / "model")

    def loader_bug(*args, **kwargs):
        raise KeyError("a bug in loading")

    monkeypatch.setattr(EnigmaLM, "from_pretrained", loader_bug)
    with pytest.raises(KeyError, match="a bug in loading"):
        load_model(str(tmp_path / "model"))


def test_an_error_that_is_not_bad_input_keeps_its_traceback(monkeypatch):
    import torch.nn.functional as F

    from enigma.models.lm import EnigmaLM

    def broken_forward(self, *args, **kwargs):  # a shape error deep in PyTorch (a ValueError)
        return F.cross_entropy(torch.zeros(2, 5), torch.zeros(3, dtype=torch.long))

    monkeypatch.setattr(EnigmaLM, "forward", broken_forward)
    with pytest.raises(ValueError, match="batch_size"):
        main(["bench", "lm", "--preset", "tiny", "--rounds", "1", "--batch", "1"])


def _train(data, out, *sets, faults=None, resume=None, workers=2, ds="ds_configs/zero2.json"):
    from enigma.train.config import build_config
    from enigma.train.driver import train

    # Activation checkpointing through DeepSpeed's API, on: what auto picks on a full GPU.
    sets = [*SMALL_RUN, "log_steps=1", "lr=2e-3", "activation_checkpointing=on", *sets]
    cfg = build_config("tiny", sets=sets, data=str(data), ds_config=ds, workers=workers,
                       output_dir=str(out))  # fmt: skip
    return train(cfg, resume=resume, faults=faults)


def _losses(out, tag="train/loss") -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard" / out.name))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_a_full_disk_then_a_checked_resume(data, tmp_path, capsys):
    """A full disk while checkpointing at step 8 is one clear error and leaves step 4; a resume
    of another model, world size or data order is refused naming what differs; the same
    command resumes from step 4. (A damaged checkpoint passed over, and the run going on past
    its step: `enigma bench faults`, whose smoke test is below.)"""
    from enigma.train.plan import Faults

    out = tmp_path / "run"
    with pytest.raises(Exception, match="writing the checkpoint .* failed .* disk full"):
        _train(data, out, "max_steps=8", "eval_steps=4", "max_failures=0",
               faults=Faults(disk_full_at_step=8))  # fmt: skip
    steps = out / "ray" / "train"
    assert sorted(p.name for p in steps.glob("step-*")) == ["step-0000004"]
    assert not list((out / ".checkpoint-tmp").iterdir()), "no staged checkpoint left behind"
    state = json.loads((steps / "step-0000004" / "trainer_state.json").read_text())
    assert state["fingerprint"]["world_size"] == 2 and state["fingerprint"]["model"]["d"] == 128
    assert state["precision"] in ("bf16", "fp32") and "run.json" in state["files"]

    argv = ["train", "--preset", "small", "--data", str(data), "--output-dir", str(out)]
    assert main([*argv, "--set", "seq_len=64", "--max-steps", "12"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "d 128 -> 256" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ValueError, match="written by 2 workers and this run has 1"):
        _train(data, out, "max_steps=8", "eval_steps=4", workers=1)
    with pytest.raises(ValueError, match="micro_batch 4 -> 2 would change the order of the data"):
        _train(data, out, "max_steps=8", "eval_steps=4", "micro_batch=2")
    with pytest.raises(ValueError, match="--resume .* would be ignored"):
        _train(data, out, "max_steps=8", resume=str(steps / "step-0000004"))

    capsys.readouterr()
    summary = _train(data, out, "max_steps=8", "eval_steps=4")
    assert "resuming from" in capsys.readouterr().out
    assert summary["steps"] == 8 and sorted(_losses(out, "val/loss")) == [4, 8]
    assert sorted(_losses(out)) == list(range(1, 9)), "each step logged once"

    # Ray's record lags behind the disk (a driver killed after step 8's checkpoint was written
    # and before Ray recorded it): the driver picks step 8, and every worker loads step 8.
    from enigma.cluster.ray_internals import forget_checkpoints

    forget_checkpoints(LocalFileSystem(), str(steps), {"step-0000008"})
    summary = _train(data, out, "max_steps=10", "eval_steps=5")
    assert "resuming from" in (said := capsys.readouterr().out) and "step-0000008 (step 8)" in said
    assert summary["steps"] == 10
    assert [line["step"] for line in summary["train_log"]] == [9, 10], "from step 8, not 4"


def test_early_stopping_after_exactly_patience_bad_evaluations(data, tmp_path):
    # lr 0: the first evaluation is the best and every later one equals it, so none improves.
    summary = _train(data, tmp_path, "max_steps=20", "eval_steps=2", "lr=0",
                     "early_stop_patience=2")  # fmt: skip
    assert sorted(_losses(tmp_path, "val/loss")) == [2, 4, 6]
    assert summary["steps"] == 6


def test_bench_faults_smoke_sigterms_and_damaged_checkpoints(data, tmp_path):
    """Two driver SIGTERMs, a truncated checkpoint (the driver SIGKILLed while setting it aside)
    and one cut short (its model states missing), on a cluster shared with another job: all
    survived, the other job's groups intact, every step trained again after a restart equal to
    its first training (fp32; the comparison with an undisturbed run, one run more, is the
    benchmark's default). Worker kills and the S3 part are left to the benchmark's full run (and
    to test_train, test_storage, test_locks). In its own process: the benchmark starts the
    shared cluster itself."""
    out = tmp_path / "faults.json"
    argv = ["bench", "faults", "--data", str(data), "--steps", "16", "--save-every", "4"]
    argv += [
        "--kills",
        "0",
        "--no-s3",
        "--no-reference",
        "--output-dir",
        str(tmp_path / "work"),
        "--json",
        str(out),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-m", "enigma.cli", *argv], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["faults_injected"] == result["faults_survived"] == 5
    assert result["exit_codes"][:2] != [0, 0] and result["exit_codes"][-1] == 0
    assert result["fell_back"] and result["passed_over_missing_model_states"]
    assert result["killed_in_set_aside"] and "s3" not in result
    assert result["kills_done"] == []
    assert result["other_job"] == {"created_group_kept": True, "pending_request_kept": True}
    assert result["steps_lost"] == [] and result["steps_logged_twice"] == []
    # Both restarts resumed before where their run stopped: the steps between trained twice.
    assert result["compared_with"] == "their first training" and len(result["steps_compared"]) >= 2
    assert result["max_loss_diff"] < 1e-4


def test_workers_that_cannot_be_placed_fail_with_what_is_held(data, tmp_path, capsys):
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    argv = ["train", "--preset", "tiny", "--data", str(data), "--output-dir", str(tmp_path)]
    argv += ["--gpus-per-worker", "0", "--set", "seq_len=64"]
    # More than the cluster has at all: refused at once, naming both numbers.
    assert main([*argv, "--workers", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "3 workers x 1 CPU = 3 CPUs, but the cluster has 2" in err
    # Enough in all, but another holder keeps a CPU: the run waits (a queue on a shared cluster);
    # with a placement timeout it fails after it, saying what waits and who holds the room.
    holder = placement_group([{"CPU": 1}])
    ray.get(holder.ready())
    try:
        start = time.monotonic()
        assert main([*argv, "--workers", "2", "--set", "placement_timeout_s=10"]) == 2
        err = capsys.readouterr().err.strip()
        assert "could not be placed for 10 s" in err and "2 x {CPU 1}" in err
        assert "held by 1 placement group(s) 1 x {CPU 1} (0 of them" in err
        assert len(err.splitlines()) == 1
        assert time.monotonic() - start < 90
    finally:
        remove_placement_group(holder)
    # The stopped run left nothing behind that would take the freed CPU and keep it.
    from enigma.cluster.placement import actor_placement_groups

    assert actor_placement_groups(dead_creator_only=False) == []


def test_a_failing_worker_reaches_the_driver_at_every_attempt(data, tmp_path, capsys):
    """A worker that cannot import a module: its traceback's last lines are printed on the
    driver as each attempt fails, and the run ends with the error instead of waiting."""
    from enigma.train.config import build_config
    from enigma.train.driver import train
    from enigma.train.plan import Faults

    cfg = build_config("tiny", sets=[*SMALL_RUN, "max_failures=1"], data=str(data), workers=2,
                       output_dir=str(tmp_path))  # fmt: skip
    start = time.monotonic()
    with pytest.raises(Exception, match="No module named 'enigma_no_such_module'"):
        train(cfg, faults=Faults(import_on_start="enigma_no_such_module"))
    out = capsys.readouterr().out
    reports = out.count("ModuleNotFoundError: No module named 'enigma_no_such_module'")
    # 2 ranks x (the first attempt + 1 restart), less a rank the ending run's teardown stopped
    # before it reported (seen once in a clean run): more than 2, so both attempts reported.
    assert 3 <= reports <= 4, out
    assert "worker rank 0 failed:" in out and "worker rank 1 failed:" in out
    assert time.monotonic() - start < 180
