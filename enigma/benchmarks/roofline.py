"""``enigma bench roofline``: what a training step costs a GPU, counted on the CPU.

Under ``FakeTensorMode`` nothing is computed and nothing is allocated, yet every aten op of a
step (forward, the loss, backward; bf16 autocast as training runs) passes through a dispatch mode
that sees its inputs and outputs: it counts the ops an eager step launches (views, which launch
nothing, left out), the bytes they touch (every input read and output written once, an out=
argument only written: the eager step's memory traffic, which a fusing compiler cuts), their
FLOPs (torch's own formulas), and the tensors created as large as the full logits. At
``base``, B=32 and 128, L=256 and 2048, for the plain Transformer and EnigmaLM
(``coupling_hidden`` d and d/2), with their FLOP ratio: the tokens/s ratio EnigmaLM would reach
if every FLOP ran at the plain model's rate.
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import meta

SHAPES = [(32, 256), (128, 256), (8, 2048), (1, 2048)]
# Ops that launch no kernel though torch does not mark them views.
VIEWS = (torch.ops.aten.detach, torch.ops.aten._unsafe_view)
# In-place writes at an index into a tensor: their traffic is the index and the values.
INDEXED = (torch.ops.aten.scatter_add_, torch.ops.aten.index_put_, torch.ops.aten.scatter_)
INDEXED += (torch.ops.aten.gather,)  # reads the gathered elements, writes as many
# Allocations: no memory traffic of their own.
ALLOCATIONS = (torch.ops.aten.empty_like, torch.ops.aten.empty, torch.ops.aten.new_empty)


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


class StepCounter(TorchDispatchMode):
    """Ops, bytes, FLOPs and large tensors of what runs under it."""

    def __init__(self, large: int = 0):
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self.registry, self.large = flop_registry, large
        self.ops, self.bytes, self.flops, self.large_outputs = 0, 0, 0, 0
        self.by_op: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view or func.overloadpacket in VIEWS:
            return out
        # An out= variant writes its out arguments (``out``, or ``values``/``indices``...) and
        # reads nothing from them.
        written = _tensors([kwargs.get(a.name) for a in func._schema.arguments if a.is_out])
        tensors_in = [t for t in _tensors((args, kwargs)) if not any(t is w for w in written)]
        tensors_out = _tensors(out)
        if not tensors_out:  # a query (device, size, ...): no kernel
            return out
        if self.large:  # tensors created: an in-place or out= op hands back one it was given
            given = tensors_in + written
            created = [t for t in tensors_out if not any(t is g for g in given)]
            self.large_outputs += sum(t.numel() >= self.large for t in created)
        if func.overloadpacket in ALLOCATIONS:  # memory handed out: no kernel, no traffic
            return out
        self.ops += 1
        self.by_op[func.overloadpacket.__name__] += 1
        if func.overloadpacket in INDEXED:  # touches the indexed elements, not the whole tensor
            tensors_in = tensors_out = [
                t for t in tensors_in[1:] if t.numel() < tensors_in[0].numel()
            ]
        self.bytes += sum(t.numel() * t.element_size() for t in tensors_in + tensors_out)
        flop = self.registry.get(func.overloadpacket)
        if flop is not None:
            self.flops += flop(*args, **kwargs, out_val=out)
        return out


def count_step(model_fields: dict, batch: int, seq_len: int, preset: str = "base") -> dict:
    """One training step of ``EnigmaLM(EnigmaConfig.from_preset(preset, **model_fields))`` at
    ``batch`` x ``seq_len``, counted under ``FakeTensorMode``."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..models.lm import EnigmaLM
    from ..models.lm_config import EnigmaConfig

    config = EnigmaConfig.from_preset(preset, max_len=max(2048, seq_len), **model_fields)
    logits = batch * (seq_len - 1) * config.vocab_size  # at least this: a full-logits tensor
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = EnigmaLM(config).train()
        # On a GPU training skips the token-id check (a host read); so does the count.
        model.check_token_ids = lambda ids: None
        ids = torch.randint(0, config.vocab_size, (batch, seq_len))
        counter = StepCounter(large=logits)
        with counter, torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        with counter:
            loss.backward()
    return {"ops": counter.ops, "bytes": counter.bytes, "flops": counter.flops,
            "full_logits_tensors": counter.large_outputs,
            "top_ops": dict(counter.by_op.most_common(8))}  # fmt: skip


MODELS = {
    "plain": {"core": "none"},
    "enigma": {},
    "enigma_coupling_half": {"coupling_hidden": "half"},
}


def fields_for(name: str, preset: str) -> dict:
    from ..models.lm_config import preset_fields

    fields = dict(MODELS[name])
    if fields.get("coupling_hidden") == "half":
        fields["coupling_hidden"] = preset_fields(preset)["d"] // 2
    return fields


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="base")
    p.add_argument("--shapes", default=",".join(f"{b}x{s}" for b, s in SHAPES),
                   help="BATCHxSEQ, comma-separated")  # fmt: skip
    what = "also time one base step at L=2048 B=1 and L=256 B=8 (fresh processes)"
    p.add_argument("--long", action="store_true", help=what)
    p.add_argument("--json", dest="json_out", default=None)


def long_sequences() -> list[dict]:
    """One base training step (fp32, plain autograd) on 2,048 tokens either way, each in a fresh
    process: peak memory and tokens/s (``enigma bench memory``'s measurement)."""
    from .memory import measure_lm_in_fresh_process

    out = []
    for batch, length in ((8, 256), (1, 2048)):
        m = measure_lm_in_fresh_process(8, "plain", 512, batch, length)
        out.append({"batch": batch, "seq_len": length, "peak_rss_mb": m["peak_rss_mb"],
                    "tokens_per_sec": m["tokens_per_sec"], "step_s": m["step_s"]})  # fmt: skip
        print(f"L={length} B={batch}: {m['tokens_per_sec']:.0f} tokens/s, peak "
              f"{m['peak_rss_mb']:,.0f} MB", flush=True)  # fmt: skip
    return out


def run(args: argparse.Namespace) -> dict:
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    rows = []
    for batch, seq_len in shapes:
        counted = {name: count_step(fields_for(name, args.preset), batch, seq_len, args.preset)
                   for name in MODELS}  # fmt: skip
        for c in counted.values():
            c["flops_ratio"] = counted["plain"]["flops"] / c["flops"]
        rows.append({"batch": batch, "seq_len": seq_len, "models": counted})
        for name, c in counted.items():
            print(f"B={batch} L={seq_len} {name}: {c['ops']} ops, {c['bytes'] / 1e9:.1f} GB, "
                  f"{c['flops'] / 1e12:.2f} TFLOP, {c['full_logits_tensors']} full-logits "
                  f"tensors, FLOP ratio {c['flops_ratio']:.3f}", flush=True)  # fmt: skip
    result = {"benchmark": "roofline", "preset": args.preset, "precision": "bf16 autocast",
              "mode": "eager", "rows": rows}  # fmt: skip
    if args.long and args.preset == "base":
        result["long_sequences"] = long_sequences()
    meta.save(result, args.json_out, args.command_line)
    return result
