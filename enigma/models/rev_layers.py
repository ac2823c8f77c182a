"""Reversible Transformer layers: EnigmaLM's layers as steps of the machine's reversible chain.

With ``reversible_layers=True`` the residual stream is split into two streams of width ``d``,
``(x1, x2) = (h, h)`` (:class:`StreamSplit`), and each Transformer layer couples them the RevNet
way (Reformer's reversible Transformer)::

    y1 = x1 + Attention(LN(x2))
    y2 = x2 + MLP(LN(y1))

After the last layer the streams merge as their mean, ``(y1 + y2) / 2``, which the final
LayerNorm reads. Each layer is invertible (``x2 = y2 - MLP(LN(y1))``, then
``x1 = y1 - Attention(LN(x2))``), and the split's left inverse is the mean of the two streams,
so the embedding, the machine and every layer form one chain that the reversible backward
(:mod:`enigma.invertible.reversible`) rebuilds from its output: nothing per layer is kept for
backward.

The streams run in at least fp32 (like the machine's coupling stream) and each branch runs in its
weights' precision, so bf16 weights leave the additions, and so the rebuild, fp32-exact up to
rounding. Dropout is replayed exactly in the rebuild: each branch records the random state it
started from and runs from the same state again.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..invertible.base import zero_log_det
from ..invertible.rev_block import additive_coupling, additive_rebuild_and_backprop
from ..invertible.reversible import apply_chain


@dataclass
class LayerContext:
    """What every layer of one forward pass shares: the attention bias, the KV cache, and whether
    branches must record their random state (dropout active under the reversible backward)."""

    bias: Tensor | None
    is_causal: bool
    cache: object = None
    replay_rng: bool = False


class StreamSplit(nn.Module):
    """``h -> (h, h)`` on the last dim; its left inverse is the streams' mean. Holds no weights;
    a module only so that the chain's ``(module, reverse)`` steps treat it like the others."""

    rebuilds_with_vjp = True

    def forward(self, x: Tensor, positions=None, *, reverse: bool = False, with_log_det=False):
        out = merge_streams(x) if reverse else torch.cat([x, x], dim=-1)
        return (out, zero_log_det(out)) if with_log_det else out

    def rebuild_and_backprop(self, out: Tensor, grad_out: Tensor | None, reverse: bool, params):
        if reverse:  # out = mean of the streams; its input is (out, out)
            grad_in = None if grad_out is None else torch.cat([grad_out, grad_out], -1) / 2
            return torch.cat([out, out], dim=-1), grad_in, ()
        grad_in = None if grad_out is None else sum(grad_out.chunk(2, dim=-1))
        return merge_streams(out), grad_in, ()


def merge_streams(y: Tensor) -> Tensor:
    y1, y2 = y.chunk(2, dim=-1)
    return (y1 + y2) / 2


class ReversibleStack(nn.Module):
    """The machine (optional), the split and the layers: the one module whose call runs the whole
    reversible chain. It owns their parameters (named ``stack.machine.*``, ``stack.blocks.*``),
    so DeepSpeed ZeRO-3 can treat it as one leaf: its parameters are gathered for its forward and
    its backward, which the rebuild needs (the optimizer's states and the gradients stay
    partitioned)."""

    def __init__(self, machine: nn.Module | None, blocks: nn.ModuleList, reversible_backward: bool):
        super().__init__()
        self.machine, self.split, self.blocks = machine, StreamSplit(), blocks
        self.reversible_backward = reversible_backward

    def forward(self, h: Tensor, positions: Tensor, context: LayerContext) -> Tensor:
        """``h`` in at least fp32 -> the merged streams, in ``h``'s dtype. A KV cache
        (generation) runs the chain with plain autograd."""
        memory_efficient = self.reversible_backward and context.cache is None
        y, _ = apply_chain(self.steps(context), h, positions, memory_efficient)
        return merge_streams(y)

    def draws(self) -> bool:
        """Whether a forward in training draws random numbers in the layers (dropout of any kind:
        the model's own, or a LoRA adapter's), which the rebuild must then replay."""
        return any(
            isinstance(m, nn.Dropout) and m.p > 0 and m.training for m in self.blocks.modules()
        )

    def steps(self, context: LayerContext) -> list:
        """The chain as ``(step, reverse)`` pairs: the machine's path, the split, the layers."""
        steps = self.machine.chain() if self.machine is not None else []
        steps.append((self.split, False))
        return steps + [(LayerStep(block, context), False) for block in self.blocks]


class LayerStep:
    """One Transformer layer (:class:`enigma.models.lm.TransformerBlock`) as an additive coupling
    step on the two streams, bound to one forward pass's :class:`LayerContext`."""

    rebuilds_with_vjp = True

    def __init__(self, layer: nn.Module, context: LayerContext):
        self.layer, self.context = layer, context
        self.rng: dict[str, tuple] = {}  # branch -> the random state it first ran from

    def parameters(self):
        return self.layer.parameters()

    def f(self, h: Tensor) -> Tensor:
        c, x = self.context, _to_weights(h, self.layer)
        with self._random_state("f"):
            return self.layer.attention_branch(x, c.bias, c.is_causal, c.cache).to(h.dtype)

    def g(self, h: Tensor) -> Tensor:
        with self._random_state("g"):
            return self.layer.mlp_branch(_to_weights(h, self.layer)).to(h.dtype)

    def __call__(self, x: Tensor, positions=None, *, reverse: bool = False, with_log_det=False):
        out = additive_coupling(self.f, self.g, x, reverse)
        return (out, zero_log_det(out)) if with_log_det else out

    def rebuild_and_backprop(self, out, grad_out, reverse: bool, params):
        return additive_rebuild_and_backprop(self.f, self.g, out, grad_out, reverse, params)

    def _random_state(self, branch: str):
        if not self.context.replay_rng:
            return nullcontext()
        if branch not in self.rng:
            self.rng[branch] = _capture_rng()
            return nullcontext()
        return _replay_rng(self.rng[branch])


def _to_weights(h: Tensor, layer: nn.Module) -> Tensor:
    return h.to(layer.ln_attn.weight.dtype)


def _capture_rng() -> tuple:
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        device = torch.cuda.current_device()
        cuda = (device, torch.cuda.get_rng_state(device))
    return torch.get_rng_state(), cuda


@contextmanager
def _replay_rng(state: tuple):
    cpu, cuda = state
    with torch.random.fork_rng(devices=[cuda[0]] if cuda else []):
        torch.set_rng_state(cpu)
        if cuda:
            torch.cuda.set_rng_state(cuda[1], cuda[0])
        yield
