"""A cluster of two nodes (one CPU each, so the two workers run on different nodes) that share
only a bucket: the whole life of a model through ``ray job submit`` and the CLI."""

import os
import re
import shutil
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


def _start_two_nodes(temp_dir: Path, env: dict, caches: list[Path]) -> int:
    """``ray start`` a head and a second node, one CPU each, each with a model cache of its own
    (its "disk"); the head's dashboard port."""
    port, dash = free_port(), free_port()
    # Every port of its own: the agents' fixed defaults (52365, ...) collide with any other Ray
    # instance on the machine, and a job agent that cannot bind never registers.
    agents = ["dashboard-agent-listen-port", "dashboard-agent-grpc-port",
              "runtime-env-agent-port", "metrics-export-port"]  # fmt: skip
    start = [RAY, "start", "--head", f"--port={port}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=1",
             f"--temp-dir={temp_dir}", "--disable-usage-stats",
             *[f"--{name}={free_port()}" for name in agents]]  # fmt: skip
    node = {**env, "ENIGMA_CACHE": str(caches[0])}
    subprocess.run(start, check=True, env=node, capture_output=True, timeout=120)
    join = [RAY, "start", f"--address=127.0.0.1:{port}", "--num-cpus=1", "--disable-usage-stats",
            *[f"--{name}={free_port()}" for name in agents]]  # fmt: skip
    node = {**env, "ENIGMA_CACHE": str(caches[1])}
    subprocess.run(join, check=True, env=node, capture_output=True, timeout=120)
    return port, dash


def _submit(dash: int, env: dict, argv: list[str]) -> str:
    """``ray job submit`` of ``argv`` from the repository; the job's logs once it succeeded."""
    address = f"--address=http://127.0.0.1:{dash}"
    submit = [RAY, "job", "submit", address, "--no-wait", "--working-dir", str(ROOT),
              "--runtime-env", str(ROOT / "ray_jobs" / "runtime_env.yaml"), "--",
              sys.executable, *argv]  # fmt: skip
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
    return logs


class Stages:
    """Each stage as on a machine that never saw the others: a fresh working directory and model
    cache, removed afterwards with the nodes' caches, so only the bucket carries anything."""

    def __init__(self, root: Path, env: dict, caches: list[Path]):
        self.root, self.env, self.caches = root, env, caches

    def run(self, name: str, *argv: str) -> str:
        work, start = self.root / name, time.monotonic()
        (work / "cache").mkdir(parents=True)
        env = {**self.env, "ENIGMA_CACHE": str(work / "cache")}
        result = subprocess.run([sys.executable, "-m", "enigma.cli", *argv], cwd=work, env=env,
                                capture_output=True, text=True, timeout=600)  # fmt: skip
        said = result.stdout + result.stderr
        assert result.returncode == 0, f"{name}: {said[-3000:]}"
        print(f"{name}: {time.monotonic() - start:.0f} s")
        self.clean(work)
        return said

    def clean(self, work: Path) -> None:
        shutil.rmtree(work)
        for cache in self.caches:  # what a stage's tasks mirrored on the nodes
            shutil.rmtree(cache, ignore_errors=True)
            cache.mkdir()


