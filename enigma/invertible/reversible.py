"""A chain of invertible steps whose backward rebuilds activations instead of storing them.

A chain is a list of ``(module, reverse)`` steps. In memory-efficient mode the forward pass runs
under ``no_grad`` and keeps only the chain's output. The backward pass walks the chain from the
end: it rebuilds each step's input from its output with the inverse, runs that one step again with
autograd, and backpropagates through it alone. An additive coupling block does better (RevNet's
algorithm): the vector-Jacobian products of its two nets are taken while they run for the
rebuild, so each net runs once in backward (steps with ``rebuilds_with_vjp``: additive
:class:`~enigma.invertible.rev_block.RevBlock` and EnigmaLM's reversible Transformer layers).
Peak memory is one step's activations, whatever the depth. Gradient checkpointing cannot do
this: it must keep every segment's input.

Each step's gradients come from ``torch.autograd.grad`` inside ``backward``; the chain's
parameters are inputs of the autograd function, whose backward returns their gradients summed over
every step that uses them. Autograd then accumulates each parameter's gradient once per backward,
through the ordinary accumulation hooks that DeepSpeed ZeRO-1/2 reduce from (the involutive machine
runs each block twice; a hook firing twice is an error there). Under ZeRO-3, which partitions the
parameters themselves, the module whose call runs a chain (the machine, or EnigmaLM's reversible
stack) is a DeepSpeed leaf module (``EnigmaLM.zero3_leaves``): its parameters are gathered whole for
its forward and its backward, so they enter the function at full size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .base import InvertibleModule
from .rotor import DynamicInvertibleConv1x1Stack

Step = tuple[InvertibleModule, bool]


def invert_chain(steps: Sequence[Step]) -> list[Step]:
    """The chain that undoes ``steps``."""
    return [(module, not reverse) for module, reverse in reversed(steps)]


def run_chain(steps: Sequence[Step], x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """Apply the steps with ordinary autograd; returns ``(y, total log-det)``."""
    log_det = None
    shared: dict = {}  # what a step forms once for all its uses in the chain (rotor matrices)
    for module, reverse in steps:
        extra = {"shared": shared} if isinstance(module, InvertibleModule) else {}
        x, step_log_det = module(x, positions, reverse=reverse, with_log_det=True, **extra)
        log_det = step_log_det if log_det is None else log_det + step_log_det
    if log_det is None:
        log_det = x.new_zeros(())
    return x, log_det.expand(x.shape[:-1]).contiguous()


class _AutocastState:
    """The autocast setting of the forward pass, replayed while the backward recomputes."""

    def __init__(self, device_type: str):
        self.device_type = device_type
        self.enabled = torch.is_autocast_enabled(device_type)
        self.dtype = torch.get_autocast_dtype(device_type)

    def __call__(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)


class _ReversibleFunction(torch.autograd.Function):
    """The chain's parameters are inputs of this function, and its backward returns their
    gradients, summed over every step that uses them (the involutive machine runs each block
    twice, in F and F⁻¹). So autograd accumulates each parameter's gradient once per backward,
    as DeepSpeed ZeRO's reduction hooks require."""

    @staticmethod
    def forward(ctx, x, positions, steps, *params):
        ctx.steps, ctx.params = steps, params
        ctx.autocast = _AutocastState(x.device.type)
        ctx.set_materialize_grads(False)
        with torch.no_grad():
            y, log_det = run_chain(steps, x, positions)
        ctx.save_for_backward(y, positions)
        return y, log_det

    @staticmethod
    def backward(ctx, grad_y, grad_log_det):
        y, positions = ctx.saved_tensors
        if grad_y is None:
            grad_y = torch.zeros_like(y)
        slot = {id(p): i for i, p in enumerate(ctx.params)}
        totals: list[Tensor | None] = [None] * len(ctx.params)
        pending: dict = {}  # rotor stacks' matrices and their gathered gradients
        rotors: dict = {}
        for module, reverse in reversed(ctx.steps):
            if getattr(module, "rebuilds_with_vjp", False):
                own = [p for p in module.parameters() if id(p) in slot]
                with ctx.autocast():
                    y, grad_y, found = module.rebuild_and_backprop(y, grad_y, reverse, own)
                _accumulate(totals, slot, own, found)
                continue
            if isinstance(module, DynamicInvertibleConv1x1Stack) and module.num_layers:
                y, grad_y = module.rebuild_and_backprop(y, grad_y, reverse, positions, pending)
                if grad_log_det is not None:  # its log-det is ±sum(log_s) at every token
                    entry = pending[id(module)]
                    entry["log_det"] = (
                        entry["log_det"] + (-1 if reverse else 1) * grad_log_det.sum()
                    )
                rotors[id(module)] = module
                continue
            with torch.no_grad(), ctx.autocast():
                x = module(y, positions, reverse=not reverse)
            with torch.enable_grad(), ctx.autocast():
                x = x.detach().requires_grad_(True)
                out, log_det = module(x, positions, reverse=reverse, with_log_det=True)
                outputs, grads = [out], [grad_y]
                if grad_log_det is not None and log_det.requires_grad:
                    outputs.append(log_det)
                    grads.append(grad_log_det)
                own = [p for p in module.parameters() if id(p) in slot]
                found = torch.autograd.grad(outputs, [x, *own], grads, allow_unused=True)
            _accumulate(totals, slot, own, found[1:])
            grad_y, y = found[0], x.detach()
        for key, module in rotors.items():
            own = [p for p in module.parameters() if id(p) in slot]
            entry = pending[key]
            _accumulate(totals, slot, own, module.parameter_grads(entry, own, entry["log_det"]))
        return (grad_y, None, None, *totals)


def _accumulate(totals: list, slot: dict, params: list, grads) -> None:
    for p, g in zip(params, grads, strict=True):
        if g is not None:
            i = slot[id(p)]
            totals[i] = g if totals[i] is None else totals[i] + g


def apply_chain(
    steps: Sequence[Step], x: Tensor, positions: Tensor, memory_efficient: bool
) -> tuple[Tensor, Tensor]:
    """Run a chain, storing no per-step activations when ``memory_efficient`` and grad is on."""
    if memory_efficient and torch.is_grad_enabled() and steps:
        params = {id(p): p for m, _ in steps for p in m.parameters() if p.requires_grad}
        return _ReversibleFunction.apply(x, positions, list(steps), *params.values())
    return run_chain(steps, x, positions)


class ReversibleSequence(InvertibleModule):
    """Invertible modules applied in order, with optional memory-efficient backprop.

    ``ReversibleSequence(*[RevBlock(d) for _ in range(16)])`` backpropagates in the memory of one
    block when ``memory_efficient=True``.
    """

    def __init__(self, *modules: InvertibleModule, memory_efficient: bool = True):
        super().__init__()
        self.steps_modules = nn.ModuleList(modules)
        self.memory_efficient = memory_efficient

    def chain(self) -> list[Step]:
        return [(module, False) for module in self.steps_modules]

    def _forward(self, x: Tensor, positions: Tensor):
        return apply_chain(self.chain(), x, positions, self.memory_efficient)

    def _inverse(self, y: Tensor, positions: Tensor):
        return apply_chain(invert_chain(self.chain()), y, positions, self.memory_efficient)
