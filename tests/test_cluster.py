"""The same training code through ``ray job submit`` onto a cluster of two nodes (one CPU each,
so the two workers run on different nodes)."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, SMALL_RUN, free_port, slow_bf16_reason

RAY = str(Path(sys.executable).with_name("ray"))
# `ray job status` ends with "Job '...' succeeded" (or failed / stopped); match any case.
FINAL = r"\b(succeeded|failed|stopped)\b"
SETS = [*SMALL_RUN, "eval_steps=4", "log_steps=2"]


def _stop_cluster(temp_dir: Path) -> None:
    """Stop only the processes of the cluster this test started (found by its temp dir): SIGTERM,
    then SIGKILL for whatever is still there after 10 s; none may outlive the test."""
    procs = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(str(temp_dir) in part for part in proc.info["cmdline"] or []):
                proc.terminate()
                procs.append(proc)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for proc in alive:
        proc.kill()
    _, alive = psutil.wait_procs(alive, timeout=10)
    assert not alive, f"cluster processes survived SIGKILL: {alive}"


@pytest.mark.job_submit
def test_ray_job_submit_onto_two_nodes_end_to_end(data, tmp_path):
    temp_dir = Path("/tmp") / f"enigma-ray-{os.getpid()}"  # short: socket paths have a limit
    port, dash = free_port(), free_port()
    # The cluster's nodes run oneDNN capped at AVX2 (bf16's slow path on any CPU): the job's
    # precision, "auto" in the shipped JSON, must come out fp32, decided on the nodes themselves.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "HF_HUB_OFFLINE": "1",
           "ONEDNN_MAX_CPU_ISA": "AVX2"}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    # Every port of its own: the agents' fixed defaults (52365, ...) collide with any other Ray
    # instance on the machine, and a job agent that cannot bind never registers.
    agents = ["dashboard-agent-listen-port", "dashboard-agent-grpc-port",
              "runtime-env-agent-port", "metrics-export-port"]  # fmt: skip
    start = [RAY, "start", "--head", f"--port={port}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=1",
             f"--temp-dir={temp_dir}", "--disable-usage-stats",
             *[f"--{name}={free_port()}" for name in agents]]  # fmt: skip
    subprocess.run(start, check=True, env=env, capture_output=True, timeout=120)
    join = [RAY, "start", f"--address=127.0.0.1:{port}", "--num-cpus=1", "--disable-usage-stats",
            *[f"--{name}={free_port()}" for name in agents]]  # fmt: skip
    try:
        subprocess.run(join, check=True, env=env, capture_output=True, timeout=120)
        address = f"--address=http://127.0.0.1:{dash}"
        submit = [RAY, "job", "submit", address, "--no-wait", "--working-dir", str(ROOT),
                  "--runtime-env", str(ROOT / "ray_jobs" / "runtime_env.yaml"), "--",
                  sys.executable, "ray_jobs/pretrain.py", "--preset", "tiny", "--data", str(data),
                  "--workers", "2", "--output-dir", str(tmp_path / "run"), "--max-steps", "4",
                  *[x for s in SETS for x in ("--set", s)]]  # fmt: skip
        for _ in range(30):  # the job agent comes up a little after `ray start` returns
            result = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=120)
            if "No available agent" not in result.stdout + result.stderr:
                break
            time.sleep(2)  # nothing was submitted: safe to try again
        output = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout + result.stderr)
        assert result.returncode == 0, output[-3000:]
        job_id = re.search(r"raysubmit_\w+", output).group(0)
        status = ""
        deadline = time.monotonic() + 480
        while time.monotonic() < deadline and not re.search(FINAL, status, re.IGNORECASE):
            time.sleep(3)
            probe = subprocess.run([RAY, "job", "status", address, job_id], env=env,
                                   capture_output=True, text=True, timeout=60)  # fmt: skip
            status = probe.stdout + probe.stderr  # the CLI logs the status line to stderr
        probe = subprocess.run([RAY, "job", "logs", address, job_id], env=env,
                               capture_output=True, text=True, timeout=60)  # fmt: skip
        logs = probe.stdout + probe.stderr
        assert "succeeded" in status.lower(), status + logs[-3000:]
        assert "=== done ===" in logs
        assert "on 2 worker(s) (CPU)" in logs  # one CPU per node: one worker on each
        precision = [line for line in logs.splitlines() if "precision:" in line]
        # Two nodes asked: the line names the first that runs bf16 slowly, and why (the
        # variable on a CPU with the fast path, the CPU itself on one without).
        why = rf"precision: fp32 \(auto: node \S+: {slow_bf16_reason()}"
        assert any(re.search(why, line) for line in precision), precision
        assert "DeepSpeed ZeRO-2 fp32;" in logs
        assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    finally:
        _stop_cluster(temp_dir)


def test_a_lost_node_still_counts_for_what_could_be_placed():
    """Two 8-GPU workers on two 8-GPU nodes: possible; judged on one node alone (the other
    lost), never. The watch judges on every node seen alive since it began."""
    from enigma.cluster.placement import never_fits

    nodes = [{"CPU": 8, "GPU": 8}, {"CPU": 8, "GPU": 8}]
    assert never_fits([{"GPU": 8}, {"GPU": 8}], nodes) is None
    assert "the cluster has 8 GPU in all" in never_fits([{"GPU": 8}, {"GPU": 8}], nodes[:1])
    assert "no node has {GPU 9}" in never_fits([{"GPU": 9}], nodes)
