"""A checkpoint is complete only with every file its ranks wrote, at its size, and run.json; under
ZeRO-3 the ranks agree on what they can read before any of them loads."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, free_port

from enigma.train.checkpoint import RUN_FILE, STATE_FILE, damage


@pytest.fixture(scope="module")
def zero3_resume(tmp_path_factory):
    """Two ZeRO-3 ranks write a checkpoint, then resume it where the last rank's copy is
    truncated (``tests/restore_probe.py``); returns the directory and each rank's outcome."""
    root = tmp_path_factory.mktemp("zero3")
    env = {**os.environ, "PROBE_PORT": str(free_port()), "WORLD_SIZE": "2"}
    ranks = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "restore_probe.py"), str(root)],
            env={**env, "RANK": str(r)},
            cwd=ROOT,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for r in range(2)
    ]
    outputs = []
    try:
        outputs = [rank.communicate(timeout=300) for rank in ranks]
    finally:
        for rank in ranks:  # a rank left waiting in a collective must not outlive the test
            rank.kill()
    lines = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs if out.strip()]
    assert len(lines) == 2, [err[-2000:] for _, err in outputs]
    return root, lines


def test_zero3_ranks_agree_on_what_they_can_read_before_any_loads(zero3_resume):
    _, outcomes = zero3_resume
    assert [o["loaded"] for o in outcomes] == [False, False]
    assert "passed over (on another rank)" in outcomes[0]["error"]
    assert "model_states.pt holds 100 of its" in outcomes[1]["error"]


def test_a_checkpoint_is_complete_only_with_every_file_its_ranks_wrote(zero3_resume, tmp_path):
    root, _ = zero3_resume
    shared = root / "shared"
    state = json.loads((shared / STATE_FILE).read_text())
    names = set(state["files"])
    assert {f"ds/zero_pp_rank_{r}_mp_rank_00_{k}_states.pt" for r in (0, 1)
            for k in ("model", "optim")} <= names  # fmt: skip
    assert RUN_FILE in names and damage(str(shared)) is None

    def broken(change) -> str:
        copy = tmp_path / f"copy-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(shared, copy)
        change(copy)
        return damage(str(copy))

    # What an upload cut short leaves: the optimizer shards, no model states.
    for model_states in sorted(names):
        if "model_states" in model_states:
            problem = broken(lambda c, n=model_states: (c / n).unlink())
            assert problem == f"{model_states} is missing"
    assert broken(lambda c: (c / RUN_FILE).unlink()) == f"{RUN_FILE} is missing"
    assert broken(lambda c: (c / STATE_FILE).unlink()) == f"{STATE_FILE} is missing"
    shard = "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    cut = broken(lambda c: (c / shard).write_bytes((c / shard).read_bytes()[:10]))
    assert cut.startswith(f"{shard} holds 10 of its")

    def unlisted(c):  # a checkpoint from before the state listed its files
        listed = json.loads((c / STATE_FILE).read_text())
        del listed["files"]
        (c / STATE_FILE).write_text(json.dumps(listed))
        for f in (c / "ds").glob("*model_states.pt"):
            f.unlink()

    assert broken(unlisted) == "no model states in ds/"
