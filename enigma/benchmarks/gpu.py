"""``enigma bench gpu``: the training path on one CUDA GPU, measured and checked in one command.

It needs torch, transformers and DeepSpeed, not Ray, and no network, so it runs on a bare GPU
box (see the README for the wheels to carry). In order:

1. **Throughput**: EnigmaLM (``--preset``, default ``base``) against the plain Transformer of the
   same shape (``core="none"``), bf16 autocast with fp32 weights and torch's fused AdamW, with
   the machine eager, compiled (as training runs it on GPUs) and compiled with CUDA graphs
   (``mode="reduce-overhead"``): training tokens/s, peak GPU memory, and MFU = model FLOPs/s over
   the GPU's peak dense bf16 FLOP/s (:data:`PEAK_BF16_TFLOPS`, or ``--peak-tflops``). Model FLOPs
   per token are ``6 N + 12 L d T`` (weights forward and backward, plus attention scores; PaLM's
   appendix B). Each model's FLOPs are also counted op by op (``flops_ratio``: the ratio EnigmaLM
   would reach if its FLOPs ran at the plain model's rate).
2. **The machine's cost** alone and by part (:mod:`.machine_cost`): operations launched,
   milliseconds per forward + backward, and how much of that the GPU was busy.
3. **DeepSpeed**, one process, world size 1, activation checkpointing on through DeepSpeed's API:
   ZeRO-2 bf16 with the optimizer that :mod:`enigma.train.optimizer` chooses, ``--steps`` steps
   with the loss falling; ``zero2_fp16.json`` with dynamic loss scaling; ZeRO-3 bf16, exported
   with ``save_pretrained`` and reloaded, with the same logits as the engine.
4. **Exactness** of the machine trained in 3, on the GPU, in fp32 and under bf16 autocast.
5. **Memory by depth**, as ``enigma bench memory`` measures it on the CPU: one EnigmaLM step
   (forward + backward, bf16 autocast) at 2, 4, 8 and 16 layers for plain autograd, activation
   checkpointing and reversible layers, with peak CUDA memory (``max_memory_allocated``) and
   tokens/s, then the deepest reversible model within the plain 4-layer model's peak.

Without CUDA it exits 2 with one line. Each check records its figures and ``ok``; the command
exits 1 when any check fails, after writing the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import tempfile
import time
import traceback
from pathlib import Path

import torch

from ..errors import InputError
from ..models.lm_config import PRESET_SEQ_LEN
from . import meta
from .timing import autocast, sync

# Dense bf16 tensor throughput with fp32 accumulation, TFLOP/s, from the vendors' data sheets;
# the longest name contained in ``torch.cuda.get_device_name()`` wins.
PEAK_BF16_TFLOPS = {
    "H200": 989.4,
    "H100": 989.4,  # SXM
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "A100": 312.0,
    "L40S": 362.1,
    "L4": 121.0,
    "A10": 125.0,
    "RTX 4090": 165.2,
    "RTX 3090": 71.0,
}
# EnigmaLM's timed variants: (torch.compile mode of the machine or None for eager, rotor
# products). "reduce-overhead" also records CUDA graphs, so a step launches the machine's kernels
# in two replays instead of one by one from the host.
VARIANTS = {
    "enigma_eager": (None, "fp32"),
    "enigma_eager_bf16_rotors": (None, "bf16"),
    "enigma_compiled": ("default", "fp32"),
    "enigma_compiled_bf16_rotors": ("default", "bf16"),
    "enigma_graphs": ("reduce-overhead", "fp32"),
    "enigma_graphs_bf16_rotors": ("reduce-overhead", "bf16"),
}
CONFIGS = Path(__file__).resolve().parents[2] / "ds_configs"
# Relative reconstruction error of the machine: fp32, bf16 autocast, and fp32 with bf16 rotor
# products (``rotor_matmul="bf16"``).
BOUNDS = {"fp32": 1e-5, "bf16_autocast": 1e-2, "bf16_rotors": 1e-2}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="base")
    p.add_argument("--batch", type=int, default=32, help="sequences per step (throughput)")
    p.add_argument("--seq-len", type=int, default=None, help="default: the preset's")
    p.add_argument("--rounds", type=int, default=20, help="timed steps per model and pass")
    p.add_argument("--steps", type=int, default=30, help="DeepSpeed ZeRO-2 steps")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak")
    p.add_argument(
        "--weights", choices=["autocast", "bf16"], default="autocast",
        help="throughput: fp32 weights under bf16 autocast, or bf16 weights without autocast "
        "(as a DeepSpeed bf16 engine holds the model)",
    )  # fmt: skip
    p.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        help="time the machine eager only (no compiled or CUDA-graph passes)",
    )
    p.add_argument(
        "--only",
        choices=["throughput", "machine", "memory"],
        default=None,
        help="run this check alone",
    )
    p.add_argument("--memory-layers", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument(
        "--memory-shape", type=int, nargs=3, default=[512, 512, 8], metavar=("D", "L", "B"),
        help="width, sequence length and batch of the memory check",
    )  # fmt: skip
    p.add_argument("--deepest-up-to", type=int, default=128, help="the reversible search's limit")
    p.add_argument("--json", dest="json_out", default=None)


def peak_tflops(name: str, given: float | None) -> float | None:
    if given:
        return given
    known = [k for k in PEAK_BF16_TFLOPS if k in name]
    return PEAK_BF16_TFLOPS[max(known, key=len)] if known else None


def flops_per_token(model, seq_len: int) -> float:
    """``6 N + 12 L d T``; N leaves out the learned position table (a lookup, no FLOPs)."""
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    if model.pos_embed is not None:
        n -= model.pos_embed.weight.numel()
    return 6 * n + 12 * c.num_transformer_layers * c.d * seq_len


def counted_flops_per_token(model, ids: torch.Tensor, device: torch.device) -> float:
    """FLOPs of one training step (forward + backward, bf16 autocast) per token, counted by torch
    op by op: the machine's included, which ``6 N`` counts once where the involutive machine runs
    its blocks twice."""
    from torch.utils.flop_counter import FlopCounterMode

    model.to(device).train()
    with FlopCounterMode(display=False) as counter:
        with autocast(device):
            loss = model(ids, labels=ids).loss
        loss.backward()
    model.zero_grad(set_to_none=True)
    model.to("cpu")
    return counter.get_total_flops() / ids.numel()


def timed_pass(
    model, ids, rounds: int, device: torch.device, graphs: bool = False, bf16_weights=False
) -> dict:
    """Warm up, then ``rounds`` training steps; seconds per step and the peak memory. ``graphs``:
    the machine replays CUDA graphs, so each step tells them where a new step begins.
    ``bf16_weights``: the model is already in bf16 and runs without autocast."""
    model.to(device).train()
    precision = contextlib.nullcontext if bf16_weights else lambda: autocast(device)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused or None)

    def step():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        opt.zero_grad(set_to_none=True)
        with precision():
            loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(rounds):
        step()
    sync(device)
    seconds = (time.perf_counter() - start) / rounds
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    model.to("cpu")
    return {"seconds": seconds, "peak_mb": peak}


def enigma_variants(args: argparse.Namespace, device: torch.device) -> list[str]:
    """The EnigmaLM passes to time (:data:`VARIANTS`): eager first, then (unless
    ``--no-compile``) compiled and on CUDA compiled with CUDA graphs, and last the last of those
    with bf16 rotor products."""
    if not args.compile:
        return ["enigma_eager", "enigma_eager_bf16_rotors"]
    if device.type != "cuda":
        return ["enigma_eager", "enigma_compiled", "enigma_compiled_bf16_rotors"]
    return ["enigma_eager", "enigma_compiled", "enigma_graphs", "enigma_graphs_bf16_rotors"]


def set_variant(machine, name: str) -> None:
    """Compile ``machine`` in place the way ``name`` says (or leave it eager), with its rotors'
    products in that variant's precision."""
    mode, matmul = VARIANTS[name]
    machine.rotors.matmul = matmul
    torch._dynamo.reset()
    machine._compiled_call_impl = None  # eager again, or compiled afresh below
    if mode is not None:
        machine.compile(mode=mode)


