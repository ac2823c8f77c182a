"""``enigma bench gpu``: one line and exit 2 without CUDA; every check it runs on a GPU, run here
on the CPU at the tiny preset (all but fp16, which DeepSpeed refuses on CPU)."""

import json
import os
import subprocess
import sys

from conftest import ROOT

from enigma.benchmarks.gpu import flops_per_token, peak_tflops, tf32_matmuls
from enigma.cli import main


def test_without_cuda_it_exits_2_with_one_line(capsys):
    assert main(["bench", "gpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs a CUDA GPU" in err


def test_peak_table_and_model_flops():
    assert peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.4
    assert peak_tflops("NVIDIA H100 PCIe", None) == 756.0
    assert peak_tflops("NVIDIA GeForce RTX 4090", None) == 165.2
    assert peak_tflops("Some Future GPU", None) is None
    assert peak_tflops("Some Future GPU", 123.0) == 123.0
    from enigma import EnigmaConfig, EnigmaLM

    model = EnigmaLM(EnigmaConfig.from_preset("tiny", core="none", max_len=256))
    n = sum(p.numel() for p in model.parameters())
    c = model.config
    assert flops_per_token(model, 128) == 6 * n + 12 * c.num_transformer_layers * c.d * 128


def test_throughput_with_bf16_weights_as_deepspeed_holds_them():
    import argparse

    import torch

    from enigma.benchmarks.gpu import throughput
    from enigma.benchmarks.report import section_gpu

    args = argparse.Namespace(preset="tiny", batch=2, seq_len=16, rounds=1, peak_tflops=1.0,
                              compile=False, weights="bf16")  # fmt: skip
    t = throughput(args, torch.device("cpu"))
    assert t["weights"] == "bf16" and t["param_dtypes"] == ["torch.bfloat16"]
    assert t["plain"]["tokens_per_sec"] > 0 and t["enigma_eager"]["tokens_per_sec"] > 0
    title, _ = section_gpu({"gpu": "cpu", "checks": {"throughput": t}})
    assert title.endswith("B=2, L=16, bf16 weights)")


def test_tf32_block_restores_the_flag():
    import torch

    assert not torch.backends.cuda.matmul.allow_tf32
    with tf32_matmuls():
        assert torch.backends.cuda.matmul.allow_tf32
    assert not torch.backends.cuda.matmul.allow_tf32


SCRIPT = """
import argparse, json, sys, torch
from enigma.benchmarks.gpu import run_checks
args = argparse.Namespace(preset="tiny", batch=2, seq_len=16, rounds=1, steps=8,
                          peak_tflops=1.0, json_out=None, compile=False, only=None,
                          memory_layers=[2, 4], memory_shape=[16, 16, 2], deepest_up_to=4,
                          weights="autocast")
print("RESULT " + json.dumps(run_checks(args, torch.device("cpu"))))
"""


def test_every_check_runs_on_the_cpu():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_PORT": "29547"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=900)  # fmt: skip
    lines = [s for s in proc.stdout.splitlines() if s.startswith("RESULT ")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(lines[-1][len("RESULT ") :])
    checks = {"throughput", "machine_cost", "zero2_bf16", "zero3_export", "exactness", "memory"}
    assert set(results) == checks
    t = results["throughput"]
    for name in ("enigma_eager", "enigma_eager_bf16_rotors", "plain"):
        assert t[name]["tokens_per_sec"] > 0
    assert t["ratio_bf16_rotors"] > 0 and t["fastest"].startswith("enigma_")
    assert abs(t["plain"]["mfu"] - t["plain"]["model_tflops"] / 1.0) < 0.01  # --peak-tflops 1
    modes = {(p["layers"], p["mode"]) for p in results["memory"]["points"]}
    assert modes == {(n, m) for n in (2, 4) for m in ("plain", "checkpointing", "reversible")}
    # FLOPs counted op by op: the plain model's near 6 N + attention, the machine's on top.
    counted = {k: t[k]["counted_mflops_per_token"] * 1e6 for k in ("plain", "enigma_eager")}
    from enigma import EnigmaConfig, EnigmaLM

    plain = EnigmaLM(EnigmaConfig.from_preset("tiny", core="none", max_len=2048))
    assert 0.8 < counted["plain"] / flops_per_token(plain, 16) < 1.2
    assert abs(t["flops_ratio"] - counted["plain"] / counted["enigma_eager"]) < 1e-3
    assert t["flops_ratio"] < 1
    parts = results["machine_cost"]["parts"]
    assert set(parts) == {"machine", "plugboard", "rotors", "rev_block", "reflector"}
    assert parts["plugboard"]["ops"] > 0 and parts["machine"]["busy_ms"] is None  # no GPU here
    # Every operation of the machine is one of its parts' (the chain adds bookkeeping only).
    assert 0.8 < results["machine_cost"]["ops_in_parts"] / parts["machine"]["ops"] < 1.2
    for name in ("zero2_bf16", "zero3_export", "exactness", "memory", "machine_cost"):
        assert results[name]["ok"], (name, results[name])
    assert results["zero2_bf16"]["optimizer"].startswith("torch AdamW")
    assert results["zero3_export"]["logits_max_rel_diff"] <= 1e-3
    assert results["exactness"]["fp32"] <= 1e-5
    assert results["exactness"]["fp32_tf32"] == results["exactness"]["fp32"]  # no TF32 on a CPU
    assert 1e-6 < results["exactness"]["bf16_rotors"] <= 1e-2  # bf16 products: rounded, bounded