def _serve_one_completion(stages: Stages, model: str) -> dict:
    """``enigma serve`` onto the cluster from a fresh directory; one completion; Ctrl-C."""
    import json
    import signal
    import threading
    import urllib.request

    work, port = stages.root / "serve", free_port()
    (work / "cache").mkdir(parents=True)
    env = {**stages.env, "ENIGMA_CACHE": str(work / "cache"), "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "enigma.cli", "serve", model, "--port", str(port),
            "--api-key", "k", "--max-batch-size", "2"]  # fmt: skip
    # Ctrl-C's signal as a terminal gives it: a shell's background job inherits SIGINT ignored,
    # and Python then installs no handler for it
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    proc = subprocess.Popen(argv, cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=default_sigint)  # fmt: skip
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("serving "):
                break
        assert seen and seen[-1].startswith("serving "), "".join(seen)[-3000:]
        # keep reading: a full pipe would block the server's own writes, its shutdown's too
        threading.Thread(target=lambda: seen.extend(proc.stdout), daemon=True).start()
        body = json.dumps({"prompt": "话说", "max_tokens": 4, "temperature": 0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json",
                                                  "Authorization": "Bearer k"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError("serve did not stop on SIGINT: " + "".join(seen)[-3000:]) from None
    stages.clean(work)
    return answer


@pytest.mark.job_submit
def test_two_nodes_that_share_only_a_bucket_carry_a_model_from_data_to_serving(tmp_path):
    """A cluster of two nodes (one CPU each, so the two workers run on different nodes) whose
    stages share nothing but a bucket (moto's S3 server): prepare, pretrain through ``ray job
    submit``, resume from another directory, export, fine-tune, evaluate, serve, generate, each
    reading and writing only ``s3://…?scheme=http&endpoint_override=…``."""
    from conftest import moto_server

    temp_dir = Path("/tmp") / f"enigma-ray-{os.getpid()}"  # short: socket paths have a limit
    caches = [tmp_path / "node-1-cache", tmp_path / "node-2-cache"]
    with moto_server(endpoint_in_env=False) as bucket:
        query = f"scheme=http&endpoint_override={bucket.meta.endpoint_url[len('http://') :]}"
        at = lambda prefix: f"s3://runs/{prefix}?{query}"  # noqa: E731
        # The cluster's nodes run oneDNN capped at AVX2 (bf16's slow path on any CPU): the job's
        # precision, "auto" in the shipped JSON, must come out fp32, decided on the nodes.
        env = {**os.environ, "RAY_AUTH_MODE": "token", "HF_HUB_OFFLINE": "1",
               "ONEDNN_MAX_CPU_ISA": "AVX2"}  # fmt: skip
        env.pop("RAY_ADDRESS", None)
        for cache in caches:
            cache.mkdir()
        port, dash = _start_two_nodes(temp_dir, env, caches)
        try:
            stages = Stages(tmp_path / "stages", {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"},
                            caches)  # fmt: skip
            _carry_a_model(stages, bucket, at, dash, env)
        finally:
            _stop_cluster(temp_dir)


def _carry_a_model(stages: Stages, bucket, at, dash: int, env: dict) -> None:
    import json

    from test_storage import keys

    said = stages.run("prepare", "data", "prepare", "--source", "sanguo", "--max-docs", "40",
                      "--seq-len", "64", "--out", at("data"))  # fmt: skip
    assert "wrote s3://runs/data" in said and keys(bucket, "data/manifest.json")
    job_dir, start = stages.root / "job", time.monotonic()  # the job's lock and staging
    sets = [x for s in SETS for x in ("--set", s)]
    logs = _submit(dash, env, ["ray_jobs/pretrain.py", "--preset", "tiny", "--data", at("data"),
                               "--workers", "2", "--storage-path", at("run"), "--output-dir",
                               str(job_dir), "--max-steps", "4", *sets])  # fmt: skip
    assert "=== done ===" in logs and "on 2 worker(s) (CPU)" in logs, logs[-3000:]
    precision = [line for line in logs.splitlines() if "precision:" in line]
    # Two nodes asked: the line names the first that runs bf16 slowly, and why (the variable on
    # a CPU with the fast path, the CPU itself on one without).
    why = rf"precision: fp32 \(auto: node \S+: {slow_bf16_reason()}"
    assert any(re.search(why, line) for line in precision), precision
    assert "DeepSpeed ZeRO-2 fp32;" in logs
    print(f"job: {time.monotonic() - start:.0f} s")
    stages.clean(job_dir)
    assert keys(bucket, "run/model/model.safetensors")
    said = stages.run("resume", "train", "--preset", "tiny", "--data", at("data"), "--workers",
                      "2", "--storage-path", at("run"), "--output-dir", "run", "--max-steps", "6",
                      "--ds-config", str(ROOT / "ds_configs" / "zero2.json"), *sets)  # fmt: skip
    assert re.search(r"resuming from s3://runs/run/ray/train/step-0000004\S* \(step 4\)", said)
    said = stages.run("export", "export", at("run"), at("exported"), "--step", "latest")
    assert "exported step 6" in said and keys(bucket, "exported/checksums.json")
    rows = [{"instruction": f"重复{i}", "output": f"{i}"} for i in range(40)]
    bucket.put_object(
        Bucket="runs",
        Key="rows.jsonl",
        Body="\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode(),
    )
    said = stages.run("finetune", "finetune", "--model", at("exported"), "--data", at("rows.jsonl"),
                      "--workers", "2", "--storage-path", at("tuned"), "--output-dir", "tuned",
                      "--max-steps", "2", "--set", "micro_batch=2", "--set", "val_fraction=0.25",
                      "--ds-config", str(ROOT / "ds_configs" / "zero2.json"))  # fmt: skip
    assert keys(bucket, "tuned/model/model.safetensors") and keys(bucket, "tuned/adapter/")
    said = stages.run("eval", "eval", at("tuned/model"), "--perplexity", at("data"),
                      "--lengths", "1")  # fmt: skip
    assert re.search(r"tokens \(1x training\): perplexity \d", said), said[-2000:]
    answer = _serve_one_completion(stages, at("exported"))
    assert answer["choices"][0]["finish_reason"] in ("length", "stop"), answer
    said = stages.run("generate", "generate", "--model", at("tuned/model"), "--prompt", "话说",
                      "--max-new-tokens", "4")  # fmt: skip
    assert said.strip(), "a continuation"
    assert not list(stages.root.iterdir()), "every stage's directory is gone"


def test_a_lost_node_still_counts_for_what_could_be_placed():
    """Two 8-GPU workers on two 8-GPU nodes: possible; judged on one node alone (the other
    lost), never. The watch judges on every node seen alive since it began."""
    from enigma.cluster.placement import never_fits

    nodes = [{"CPU": 8, "GPU": 8}, {"CPU": 8, "GPU": 8}]
    assert never_fits([{"GPU": 8}, {"GPU": 8}], nodes) is None
    assert "the cluster has 8 GPU in all" in never_fits([{"GPU": 8}, {"GPU": 8}], nodes[:1])
    assert "no node has {GPU 9}" in never_fits([{"GPU": 9}], nodes)