def throughput(args: argparse.Namespace, device: torch.device) -> dict:
    """EnigmaLM and the plain Transformer in alternating passes (E, P, E, P; each pass holds one
    model on the GPU, so its peak memory is its own), then EnigmaLM's other variants
    (:func:`enigma_variants`) two passes each; the fastest pass of each counts. ``ratio`` is the
    fastest EnigmaLM's with fp32 rotor products (the default), ``ratio_bf16_rotors`` with bf16."""
    from torch._dynamo.utils import counters

    from ..models.lm import EnigmaLM
    from ..models.lm_config import EnigmaConfig

    seq_len = args.seq_len or PRESET_SEQ_LEN.get(args.preset, 256)
    shape = dict(max_len=max(2048, seq_len))
    torch.manual_seed(0)
    enigma = EnigmaLM(EnigmaConfig.from_preset(args.preset, **shape))
    plain = EnigmaLM(EnigmaConfig.from_preset(args.preset, **shape, core="none"))
    ids = torch.randint(0, enigma.config.vocab_size, (args.batch, seq_len)).to(device)
    bf16_weights = args.weights == "bf16"
    if bf16_weights:  # as DeepSpeed's bf16 mode holds the module (its fp32 master copy aside)
        enigma, plain = enigma.to(torch.bfloat16), plain.to(torch.bfloat16)
    variants = enigma_variants(args, device)
    half = coupling_half(enigma, args) if args.compile else None
    if args.compile:  # the baseline compiled as training compiles it, or the ratio flatters us
        for model in (enigma, plain, half):
            model.compile_layers()
    order = [(variants[0], enigma), ("plain", plain)] * 2
    order += [(name, enigma) for name in variants[1:] for _ in range(2)]
    order += [("enigma_coupling_half", half)] * 2 if half is not None else []
    models = (enigma, plain) + ((half,) if half is not None else ())
    counted = {m: counted_flops_per_token(m, ids, device) for m in models}
    passes: dict[str, list[dict]] = {}
    skips = counters["inductor"]  # graphs that a compiled graph could not use (each logs why)
    for name, model in order:
        if name not in passes and name in VARIANTS:
            set_variant(enigma.machine, name)
        elif name not in passes and name == "enigma_coupling_half":
            set_variant(half.machine, "enigma_compiled")
        graphs = VARIANTS.get(name, (None,))[0] == "reduce-overhead"
        before = skips["cudagraph_skips"]
        timed = timed_pass(model, ids, args.rounds, device, graphs, bf16_weights)
        if graphs:
            timed["cudagraph_skips"] = skips["cudagraph_skips"] - before
        passes.setdefault(name, []).append(timed)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the pass's optimizer state is gone: free its memory
    set_variant(enigma.machine, "enigma_eager")
    peak = peak_tflops(torch.cuda.get_device_name(device) if device.type == "cuda" else "", None)
    peak = args.peak_tflops or peak
    out = {"preset": args.preset, "batch": args.batch, "seq_len": seq_len, "peak_tflops": peak}
    out["weights"] = args.weights
    out["param_dtypes"] = sorted({str(p.dtype) for m in (enigma, plain) for p in m.parameters()})
    out["layers_compiled"] = args.compile
    for name, runs in passes.items():
        model = {"plain": plain, "enigma_coupling_half": half}.get(name, enigma)
        tokens_per_sec = args.batch * seq_len / min(p["seconds"] for p in runs)
        out[name] = pass_figures(model, runs, tokens_per_sec, seq_len, peak, counted[model])
        if "cudagraph_skips" in runs[0]:
            out[name]["cudagraph_skips"] = sum(p["cudagraph_skips"] for p in runs)
    # The ratio EnigmaLM would reach if its every FLOP ran at the plain Transformer's rate.
    out["flops_ratio"] = round(counted[plain] / counted[enigma], 4)
    if half is not None:
        out["flops_ratio_coupling_half"] = round(counted[plain] / counted[half], 4)
    return out | ratios({name: out[name]["tokens_per_sec"] for name in passes})


