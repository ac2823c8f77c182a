"""The optimizer DeepSpeed steps with: DeepSpeed's compiled Adam where it builds, torch's AdamW
(nothing to build) where it does not, one line saying which and why."""

import json
import os
import subprocess
import sys

from conftest import ROOT

PROBE = str(ROOT / "tests" / "engine_probe.py")


def probe(tmp_path, ds_config: dict, *args) -> tuple[int, dict]:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds_config))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, PROBE, str(path), *args], capture_output=True, text=True, env=env,
        cwd=ROOT, timeout=600,
    )  # fmt: skip
    lines = [s for s in proc.stdout.splitlines() if s.startswith("{")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.returncode, json.loads(lines[-1])


def shipped(name: str) -> dict:
    return json.loads((ROOT / "ds_configs" / f"{name}.json").read_text())


def test_cpu_workers_step_with_torch_adamw_and_say_why(tmp_path):
    rc, out = probe(tmp_path, shipped("zero2"))
    assert rc == 0 and out["optimizer"] == "AdamW"
    assert out["line"].startswith("optimizer: torch AdamW (foreach): DeepSpeed's fused Adam")
    assert out["losses"][-1] < 0.7 * out["losses"][0]


def test_offload_without_a_compiler_falls_back_to_torch_adamw(tmp_path):
    empty = tmp_path / "no-ops"
    empty.mkdir()
    rc, out = probe(tmp_path, shipped("zero2_offload"), "--no-compiler", str(empty))
    assert rc == 0 and out["optimizer"] == "AdamW"
    assert "cpu_adam could not be built" in out["line"], out["line"]
    assert out["losses"][-1] < 0.7 * out["losses"][0]


def test_offload_steps_with_deepspeed_cpu_adam_where_it_builds(tmp_path):
    rc, out = probe(tmp_path, shipped("zero2_offload"))
    assert rc == 0 and out["optimizer"] == "DeepSpeedCPUAdam", out
    assert out["line"].startswith("optimizer: DeepSpeed CPUAdam (cpu_adam loaded in")
    assert out["losses"][-1] < 0.7 * out["losses"][0]


def offload_without_compiler(tmp_path, torch_adam) -> tuple[int, dict, object]:
    config = shipped("zero2_offload")
    config["optimizer"]["params"]["torch_adam"] = torch_adam
    empty = tmp_path / "no-ops"
    empty.mkdir()
    rc, out = probe(tmp_path, config, "--no-compiler", str(empty))
    return rc, out, empty


def test_torch_adam_false_demands_the_kernel(tmp_path):
    rc, out, _ = offload_without_compiler(tmp_path, False)
    assert rc == 1 and "could not be built" in out["error"] and '"auto"' in out["error"]


def test_torch_adam_true_never_builds(tmp_path):
    rc, out, empty = offload_without_compiler(tmp_path, True)
    assert rc == 0 and out["optimizer"] == "AdamW"
    assert "torch_adam is true" in out["line"] and not any(empty.iterdir())


def test_every_auto_is_filled_from_the_training_config(tmp_path):
    from enigma.train import deepspeed_json
    from enigma.train.config import TrainConfig

    config = shipped("zero3")
    config["bf16"]["enabled"] = "auto"
    zero = config["zero_optimization"]
    for key in deepspeed_json.ZERO_AUTO:
        zero[key] = "auto"
    cfg = TrainConfig(preset="tiny", adam_eps=1e-6, precision="bf16")
    filled = deepspeed_json.fill_auto(config, cfg, 1)
    d = cfg.model_config().d
    assert filled["bf16"]["enabled"] is True and filled["optimizer"]["params"]["eps"] == 1e-6
    assert filled["zero_optimization"]["reduce_bucket_size"] == d * d
    assert filled["zero_optimization"]["stage3_param_persistence_threshold"] == 10 * d
    assert deepspeed_json.auto_paths(filled) == [("optimizer", "params", "torch_adam")]
    assert deepspeed_json.fill_auto(config, cfg.replace(precision="fp32"), 1)["bf16"] == {
        "enabled": False
    }
    rc, out = probe(tmp_path, config)  # DeepSpeed itself takes the filled config
    assert rc == 0 and out["losses"][-1] < 0.7 * out["losses"][0]
