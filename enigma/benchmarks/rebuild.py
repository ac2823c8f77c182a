"""``enigma bench rebuild``: how exact the reversible backward is, by depth and precision.

For EnigmaLM with reversible layers at 2, 4, 8 and 16 layers, in float64, float32 and bf16 weights
(the streams stay fp32 with bf16 weights, as under DeepSpeed):
- reconstruction: the chain's input rebuilt from its output by the inverse steps (machine, split,
  layers), ``‖x − x'‖ / ‖x‖``, the error the backward's rebuild starts from;
- gradients: every parameter's and the embedded input's gradient with the rebuild against the same
  weights' gradient with stored activations, ``‖g − g'‖ / ‖g‖``, the largest over all of them and
  the median; and each against the float64 model's stored gradient, which says how much of the
  difference the precision makes anyway.
Weights are the model's start with N(0, 0.02) noise added (so the zero-ended couplings carry
signal), the loss is the LM loss on random tokens.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from . import meta

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bf16": torch.bfloat16}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--json", dest="json_out", default=None, help="also write the figures here")


def build(layers: int, args, dtype: torch.dtype, rebuild: bool, seed: int = 0):
    from enigma import EnigmaConfig, EnigmaLM

    torch.manual_seed(seed)
    config = EnigmaConfig(
        vocab_size=args.vocab, d=args.d, num_heads=4, num_transformer_layers=layers,
        num_rev_blocks=4, num_rotors=2, max_len=max(2048, args.length),
        reversible_layers=True, reversible_backward=rebuild,
    )  # fmt: skip
    model = EnigmaLM(config)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model.to(dtype).train()


def gradients(model, ids: torch.Tensor) -> list[torch.Tensor]:
    seen = {}
    hook = model.embed.register_forward_hook(lambda m, i, out: seen.setdefault("h", out))
    loss = model(ids, labels=ids).loss
    hook.remove()
    return [g.double() for g in torch.autograd.grad(loss, [seen["h"], *model.parameters()])]


def reconstruction(model, ids: torch.Tensor) -> float:
    from enigma.invertible.reversible import invert_chain, run_chain
    from enigma.models.rev_layers import LayerContext

    from ..models.attention import attention_bias

    config = model.config
    length = ids.shape[1]
    positions = torch.arange(length)
    bias, causal = attention_bias(config.num_heads, 0, length, config.use_alibi)
    steps = model.stack.steps(LayerContext(bias, causal))
    with torch.no_grad():
        x = model.embed(ids).to(torch.promote_types(model.embed.weight.dtype, torch.float32))
        y, _ = run_chain(steps, x, positions)
        back, _ = run_chain(invert_chain(steps), y, positions)
    return ((back - x).norm() / x.norm()).item()


def spread(grads: list[torch.Tensor], reference: list[torch.Tensor]) -> dict:
    """Largest and median of ``‖g − r‖ / ‖r‖`` over the tensors."""
    diffs = [
        ((g - r).norm() / r.norm().clamp_min(1e-300)).item()
        for g, r in zip(grads, reference, strict=True)
    ]
    return {"max": max(diffs), "median": statistics.median(diffs)}


def _pair(d: dict) -> str:
    return f"{d['max']:.1e} / {d['median']:.1e}"


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.length))
    points = []
    for layers in args.layers:
        reference = gradients(build(layers, args, torch.float64, rebuild=False), ids)
        for name, dtype in DTYPES.items():
            stored = gradients(build(layers, args, dtype, rebuild=False), ids)
            rebuilt_model = build(layers, args, dtype, rebuild=True)
            rebuilt = gradients(rebuilt_model, ids)
            point = {
                "layers": layers,
                "dtype": name,
                "reconstruction": reconstruction(rebuilt_model, ids),
                "rebuilt_vs_stored": spread(rebuilt, stored),
                "stored_vs_float64": spread(stored, reference),
                "rebuilt_vs_float64": spread(rebuilt, reference),
            }
            print(
                f"  {layers:>3} layers, {name:<8} reconstruction {point['reconstruction']:.1e}; "
                "gradient differences (max / median): rebuilt vs stored "
                f"{_pair(point['rebuilt_vs_stored'])}, stored vs float64 "
                f"{_pair(point['stored_vs_float64'])}, rebuilt vs float64 "
                f"{_pair(point['rebuilt_vs_float64'])}",
                flush=True,
            )
            points.append(point)
    result = {
        "benchmark": "rebuild",
        "shape": {
            "d": args.d,
            "batch": args.batch,
            "length": args.length,
            "vocab": args.vocab,
            "rev_blocks": 4,
            "rotors": 2,
        },  # fmt: skip
        "points": points,
    }
    return meta.save(result, args.json_out, args.command_line)
