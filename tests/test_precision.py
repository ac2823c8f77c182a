"""Precision follows the hardware: bf16 where every worker runs it natively, fp32 elsewhere, one
line saying which; an explicit choice wins, and one that contradicts the DeepSpeed JSON is an
error naming both."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, cpu_has_fast_bf16, own_ray_cluster, slow_bf16_reason

from enigma.cli import main
from enigma.errors import InputError
from enigma.train import precision

SHIPPED = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())


def _flags(**set_flags):
    base = {k: False for k in ("avx2", "avx512_f", "avx512_bf16", "amx_bf16")}
    return {**base, **set_flags}


@pytest.mark.parametrize(
    ("flags", "isa", "native", "why"),
    [
        (_flags(avx2=True), None, False, "the CPU has AVX2 but no AVX-512 BF16 or AMX"),
        (_flags(avx2=True, avx512_f=True), None, False, "AVX-512 but no AVX-512 BF16"),
        (_flags(avx2=True, avx512_f=True, avx512_bf16=True), None, True, "AVX-512 BF16"),
        (_flags(avx2=True, avx512_f=True, amx_bf16=True), None, True, "the CPU has AMX"),
        (_flags(avx2=True, avx512_f=True, avx512_bf16=True), "AVX2", False, "ONEDNN_MAX_CPU_ISA"),
        (_flags(avx2=True, avx512_f=True, avx512_bf16=True), "avx512_core_amx", True, "BF16"),
        # Both causes at once: the CPU's own lack is what a user can do nothing about, so it is
        # the one named (dropping the variable would not make bf16 fast).
        (_flags(avx2=True), "AVX2", False, "the CPU has AVX2 but no AVX-512 BF16 or AMX"),
        (_flags(avx2=True, avx512_f=True), "AVX2", False, "AVX-512 but no AVX-512 BF16"),
    ],
)
def test_the_cpu_decision_both_ways(monkeypatch, flags, isa, native, why):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: flags)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if isa:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
    else:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    ok, reason = precision.native_bf16(use_gpu=False)
    assert ok is native and why in reason


# A fresh Python that answers as a CPU with the given flags would (None: this machine's own).
PROBE = """
import json, sys, torch
from enigma.train.precision import native_bf16
flags = json.loads(sys.argv[1])
if flags is not None:
    torch.cpu.get_capabilities = lambda: flags