def coupling_half(enigma, args):
    """EnigmaLM with coupling nets half as wide (``coupling_hidden`` = d/2), same everything
    else."""
    from ..models.lm import EnigmaLM

    torch.manual_seed(0)
    config = enigma.config.__class__.from_dict(enigma.config.to_dict())
    config.coupling_hidden = config.d // 2
    model = EnigmaLM(config)
    return model.to(next(enigma.parameters()).dtype)


def pass_figures(model, runs: list[dict], tokens_per_sec, seq_len, peak, counted) -> dict:
    model_flops = flops_per_token(model, seq_len) * tokens_per_sec
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "tokens_per_sec": round(tokens_per_sec, 1),
        "peak_memory_mb": max((p["peak_mb"] or 0) for p in runs) or None,
        "model_tflops": round(model_flops / 1e12, 2),
        "mfu": round(model_flops / (peak * 1e12), 4) if peak else None,
        "counted_mflops_per_token": round(counted / 1e6, 2),
    }


def ratios(rate: dict[str, float]) -> dict:
    """Each EnigmaLM variant's tokens/s over the plain Transformer's, the best of each rotor
    precision, and whether the best reaches the 0.85 target."""
    rotors = {**{k: v[1] for k, v in VARIANTS.items()}, "enigma_coupling_half": "fp32"}
    exact = {k: r for k, r in rate.items() if k != "plain" and rotors[k] == "fp32"}
    low = {k: r for k, r in rate.items() if k != "plain" and rotors[k] == "bf16"}
    out = {"ratio_eager": rate["enigma_eager"] / rate["plain"]}
    out["ratio"] = max(exact.values()) / rate["plain"]
    if low:
        out["ratio_bf16_rotors"] = max(low.values()) / rate["plain"]
    out["fastest"] = max(exact | low, key=(exact | low).get)
    out["ok"] = max(out["ratio"], out.get("ratio_bf16_rotors", 0)) >= 0.85
    return out


