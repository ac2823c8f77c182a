"""Which precision a run trains in: bf16 where every worker runs it natively, fp32 elsewhere.

A bf16 matmul is fast only on hardware that has it: a GPU from Ampere on, or a CPU with AVX-512
BF16 or AMX. On an AVX2-only CPU oneDNN has no bf16 kernel and torch emulates it, about 90x slower
than fp32 (and ``ONEDNN_MAX_CPU_ISA`` below ``AVX512_CORE_BF16`` gives that slow path on a CPU
that has the fast one). So ``precision="auto"`` (the default, and what the shipped DeepSpeed JSONs'
``"bf16": {"enabled": "auto"}`` follows) asks every node that could host a worker before any worker
starts, and says what it chose and why in one line. An explicit ``precision`` wins; a JSON that
fixes the precision (``"enabled": true``) wins over ``auto``, and one that contradicts an explicit
``precision`` is an error naming both. A run that resumes a checkpoint keeps its precision.
"""

from __future__ import annotations

import os

from ..errors import InputError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) that still include native bf16 instructions.
BF16_ISAS = {
    "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512", "AVX512_CORE_AMX", "AVX10_1_512_AMX",
    "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2",
    "ALL", "DEFAULT",
}  # fmt: skip


def json_precision(ds: dict) -> tuple[str | None, set[str]]:
    """What the DeepSpeed JSON fixes (``"bf16"``/``"fp16"``/``"fp32"``), or None when a section
    says ``"auto"``; and the sections that say ``"auto"``."""
    enabled = {s: ds.get(s, {}).get("enabled", False) for s in ("bf16", "fp16")}
    fixed = [s for s, v in enabled.items() if v is True]
    autos = {s for s, v in enabled.items() if v == "auto"}
    if fixed:
        return fixed[0], autos
    return (None if autos else "fp32"), autos


def check_agreement(asked: str, ds: dict, path: str) -> str | None:
    """The JSON against ``precision``: the precision both fix (None: decide by hardware), or an
    error naming both when they contradict."""
    fixed, autos = json_precision(ds)
    if fixed is not None:
        if asked not in ("auto", fixed):
            what = f"{fixed}.enabled=true" if fixed != "fp32" else "no bf16/fp16 section enabled"
            raise InputError(
                f"precision={asked} contradicts {path}, which has {what}: drop one of them "
                f'(--set precision={fixed}, or a JSON whose section says "auto")'
            )
        return fixed
    if asked == "auto":
        return None
    if asked != "fp32" and asked not in autos:
        raise InputError(
            f"precision={asked} but {path} has no {asked} section to enable; add "
            f'"{asked}": {{"enabled": "auto"}} to it, or drop precision'
        )
    return asked


def cpu_flags_have_bf16(flags: dict) -> bool:
    """Whether CPU flags (``torch.cpu.get_capabilities()``) include native bf16 matmuls."""
    return bool(flags.get("avx512_bf16") or flags.get("amx_bf16"))


def native_bf16(use_gpu: bool) -> tuple[bool, str]:
    """Whether this process's device runs bf16 matmuls natively, and why (or why not)."""
    import torch

    if use_gpu:
        if not torch.cuda.is_available():
            return True, "no GPU visible to the probe; bf16 assumed for the GPU workers"
        caps = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
        if all(c >= (8, 0) for c in caps):
            return True, f"every GPU has bf16 (compute capability {min(caps)[0]}.{min(caps)[1]}+)"
        return False, f"a GPU of compute capability {min(caps)[0]}.{min(caps)[1]} has no bf16"
    flags = torch.cpu.get_capabilities()
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    if not cpu_flags_have_bf16(flags):
        have = "AVX-512" if flags.get("avx512_f") else "AVX2" if flags.get("avx2") else "no AVX2"
        return False, f"the CPU has {have} but no AVX-512 BF16 or AMX"
    if cap and cap.upper() not in BF16_ISAS:
        return False, f"ONEDNN_MAX_CPU_ISA={cap} keeps oneDNN below AVX512_CORE_BF16"
    return True, "the CPU has " + ("AMX" if flags.get("amx_bf16") else "AVX-512 BF16")


def probe_nodes(use_gpu: bool) -> list[tuple[str, bool, str]]:
    """``(node, native, why)`` for every alive node that could host a worker, asked by a task
    that runs there (so it sees that node's CPU and its environment)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    kind = "GPU" if use_gpu else "CPU"
    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get(kind, 0) > 0]
    env = {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"} if use_gpu else {}
    probe = ray.remote(num_cpus=0, runtime_env={"env_vars": env} if env else None)(native_bf16)
    refs = [
        probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(use_gpu)
        for n in nodes
    ]
    answers = ray.get(refs, timeout=300)
    return [(n["NodeManagerAddress"], ok, why) for n, (ok, why) in zip(nodes, answers, strict=True)]


_DECIDED: dict = {}  # one probe per cluster and device kind in a process (tests, sweeps)


def decide_by_hardware(use_gpu: bool) -> tuple[str, str]:
    """``(precision, why)`` for ``auto``: bf16 when every node runs it natively."""
    import ray

    key = (tuple(sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])), use_gpu)
    if key not in _DECIDED:
        answers = probe_nodes(use_gpu)
        slow = [(node, why) for node, ok, why in answers if not ok]
        if slow:
            node, why = slow[0]
            where = f"node {node}: " if len(answers) > 1 else ""
            _DECIDED[key] = ("fp32", f"{where}{why}, where bf16 runs many times slower than fp32")
        else:
            _DECIDED[key] = ("bf16", answers[0][2] if answers else "no node to ask")
    return _DECIDED[key]


def resolve(asked: str, ds: dict, path: str, use_gpu: bool, resumed: str | None) -> tuple[str, str]:
    """The run's precision and the line that says it; ``resumed``: the precision of the
    checkpoint the run resumes (None for a fresh run, or one saved before it was recorded)."""
    fixed = check_agreement(asked, ds, path)
    if resumed and (fixed or resumed) != resumed:
        raise InputError(
            f"the checkpoint this run resumes was trained in {resumed}, and this run asks for "
            f"{fixed}: resume with --set precision={resumed}"
        )
    if resumed:
        return resumed, f"precision: {resumed}, as the checkpoint it resumes was trained"
    if fixed:
        source = "--set precision" if asked != "auto" else path
        return fixed, f"precision: {fixed} ({source})"
    _, autos = json_precision(ds)
    if "bf16" not in autos:  # the JSON can enable only fp16: the hardware's bf16 is not on offer
        if "fp16" in autos and use_gpu:
            return "fp16", f"precision: fp16 (auto: {path} offers fp16, not bf16)"
        why = "which the CPU refuses" if "fp16" in autos else "nothing else"
        return "fp32", f"precision: fp32 (auto: {path} offers no bf16 section, and fp16 {why})"
    chosen, why = decide_by_hardware(use_gpu)
    other = "fp32" if chosen == "bf16" else "bf16"
    return chosen, f"precision: {chosen} (auto: {why}; --set precision={other} to override)"