print(native_bf16(False))
"""


@pytest.mark.parametrize(
    "flags",
    [None, _flags(avx2=True), _flags(avx2=True, avx512_f=True, avx512_bf16=True)],
    ids=["this-cpu", "avx2-only", "avx512-bf16"],
)
def test_this_cpu_and_the_slow_path_forced_on_it(flags):
    """The answer follows the CPU's flags; ``ONEDNN_MAX_CPU_ISA=AVX2`` (what gives a bf16 matmul
    its slow path on a CPU that has the fast one) gives fp32 whatever the CPU, blaming the
    variable where the CPU has the fast path and the CPU where it has none. Run on this machine
    and as each kind of CPU would answer, so both kinds are checked on either."""
    env = {k: v for k, v in os.environ.items() if "MAX_CPU_ISA" not in k}
    probe = [sys.executable, "-c", PROBE, json.dumps(flags)]
    fast = cpu_has_fast_bf16() if flags is None else flags["avx512_bf16"]
    here = subprocess.run(probe, env=env, capture_output=True, text=True)
    assert here.stdout.startswith(f"({fast},"), here.stdout + here.stderr
    env["ONEDNN_MAX_CPU_ISA"] = "AVX2"
    slow = subprocess.run(probe, env=env, capture_output=True, text=True)
    assert slow.stdout.startswith("(False,"), slow.stdout + slow.stderr
    assert re.search(slow_bf16_reason(fast), slow.stdout), slow.stdout


def test_the_cluster_decides_once_for_all_its_nodes(monkeypatch):
    answers = [("10.0.0.1", True, "the CPU has AVX-512 BF16"),
               ("10.0.0.2", False, "the CPU has AVX2 but no AVX-512 BF16 or AMX")]  # fmt: skip
    monkeypatch.setattr(precision, "probe_nodes", lambda use_gpu: answers)

    class Nodes:  # what ray.nodes() says: two alive nodes
        @staticmethod
        def nodes():
            return [{"NodeID": "a", "Alive": True}, {"NodeID": "b", "Alive": True}]

    monkeypatch.setitem(sys.modules, "ray", Nodes)
    monkeypatch.setattr(precision, "_DECIDED", {})
    chosen, line = precision.resolve("auto", SHIPPED, "zero2.json", False, None)
    assert chosen == "fp32" and "node 10.0.0.2: the CPU has AVX2" in line
    assert "--set precision=bf16 to override" in line
    monkeypatch.setattr(precision, "_DECIDED", {})
    monkeypatch.setattr(precision, "probe_nodes", lambda use_gpu: answers[:1])
    chosen, line = precision.resolve("auto", SHIPPED, "zero2.json", False, None)
    assert chosen == "bf16" and "AVX-512 BF16" in line


def test_auto_with_a_json_that_offers_only_fp16_says_what_deepspeed_will_do(monkeypatch):
    """bf16 hardware, but a JSON whose only auto section is fp16: DeepSpeed cannot train bf16,
    so auto does not say it will (it said bf16 and DeepSpeed trained fp32)."""
    monkeypatch.setattr(precision, "decide_by_hardware", lambda use_gpu: ("bf16", "bf16 here"))
    fp16_only = {k: v for k, v in SHIPPED.items() if k != "bf16"}
    fp16_only["fp16"] = {"enabled": "auto"}
    chosen, line = precision.resolve("auto", fp16_only, "fp16.json", False, None)
    assert chosen == "fp32" and "fp16.json offers no bf16 section" in line
    assert precision.resolve("auto", fp16_only, "fp16.json", True, None)[0] == "fp16"
    assert precision.resolve("auto", SHIPPED, "zero2.json", False, None)[0] == "bf16"


def test_explicit_choices_win_and_contradictions_name_both():
    fixed = {**SHIPPED, "bf16": {"enabled": True}}
    assert precision.resolve("fp32", SHIPPED, "zero2.json", False, None)[0] == "fp32"
    assert precision.resolve("auto", fixed, "mine.json", False, None) == (
        "bf16", "precision: bf16 (mine.json)")  # fmt: skip
    with pytest.raises(InputError, match=r"precision=fp32 contradicts mine.json.*bf16.enabled"):
        precision.resolve("fp32", fixed, "mine.json", False, None)
    bare = {k: v for k, v in SHIPPED.items() if k != "bf16"}
    with pytest.raises(InputError, match="precision=bf16 contradicts bare.json, which has no bf"):
        precision.resolve("bf16", bare, "bare.json", False, None)
    with pytest.raises(InputError, match="precision=fp16 but zero2.json has no fp16 section"):
        precision.resolve("fp16", SHIPPED, "zero2.json", True, None)
    with pytest.raises(InputError, match="trained in bf16.*--set precision=bf16"):
        precision.resolve("fp32", SHIPPED, "zero2.json", False, "bf16")
    kept = precision.resolve("auto", SHIPPED, "zero2.json", False, "bf16")
    assert kept == ("bf16", "precision: bf16, as the checkpoint it resumes was trained")


def test_a_flag_that_contradicts_the_json_stops_before_ray(data, tmp_path, capsys):
    own_ray_cluster()  # none left up by an earlier module: this one must not start
    ds = tmp_path / "bf16.json"
    ds.write_text(json.dumps({**SHIPPED, "bf16": {"enabled": True}}))
    argv = ["train", "--preset", "tiny", "--data", str(data), "--output-dir", str(tmp_path / "o"),
            "--ds-config", str(ds), "--set", "seq_len=64", "--set", "precision=fp32"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "precision=fp32 contradicts" in err and str(ds) in err
    import ray

    assert not ray.is_initialized(), "refused before Ray started"