def machine_parts(args: argparse.Namespace, device: torch.device) -> dict:
    """The machine's forward + backward alone and by part (:mod:`.machine_cost`), at the
    throughput check's shape."""
    from .machine_cost import machine_cost

    seq_len = args.seq_len or PRESET_SEQ_LEN.get(args.preset, 256)
    return machine_cost(args.preset, args.batch, seq_len, args.rounds, device)


@contextlib.contextmanager
def process_group(device: torch.device):
    """A one-rank process group (NCCL on CUDA, gloo on CPU) for DeepSpeed engines."""
    import deepspeed
    import torch.distributed as dist

    from ..train.worker import assign_accelerator

    assign_accelerator(device.type == "cuda")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29000 + os.getpid() % 1000))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def engine_for(config_name: str, preset: str, batch: int, device: torch.device, **model_fields):
    """An EnigmaLM DeepSpeed engine from a shipped JSON, activation checkpointing through
    DeepSpeed; returns the engine, the model config and the optimizer line."""
    from ..models.lm import EnigmaLM
    from ..train import deepspeed_json
    from ..train.config import TrainConfig
    from ..train.precision import check_agreement
    from ..train.worker import make_engine

    raw = deepspeed_json.load(str(CONFIGS / config_name))
    chosen = check_agreement("auto", raw, config_name) or "bf16"  # GPUs train in bf16
    cfg = TrainConfig(preset=preset, micro_batch=batch, grad_accum=1, lr=1e-3, warmup_ratio=0)
    cfg = cfg.replace(model=model_fields, activation_checkpointing=True, precision=chosen)
    ds = deepspeed_json.fill_auto(raw, cfg, 1)
    torch.manual_seed(0)
    model_config = cfg.model_config()
    engine, line = make_engine(EnigmaLM(model_config), cfg, ds, device)
    return engine, model_config, line.removeprefix("optimizer: ")


def train_steps(engine, ids: torch.Tensor, steps: int) -> list[float]:
    """``steps`` optimizer steps on one fixed batch (so the loss must fall: it is memorised)."""
    losses = []
    for _ in range(steps):
        loss = engine(ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.float().item())
    return losses


def zero2(args, device: torch.device, ids: torch.Tensor, config_name: str, steps: int) -> dict:
    engine, model_config, line = engine_for(config_name, args.preset, ids.shape[0], device)
    start = time.perf_counter()
    losses = train_steps(engine, ids, steps)
    out = {"config": config_name, "optimizer": line, "steps": steps}
    out.update(first_loss=losses[0], last_loss=losses[-1])
    out["seconds_per_step"] = (time.perf_counter() - start) / steps
    out["ok"] = all(map(math.isfinite, losses)) and losses[-1] < 0.9 * losses[0]
    if "fp16" in config_name:
        out["loss_scale"] = float(engine.optimizer.loss_scale)
        out["ok"] = out["ok"] and out["loss_scale"] > 1
    out["state_dict"] = {k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()}
    out["model_config"] = model_config
    return out


def zero3_export(args, device: torch.device, ids: torch.Tensor) -> dict:
    """ZeRO-3 bf16: a few steps, export (parameters gathered), reload, compare logits."""
    from ..models.lm import EnigmaLM
    from ..train.export import export_model

    engine, model_config, line = engine_for("zero3.json", args.preset, ids.shape[0], device)
    losses = train_steps(engine, ids, 5)
    with torch.no_grad():
        engine.eval()
        logits = engine(ids[:2]).logits.float()
    with tempfile.TemporaryDirectory() as tmp:
        export_model(engine, model_config, Path(tmp) / "model", "", rank=0, stage=3)
        reloaded = EnigmaLM.from_pretrained(Path(tmp) / "model").to(device, torch.bfloat16)
    with torch.no_grad():
        again = reloaded.eval()(ids[:2]).logits.float()
    diff = ((again - logits).abs().max() / logits.abs().max()).item()
    return {"optimizer": line, "last_loss": losses[-1], "logits_max_rel_diff": diff,
            "ok": diff <= 1e-3}  # fmt: skip


@contextlib.contextmanager
def tf32_matmuls():
    """CUDA fp32 matmuls on TF32 tensor cores inside the block (no effect off CUDA)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def exactness(trained: dict, device: torch.device, ids: torch.Tensor) -> dict:
    """‖E⁻¹(E(x)) − x‖/‖x‖ of the machine trained by DeepSpeed: fp32, bf16 autocast, bf16 rotor
    products, and fp32 with TF32 matmuls."""
    from ..models.lm import EnigmaLM

    model = EnigmaLM(trained["model_config"])
    model.load_state_dict(trained["state_dict"], strict=False)
    model.to(device).eval()
    positions = torch.arange(ids.shape[1], device=device)
    out = {}
    plain = contextlib.nullcontext
    modes = {"fp32": ("fp32", plain), "bf16_autocast": ("fp32", lambda: autocast(device))}
    modes["bf16_rotors"] = ("bf16", plain)
    # Reported, not bounded: what the fp32 machine keeps when a script turns TF32 on for its
    # matmuls (the rotor matrices' products then round to 10 bits; the solves do not).
    modes["fp32_tf32"] = ("fp32", tf32_matmuls)
    with torch.no_grad():
        x = model.embed(ids).float()
        for mode, (matmul, context) in modes.items():
            model.machine.rotors.matmul = matmul
            with context():
                back = model.machine.inverse(model.machine(x, positions), positions)
            out[mode] = ((back.float() - x).norm() / x.norm()).item()
    out["bounds"] = BOUNDS
    out["ok"] = all(out[k] <= b for k, b in BOUNDS.items())
    return out


def check(name: str, results: dict, fn, *args) -> None:
    """Run one check; a failure is recorded (with its traceback's last lines), not fatal."""
    start = time.perf_counter()
    try:
        results[name] = fn(*args)
    except Exception as err:  # recorded in the JSON; the other checks still run
        tail = traceback.format_exc().strip().splitlines()[-6:]
        results[name] = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": tail}
    results[name]["seconds"] = round(time.perf_counter() - start, 1)
    show(name, results[name])


def show(name: str, r: dict) -> None:
    mark = "ok" if r.get("ok") else "FAILED"
    skip = {"ok", "state_dict", "model_config", "traceback", "bounds"}
    figures = ", ".join(f"{k} {_fmt(v)}" for k, v in r.items() if k not in skip)
    print(f"[{mark}] {name}: {figures}", flush=True)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} {_fmt(x)}" for k, x in v.items()) + "}"
    return str(v)


def memory(args: argparse.Namespace, device: torch.device) -> dict:
    """Peak memory and tokens/s of one EnigmaLM step by depth and mode (on the CPU the peak is
    not measured: ``enigma bench memory`` does that in fresh processes)."""
    from ..models.lm import EnigmaLM
    from .memory import depth_sweep, lm_config

    d, length, batch = args.memory_shape
    cuda = device.type == "cuda"
    ids = torch.randint(0, 21128, (batch, length), device=device)

    def point(layers: int, mode: str) -> dict:
        torch.manual_seed(0)
        model = EnigmaLM(lm_config(layers, mode, d, length)).to(device).train()

        def step(model):
            with autocast(device):
                loss = model(ids, labels=ids).loss
            loss.backward()
            model.zero_grad(set_to_none=True)

        step(model)  # warm-up: kernels chosen, allocator filled
        sync(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        step(model)
        sync(device)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
        del model
        if cuda:
            torch.cuda.empty_cache()
        return {"layers": layers, "mode": mode, "peak_mb": peak,
                "tokens_per_sec": round(batch * length / seconds, 1)}  # fmt: skip

    points, budget, deepest = depth_sweep(point, args.memory_layers, "peak_mb", args.deepest_up_to)
    out = {"shape": {"d": d, "length": length, "batch": batch}, "points": points,
           "plain_4_layers_peak_mb": budget, "deepest_reversible_within_plain_4": deepest,
           "search_limit_layers": args.deepest_up_to}  # fmt: skip
    rev = sorted((p["layers"], p["peak_mb"]) for p in points if p["mode"] == "reversible")
    if cuda and len(rev) > 1:
        out["reversible_growth"] = rev[-1][1] / rev[0][1]
        out["summary"] = (
            f"reversible peak x{out['reversible_growth']:.2f} from {rev[0][0]} to {rev[-1][0]} "
            f"layers; deepest within plain 4 layers: {deepest['layers'] if deepest else 'none'}"
        )
    out["ok"] = all(p["tokens_per_sec"] > 0 for p in points)
    return out


def run_checks(args: argparse.Namespace, device: torch.device) -> dict:
    """Every check on ``device`` (the CPU runs all but fp16 and the throughput bound: a test
    runs them so)."""
    results: dict = {}
    only = getattr(args, "only", None)
    if only == "memory":
        check("memory", results, memory, args, device)
        return results
    if only in (None, "throughput"):
        check("throughput", results, throughput, args, device)
    if only in (None, "machine"):
        check("machine_cost", results, machine_parts, args, device)
    if only is not None:
        return results
    torch.manual_seed(1)
    seq_len = args.seq_len or PRESET_SEQ_LEN.get(args.preset, 256)
    ids = torch.randint(0, 21128, (8, seq_len), device=device)
    with process_group(device):
        check("zero2_bf16", results, zero2, args, device, ids, "zero2.json", args.steps)
        if device.type == "cuda":
            check("zero2_fp16", results, zero2, args, device, ids, "zero2_fp16.json", 10)
        check("zero3_export", results, zero3_export, args, device, ids)
    trained = results["zero2_bf16"]
    if "state_dict" in trained:
        check("exactness", results, exactness, trained, device, ids)
    check("memory", results, memory, args, device)
    for r in results.values():
        r.pop("state_dict", None)
        r.pop("model_config", None)
    return results


def run(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        raise InputError(
            f"enigma bench gpu needs a CUDA GPU; torch {torch.__version__} sees none here"
        )
    device = torch.device("cuda", torch.cuda.current_device())
    name = torch.cuda.get_device_name(device)
    print(f"enigma bench gpu on {name} (torch {torch.__version__}, CUDA {torch.version.cuda})")
    start = time.perf_counter()
    results = run_checks(args, device)
    record = {"benchmark": "gpu", "gpu": name, "checks": results}
    record["wall_seconds"] = round(time.perf_counter() - start, 1)
    record["ok"] = all(r.get("ok") for r in results.values())
    meta.save(record, args.json_out, args.command_line)
    print(f"{'all checks passed' if record['ok'] else 'some checks FAILED'} in "
          f"{record['wall_seconds']} s")  # fmt: skip
    return 0 if record["ok"] else 1
